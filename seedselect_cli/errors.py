"""The exceptions that end a command on purpose, and how the command line reports them.

Anything raised as `UserError` ends the command with exit code 2 and a single `error:` line on
stderr (see `cli.py`); `Interrupted` (Ctrl-C, SIGTERM) ends it with 128 + the signal's number after
the current step. Every other exception is a bug and keeps its traceback.
"""


# How a message asks to run the command again; the command line adds the run directory to it where the user left
# that to Hydra's default (a new folder at each start: the same command alone would start over, not resume)
SAME_COMMAND = "the same command"


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (its type's name if it has none): for `error:` lines."""
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def count_of(n: int, noun: str, plural: str | None = None) -> str:
    """"1 image", "2 images"; "1 class", "2 classes" with `plural`."""
    return f"{n} {noun}" if n == 1 else f"{n} {plural or noun + 's'}"


class UserError(Exception):
    """A problem the user can fix: a bad value, a missing folder, weights not available offline."""


class Interrupted(Exception):
    """The run was asked to stop (SIGINT or SIGTERM) and did, keeping everything finished."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
