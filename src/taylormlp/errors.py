"""The one exception type the CLI turns into a clear message (exit code 2)."""


class TaylorMLPError(Exception):
    """A problem with the user's input or files; the message names it and says how to fix it."""
