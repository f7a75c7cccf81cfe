"""The web audit console (`convlog web`)."""
