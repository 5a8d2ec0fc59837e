"""One exception type for every user-facing failure: the CLI prints its message on one line and exits 1."""


class QuantkitError(Exception):
    """A problem with the user's input or environment, reported as a one-line error (exit code 1)."""
