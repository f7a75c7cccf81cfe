"""convlog's benchmarks: the log service's appends and reads (``appends``),
convlog's cost per agent turn (``turns``), ``ConvlogSession`` next to the
Agents SDK's ``SQLiteSession`` (``sdk``); ``measure`` and ``stack`` are what
they share, ``cli`` the ``convlog bench`` command that dispatches to them.
Every figure is reported next to a baseline measured in the same run."""
