"""The one exception type slimlm raises for bad input; the CLI prints it as a single line."""


class SlimlmError(ValueError):
    """A user-facing error: bad arguments, unreadable model or data, non-finite activations."""
