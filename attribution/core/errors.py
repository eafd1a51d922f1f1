"""The one exception type users see: a clear, one-line message about their input."""


class HeadpruneError(ValueError):
    """Bad input or an unsupported setting; the CLI prints its message on one line and exits 2."""
