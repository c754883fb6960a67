"""The seed file: z_T before and after optimisation, and everything `generate` needs to redraw it.

A safetensors file with float32 tensors `initial` and `optimized`, each (C, H/f, W/f), and string
metadata: prompt, model, steps, guidance scale, size, scheduler (with its full config), dtype.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from seedselect_cli.errors import UserError
from seedselect_cli.writer import atomic_write

FORMAT = "seedselect-seed/1"
REQUIRED = ("prompt", "model", "steps", "guidance_scale", "height", "width", "scheduler_config", "dtype")


@dataclass
class SeedFile:
    initial: torch.Tensor
    optimized: torch.Tensor
    metadata: dict[str, str]

    @property
    def steps(self) -> int:
        return int(self.metadata["steps"])

    @property
    def guidance_scale(self) -> float:
        return float(self.metadata["guidance_scale"])


def save_seed_file(path: Path, initial: torch.Tensor, optimized: torch.Tensor, metadata: dict) -> None:
    """Write a seed file atomically (it appears whole or not at all)."""
    tensors = {"initial": initial.detach().float().cpu().contiguous(),
               "optimized": optimized.detach().float().cpu().contiguous()}
    meta = {"format": FORMAT, **{k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load_seed_file(path: str | Path) -> SeedFile:
    """Read and check a seed file; `UserError` if it is missing, not safetensors, or malformed."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"seed_file={path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"seed_file={path} is not a safetensors seed file ({str(exc).splitlines()[0]})") from None
    missing = [k for k in ("initial", "optimized") if k not in tensors] + [k for k in REQUIRED if k not in metadata]
    if missing:
        raise UserError(f"seed_file={path} is not a seedselect seed file: {', '.join(missing)} missing")
    initial, optimized = tensors["initial"], tensors["optimized"]
    if initial.ndim != 3 or initial.shape != optimized.shape:
        raise UserError(f"seed_file={path}: seeds must be two tensors of one shape (C, H, W), "
                        f"got {tuple(initial.shape)} and {tuple(optimized.shape)}")
    return SeedFile(initial=initial.float(), optimized=optimized.float(), metadata=metadata)
