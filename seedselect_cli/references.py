"""Reading and encoding a class's reference images, through the on-disk cache (`files/tensor_cache.py`).

    mu_v = mean_i normalize(CLIP(I_i))         semantic centroid (README, "The method, as implemented")
    mu_z = mean_i E(I_i) * scaling_factor      appearance centroid, at the sampler's size

Each reference is encoded on its own (so its encoding never depends on which images it was
batched with) and kept per image, so that bootstrap subsets can be averaged without encoding again.
Encodings are cached as safetensors files keyed by the weights of the VAE and the CLIP image
encoder, the preprocessing, and the image file's bytes: a loop over classes, or another shard,
reads them back instead of encoding again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from seedselect_cli.core.frozen import FrozenModels
from seedselect_cli.core.targets import ReferenceEncodings, encode_images
from seedselect_cli.errors import UserError, count_of
from seedselect_cli.files.images import file_sha256, load_rgb
from seedselect_cli.files.tensor_cache import TensorCache

log = logging.getLogger(__name__)


def expected_entry(models: FrozenModels, height: int, width: int) -> dict[str, tuple[int, ...]]:
    """The tensors, with their shapes, of a reference's cache entry for these models and size."""
    f = models.vae_scale_factor
    shapes = {"appearance": (models.vae.config.latent_channels, height // f, width // f)}
    if models.image_encoder is not None:
        shapes["semantic"] = (models.image_encoder.config.projection_dim,)
    return shapes


def load_encodings(models: FrozenModels, paths: Sequence[Path], height: int, width: int, resize_mode: str,
                   cache: TensorCache, what: str, minimum: int = 1,
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
