"""Processes side by side and signals, as a cluster sends them: shards that fail beside a working one,
two copies of one command, SIGTERM during bootstrap's z_T^G, Ctrl-C during start-up."""

from __future__ import annotations

import json
import signal
import sys
import time

import numpy as np
import pytest
from PIL import Image

from tests.layouts import make_cub
from tests.runs import Forked, bootstrap_command, in_process, read_manifest, start

pytestmark = pytest.mark.slow  # minutes together: the quick loop (`pytest -m "not slow"`) leaves it out


def wait_for(condition, process: Forked | None = None, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process ended first: {process.communicate()}")
        time.sleep(0.02)


@pytest.fixture
def cub(tmp_path):
    return make_cub(tmp_path / "CUB_200_2011", classes=("001.Black_footed_Albatross", "094.Pine_Warbler"))


def test_a_failing_shard_leaves_the_run_directory_of_a_working_one_alone(cub, tmp_path, monkeypatch, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for i in range(3):  # shard 1's class: every reference unreadable
        (broken / f"Pine_Warbler_{i}.jpg").write_bytes(b"not a jpeg")
    run_dir = tmp_path / "run"
    shard0 = start([*bootstrap_command(cub, run_dir, 6), "runtime.shard=0/2", "bootstrap.global_iterations=20"], tmp_path)
    wait_for(lambda: (run_dir / "config.yaml").is_file(), shard0)
    real = cub / "images" / "094.Pine_Warbler"
    real.rename(tmp_path / "kept")
    real.symlink_to(broken)
    code, _, err = in_process([*bootstrap_command(cub, run_dir, 6), "runtime.shard=1/2",
                               "bootstrap.global_iterations=20"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "0 readable images" in err, err
    assert (run_dir / "config.yaml").is_file() and (run_dir / ".hydra").is_dir()  # shard 0's run is intact
    _, err = shard0.communicate(timeout=300)
    assert shard0.returncode == 0, err
    assert len(read_manifest(run_dir)) == 6
    code, _, err = in_process([*bootstrap_command(cub, run_dir, 6), "runtime.shard=0/2",
                               "bootstrap.global_iterations=20", "loss.lam=0.5"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "holds a run made with another config (loss.lam" in err, err


def test_two_copies_of_one_bootstrap_make_each_image_once(cub, tmp_path):
    run_dir = tmp_path / "run"
    command = bootstrap_command(cub, run_dir, 6)
    processes = [start(command, tmp_path) for _ in range(2)]
    for process in processes:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
    keys = [(e["class"], e["index"]) for e in read_manifest(run_dir)]
    assert len(keys) == len(set(keys)) == 12
    metadata = [json.loads(line) for line in (run_dir / "images" / "metadata.jsonl").read_text().splitlines()]
    assert len(metadata) == len({m["file_name"] for m in metadata}) == 12


def test_sigterm_during_z_T_G_stops_within_an_iteration(cub, tmp_path):
    run_dir = tmp_path / "run"
    command = [*bootstrap_command(cub, run_dir, 2), "bootstrap.global_iterations=2000", "sampler.steps=10",
               "init=random"]
    process = start(command, tmp_path)
    log = run_dir / "bootstrap.log"
    wait_for(lambda: log.is_file() and "images to make" in log.read_text(), process)
    time.sleep(0.5)  # inside z_T^G's iterations
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    seconds = time.monotonic() - sent
    assert process.returncode == 128 + signal.SIGTERM, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("seedselect: stopped by SIGTERM"), err
    assert seconds < 10, f"{seconds:.1f} s from SIGTERM to exit"
    assert not list(run_dir.glob("bootstrap/*.safetensors")), "a half-optimised z_T^G was saved"


def test_ctrl_c_during_start_up_is_one_line_and_leaves_nothing(tmp_path):
    run_dir = tmp_path / "run"
    process = start([sys.executable, "-m", "seedselect_cli", "optimize", "runtime.progress=false",
                     f"hydra.run.dir={run_dir}"], tmp_path)
    wait_for(lambda: (run_dir / ".active").exists(), process)  # the command runs, the models are loading
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("seedselect: stopped by SIGINT") and "Traceback" not in err, err
    assert not run_dir.exists(), sorted(p.name for p in run_dir.iterdir())


def test_ctrl_c_while_a_folder_of_seeds_is_drawn_keeps_whole_images_and_the_same_command_goes_on(cub, tmp_path,
                                                                                                   monkeypatch, capsys):
    run_dir = tmp_path / "run"
    code, _, err = in_process(bootstrap_command(cub, run_dir, 8), tmp_path, monkeypatch, capsys)
    assert code == 0, err
    out = tmp_path / "redrawn"
    command = [sys.executable, "-m", "seedselect_cli", "generate", f"seed_file={run_dir / 'seeds'}", f"out={out}"]
    process = start(command, tmp_path)
    wait_for(lambda: len(list(out.rglob("*.png"))) >= 1, process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    lines = err.strip().splitlines()
    assert lines == ["seedselect: stopped by SIGINT; the images drawn are kept: run the same command again to go on"]
    drawn = len(list(out.rglob("*.png")))
    assert 1 <= drawn < 16 and not [p for p in out.rglob(".*") if p.is_file()]  # no temporaries left
    code, said, err = in_process(command, tmp_path, monkeypatch, capsys)
    assert code == 0, err
    assert f"{drawn} of the 16 images are already in {out}; drawing the other {16 - drawn}" in said
    assert f"{16 - drawn} of {16 - drawn} are pixel for pixel the run's images" in said
    for image in (run_dir / "images").rglob("*.png"):  # those kept at the stop too: whole, and the run's
        with Image.open(out / image.relative_to(run_dir / "images")) as again, Image.open(image) as original:
            assert np.array_equal(np.asarray(again), np.asarray(original))
