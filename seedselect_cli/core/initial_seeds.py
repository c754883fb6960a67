"""Where each seed starts (`init`): fresh noise, or a centroid of the references' DDIM inversions.

    random     z_T = eps                                       eps ~ N(0, I), drawn from the image's init seed
    inversion  c = mean_i invert(E(I_i))                       DDIM inversion with the class prompt
    nao        c = NAO centroid of the inverted seeds          on the chi shell (`nao.py`)
    reference  c = invert(E(I_r)), r the image's own reference  one reference per image, in turn
               z_T = sqrt(1 - a) c + sqrt(a) eps               a = `init.noise`, so images of a class differ

With `init.candidates` = N > 1 each image gets N such starts (the k-th from noise of its own init seed
k), and the caller keeps the one of lowest loss.

Mixing variances keeps a centroid that lies on the chi shell there: ||z_T||^2 ~ (1 - a) ||c||^2 + a d.
Inversions are cached per reference like its encodings, keyed by the UNet, text encoder, VAE,
scheduler, prompt, step count and guidance. The noise of image `index` depends only on (`seed`,
class, index), so a resumed run, another batch size or another shard starts every seed the same.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable
from typing import Protocol

import torch

from seedselect_cli.core.frozen import FrozenModels
from seedselect_cli.core.nao import nao_centroid, rescaled_centroid
from seedselect_cli.core.prompts import PromptEmbeds
from seedselect_cli.core.sampling import ddim_invert
from seedselect_cli.core.specs import InitSpec, SamplerSpec
from seedselect_cli.core.targets import ReferenceEncodings, weights_fingerprint
from seedselect_cli.derive import derived_int

log = logging.getLogger(__name__)


def init_seed_for(seed: int, class_name: str, index: int | str) -> int:
    """The integer that draws z_T for image `index` of `class_name` (63 bits of a SHA-256)."""
    return derived_int(seed, class_name, index) >> 1


def candidate_seed(init_seed: int, k: int) -> int:
    """The init seed of an image's k-th candidate start (the 0-th is the image's own)."""
    if k == 0:
        return init_seed
    return derived_int(init_seed, "candidate", k) >> 1


def assigned_reference(seed: int, class_name: str, index: int, n_references: int) -> int:
    """The reference of image `index` (init=reference, loss.appearance=assigned): the class's references
    in an order drawn from (seed, class), in turn, so that any n consecutive images have n different ones."""
    key = derived_int(seed, class_name, "references")
    order = list(range(n_references))
    random.Random(key).shuffle(order)
    return order[index % n_references]


def own_references(seed: int, class_name: str, index: int, n_references: int, count: int) -> list[int]:
    """Image `index`'s references for loss.appearance=assigned: its own (`assigned_reference`) first, then the next
    ones in the same drawn order, `count` in all (at most every reference once)."""
    return [assigned_reference(seed, class_name, index + j, n_references) for j in range(min(count, n_references))]


def initial_noise(shape: tuple[int, ...], init_seed: int) -> torch.Tensor:
    """z_T ~ N(0, I), drawn on the CPU so every device gets the same seed (the rollout scales it by the
    sampler's init_noise_sigma, 1 for DDIM)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(init_seed), dtype=torch.float32)


def plain_noise(shape: tuple[int, ...], seed: int, class_name: str, index: int) -> torch.Tensor:
    """The noise plain sampling of image `index` starts from: what `init=random` starts that image from, and
    what `evaluate` compares every image with, whatever its start was."""
    return initial_noise(shape, init_seed_for(seed, class_name, index))


def mix(centre: torch.Tensor | None, noise: torch.Tensor, share: float) -> torch.Tensor:
    """sqrt(1 - a) c + sqrt(a) eps: the start of a seed, with a = `share` of fresh noise's variance."""
    if centre is None:
        return noise
    return (1.0 - share) ** 0.5 * centre + share ** 0.5 * noise


def inversion_fingerprint(models: FrozenModels, height: int, width: int, resize_mode: str) -> str:
    """A key that changes whenever the inversion of the same image could (weights, scheduler, size)."""
    networks = (models.vae, models.unet, models.text_encoder, *([models.text_encoder_2] if models.text_encoder_2 else []))
    return weights_fingerprint(networks, [
        "ddim-inversion", models.scheduler_json(), len(models.tokenizer), height, width, resize_mode,
        str(models.dtype), models.device.type, models.vae.config.scaling_factor])


class TensorStore(Protocol):
    """Where per-image tensors are kept between runs (`files.tensor_cache.TensorCache`)."""

    def get(self, key: str, expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor] | None: ...

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None: ...


class SeedStarts:
    """The starting seeds of a run: `centre` once per class, then `seeds` for each batch of images."""

    def __init__(self, models: FrozenModels, init: InitSpec, sampler: SamplerSpec, shape: tuple[int, ...],
                 cache: TensorStore | None = None, should_stop: Callable[[str], None] | None = None):
        """`cache`: where inversions are kept (`files.tensor_cache.TensorCache` keyed by
        `inversion_fingerprint`), or None; `should_stop(what)` is called before each inversion and may raise."""
        self.models, self.init, self.sampler, self.shape = models, init, sampler, shape
        self.cache, self.should_stop = cache, should_stop

    def invert(self, encodings: ReferenceEncodings, prompt: str, text_embeds: PromptEmbeds) -> torch.Tensor:
        """Each reference's DDIM-inverted seed (n, C, h, w), one at a time, from the cache where it can."""
        init = self.init
        steps = init.inversion_steps or self.sampler.steps
        settings = json.dumps([prompt, self.sampler.negative_prompt, steps, init.inversion_guidance])
        seeds, inverted = [], 0
        for i, latent in enumerate(encodings.appearance):
            if self.should_stop is not None:
                self.should_stop(f"the DDIM inversion of the references of {prompt!r}")
            key = (hashlib.sha256(f"{encodings.hashes[i]}/{settings}".encode()).hexdigest()
                   if encodings.hashes else None)
            entry = self.cache.get(key, {"inverted": self.shape}) if key and self.cache is not None else None
            if entry is None:
                if not inverted:
                    log.info("DDIM-inverting the references with %r, %d steps each", prompt, steps)
                entry = {"inverted": ddim_invert(self.models, latent[None], text_embeds, steps,
                                                 init.inversion_guidance)[0].float().cpu()}
                inverted += 1
                if key and self.cache is not None:
                    self.cache.put(key, entry)
            seeds.append(entry["inverted"])
        return torch.stack(seeds)

    def centre(self, encodings: ReferenceEncodings, prompt: str, text_embeds: PromptEmbeds) -> torch.Tensor | None:
        """The class's centroid start c (C, h, w) float32, None for `init.method=random`, or for
        `init.method=reference` every reference's inverted seed (n, C, h, w)."""
        init = self.init
        if init.method == "random":
            return None
        inverted = self.invert(encodings, prompt, text_embeds)
        if init.method == "reference":
            log.info("init reference: %d inverted references (norm %.1f on average), one per image in turn",
                     len(inverted), inverted.flatten(1).norm(dim=1).mean())
            return inverted
        if init.method == "inversion":
            centre = inverted.mean(dim=0)
        elif init.nao_paths:
            centre = nao_centroid(inverted, init.nao_points, init.nao_length_weight, init.nao_iterations)
        else:
            centre = rescaled_centroid(inverted)
        d = centre.numel()
        log.info("init %s: %d inverted references (norm %.1f on average), centroid norm %.1f; the chi mode is "
                 "%.1f", init.method, len(inverted), inverted.flatten(1).norm(dim=1).mean(), centre.norm(),
                 (d - 1) ** 0.5)
        return centre

    def seeds(self, centre: torch.Tensor | None, init_seeds: list[int], references: list[int] | None = None,
              candidates: int = 1) -> torch.Tensor:
        """The starting seeds (B, C, h, w) of the images with these init seeds, or with `candidates` > 1 their
        candidate starts (B, N, C, h, w). For init=reference, `references` are the images' references."""
        def start(i: int, init_seed: int) -> torch.Tensor:
            own = centre[references[i]] if centre is not None and centre.ndim == len(self.shape) + 1 else centre
            return mix(own, initial_noise(self.shape, init_seed), self.init.noise)

        if candidates == 1:
            return torch.stack([start(i, s) for i, s in enumerate(init_seeds)])
        return torch.stack([torch.stack([start(i, candidate_seed(s, k)) for k in range(candidates)])
                            for i, s in enumerate(init_seeds)])
