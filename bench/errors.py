"""The one exception type the CLI turns into a one-line message and a non-zero exit.

Anything a user can cause (a wrong file, a missing asset offline, a bad option, NaNs in a run) raises
a subclass of ``UserError`` with a message that says what is wrong and what to do. Everything else is
a bug in dit-bench and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input or environment, reported as one line."""

    exit_code = 2
