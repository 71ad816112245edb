"""The one exception type the CLI turns into a clear message (exit code 2)."""


class TaylorMLPError(Exception):
    """A problem with the user's input or files; the message names it and says how to fix it."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message for a one-line error (its type name when the message is empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
