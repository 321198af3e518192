"""The one exception type users see, and the one warning type.

Every error raised for bad input says what is wrong and how to fix it. It derives from ValueError so that
Slicer's ``tryWithErrorDisplay`` and plain Python callers treat it as a user error, and the command line
turns it into one line on stderr and exit code 2 without a traceback.

Input that is used, but not exactly as given (a mask resampled onto its image's grid, non-finite voxels
treated as missing), is reported with :func:`warn`: a :class:`FMOneShotWarning` through Python's
``warnings``, which the command line prints as one ``fmoneshot: warning:`` line and Slicer shows in its
Python console.
"""

import warnings


class FMOneShotError(ValueError):
    """Bad input or a missing resource: the message names the problem and the fix."""

    def __init__(self, problem: str, fix: str = ""):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if not fix else f"{problem} Fix: {fix}")


class FMOneShotWarning(UserWarning):
    """Input was used, but not exactly as given: the message says what was done."""


def warn(message: str) -> None:
    """Report ``message`` as an :class:`FMOneShotWarning`, attributed to the caller's caller."""
    warnings.warn(message, FMOneShotWarning, stacklevel=3)
