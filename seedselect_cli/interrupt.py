"""Stopping cleanly: Ctrl-C or SIGTERM (how clusters preempt a job) ask the run to stop after the
current optimisation step; images already written stay, the batch at work is dropped and redone
by the next run. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulStop:
    """Context manager: while inside, SIGINT and SIGTERM only set `signum`."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, _frame) -> None:
        if self.signum is not None:  # asked twice: stop now
            signal.signal(signum, signal.SIG_DFL)
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s: stopping after the current step; finished images are kept (again to stop now)",
                    signal.Signals(signum).name)

    def __enter__(self) -> GracefulStop:  # noqa: PYI034 (typing.Self needs Python 3.11)
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
