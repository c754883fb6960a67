"""Faults: non-finite losses, out of memory, Ctrl-C and SIGTERM, SIGKILL at random moments; what is
promised about safety and reproducibility."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import seedselect_cli.core.engine as engine_module
import seedselect_cli.core.optimize as optimize_module
from seedselect_cli import pipeline
from seedselect_cli.core import initial_seeds
from seedselect_cli.core.optimize import optimize_seeds
from seedselect_cli.core.prompts import encode_prompt
from seedselect_cli.errors import Interrupted, UserError
from seedselect_cli.files.atomic import atomic_write
from seedselect_cli.files.run_directory import RunDirectory
from seedselect_cli.interrupt import GracefulStop, StopNow
from seedselect_cli.pipeline import run_bootstrap, run_optimize
from tests.conftest import make_config
from tests.layouts import make_cub
from tests.runs import bootstrap_command, in_process, read_manifest, start
from tests.test_optimize import random_target, seeds

pytestmark = pytest.mark.slow  # minutes together: the quick loop (`pytest -m "not slow"`) leaves it out

# --- non-finite losses -------------------------------------------------------------------------


def test_a_seed_that_is_never_finite_is_stopped_and_the_others_go_on(tiny_models):
    config = make_config()
    target, embeds = random_target(20), encode_prompt(tiny_models, "a red disc")
    z = seeds(3, 21)
    z[1, 0, 0, 0] = float("nan")
    results = optimize_seeds(tiny_models, z, target, embeds, config.objective(), config.optim_spec())
    assert not results[1].usable and "loss became nan at iteration 0" in results[1].stopped
    assert results[1].loss_history == []
    clean = optimize_seeds(tiny_models, z[[0, 2]], target, embeds, config.objective(), config.optim_spec())
    for got, alone in zip([results[0], results[2]], clean):
        assert got.usable and got.stopped is None
        torch.testing.assert_close(got.optimized, alone.optimized, rtol=1e-3, atol=2e-4)


def test_a_seed_that_turns_non_finite_keeps_its_best_iterate(tiny_models, monkeypatch):
    config = make_config(["optim.iterations=5"])
    target, embeds = random_target(22), encode_prompt(tiny_models, "a red disc")
    calls = []
    real = optimize_module.seed_objective

    def poisoned(*args, **kwargs):  # seed 0's loss is inf from the third iteration on
        terms = real(*args, **kwargs)
        calls.append(1)
        if len(calls) >= 3:
            terms.total = terms.total + torch.tensor([float("inf"), 0.0])
        return terms

    monkeypatch.setattr(optimize_module, "seed_objective", poisoned)
    stopped, other = optimize_seeds(tiny_models, seeds(2, 23), target, embeds, config.objective(),
                                   config.optim_spec())
    monkeypatch.setattr(optimize_module, "seed_objective", real)
    [baseline_0, baseline_1] = optimize_seeds(tiny_models, seeds(2, 23), target, embeds, config.objective(),
                                   config.optim_spec())
    assert stopped.stopped == "its loss became infinite at iteration 2" and len(stopped.loss_history) == 2
    assert stopped.loss == min(baseline_0.loss_history[:2])
    assert len(other.loss_history) == 5 and other.stopped is None
    torch.testing.assert_close(other.optimized, baseline_1.optimized, rtol=1e-5, atol=1e-6)


def test_the_run_writes_the_others_and_then_says_what_failed(tmp_path, monkeypatch):
    real = initial_seeds.initial_noise

    def nan_for_one(shape, init_seed):
        noise = real(shape, init_seed)
        if init_seed == initial_seeds.init_seed_for(0, "red_disc", 1):
            noise[0, 0, 0] = float("nan")
        return noise

    monkeypatch.setattr(initial_seeds, "initial_noise", nan_for_one)
    with pytest.raises(UserError, match=r"1 image could not be made \(red_disc #1\).*optim.lr"):
        # one start per image (method=paper): with candidates, a start that is not finite is passed over instead
        run_optimize(make_config(["method=paper", "n_images=3", "runtime.batch_size=3"]), tmp_path)
    assert sorted(RunDirectory(tmp_path).finished()) == [("red_disc", 0), ("red_disc", 2)]


# --- out of memory -------------------------------------------------------------------------------


def test_out_of_memory_names_the_setting_and_keeps_what_is_done(tmp_path, monkeypatch):
    real, calls = engine_module.optimize_seeds, []

    def second_batch_runs_out(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, "optimize_seeds", second_batch_runs_out)
    with pytest.raises(UserError, match=r"^out of GPU memory with runtime.batch_size=1 at 32x32: use runtime.dtype="
                                        r"float16; the 1 image finished in .* stay"):
        run_optimize(make_config(["n_images=3", "runtime.batch_size=1"]), tmp_path)
    assert sorted(RunDirectory(tmp_path).finished()) == [("red_disc", 0)]


def test_out_of_memory_advice_names_only_what_the_run_can_still_change():
    from seedselect_cli.pipeline import memory_advice

    lean = make_config(["runtime.batch_size=1", "runtime.dtype=float16", "runtime.memory_budget=0.00"])
    assert memory_advice(lean, torch.float16).startswith("every setting that saves memory is on already")
    heavy = make_config(["runtime.batch_size=4", "runtime.memory_budget=auto", "sampler.checkpointing=false"])
    assert memory_advice(heavy, torch.float32) == (
        "lower runtime.memory_budget (now auto; 0 recomputes every step), or set sampler.checkpointing=true, or "
        "lower runtime.batch_size (1 needs least), or use runtime.dtype=float16")


# --- Ctrl-C and SIGTERM --------------------------------------------------------------------------


def test_graceful_stop_between_steps_sets_a_flag_then_a_second_signal_stops_at_once():
    with GracefulStop() as stop, stop.steps():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.requested and stop.signum == signal.SIGTERM
        with pytest.raises(Interrupted, match="stopped by SIGTERM during the test's step"):
            stop.check("the test's step")
        with pytest.raises(StopNow):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_outside_steps_a_signal_stops_at_once():
    with GracefulStop() as stop:
        with pytest.raises(StopNow) as info:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
        assert info.value.signum == signal.SIGTERM and stop.requested


def test_sigterm_mid_run_keeps_the_finished_images_and_a_consistent_manifest(tmp_path, monkeypatch):
    real = RunDirectory.append_manifest

    def preempted_after_the_first_image(self, entry):
        real(self, entry)
        os.kill(os.getpid(), signal.SIGTERM)  # as Slurm does when it preempts the job

    monkeypatch.setattr(RunDirectory, "append_manifest", preempted_after_the_first_image)
    config = make_config(["n_images=4", "runtime.batch_size=1"])
    with pytest.raises(Interrupted, match="stopped by SIGTERM: 1 new image kept") as info:
        run_optimize(config, tmp_path)
    assert info.value.signum == signal.SIGTERM
    assert sorted(RunDirectory(tmp_path).finished()) == [("red_disc", 0)]
    assert sorted(p.name for p in (tmp_path / "images" / "red_disc").iterdir()) == ["00000.png"]
    monkeypatch.setattr(RunDirectory, "append_manifest", real)
    assert len(run_optimize(config, tmp_path)) == 3


@pytest.fixture(scope="module")
def cub(tmp_path_factory):
    return make_cub(tmp_path_factory.mktemp("data") / "CUB_200_2011",
                    classes=("001.Black_footed_Albatross", "094.Pine_Warbler", "095.Cerulean_Warbler"))


def test_sigterm_to_the_command_stops_it_with_exit_143(cub, tmp_path):
    run_dir = tmp_path / "run"
    process = start(bootstrap_command(cub, run_dir, 4), tmp_path)
    deadline = time.monotonic() + 120
    while not read_manifest(run_dir) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "run the same command again to resume" in err
    assert_trustworthy(run_dir)


def assert_trustworthy(run_dir: Path) -> None:
    """Whatever a killed run left: every manifest entry's files exist and load; every image and seed
    file on disk is whole (atomic rename), whether or not its manifest line made it."""
    for entry in read_manifest(run_dir):
        assert (run_dir / entry["image"]).is_file() and (run_dir / entry["seed_file"]).is_file()
    for png in run_dir.glob("images/*/*.png"):
        with Image.open(png) as image:
            image.load()
    for seed_file in [*run_dir.glob("seeds/*/*.safetensors"), *run_dir.glob("bootstrap/*.safetensors")]:
        assert set(load_file(seed_file)) == {"initial", "optimized"}


def test_sigkill_at_random_moments_then_resume_ends_with_exactly_the_wanted_images(cub, tmp_path, monkeypatch,
                                                                                  capsys):
    run_dir, n_images = tmp_path / "run", 5
    rng = random.Random(1234)
    kills, done_at_kills = 0, []
    for _ in range(4):  # at most 3 images a round: the 15 are never all made before the last kill
        process = start(bootstrap_command(cub, run_dir, n_images), tmp_path)
        before = len(read_manifest(run_dir))
        if rng.random() < 0.3:  # during start-up, model building or the first batch (its first image at 2.6 s)
            time.sleep(rng.uniform(0.05, 2.0))
        else:  # after 1 to 3 more images, at a random moment of the next one: whatever the machine's speed
            target, deadline = before + rng.randint(1, 3), time.monotonic() + 120
            while len(read_manifest(run_dir)) < target and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.3))
        if process.poll() is not None:  # it finished before its kill
            break
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
        assert_trustworthy(run_dir)
        done_at_kills.append(len(read_manifest(run_dir)))
    assert kills >= 3 and any(0 < done < 3 * n_images for done in done_at_kills), done_at_kills
    code, _, err = in_process(bootstrap_command(cub, run_dir, n_images), tmp_path, monkeypatch, capsys)
    assert code == 0, err  # the resume in this process: the killed ones were processes of their own
    entries = read_manifest(run_dir)
    keys = [(e["class"], e["index"]) for e in entries]
    assert len(keys) == len(set(keys)) == 3 * n_images  # no duplicates, nothing missing
    for slug in ("Black_footed_Albatross", "Pine_Warbler", "Cerulean_Warbler"):
        assert sorted(p.name for p in (run_dir / "images" / slug).glob("*.png")) == [
            f"{i:05d}.png" for i in range(n_images)]
    assert {e["image"] for e in entries} == {p.relative_to(run_dir).as_posix() for p in run_dir.glob("images/*/*.png")}
    assert not list(run_dir.rglob("*.tmp")), "temporary files of killed writers are cleared on resume"
    metadata = [json.loads(line) for line in (run_dir / "images" / "metadata.jsonl").read_text().splitlines()]
    assert sorted(m["file_name"] for m in metadata) == sorted(e["image"].removeprefix("images/") for e in entries)
    assert_trustworthy(run_dir)


def test_temporary_files_of_live_writers_are_left_alone(tmp_path):
    run = RunDirectory(tmp_path)
    run.start("seed: 0\n")
    folder = tmp_path / "images" / "c"
    folder.mkdir(parents=True)
    from seedselect_cli.files.atomic import HOST

    live = folder / f".00000.png.{HOST}.{os.getpid()}.tmp"
    dead = folder / f".00001.png.{HOST}.999999999.tmp"
    other_host = folder / ".00002.png.elsewhere.1.tmp"
    old_other_host = folder / ".00003.png.elsewhere.2.tmp"
    for path in (live, dead, other_host, old_other_host):
        path.write_text("partial")
    os.utime(old_other_host, (time.time() - 7200, time.time() - 7200))
    RunDirectory(tmp_path).start("seed: 0\n")
    assert sorted(p.name for p in folder.iterdir()) == sorted([live.name, other_host.name])


# --- safety ---------------------------------------------------------------------------------------


def test_no_pickle_loading_and_no_remote_code_in_the_package():
    source = Path(pipeline.__file__).parent
    for path in source.rglob("*.py"):
        text = path.read_text()
        for pattern in (r"torch\.load\(", r"\bpickle\b", r"trust_remote_code\s*=\s*True", r"weights_only\s*=\s*False"):
            assert not re.search(pattern, text), f"{path.name}: {pattern}"


def test_atomic_write_never_leaves_a_partial_target(tmp_path):
    target = tmp_path / "a.txt"

    def killed_half_way(tmp):
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, killed_half_way)
    assert not target.exists() and os.listdir(tmp_path) == []


# --- reproducibility -------------------------------------------------------------------------------


def test_same_config_same_images_and_seeds_drawn_independently_of_batching(tmp_path):
    first, again, batched = tmp_path / "first", tmp_path / "again", tmp_path / "batched"
    run_optimize(make_config(["n_images=3", "runtime.batch_size=1"]), first)
    run_optimize(make_config(["n_images=3", "runtime.batch_size=1"]), again)
    run_optimize(make_config(["n_images=3", "runtime.batch_size=3"]), batched)
    for index in range(3):
        name = f"red_disc/{index:05d}"
        assert np.array_equal(np.asarray(Image.open(first / "images" / f"{name}.png")),
                              np.asarray(Image.open(again / "images" / f"{name}.png")))
        a, b = (load_file(d / "seeds" / f"{name}.safetensors") for d in (first, batched))
        assert torch.equal(a["initial"], b["initial"])  # the seed drawn for (class, index)


def test_bootstrap_images_do_not_depend_on_resumption(cub, tmp_path, monkeypatch):
    overrides = [f"dataset.root={cub}", "model=tiny", "sampler=tiny", "runtime.device=cpu", "sampler.steps=3",
                 "bootstrap.global_iterations=2", "bootstrap.iterations=2", "runtime.progress=false",
                 "runtime.batch_size=2", "dataset.classes=[Pine Warbler]", "bootstrap.n_images=4"]
    config = make_config(overrides, name="cub_tail")
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run_bootstrap(config, whole)
    real = RunDirectory.append_manifest

    def preempted(self, entry):
        real(self, entry)
        if entry["index"] == 0:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(RunDirectory, "append_manifest", preempted)
    with pytest.raises(Interrupted):
        run_bootstrap(config, parts)
    monkeypatch.setattr(RunDirectory, "append_manifest", real)
    run_bootstrap(config, parts)
    for index in range(4):
        a, b = (load_file(d / "seeds" / "Pine_Warbler" / f"{index:05d}.safetensors") for d in (whole, parts))
        assert torch.equal(a["optimized"], b["optimized"]), index
