"""The one base class of every error loopgolf raises about its input.

The CLI prints these as one line and exits non-zero; anything else is a bug and
keeps its traceback.
"""


class LoopgolfError(ValueError):
    """Bad input: a value, a file or a directory that is not what was expected."""
