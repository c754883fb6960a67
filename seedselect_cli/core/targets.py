"""The targets SeedSelect steers towards, from a class's encoded reference images.

    mu_v = mean_i normalize(CLIP(I_i))         semantic centroid (README, "The method, as implemented")
    mu_z = mean_i E(I_i) * scaling_factor      appearance centroid, at the sampler's size

Each reference is encoded on its own (so its encoding never depends on which images it was batched
with) and kept per image, so that bootstrap subsets can be averaged without encoding again. The
fingerprints here key the caches of these encodings and of the references' inversions.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from seedselect_cli.core.encoders import clip_embed_pil, vae_encode
from seedselect_cli.core.frozen import FrozenModels
from seedselect_cli.core.losses import semantic_distance


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
    # The cosine distance from mu_v to the nearest reference that is not the target itself, () or (B,); None with
    # nothing to compare to. An image nearer its target than that copies a reference (`optim.stop_near_reference`).
    spacing: torch.Tensor | None = None

    def to(self, device: torch.device) -> Centroids:
        move = (lambda t: t.to(device) if t is not None else None)
        return Centroids(move(self.semantic), move(self.appearance), self.count, move(self.classes),
                         self.class_index, move(self.references), move(self.spacing))

    def rows(self, indices: Sequence[int]) -> Centroids:
        """The centroids of these seeds of a batch: per-seed targets indexed, shared ones as they are."""
        rows = torch.as_tensor(list(indices), dtype=torch.long)
        per_seed = self.appearance.ndim == 4  # (B, C, h, w), against (C, h, w) shared

        def pick(t: torch.Tensor | None, shared_ndim: int) -> torch.Tensor | None:
            return t[rows.to(t.device)] if t is not None and per_seed and t.ndim > shared_ndim else t

        return Centroids(pick(self.semantic, 1), pick(self.appearance, 3), self.count, self.classes, self.class_index,
                         pick(self.references, 4), pick(self.spacing, 0))


def stack_centroids(items: Sequence[Centroids]) -> Centroids:
    """One batch of per-seed centroids (B, ...) from centroids of single seeds."""
    first = items[0]
    semantic = torch.stack([c.semantic for c in items]) if first.semantic is not None else None
    references = torch.stack([c.references for c in items]) if first.references is not None else None
    spacing = torch.stack([c.spacing for c in items]) if all(c.spacing is not None for c in items) else None
    return Centroids(semantic, torch.stack([c.appearance for c in items]), first.count, first.classes,
                     first.class_index, references, spacing)


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
        spacing = self.spacing(semantic, rows)
        if appearance == "assigned":
            return Centroids(semantic=semantic, appearance=self.appearance[rows[0]], count=len(rows), spacing=spacing)
        references = self.appearance[rows] if appearance == "nearest" else None  # repeats keep subsets stackable
        return Centroids(semantic=semantic, appearance=self.appearance[rows].mean(dim=0), count=len(rows),
                         references=references, spacing=spacing)

    def spread(self, distance: str = "cosine") -> torch.Tensor | None:
        """How far the farthest reference lies from the centroid of the others, max_i dist(mean_{j != i} v_j, v_i)
        (`bootstrap.keep_drawn`: an image at most this far from the class's mu_v draws the concept as a reference
        does); None with fewer than two references or no image encoder."""
        n = len(self.paths)
        if self.semantic is None or n < 2:
            return None
        others = (self.semantic.sum(dim=0, keepdim=True) - self.semantic) / (n - 1)  # row i: the mean without i
        return semantic_distance(self.semantic, others, distance).max()

    def spacing(self, semantic: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
        """The cosine distance from the target `semantic` (the mean of `rows`' embeddings) to the nearest reference
        other than itself: every reference when the target is a mean of several, the others when it is one."""
        if semantic is None:
            return None
        chosen = set(rows.tolist())
        others = [r for r in range(len(self.paths)) if len(chosen) > 1 or r not in chosen]
        if not others:
            return None
        distances = 1.0 - torch.nn.functional.cosine_similarity(self.semantic[others], semantic[None], dim=-1)
        return distances.min()


def encode_images(models: FrozenModels, images: list[Image.Image], height: int, width: int,
                  resize_mode: str = "default") -> tuple[torch.Tensor | None, torch.Tensor]:
    """(unit CLIP embeddings (n, D) or None, VAE latents (n, C, h, w)), one image at a time."""
    semantic = (torch.cat([clip_embed_pil(models, [im]) for im in images]).cpu()
                if models.image_encoder is not None else None)
    appearance = torch.cat([vae_encode(models, [im], height, width, resize_mode) for im in images]).cpu()
    return semantic, appearance


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
