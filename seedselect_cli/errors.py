"""The one exception type for problems with the user's input or environment.

Anything raised as `UserError` ends the command with exit code 2 and a single `error:` line on
stderr (see `cli.py`); every other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix: a bad value, a missing folder, weights not available offline."""
