"""The one exception type users see.

Every error raised for bad input says what is wrong and how to fix it. It derives from ValueError so that
Slicer's ``tryWithErrorDisplay`` and plain Python callers treat it as a user error, and the command line
turns it into one line on stderr and exit code 2 without a traceback.
"""


class FMOneShotError(ValueError):
    """Bad input or a missing resource: the message names the problem and the fix."""

    def __init__(self, problem: str, fix: str = ""):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if not fix else f"{problem} Fix: {fix}")
