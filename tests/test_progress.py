"""The end-of-run table: one row per class, and for a sweep over many classes the first of them and the total."""

from __future__ import annotations

import random
from pathlib import Path

from seedselect_cli.progress import SUMMARY_ROWS, print_summary


def entries_of(n_classes: int, per_class: int, rng: random.Random) -> list[dict]:
    """Manifest entries with fresh losses; every third image never gets below its start (unrefined)."""
    entries = []
    for c in range(n_classes):
        for i in range(per_class):
            start = rng.uniform(0.5, 1.0)
            history = [start, start * rng.uniform(0.3, 0.9)] if (c + i) % 3 else [start, start * 1.2]
            entries.append({"class": f"class {c:03d}", "loss_history": history, "loss": min(history),
                            "seconds": rng.uniform(0.1, 2.0)})
    return entries


def test_a_sweep_over_many_classes_shows_the_first_and_the_total(capsys):
    entries = entries_of(SUMMARY_ROWS + 7, 3, random.Random(41))
    print_summary(entries, Path("RUN"), "seedselect evaluate run_dir=RUN")
    out = capsys.readouterr().out
    shown = [f"class {c:03d}" for c in range(SUMMARY_ROWS + 7) if f"class {c:03d}" in out]
    assert shown == [f"class {c:03d}" for c in range(SUMMARY_ROWS)]
    assert "... 7 more classes" in out and f"all {SUMMARY_ROWS + 7} classes" in out
    total = next(line for line in out.splitlines() if "all " in line).split("│")
    unrefined = sum(min(e["loss_history"]) >= e["loss_history"][0] for e in entries)
    first = sum(e["loss_history"][0] for e in entries) / len(entries)
    assert [cell.strip() for cell in total[2:5]] == [str(len(entries)), f"{first:.4f}",
                                                     f"{sum(e['loss'] for e in entries) / len(entries):.4f}"]
    assert total[5].strip() == str(unrefined) and 0 < unrefined < len(entries)
    assert out.rstrip().endswith("seedselect evaluate run_dir=RUN")


def test_one_class_has_no_total_row(capsys):
    print_summary(entries_of(1, 4, random.Random(42)), Path("RUN"))
    out = capsys.readouterr().out
    assert "class 000" in out and "all " not in out and "more class" not in out
