"""The one kind of error a user is shown as a single line."""
from typing import Optional

PYTHON_TRACEBACK = "Traceback (most recent call last):"


class EtlError(Exception):
    """A problem the user can fix: reported as one line, never as a traceback."""


def one_line(exc: BaseException) -> str:
    """Any exception as one line: its type and the first line of its message; for a failure in a Spark
    task's Python worker, the exception the worker raised, rather than the Py4J call that carried it."""
    text = str(exc).strip()
    raised = python_worker_error(text)
    if raised:
        return f"{raised} (in a Spark task's Python worker)"
    lines = text.splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def python_worker_error(text: str) -> Optional[str]:
    """The line of the Python traceback in text that names the exception it ends with (ModuleNotFoundError:
    No module named 'boto3'), or None. Spark carries a worker's traceback inside the Java exception's message
    (a PythonException's), followed by the Java stack ("\\tat ..." lines)."""
    start = text.find(PYTHON_TRACEBACK)
    if start < 0:
        return None
    raised, in_frames = None, False
    for line in text[start:].splitlines()[1:]:
        if line.startswith("\tat "):
            break
        if line.startswith(" "):  # a frame, its source line or a caret line
            in_frames = True
        elif in_frames and line.strip():  # the first line after the frames names the exception
            raised, in_frames = line.strip(), False
    return raised
