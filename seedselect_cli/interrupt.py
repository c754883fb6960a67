"""Stopping cleanly: Ctrl-C or SIGTERM (how clusters preempt a job, with 30 to 60 s before SIGKILL).

From the moment the command starts, a signal is caught. While nothing can be kept (parsing, model
loading) it stops the command at once; around work that can stop between steps (the references'
encodings and inversions, the optimisation of a batch or of bootstrap's z_T^G) it only asks, and the
work stops after the current step: images already written stay, the batch at work is dropped and
redone by the next run. A second signal stops at once. Either way the command ends with one line and
exit code 128 + the signal's number.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

from seedselect_cli.errors import Interrupted

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopNow(BaseException):
    """Raised by the signal handler where no step can finish first. A `BaseException`, like
    `KeyboardInterrupt`, so that no library's `except Exception` turns it into another error."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class GracefulStop:
    """Context manager: while inside, SIGINT and SIGTERM raise `StopNow`, or, inside `steps()`, only
    set `signum` for the work to see between its steps."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.stopped_now = False  # the handler raised StopNow (not only asked for a stop between steps)
        self._between_steps = 0
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, _frame) -> None:
        if self.signum is not None or not self._between_steps:  # asked twice, or nothing to finish: stop now
            self.signum = signum
            self.stopped_now = True
            raise StopNow(signum)
        self.signum = signum
        log.warning("%s: stopping after the current step; finished images are kept (again to stop now)",
                    signal.Signals(signum).name)

    @contextlib.contextmanager
    def steps(self) -> Iterator[GracefulStop]:
        """Inside, a signal waits for the current step to end (the work checks `requested` or `check`)."""
        if self.requested:
            raise StopNow(self.signum)
        self._between_steps += 1
        try:
            yield self
        finally:
            self._between_steps -= 1

    def check(self, what: str) -> None:
        """Raise `Interrupted` if a stop was asked for; `what` says what was under way."""
        if self.signum is not None:
            raise Interrupted(self.signum, f"stopped by {signal.Signals(self.signum).name} during {what}")

    def __enter__(self) -> GracefulStop:  # noqa: PYI034 (typing.Self needs Python 3.11)
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


_current: GracefulStop | None = None


@contextlib.contextmanager
def catching_signals() -> Iterator[GracefulStop]:
    """Install the command's one `GracefulStop` (nested calls share it)."""
    global _current
    if _current is not None:
        yield _current
        return
    with GracefulStop() as stop:
        _current = stop
        try:
            yield stop
        finally:
            _current = None


def raise_the_stop_again() -> None:
    """Raise the command's `StopNow` again where its handler raised one. The handler runs wherever the main thread
    is, also inside a library's native code, which may make an error of its own of it: safetensors, reading a seed file
    at Ctrl-C, raised `ValueError: could not determine the shape of object type 'torch.storage.UntypedStorage'`, and
    the user was told the seed file was damaged. Called where an error ends the command."""
    if _current is not None and _current.stopped_now:
        raise StopNow(_current.signum)


def current_stop() -> GracefulStop:
    """The command's `GracefulStop`, or a fresh one when none is installed (a plain `run(cfg)` from code)."""
    return _current if _current is not None else GracefulStop()
