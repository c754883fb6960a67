"""Shared by the tests that run commands: the tiny bootstrap command line, and reading a run's manifest."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def bootstrap_command(root: Path, run_dir: Path | str, n_images: int, iterations: int = 2) -> list[str]:
    """`seedselect bootstrap` on a CUB layout with the tiny components, fast settings, batch 2."""
    return [sys.executable, "-m", "seedselect_cli", "bootstrap", "--config-name", "cub_tail", "model=tiny",
            "sampler=tiny", "runtime.device=cpu", f"dataset.root={root}", f"bootstrap.n_images={n_images}",
            "sampler.steps=3", "bootstrap.global_iterations=2", f"bootstrap.iterations={iterations}",
            "runtime.batch_size=2", "runtime.progress=false", f"hydra.run.dir={run_dir}"]


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
