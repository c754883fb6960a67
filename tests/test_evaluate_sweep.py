"""`seedselect evaluate` on a sweep's folder: each run's report as for the run alone, one table of the runs side by
side, comparison.json; a run that cannot be evaluated is skipped, saying why."""

from __future__ import annotations

import json
import shutil

import pytest

from seedselect_cli.cli import main
from seedselect_cli.evaluate_sweep import run_labels
from seedselect_cli.files.run_directory import sweep_runs
from seedselect_cli.pipeline import run_optimize
from tests.conftest import make_config


def test_the_run_labels_keep_what_the_sweep_varied():
    assert run_labels(["loss.lam-0.5+seed-1", "loss.lam-1+seed-1"]) == {"loss.lam-0.5+seed-1": "loss.lam-0.5",
                                                                        "loss.lam-1+seed-1": "loss.lam-1"}
    assert run_labels(["a-1+b-2", "a-1+b-3", "a-2+b-3"]) == {"a-1+b-2": "a-1+b-2", "a-1+b-3": "a-1+b-3",
                                                             "a-2+b-3": "a-2+b-3"}
    assert run_labels(["seed-0"]) == {"seed-0": "seed-0"}


def test_a_sweeps_runs_come_in_the_order_hydra_launched_them(tmp_path):
    for number, name in ((2, "x-10"), (1, "x-2"), (0, "x-1"), (None, "x-9"), ("zero", "x-0")):
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / "config.yaml").write_text("seed: 0\n")
        if number is not None:
            (tmp_path / name / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  job:\n    num: {number}\n")
    assert sweep_runs(tmp_path) == []  # no multirun.yaml: not a sweep's folder
    (tmp_path / "multirun.yaml").write_text("hydra: {}\n")
    assert [run.name for run in sweep_runs(tmp_path)] == ["x-1", "x-2", "x-10", "x-0", "x-9"]  # unknown: last, by name


@pytest.mark.slow
def test_a_sweeps_folder_is_evaluated_run_by_run_and_compared(tmp_path, monkeypatch, capsys):
    sweep = tmp_path / "sweep"
    for lam in ("0.5", "1"):
        run_optimize(make_config([f"loss.lam={lam}", "n_images=2", "runtime.batch_size=2"]),
                     sweep / f"loss.lam-{lam}+optim.iterations-3")
    (sweep / "multirun.yaml").write_text("hydra: {}\n")  # Hydra's mark of a sweep's folder
    failed = sweep / "loss.lam-0.9+optim.iterations-3"  # a job that failed before its first image
    failed.mkdir()
    shutil.copy(sweep / "loss.lam-1+optim.iterations-3" / "config.yaml", failed / "config.yaml")
    monkeypatch.chdir(tmp_path)

    assert main(["evaluate", f"run_dir={sweep}"]) == 0
    out = capsys.readouterr().out
    comparison = json.loads((sweep / "comparison.json").read_text())
    assert [r["label"] for r in comparison["runs"].values()] == ["loss.lam-0.5", "loss.lam-1"]
    assert list(comparison["skipped"]) == ["loss.lam-0.9+optim.iterations-3"]
    assert "holds no finished images" in comparison["skipped"]["loss.lam-0.9+optim.iterations-3"]
    assert "the sweep's 2 runs, overall" in out and "skipped: loss.lam-0.9+optim.iterations-3" in out
    table = out[out.index("the sweep's 2 runs"):]
    assert table.index("loss.lam-0.5") < table.index("loss.lam-1 ") and "SeedSelect" in table and "plain" in table
    for name, run in comparison["runs"].items():  # each run's figures are its own report's, as evaluated alone
        alone = json.loads((sweep / name / "report" / "metrics.json").read_text())
        assert run["overall"] == alone["overall"] and run["n_images"] == alone["n_images"] == 2
        assert (sweep / name / "report" / "sheets" / "red_disc.png").is_file()
    lam_half, lam_one = (r["overall"]["seedselect"] for r in comparison["runs"].values())
    assert lam_half != lam_one  # two settings, two sets of figures
    assert not (failed / "report").exists()

    # a sweep's one run (a sweep over shards alone shares one run directory): its own full tables
    shutil.rmtree(sweep / "loss.lam-0.5+optim.iterations-3")
    shutil.rmtree(failed)
    (sweep / "comparison.json").unlink()
    assert main(["evaluate", f"run_dir={sweep}", "baseline=false"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "the sweep's" not in out and not (sweep / "comparison.json").exists()


def test_a_sweep_none_of_whose_runs_can_be_evaluated_is_one_line(tmp_path, monkeypatch, capsys):
    sweep = tmp_path / "sweep"
    for name in ("seed-0", "seed-1"):
        (sweep / name).mkdir(parents=True)
        (sweep / name / "config.yaml").write_text("seed: 0\n")
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", f"run_dir={sweep}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: run_dir={sweep}: none of its 2 runs can be evaluated (seed-0: ")
