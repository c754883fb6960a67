"""`seedselect bootstrap` as a user runs it on a CUB layout: killed and resumed, swept with submitit."""

from __future__ import annotations

import signal
import sys
import time

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from tests.layouts import make_cub
from tests.runs import bootstrap_command, in_process, read_manifest, start

pytestmark = pytest.mark.slow  # minutes together: the quick loop (`pytest -m "not slow"`) leaves it out

CLASSES = ("001.Black_footed_Albatross", "094.Pine_Warbler")
SLUGS = ("Black_footed_Albatross", "Pine_Warbler")


def command(root, run_dir, *extra):
    return [*bootstrap_command(root, run_dir, 3, iterations=3), *extra]


def run(args, cwd, **env):
    process = start(args, cwd, **env)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err


@pytest.fixture(scope="module")
def cub(tmp_path_factory):
    return make_cub(tmp_path_factory.mktemp("data") / "CUB_200_2011", classes=CLASSES)


@pytest.fixture(scope="module")
def uninterrupted(cub, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("whole")
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert in_process(command(cub, cwd / "run"), cwd, monkeypatch)[0] == 0
    return cwd / "run"


def test_a_killed_run_resumes_to_exactly_n_images_per_class(cub, uninterrupted, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    process = start(command(cub, run_dir), tmp_path)  # one thread, as in_process runs the others
    deadline = time.monotonic() + 120
    while len(read_manifest(run_dir)) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_with = len(read_manifest(run_dir))
    assert 2 <= killed_with < 6, "the run should be killed part-way"

    code, out, err = in_process(command(cub, run_dir), tmp_path, monkeypatch, capsys)
    assert code == 0, err
    entries = read_manifest(run_dir)
    assert sorted((e["class"], e["index"]) for e in entries) == [(c, i) for c in ("Black footed Albatross",
                                                                                  "Pine Warbler") for i in range(3)]
    assert f"{6 - killed_with} new images" in out
    for slug in SLUGS:
        assert sorted(p.name for p in (run_dir / "images" / slug).glob("*.png")) == [f"{i:05d}.png" for i in range(3)]
    # What the resumed run made is what the run would have made had it not been killed.
    for entry in entries:
        ours, theirs = load_file(run_dir / entry["seed_file"]), load_file(uninterrupted / entry["seed_file"])
        assert all(np.array_equal(ours[k].numpy(), theirs[k].numpy()) for k in ("initial", "optimized"))
    metadata = (run_dir / "images" / "metadata.jsonl").read_text().splitlines()
    assert len(metadata) == 6 and len(set(metadata)) == 6
    # asked for fewer than the run holds: nothing to make, and the line says the run holds more than was asked
    code, out, err = in_process(command(cub, run_dir, "bootstrap.n_images=2"), tmp_path, monkeypatch, capsys)
    assert code == 0 and len(read_manifest(run_dir)) == 6, err
    assert "(4 images of 2 classes; it holds 6 of theirs, made by a command that asked for more)" in out + err


def test_generate_redraws_a_bootstrap_image(uninterrupted, tmp_path, monkeypatch):
    entry = read_manifest(uninterrupted)[-1]
    assert in_process([sys.executable, "-m", "seedselect_cli", "generate",
                       f"seed_file={uninterrupted / entry['seed_file']}", "out=again.png"], tmp_path, monkeypatch)[0] == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png")),
                          np.asarray(Image.open(uninterrupted / entry["image"])))


def test_submitit_local_sweep_over_shards_fills_one_run_directory(cub, uninterrupted, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    args = [a for a in command(cub, "unused") if not a.startswith("hydra.run.dir")]
    args.insert(args.index("bootstrap") + 1, "-m")
    run([*args, "hydra/launcher=local", "hydra.launcher.cpus_per_task=1", "runtime.shard=0/2,1/2",
         f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path, OMP_NUM_THREADS="1")  # 2 jobs, 2 cores
    [run_dir] = [p.parent for p in (tmp_path / "sweep").glob("*/manifest.jsonl")]  # both shards, one directory
    assert "=" not in run_dir.name and "," not in run_dir.name  # passable back as run_dir=... unquoted
    assert "bootstrap.iterations-3" in run_dir.name.split("+")
    entries = read_manifest(run_dir)
    assert sorted((e["class"], e["index"]) for e in entries) == sorted(
        (e["class"], e["index"]) for e in read_manifest(uninterrupted))
    for entry in entries:  # one CPU thread here, two there: float sums round differently
        np.testing.assert_allclose(load_file(run_dir / entry["seed_file"])["optimized"].numpy(),
                                   load_file(uninterrupted / entry["seed_file"])["optimized"].numpy(),
                                   rtol=1e-3, atol=1e-3)
