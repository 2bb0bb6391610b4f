"""The one kind of error a user is shown as a single line."""


class EtlError(Exception):
    """A problem the user can fix: reported as one line, never as a traceback."""


def one_line(exc: BaseException) -> str:
    """Any exception as one line: its type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
