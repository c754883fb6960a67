"""Shared by the tests that run commands in a process of their own: starting them, the tiny bootstrap
command line, and reading a run's manifest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

OFFLINE = {"HF_HUB_OFFLINE": "1"}
# A command line's settings for time, where the images themselves are not what is tested: 3 steps, 2 iterations and
# 2 candidate starts an image (the default method scores 16, each a pass of the sampler), no progress bars
QUICK = ["sampler.steps=3", "optim.iterations=2", "init.candidates=2", "runtime.progress=false"]


def seedselect(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`seedselect ARGS` run to its end, offline, its output captured."""
    return subprocess.run([sys.executable, "-m", "seedselect_cli", *args], cwd=cwd,
                          env={**os.environ, **OFFLINE, **(env or {})}, check=False, capture_output=True, text=True,
                          timeout=300)


def in_process(args: list[str], cwd: Path, monkeypatch, capsys=None) -> tuple[int, str, str]:
    """A command line of `start` or `bootstrap_command` (`python -m seedselect_cli ...`) through `main` in the
    test's own process, from `cwd`, on one thread as `start` runs its commands (another count can round a pixel
    otherwise): for the commands around the one a test kills or runs side by side, as each process's imports cost
    5 s. Its exit code, and its stdout and stderr where `capsys` captures them."""
    import torch

    from seedselect_cli.cli import main

    monkeypatch.chdir(cwd)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    if capsys is not None:
        capsys.readouterr()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(args[args.index("seedselect_cli") + 1:])
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr() if capsys is not None else ("", "")
    return code, out, err


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    """A command line started in the background, offline, on one thread (several run side by side)."""
    return subprocess.Popen(args, cwd=cwd, env={**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def bootstrap_command(root: Path, run_dir: Path | str, n_images: int, iterations: int = 2) -> list[str]:
    """`seedselect bootstrap` on a CUB layout with the tiny components, fast settings (2 starts an image, not 8),
    batch 2."""
    return [sys.executable, "-m", "seedselect_cli", "bootstrap", "--config-name", "cub_tail", "model=tiny",
            "sampler=tiny", "runtime.device=cpu", f"dataset.root={root}", f"bootstrap.n_images={n_images}",
            "sampler.steps=3", "bootstrap.global_iterations=2", f"bootstrap.iterations={iterations}",
            "bootstrap.candidates=2", "runtime.batch_size=2", "runtime.progress=false", f"hydra.run.dir={run_dir}"]


def read_manifest(run_dir: Path) -> list[dict]:
    """The manifest's entries; none if it is not there, and a line cut by SIGKILL skipped (a resume drops it)."""
    path = Path(run_dir) / "manifest.jsonl"
    entries = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return entries
