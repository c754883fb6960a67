"""Dataset adapters: each reads one on-disk layout and returns the same record per class.

A record is a class name, its prompt, and the paths of its reference images (`dataset.shots` of
them, drawn reproducibly from the chosen split). `load_classes` picks the adapter by `dataset.name`.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

from seedselect_cli.config import DatasetConfig
from seedselect_cli.errors import UserError


@dataclass(frozen=True)
class ClassRecord:
    name: str
    prompt: str
    images: tuple[Path, ...]


def draw_shots(paths: list[Path], shots: int | None, seed: int, class_name: str) -> list[Path]:
    """`shots` of `paths`, the same for the same seed and class whatever else changes (all if None)."""
    paths = sorted(paths)
    if shots is None or shots >= len(paths):
        return paths
    key = int.from_bytes(hashlib.sha256(f"{seed}/{class_name}".encode()).digest()[:8], "big")
    return sorted(random.Random(key).sample(paths, shots))


def select_classes(available: list[str], wanted: list[str] | None, aliases: dict[str, str] | None = None
                   ) -> list[str]:
    """The classes named by `dataset.classes` (case-insensitive, aliases allowed), or all of them."""
    if wanted is None:
        return available
    lookup = {name.lower(): name for name in available}
    lookup.update({alias.lower(): name for alias, name in (aliases or {}).items()})
    chosen = []
    for name in wanted:
        if str(name).lower() not in lookup:
            close = [a for a in available if str(name).lower() in a.lower()][:3]
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UserError(f"dataset.classes: no class named {name!r} in this dataset{hint}")
        chosen.append(lookup[str(name).lower()])
    return list(dict.fromkeys(chosen))


def require_root(cfg: DatasetConfig) -> Path:
    if not cfg.root:
        raise UserError(f"dataset.root is not set: pass dataset.root=/path/to/{cfg.name}")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise UserError(f"dataset.root={cfg.root} is not an existing folder")
    return root


def load_classes(cfg: DatasetConfig, seed: int) -> list[ClassRecord]:
    """The classes of the configured dataset, each with its prompt and reference image paths."""
    from seedselect_cli.datasets import cub, folder

    adapters = {"folder": folder.load, "cub": cub.load}
    if cfg.name not in adapters:
        raise UserError(f"dataset.name={cfg.name!r} is unknown: choose one of {', '.join(adapters)}")
    return adapters[cfg.name](cfg, seed)
