"""The one base class of every error loopgolf raises about its input.

The CLI prints these as one line and exits non-zero; anything else is a bug and
keeps its traceback.
"""


class LoopgolfError(ValueError):
    """Bad input: a value, a file or a directory that is not what was expected."""


def first_line(exc: BaseException) -> str:
    """An exception's first line of text, or its type's name when it says nothing."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
