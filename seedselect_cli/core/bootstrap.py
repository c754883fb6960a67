"""Bulk image sets (README, "Bulk image sets"), one class at a time.

The paper's scheme (`bootstrap.noise=0`, `method=paper`):
    1. z_T^G: optimise one seed on the centroids of all references, `bootstrap.global_iterations`.
    2. For each image: draw `bootstrap.subset_size` references with replacement and optimise a seed
       from z_T^G towards that subset's centroids for `bootstrap.iterations`.
With `bootstrap.noise=a` each image starts from sqrt(1 - a) z_T^G + sqrt(a) eps, eps its own noise, and keeps the
best of `bootstrap.candidates` such starts; with a = 1 (`method=select`, the default) no z_T^G is needed.

Each seed of a batch has its own subset, so the batch carries per-seed centroids; the summed loss keeps every
seed's gradient and AdamW state its own. The subset and the noise of image `index` depend only on (`seed`, class,
index), and z_T^G is saved in the run directory, so a resumed run, another batch size or another shard draws
exactly the same images.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from seedselect_cli.core.initial_seeds import (
    assigned_reference,
    candidate_seed,
    init_seed_for,
    initial_noise,
    mix,
)
from seedselect_cli.core.specs import BootstrapSpec
from seedselect_cli.core.targets import Centroids, ReferenceEncodings, stack_centroids
from seedselect_cli.derive import derived_int


@dataclass
class Batch:
    """Seeds to optimise together: their image indices, starting seeds, targets, and the command's schedule for
    them: iteration count and backtracking share (`optim.*` for optimize's, `bootstrap.*` for bootstrap's)."""

    indices: list[int]
    init_seeds: list[int]
    z_init: torch.Tensor  # (B, C, h, w)
    centroids: Centroids  # shared, or per seed
    iterations: int
    extra: list[dict] = field(default_factory=list)  # per seed: what the manifest records besides
    backtrack: float | None = None  # `OptimSpec.backtrack` for this batch; None: the authors' plain AdamW
    keep_drawn: bool = False  # `bootstrap.keep_drawn`: a chosen start that already draws the concept is not refined


def draw_subset(seed: int, class_name: str, index: int, n_references: int, size: int) -> list[int]:
    """`size` reference indices drawn with replacement, the same for the same (seed, class, index)."""
    key = derived_int(seed, class_name, "subset", index)
    rng = random.Random(key)
    return sorted(rng.randrange(n_references) for _ in range(size))


def bootstrap_batches(bootstrap: BootstrapSpec, appearance: str, seed: int, class_name: str, blocks: list[list[int]],
                      encodings: ReferenceEncodings, z_global: torch.Tensor | None, global_init_seed: int,
                      shape: tuple[int, ...]) -> Iterator[Batch]:
    """Stage 2: a batch per block of image indices, seeds (of `shape`) starting from z_T^G mixed with each image's
    own noise, `bootstrap.noise` of its variance (z_T^G None: noise 1, from the image's own noise alone; with
    `bootstrap.candidates` > 1 that many starts an image, to be chosen among), each steered towards its own
    reference subset (`appearance`: `loss.appearance`; `seed`: the run's). An image's init seed is z_T^G's, or
    with noise its own."""
    n_refs, size = len(encodings.paths), bootstrap.subset_size
    for chunk in blocks:
        subsets = [draw_subset(seed, class_name, i, n_refs, size) for i in chunk]
        if appearance == "assigned":  # the image's own reference first: its latent is the target
            subsets = [[assigned_reference(seed, class_name, i, n_refs), *s] for i, s in zip(chunk, subsets)]
        if bootstrap.noise > 0:
            init_seeds = [init_seed_for(seed, class_name, i) for i in chunk]
            z_init = torch.stack([torch.stack([mix(z_global, initial_noise(shape, candidate_seed(s, k)), bootstrap.noise)
                                               for k in range(bootstrap.candidates)]) for s in init_seeds])
            if bootstrap.candidates == 1:
                z_init = z_init[:, 0]
        else:
            init_seeds = [global_init_seed] * len(chunk)
            z_init = z_global[None].expand(len(chunk), *z_global.shape).clone()
        yield Batch(
            indices=chunk, init_seeds=init_seeds, z_init=z_init,
            centroids=stack_centroids([encodings.centroids(s, appearance=appearance) for s in subsets]),
            iterations=bootstrap.iterations,
            extra=[{"subset": [encodings.paths[j].name for j in s]} for s in subsets],  # file names, as `reference`
            backtrack=bootstrap.backtrack,
            keep_drawn=bootstrap.keep_drawn,
        )
