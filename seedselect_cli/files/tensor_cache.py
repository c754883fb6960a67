"""The on-disk cache of per-image tensors (reference encodings, inversions), as safetensors files.

Entries live in `root/<fingerprint>/<ab>/<key>.safetensors`: the fingerprint names the weights and
settings that made them, the key the image (and settings). What is read back is checked.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from seedselect_cli.errors import first_line
from seedselect_cli.files.atomic import atomic_write

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """`$SEEDSELECT_CACHE_DIR`, else `$XDG_CACHE_HOME/seedselect`, else `~/.cache/seedselect`."""
    if os.environ.get("SEEDSELECT_CACHE_DIR"):
        return Path(os.environ["SEEDSELECT_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "seedselect"


class TensorCache:
    """Per-image tensors in `root/<fingerprint>/<ab>/<key>.safetensors`; the key is the SHA-256 of the
    image file (for an inversion, of the file's hash with the prompt and settings).

    What is read back is checked: an entry that cannot be read, lacks a tensor, or holds one of another
    shape or dtype, or values that are not finite, is a miss (computed again and rewritten), and the
    log says so once."""

    def __init__(self, root: Path | None, fingerprint: str):
        self.folder = Path(root) / fingerprint if root is not None else None
        self.writable = True  # until a write fails
        self._warned = False

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def get(self, key: str, expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor] | None:
        """The entry under `key` if it holds exactly the float32 tensors of the shapes in `expected`."""
        if self.folder is None or not self._path(key).is_file():
            return None
        try:
            entry = load_file(self._path(key))
        except (SafetensorError, OSError, ValueError) as exc:
            return self._miss(f"{self._path(key)} is unreadable ({first_line(exc)})")
        for name, shape in expected.items():
            tensor = entry.get(name)
            if tensor is None:
                return self._miss(f"{self._path(key)} has no {name!r} tensor")
            if tensor.dtype != torch.float32 or tuple(tensor.shape) != tuple(shape):
                return self._miss(f"{self._path(key)} holds {name!r} as {str(tensor.dtype).removeprefix('torch.')} "
                                  f"{tuple(tensor.shape)}, not float32 {tuple(shape)}")
            if not torch.isfinite(tensor).all():
                return self._miss(f"{self._path(key)} holds values of {name!r} that are not finite")
        return {name: entry[name] for name in expected}

    def _miss(self, why: str) -> None:
        if not self._warned:
            log.warning("cache: %s; computing it again (any other damaged entries too)", why)
            self._warned = True

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        if self.folder is None or not self.writable:
            return
        try:
            atomic_write(self._path(key), lambda tmp: save_file(
                {k: v.float().contiguous() for k, v in tensors.items()}, tmp))
        except OSError as exc:  # a read-only or full cache only costs time: say it once, then write no more
            log.warning("cache: cannot write %s (%s); going on without writing to the cache (runtime.cache_dir: a "
                        "writable folder; runtime.cache=false: no cache)", self._path(key), exc.strerror or exc)
            self.writable = False
