"""`seedselect evaluate` on a sweep's folder (`-m loss.lam=0.5,0.9`: one run directory per swept value): each run's
report as `evaluate` writes it for the run alone, then one table of the runs' overall figures side by side, and
SWEEP/comparison.json."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from rich.table import Table

from seedselect_cli.errors import UserError, first_line
from seedselect_cli.evaluate import run_evaluate
from seedselect_cli.files.atomic import atomic_write
from seedselect_cli.report import row_names, terminal
from seedselect_cli.tool_config import EvaluateConfig

log = logging.getLogger(__name__)
COMPARISON = "comparison.json"
# the overall figures set side by side, in this order, where any run has them
COMPARED = ("top1", "judge_top1", "precision", "recall", "diversity_ratio", "copies")
ITEM_SEP = "+"  # between a run directory's overrides in its name (configs/_hydra.yaml: override_dirname)


def run_labels(names: list[str]) -> dict[str, str]:
    """Each run directory's name without the overrides every run shares (`loss.lam-0.5+optim.iterations-2` ->
    `loss.lam-0.5` where every run has `optim.iterations-2`): what the sweep varied."""
    items = [name.split(ITEM_SEP) for name in names]
    shared = set.intersection(*map(set, items)) if len(items) > 1 else set()
    return {name: ITEM_SEP.join(i for i in parts if i not in shared) or name for name, parts in zip(names, items)}


def evaluate_sweep(cfg: EvaluateConfig, runs: list[Path]) -> dict:
    """`run_evaluate` on each of `runs` (the run directories of the sweep's folder `cfg.run_dir`); a run that cannot
    be evaluated (a job that failed before its first image) is skipped with a warning naming why. Writes and returns
    SWEEP/comparison.json's content."""
    folder = Path(cfg.run_dir).expanduser()
    results, skipped = {}, {}
    for number, run in enumerate(runs, 1):
        log.info("run %d of %d: %s", number, len(runs), run.name)
        try:
            results[run.name] = run_evaluate(dataclasses.replace(cfg, run_dir=str(run)), tables=False)
        except UserError as exc:
            skipped[run.name] = first_line(exc)
            log.warning("skipping %s: %s", run.name, skipped[run.name])
    if not results:
        name, why = next(iter(skipped.items()))
        raise UserError(f"run_dir={folder}: none of its {len(runs)} runs can be evaluated ({name}: {why})")
    labels = run_labels(list(results))
    comparison = {
        "sweep_dir": str(folder),
        "runs": {name: {"label": labels[name], "run_dir": m["run_dir"], "n_images": m["n_images"],
                        "made_by": m["made_by"], "overall": m["overall"], "notes": m["notes"]}
                 for name, m in results.items()},
        "skipped": skipped,
    }
    atomic_write(folder / COMPARISON,
                 lambda tmp: tmp.write_text(json.dumps(comparison, indent=2, ensure_ascii=False)))
    print_comparison(comparison)
    return comparison


def print_comparison(comparison: dict) -> None:
    """One table, a row per run and kind of image (SeedSelect, plain Stable Diffusion from the same seeds), its
    overall figures; then the runs' notes, each once, and the runs skipped."""
    runs = comparison["runs"]
    columns = [k for k in COMPARED if any(r["overall"][s].get(k) is not None for r in runs.values()
                                           for s in r["overall"])]
    table = Table(title=f"the sweep's {len(runs)} runs, overall")
    for column in ("run", "images", "n", *columns):
        table.add_column(column, justify="left" if column in ("run", "images") else "right")
    for r, run in enumerate(runs.values()):
        names = row_names(run["made_by"])
        for i, (kind, figures) in enumerate(run["overall"].items()):
            table.add_row(run["label"] if i == 0 else "", names[kind], str(figures["n_images"]),
                          *("" if figures.get(k) is None else f"{figures[k]:.3f}" for k in columns),
                          end_section=i == len(run["overall"]) - 1 and r < len(runs) - 1)
    console = terminal()
    console.print(table)
    plain = {"markup": False, "highlight": False, "soft_wrap": True}  # paths never wrapped
    for note in dict.fromkeys(n for run in runs.values() for n in run["notes"]):
        console.print(f"note: {note}", **plain)
    for name, why in comparison["skipped"].items():
        console.print(f"skipped: {name}: {why}", **plain)
    console.print(f"each run's report in RUN/report; the comparison in "
                  f"{Path(comparison['sweep_dir']) / COMPARISON}", **plain)
