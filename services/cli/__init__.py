"""The ``convlog`` command-line interface."""
