"""The one exception type that reaches the user as a single clear line."""


class SaliError(Exception):
    """A problem with the user's input or environment, shown as one line (no traceback)."""
