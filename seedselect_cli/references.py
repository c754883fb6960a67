"""The targets SeedSelect steers towards, from a class's reference images, with an on-disk cache.

    mu_v = mean_i normalize(CLIP(I_i))         semantic centroid (README, "The method, as implemented")
    mu_z = mean_i E(I_i) * scaling_factor      appearance centroid, at the sampler's size

Each reference is encoded on its own (so its encoding never depends on which images it was
batched with) and kept per image, so that bootstrap subsets can be averaged without encoding again.
Encodings are cached as safetensors files keyed by the weights of the VAE and the CLIP image
encoder, the preprocessing, and the image file's bytes: a loop over classes, or another shard,
reads them back instead of encoding again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from seedselect_cli.encoders import clip_embed_pil, vae_encode
from seedselect_cli.errors import UserError, count_of, first_line
from seedselect_cli.images import file_sha256, load_rgb
from seedselect_cli.models import FrozenModels
from seedselect_cli.writer import atomic_write

log = logging.getLogger(__name__)


@dataclass
class Centroids:
    """What one seed, or each seed of a batch, is steered towards."""

    semantic: torch.Tensor | None  # mu_v, (D,) or (B, D): the mean of unit CLIP embeddings
    appearance: torch.Tensor  # mu_z, (C, h, w) or (B, C, h, w)
    count: int  # number of references behind them
    # For the contrastive semantic loss: every class's mu_v (N, D), and which row is this class.
    classes: torch.Tensor | None = None
    class_index: int = 0
    # For loss.appearance=nearest: the references' latents (n, C, h, w), or each seed's (B, n, C, h, w);
    # L_app then pulls z_0 towards the nearest of them instead of towards `appearance`.
    references: torch.Tensor | None = None

    def to(self, device: torch.device) -> Centroids:
        move = (lambda t: t.to(device) if t is not None else None)
        return Centroids(move(self.semantic), move(self.appearance), self.count, move(self.classes),
                         self.class_index, move(self.references))


def stack_centroids(items: Sequence[Centroids]) -> Centroids:
    """One batch of per-seed centroids (B, ...) from centroids of single seeds."""
    first = items[0]
    semantic = torch.stack([c.semantic for c in items]) if first.semantic is not None else None
    references = torch.stack([c.references for c in items]) if first.references is not None else None
    return Centroids(semantic, torch.stack([c.appearance for c in items]), first.count, first.classes,
                     first.class_index, references)


@dataclass
class ReferenceEncodings:
    """Every reference of a class, encoded: unit CLIP embeddings and VAE latents, one row per image."""

    semantic: torch.Tensor | None  # (n, D)
    appearance: torch.Tensor  # (n, C, h, w)
    paths: tuple[Path, ...]
    hashes: tuple[str, ...] = ()  # SHA-256 of each file's bytes: the key of its cache entries

    def centroids(self, subset: Sequence[int] | None = None, appearance: str = "centroid") -> Centroids:
        """The centroids of all references, or of `subset` (indices, repeats counted as often as drawn), for
        `loss.appearance`: centroid, the mean latent; nearest, the latents themselves as well; assigned,
        the first reference's latent alone (the caller passes the image's own reference first)."""
        rows = torch.as_tensor(list(subset) if subset is not None else range(len(self.paths)), dtype=torch.long)
        semantic = self.semantic[rows].mean(dim=0) if self.semantic is not None else None
        if appearance == "assigned":
            return Centroids(semantic=semantic, appearance=self.appearance[rows[0]], count=len(rows))
        references = self.appearance[rows] if appearance == "nearest" else None  # repeats keep subsets stackable
        return Centroids(semantic=semantic, appearance=self.appearance[rows].mean(dim=0), count=len(rows),
                         references=references)


def encode_images(models: FrozenModels, images: list[Image.Image], height: int, width: int,
                  resize_mode: str = "default") -> tuple[torch.Tensor | None, torch.Tensor]:
    """(unit CLIP embeddings (n, D) or None, VAE latents (n, C, h, w)), one image at a time."""
    semantic = (torch.cat([clip_embed_pil(models, [im]) for im in images]).cpu()
                if models.image_encoder is not None else None)
    appearance = torch.cat([vae_encode(models, [im], height, width, resize_mode) for im in images]).cpu()
    return semantic, appearance


def default_cache_dir() -> Path:
    """`$SEEDSELECT_CACHE_DIR`, else `$XDG_CACHE_HOME/seedselect`, else `~/.cache/seedselect`."""
    if os.environ.get("SEEDSELECT_CACHE_DIR"):
        return Path(os.environ["SEEDSELECT_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "seedselect"


def weights_fingerprint(modules: Sequence[torch.nn.Module | None], settings: list) -> str:
    """A key that changes with the modules' weights (names, shapes and a sample of every tensor) or
    with `settings` (JSON-serialisable)."""
    digest = hashlib.sha256()
    for module in modules:
        if module is None:
            digest.update(b"none")
            continue
        for name, tensor in module.state_dict().items():
            sample = tensor.detach().flatten()[:64].float().cpu().numpy().tobytes()
            digest.update(f"{name}{tuple(tensor.shape)}".encode() + sample)
    digest.update(json.dumps(settings).encode())
    return digest.hexdigest()[:16]


def encoder_fingerprint(models: FrozenModels, height: int, width: int, resize_mode: str) -> str:
    """A key that changes whenever an encoding of the same image could: weights, preprocessing, dtype."""
    processor = models.image_processor.to_json_string() if models.image_processor is not None else ""
    return weights_fingerprint((models.vae, models.image_encoder), [
        processor, height, width, resize_mode, str(models.dtype), models.device.type,
        models.vae.config.scaling_factor])


class ReferenceCache:
    """Per-image tensors in `root/<fingerprint>/<ab>/<key>.safetensors`; the key is the SHA-256 of the
    image file (for an inversion, of the file's hash with the prompt and settings).

    What is read back is checked: an entry that cannot be read, lacks a tensor, or holds one of another
    shape or dtype, or values that are not finite, is a miss (computed again and rewritten), and the
    log says so once."""

    def __init__(self, root: Path | None, fingerprint: str):
        self.folder = Path(root) / fingerprint if root is not None else None
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
        if self.folder is None:
            return
        try:
            atomic_write(self._path(key), lambda tmp: save_file(
                {k: v.float().contiguous() for k, v in tensors.items()}, tmp))
        except OSError as exc:  # a read-only or full cache only costs time
            log.warning("cache: cannot write %s (%s)", self._path(key), exc.strerror)


def expected_entry(models: FrozenModels, height: int, width: int) -> dict[str, tuple[int, ...]]:
    """The tensors, with their shapes, of a reference's cache entry for these models and size."""
    f = models.vae_scale_factor
    shapes = {"appearance": (models.vae.config.latent_channels, height // f, width // f)}
    if models.image_encoder is not None:
        shapes["semantic"] = (models.image_encoder.config.projection_dim,)
    return shapes


def load_encodings(models: FrozenModels, paths: Sequence[Path], height: int, width: int, resize_mode: str,
                   cache: ReferenceCache, what: str, minimum: int = 1,
                   should_stop: Callable[[], None] | None = None) -> ReferenceEncodings:
    """Encode every readable reference of `paths` (from the cache where it can); skip broken ones
    with a warning. Raises `UserError` when fewer than `minimum` can be read. `should_stop()` is called
    before each reference and may raise to stop."""
    semantic, appearance, kept, hashes, broken = [], [], [], [], []
    for path in paths:
        if should_stop is not None:
            should_stop()
        try:
            file_hash = file_sha256(Path(path))
        except UserError as exc:
            broken.append(str(exc))
            continue
        entry = cache.get(file_hash, expected_entry(models, height, width))
        if entry is None:
            try:
                image = load_rgb(Path(path))
            except UserError as exc:
                broken.append(str(exc))
                continue
            sem, app = encode_images(models, [image], height, width, resize_mode)
            entry = {"appearance": app[0]} | ({"semantic": sem[0]} if sem is not None else {})
            cache.put(file_hash, entry)
        if models.image_encoder is not None:
            semantic.append(entry["semantic"])
        appearance.append(entry["appearance"])
        kept.append(Path(path))
        hashes.append(file_hash)
    for message in broken:
        log.warning("skipping reference image %s", message.replace("\n", "\\n"))
    if len(kept) < minimum:
        detail = f" ({len(broken)} unreadable: {broken[0]})" if broken else ""
        raise UserError(f"{what} has {count_of(len(kept), 'readable image')}, {minimum} needed{detail}; add readable images "
                        f"(png, jpg, webp, ...) or point dataset.root elsewhere")
    return ReferenceEncodings(torch.stack(semantic) if semantic else None, torch.stack(appearance), tuple(kept),
                              tuple(hashes))
