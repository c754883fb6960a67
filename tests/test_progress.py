"""The tables a command prints at its end: one row per class, and for many classes the first of them and the total."""

from __future__ import annotations

import random
from pathlib import Path

from seedselect_cli.limits import SHOWN_CLASSES
from seedselect_cli.progress import never_improved, print_summary


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
    entries = entries_of(SHOWN_CLASSES + 7, 3, random.Random(41))
    print_summary(entries, Path("RUN"), "seedselect evaluate run_dir=RUN")
    out = capsys.readouterr().out
    shown = [f"class {c:03d}" for c in range(SHOWN_CLASSES + 7) if f"class {c:03d}" in out]
    assert shown == [f"class {c:03d}" for c in range(SHOWN_CLASSES)]
    assert "... 7 more classes" in out and f"all {SHOWN_CLASSES + 7} classes" in out
    total = next(line for line in out.splitlines() if "all " in line).split("│")
    unrefined = sum(min(e["loss_history"]) >= e["loss_history"][0] for e in entries)
    first = sum(e["loss_history"][0] for e in entries) / len(entries)
    assert [cell.strip() for cell in total[2:5]] == [str(len(entries)), f"{first:.4f}",
                                                     f"{sum(e['loss'] for e in entries) / len(entries):.4f}"]
    assert total[5].strip() == str(unrefined) and 0 < unrefined < len(entries)
    assert out.rstrip().endswith("seedselect evaluate run_dir=RUN")


def test_images_kept_as_drawn_have_a_column_and_are_not_counted_unrefined(capsys):
    """bootstrap.keep_drawn: an image kept as drawn is its start on purpose (one loss), not an unrefined seed."""
    entries = entries_of(SHOWN_CLASSES + 2, 4, random.Random(44))
    for i, entry in enumerate(entries):
        entry["drawn"] = i % 2 == 0
        if entry["drawn"]:
            entry["loss_history"] = entry["loss_history"][:1]
            entry["loss"] = entry["loss_history"][0]
    print_summary(entries, Path("RUN"))
    out = capsys.readouterr().out
    assert "kept as drawn" in out and "... 2 more classes" in out
    total = [cell.strip() for cell in next(line for line in out.splitlines() if "all " in line).split("│")]
    unrefined = sum(min(e["loss_history"]) >= e["loss_history"][0] for e in entries if not e["drawn"])
    assert total[5:7] == [str(len(entries) // 2), str(unrefined)] and 0 < unrefined < len(entries) // 2
    print_summary(entries_of(2, 3, random.Random(45)), Path("RUN"))
    assert "kept as drawn" not in capsys.readouterr().out  # a run without the option shows no such column


def test_a_run_of_one_iteration_took_no_step_and_is_not_counted_unrefined(capsys):
    """optim.iterations=1 (selection alone): each curve is its start's loss alone; no step was taken, so none of
    its images is an unrefined seed (the table said all of them were, and the sheets marked every image)."""
    entries = entries_of(3, 4, random.Random(46))
    for entry in entries:
        entry["loss_history"] = entry["loss_history"][:1]
        entry["loss"], entry["iterations"] = entry["loss_history"][0], 1
    assert never_improved(entries) == 0
    print_summary(entries, Path("RUN"))
    total = [cell.strip() for cell in next(line for line in capsys.readouterr().out.splitlines()
                                           if "all " in line).split("│")]
    assert total[5] == "0"
    entries[0]["loss_history"] = [entries[0]["loss"], entries[0]["loss"] + 0.1]  # a step, and no gain: counted
    assert never_improved(entries) == 1


def test_one_class_has_no_total_row(capsys):
    print_summary(entries_of(1, 4, random.Random(42)), Path("RUN"))
    out = capsys.readouterr().out
    assert "class 000" in out and "all " not in out and "more class" not in out


def test_the_run_directory_is_printed_whole_on_one_line(capsys):
    """A sweep job's folder is long; as the table's title it was broken at the table's width, mid-key, and a path
    copied from it did not exist."""
    run_dir = Path("/scratch/me/multirun/cub_tail/2026-12-06_14-06-17/loss.lam-0.5+optim.iterations-30+sampler.steps-3")
    print_summary(entries_of(1, 2, random.Random(46)), run_dir)
    assert f"seedselect: 2 new images in {run_dir}\n" in capsys.readouterr().out


def test_evaluate_of_many_classes_prints_the_first_and_overall(capsys):
    """`seedselect evaluate`'s tables, as the end-of-run one: the first classes, a count of the rest, overall."""
    from seedselect_cli.report import print_table

    rng = random.Random(43)
    n = SHOWN_CLASSES + 4

    def cells() -> dict:
        return {m: {"n_images": 3, "top1": rng.random(), "precision": rng.random()} for m in ("seedselect", "plain")}

    metrics = {"classes": {f"class {c:03d}": cells() for c in range(n)}, "overall": cells(), "n_images": 3 * n,
               "run_dir": "RUN", "made_by": "optimize", "notes": []}
    print_table(metrics)
    out = capsys.readouterr().out
    assert [c for c in range(n) if f"class {c:03d}" in out] == list(range(SHOWN_CLASSES))
    assert out.count("... 4 more classes") == 2 and out.count("overall") == 2  # both tables
    assert f"{metrics['overall']['plain']['precision']:.3f}" in out
    assert "every class: RUN/report/index.html" in out


def test_evaluate_names_the_report_folder_whole_on_one_line(capsys):
    """As the end-of-run table: a sweep job's long folder, in the tables' titles, was broken at their width."""
    from seedselect_cli.report import print_table

    run_dir = "/scratch/me/multirun/cub_tail/2026-12-06_14-06-17/loss.lam-0.5+optim.iterations-30+sampler.steps-3"
    cells = {m: {"n_images": 2, "top1": 0.5, "precision": 0.25} for m in ("seedselect", "plain")}
    per_image = [{"set": "seedselect", "copy": False, "unrefined": False, "judge_label": None, "class": "a"}] * 2
    print_table({"classes": {"a": cells}, "overall": cells, "n_images": 2, "run_dir": run_dir, "made_by": "optimize",
                 "notes": [f"a note naming {run_dir}/report/sheets, longer than any table here is wide"]}, per_image)
    lines = capsys.readouterr().out.splitlines()
    assert f"seedselect evaluate: 2 images; report in {run_dir}/report" in lines
    assert f"note: a note naming {run_dir}/report/sheets, longer than any table here is wide" in lines
    assert any(line.endswith(f"every image's measures in {run_dir}/report/images.jsonl") for line in lines)


def test_the_images_bar_shows_no_loss_of_the_last_class_once_the_next_begins():
    """The images bar's `loss=` is of the class named beside the classes bar: cleared when a class begins."""
    from seedselect_cli.progress import RunProgress

    progress = RunProgress(2, 4, enabled=False)
    progress.start_class("sea gull")
    progress.images_done(2, 0.4321)
    assert progress.images.postfix == "loss=0.4321"
    progress.start_class("marsh finch")
    assert progress.images.postfix == "" and progress.classes.postfix == "marsh finch"
    progress.images_done(2, 0.1234)
    assert progress.images.postfix == "loss=0.1234"
    progress.close()
