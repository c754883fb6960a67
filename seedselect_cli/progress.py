"""What a person watching a long run sees: bars for classes, images and iterations, a line per class,
and a table at the end.

The class and image bars show rates and time left (tqdm); the iteration bar of the batch being
optimised comes and goes. Log lines (one per finished class) are routed above the bars.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger(__name__)


class RunProgress:
    """The bars of one run: `classes` (position 0) and `images` (position 1). Written to a file or a
    cluster job's log rather than a terminal, they refresh every 30 s instead of 10 times a second."""

    def __init__(self, n_classes: int, n_images: int, enabled: bool):
        self.enabled = enabled
        self.interval = 0.1 if sys.stderr.isatty() else 30.0
        self.classes = tqdm(total=n_classes, desc="classes", unit="class", position=0, disable=not enabled,
                            dynamic_ncols=True, mininterval=self.interval)
        self.images = tqdm(total=n_images, desc="images", unit="img", position=1, disable=not enabled,
                           dynamic_ncols=True, mininterval=self.interval)

    def iterations(self, total: int, what: str) -> tqdm:
        """A transient bar for the iterations of one batch (or of a bootstrap seed z_T^G)."""
        return tqdm(total=total, desc=what, unit="it", position=2, leave=False, disable=not self.enabled,
                    dynamic_ncols=True, mininterval=self.interval)

    def start_class(self, name: str) -> None:
        self.classes.set_postfix_str(name[:40])

    def images_done(self, count: int, loss: float) -> None:
        self.images.update(count)
        self.images.set_postfix(loss=f"{loss:.4f}")

    def class_done(self, name: str, entries: list[dict], already: int, wanted: int, skipped: bool = False) -> None:
        """One log line: images made and kept, time per image, loss before and after."""
        self.classes.update(1)
        if skipped:
            return
        if not entries:
            if already == wanted:
                log.info("%s: all %d images already there", name, wanted)
            return
        first = sum(e["loss_history"][0] for e in entries) / len(entries)
        best = sum(e["loss"] for e in entries) / len(entries)
        seconds = sum(e["seconds"] for e in entries) / len(entries)
        log.info("%s: %d/%d images (%d new), %.2f s/image, loss %.4f -> %.4f", name, already + len(entries),
                 wanted, len(entries), seconds, first, best)

    def close(self) -> None:
        self.images.close()
        self.classes.close()


@contextlib.contextmanager
def run_progress(n_classes: int, n_images: int, enabled: bool) -> Iterator[RunProgress]:
    """Bars for a run, with logging routed above them while they are shown."""
    progress = RunProgress(n_classes, n_images, enabled)
    try:
        with logging_redirect_tqdm(loggers=[logging.root]) if enabled else contextlib.nullcontext():
            yield progress
    finally:
        progress.close()


def print_summary(entries: list[dict], run_dir: Path) -> None:
    """A table of the new images per class: count, mean loss before and after, seconds per image."""
    table = Table(title=f"seedselect: {len(entries)} new images in {run_dir}")
    for column in ("class", "images", "first loss", "best loss", "s / image"):
        table.add_column(column, justify="left" if column == "class" else "right")
    by_class: dict[str, list[dict]] = {}
    for entry in entries:
        by_class.setdefault(entry["class"], []).append(entry)
    for name, rows in by_class.items():
        first = sum(r["loss_history"][0] for r in rows) / len(rows)
        best = sum(r["loss"] for r in rows) / len(rows)
        seconds = sum(r["seconds"] for r in rows) / len(rows)
        table.add_row(name, str(len(rows)), f"{first:.4f}", f"{best:.4f}", f"{seconds:.2f}")
    Console().print(table)
