"""The example scripts run on the tiny components and the tiny data set layouts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from seedselect_cli.pipeline import run_bootstrap
from tests.conftest import make_config
from tests.layouts import make_cub

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_linear_probe_with_and_without_the_generated_set(tmp_path):
    root = make_cub(tmp_path / "CUB_200_2011", per_class=5)  # 4 train, 1 test image per class
    run_dir = tmp_path / "run"
    run_bootstrap(make_config([f"dataset.root={root}", "model=tiny", "sampler=tiny", "runtime.device=cpu",
                               "bootstrap.n_images=3", "bootstrap.global_iterations=2", "bootstrap.iterations=2",
                               "sampler.steps=3", "runtime.progress=false", "runtime.batch_size=3"],
                              name="cub_tail"), run_dir)
    results = load_script("linear_probe").main(["--dataset", "cub", "--root", str(root), "--run", str(run_dir),
                                                "--shots", "2"])
    assert results["classes"] == 2 and results["test_images"] == 2  # the one test-split image of each class
    assert results["real only"]["train_images"] == 4 and results["real + generated"]["train_images"] == 10
    assert all(0 <= results[k]["top1"] <= 1 for k in ("real only", "real + generated"))


def test_bench_runs_its_modes_on_the_tiny_components():
    rows = load_script("bench").main(["--tiny", "--steps", "3", "--batch", "1", "2", "--warmup", "0",
                                      "--iterations", "1", "--modes", "fast", "graphed", "plain"])
    assert [(r["mode"], r["batch"]) for r in rows] == [(m, b) for m in ("fast", "graphed", "plain") for b in (1, 2)]
    assert all(r["s_per_iteration"] > 0 and r["tflop_per_iteration"] > 0 and r["dtype"] == "float32" for r in rows)
    assert rows[1]["tflop_per_iteration"] > rows[0]["tflop_per_iteration"]  # twice the seeds, more work
    # the graphed calls do the fast path's work (their FLOPs are counted with the graphs set aside)
    assert [r["tflop_per_iteration"] for r in rows[2:4]] == pytest.approx([r["tflop_per_iteration"] for r in rows[:2]])


def test_bench_counts_flops_and_operations_without_a_gpu():
    rows = load_script("bench").main(["--flops", "--steps", "2", "--k", "1"])
    counts = {row["call"]: row["tflop"] for row in rows}
    assert abs(counts["UNet, CFG batch 2"] - 1.609) < 0.01  # SD 2.1-base at 512 px, as in the issue
    assert abs(counts["VAE decode"] - 2.515) < 0.01 and abs(counts["CLIP image"] - 0.335) < 0.01
    unet, vae, clip, iteration, eager = (row["operations"] for row in rows)
    # 2 steps: forward, recomputation and backward of 2 UNet calls, the decode and CLIP, which CUDA graphs
    # replay instead; what stays eager is the loss on the embeddings and latents
    assert iteration - eager > 4 * unet + 3 * (vae + clip) and 0 < eager < vae
    assert counts["one iteration, batch 1 (forward, backward, recomputation)"] > 2 * 3 * 1.609


def test_init_experiment_scores_each_start_on_the_toy_world(tmp_path):
    rows = load_script("init_experiment").main(["--out", str(tmp_path), "--concepts", "marsh finch", "--n-images", "2",
                                                "--checkpoints", "1", "2", "--settings", "random", "nao"])
    assert [(r["init"], r["norm_weight"]) for r in rows] == [("random", 0.0), ("random", 0.1), ("nao", 0.0),
                                                             ("nao", 0.1)]
    assert all(set(r["accuracy"]) == {1, 2} and all(0 <= a <= 1 for a in r["accuracy"].values()) for r in rows)
    assert all(0 <= r["diversity"] <= 2 for r in rows)
    table = (tmp_path / "init_results.md").read_text()
    assert "| nao | 0.1 |" in table and "iterations to 0.50" in table
