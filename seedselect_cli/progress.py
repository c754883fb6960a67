"""What a person watching a long run sees: bars for classes, images and iterations, a line per class,
and a table at the end.

The class and image bars show rates and time left (tqdm); the iteration bar of the batch being
optimised comes and goes. Log lines (one per finished class) are routed above the bars.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from seedselect_cli.errors import count_of
from seedselect_cli.limits import SHOWN_CLASSES

log = logging.getLogger(__name__)


LOG_EVERY = 30.0  # seconds between progress lines when the output is a file


class RunProgress:
    """The bars of one run: `classes` (position 0) and `images` (position 1), in a terminal. Written to a
    file or a cluster job's log instead, there are no bars (their cursor codes are debris there) but a
    line every 30 s: classes and images done, seconds per image, time left."""

    def __init__(self, n_classes: int, n_images: int, enabled: bool):
        self.enabled = enabled
        bars = enabled and sys.stderr.isatty()
        self.lines = enabled and not bars
        self.classes = tqdm(total=n_classes, desc="classes", unit="class", position=0, disable=not bars,
                            dynamic_ncols=True)
        self.images = tqdm(total=n_images, desc="images", unit="img", position=1, disable=not bars,
                           dynamic_ncols=True)
        self.n_classes, self.n_images = n_classes, n_images
        self.classes_done = self.images_made = 0
        self.begin = self.last_line = time.monotonic()

    def iterations(self, total: int, what: str) -> tqdm:
        """A transient bar for the iterations of one batch (or of a bootstrap seed z_T^G), in a terminal."""
        return tqdm(total=total, desc=what, unit="it", position=2, leave=False, dynamic_ncols=True,
                    disable=self.images.disable)

    def start_class(self, name: str) -> None:
        """The class's name beside the classes bar; the images bar's loss, the last class's, is cleared until this
        class's first images are done."""
        self.classes.set_postfix_str(name[:40], refresh=False)
        self.images.set_postfix_str("", refresh=False)

    def images_done(self, count: int, loss: float) -> None:
        self.images.update(count)
        self.images.set_postfix(loss=f"{loss:.4f}", refresh=False)
        self.images_made += count
        now = time.monotonic()
        if self.lines and now - self.last_line >= LOG_EVERY:
            self.last_line = now
            per_image = (now - self.begin) / self.images_made
            left = per_image * (self.n_images - self.images_made)
            log.info("progress: %d/%d classes, %s of %d made by this run, %.2f s/image, about %s left",
                     self.classes_done, self.n_classes, count_of(self.images_made, "image"), self.n_images,
                     per_image, _duration(left))

    def class_done(self, name: str, entries: list[dict], already: int, wanted: int, skipped: bool = False) -> None:
        """One log line: images made and kept, time per image, loss before and after."""
        self.classes.update(1)
        self.classes_done += 1
        if skipped:
            return
        if not entries:
            if already == wanted:
                log.info("%s: all %s already there", name, count_of(wanted, "image"))
            return
        first = sum(e["loss_history"][0] for e in entries) / len(entries)
        best = sum(e["loss"] for e in entries) / len(entries)
        seconds = sum(e["seconds"] for e in entries) / len(entries)
        unrefined, drawn = never_improved(entries), kept_drawn(entries)
        log.info("%s: %d/%d images (%d new), %.2f s/image, loss %.4f -> %.4f%s%s", name, already + len(entries),
                 wanted, len(entries), seconds, first, best,
                 f"; kept as drawn (bootstrap.keep_drawn): {drawn}" if drawn else "",
                 f"; unrefined (loss never below the start's): {unrefined}" if unrefined else "")

    def close(self, failed: bool = False) -> None:
        for bar in (self.images, self.classes):
            if failed:  # an error line follows: no bar left half-drawn above it
                bar.leave = False
            bar.close()


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@contextlib.contextmanager
def run_progress(n_classes: int, n_images: int, enabled: bool) -> Iterator[RunProgress]:
    """Bars for a run, with logging routed above them while they are shown."""
    progress = RunProgress(n_classes, n_images, enabled)
    failed = True
    try:
        with logging_redirect_tqdm(loggers=[logging.root]) if enabled else contextlib.nullcontext():
            yield progress
        failed = False
    finally:
        progress.close(failed)


def never_improved(entries: list[dict]) -> int:
    """How many of these manifest entries' loss curves never got below their start: those images are their start,
    unrefined (AdamW's first step at the authors' lr often throws a seed out of its basin; RESULTS.md). A curve of
    one loss took no step, so its image is its start on purpose and is not counted: kept as drawn
    (`bootstrap.keep_drawn`), or a run of one iteration (`optim.iterations=1`, selection alone)."""
    return sum(len(e["loss_history"]) > 1 and min(e["loss_history"]) >= e["loss_history"][0] for e in entries)


def kept_drawn(entries: list[dict]) -> int:
    """How many of these manifest entries are their start kept as drawn (`bootstrap.keep_drawn`)."""
    return sum(bool(e.get("drawn")) for e in entries)


NEXT = "next, the metrics and contact sheets:"  # before the evaluate command a finished run prints


def summary_cells(rows: list[dict], drawn: bool = False) -> list[str]:
    """A summary row's figures for these manifest entries: count, mean first and best loss, (with `drawn`) how many
    were kept as drawn, unrefined, s / image."""
    first = sum(r["loss_history"][0] for r in rows) / len(rows)
    best = sum(r["loss"] for r in rows) / len(rows)
    seconds = sum(r["seconds"] for r in rows) / len(rows)
    kept = [str(kept_drawn(rows))] if drawn else []
    return [str(len(rows)), f"{first:.4f}", f"{best:.4f}", *kept, str(never_improved(rows)), f"{seconds:.2f}"]


def print_summary(entries: list[dict], run_dir: Path, next_command: str | None = None) -> None:
    """A table of the new images per class: count, mean loss before and after, how many never got below their
    start's loss, seconds per image, the first `SHOWN_CLASSES` classes one by one and, for more than one, all of them
    together; below it, `next_command` (what to run next), if given."""
    table = Table()
    drawn = any("drawn" in e for e in entries)  # bootstrap.keep_drawn: how many were kept as drawn
    columns = ("class", "images", "first loss", "best loss", *(["kept as drawn"] if drawn else []), "unrefined",
               "s / image")
    for column in columns:
        table.add_column(column, justify="left" if column == "class" else "right")
    by_class: dict[str, list[dict]] = {}
    for entry in entries:
        by_class.setdefault(entry["class"], []).append(entry)
    for name, rows in list(by_class.items())[:SHOWN_CLASSES]:
        table.add_row(name, *summary_cells(rows, drawn))
    if len(by_class) > SHOWN_CLASSES:
        table.add_row(f"... {count_of(len(by_class) - SHOWN_CLASSES, 'more class', 'more classes')}",
                      str(sum(len(rows) for rows in list(by_class.values())[SHOWN_CLASSES:])),
                      *[""] * (len(columns) - 2))
    if len(by_class) > 1:
        table.add_section()
        table.add_row(f"all {len(by_class)} classes", *summary_cells(entries, drawn))
    console = Console(width=None if sys.stdout.isatty() else 160)  # a log or pipe: long class names unwrapped
    # the run directory on a line of its own, never wrapped (as a table's title it was broken wherever the table's
    # width fell, a sweep job's folder in the middle of a key)
    console.print(f"seedselect: {count_of(len(entries), 'new image')} in {run_dir}", markup=False, highlight=False,
                  soft_wrap=True)
    console.print(table)
    if next_command:
        console.print(f"{NEXT} {next_command}", markup=False, highlight=False, soft_wrap=True)
