"""The method's settings as plain dataclasses: what each function of `core` needs, and no more.

The config schema (`config.py`) is made of these sections, so a key means the same in a YAML file, on
the command line and here; code that calls the method without the command line builds them
directly. `OptimSpec` holds the optimiser itself, where the config names it by a Hydra `_target_`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where an optimiser is made: the config (a bad value's answer, `--help`)
    import torch  # does without its 2 s of imports


@dataclass
class LossSpec:
    """`loss`: the SeedSelect loss, L = lam L_sem + (1 - lam) L_app (README, "The method, as implemented")."""

    # L = lam * L_sem + (1 - lam) * L_app; the authors' 10 * L_sem + L_app is lam = 10/11.
    lam: float = 10 / 11
    distance: str = "cosine"
    semantic: str = "centroid"  # centroid: dist(mu_v, v); contrastive: against every class of the run
    temperature: float = 0.05  # tau of the contrastive loss
    norm_weight: float = 0.0  # weight of the seed-norm prior (chi NLL of ||z_T||); 0: off
    # what L_app pulls z_0 towards: centroid, the references' mean latent mu_z (the paper); nearest, the
    # nearest reference's latent; assigned, one reference per image (init=reference starts it there)
    appearance: str = "centroid"
    # with appearance=assigned (seedselect optimize): L_sem's target is the mean CLIP embedding of the image's own
    # reference and the next ones, this many in all (1: its own alone; every reference: the paper's centroid)
    semantic_references: int = 1


@dataclass
class KStepSpec:
    """`kstep`: L_sem on the decodes of the last k steps, with these weights."""

    k: int = 3
    weights: list[float] = field(default_factory=lambda: [0.05, 0.25, 0.7])


@dataclass
class SamplerSpec:
    """`sampler`: the sampling the seeds are optimised through and their images drawn with."""

    name: str = "ddim"  # ddim | euler (trailing timesteps) | dpmpp_2m | lcm: core/samplers.py

    steps: int = 20
    guidance_scale: float = 7.5
    height: int = 512
    width: int = 512
    negative_prompt: str = ""
    checkpointing: bool = True  # one checkpoint per denoising step: memory flat in `steps`


@dataclass
class InitSpec:
    """Where seeds start: fresh noise, or a centroid of the references' DDIM inversions mixed with noise."""

    # random (the default: the paper's) | inversion (their mean) | nao (their norm-aware centroid, NAO) |
    # reference (each image its own reference's inversion)
    method: str = "random"
    noise: float = 0.5  # share of fresh noise's variance in a centroid start; 0: every image starts alike
    candidates: int = 1  # starts drawn per image, each scored by one forward pass; the best is optimised
    # what scores a candidate: semantic, L_sem alone (does it draw the concept?); loss, the whole loss (L_app then
    # prefers the references' mean layout, and every image of a class comes out alike: RESULTS.md)
    candidate_score: str = "semantic"
    inversion_steps: int | None = None  # DDIM steps of the inversion; null: sampler.steps
    inversion_guidance: float = 1.0  # CFG scale of the inversion; 1: the class prompt alone
    nao_paths: bool = True  # NAO's path optimisation; false: the mean of the inverted seeds moved to the chi mode
    nao_points: int = 8  # inner points on each path
    nao_length_weight: float = 0.01  # weight of the paths' squared length against their chi NLL
    nao_iterations: int = 100  # L-BFGS iterations


@dataclass
class BootstrapSpec:
    """`seedselect bootstrap`: one seed z_T^G per class on all references, then each image from it."""

    subset_size: int = 3  # references drawn, with replacement, for each image's centroids
    iterations: int = 5  # per image, from its start
    global_iterations: int = 10  # for z_T^G, on all references
    # share of fresh noise's variance in each image's start, sqrt(1 - a) z_T^G + sqrt(a) eps (eps: the image's own
    # init seed's noise, as plain sampling draws it); 0: the paper's, every image of a class from z_T^G itself
    noise: float = 0.0
    candidates: int = 1  # with noise: starts drawn per image (its own and more), the best kept as `init.candidates`
    # bootstrap's `optim.backtrack` (its own, as its iteration counts are): None, the authors' plain AdamW, in
    # every method; backtracking cost bootstrap's images precision where it cost optimize's none (RESULTS.md)
    backtrack: float | None = None
    # with candidates: the first start that already draws the concept (its L_sem to the class's mu_v within the
    # references' spread, `ReferenceEncodings.spread`) is kept as it is drawn, unrefined: where the model draws the
    # concept unaided, the images vary as plain sampling's do (README, "Bulk image sets")
    keep_drawn: bool = False


def adamw(params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    import torch

    return torch.optim.AdamW(params, lr=lr)


@dataclass
class OptimSpec:
    """The optimisation of a batch of seeds: `optimizer(params, lr=...)` for `iterations`, the learning rate
    times `lr_drop_factor` from iteration `lr_drop_at` on (the authors' schedule)."""

    lr: float = 0.1
    iterations: int = 30
    lr_drop_at: int = 3
    lr_drop_factor: float = 0.1
    shell: bool = False  # after each step, every seed back on the Gaussian shell (norm sqrt(d - 1))
    patience: int = 0  # stop once no seed's loss has improved by 1 % for this many iterations; 0: never
    stop_near_reference: bool = False  # stop each seed once L_sem <= its target's `Centroids.spacing`
    # a seed whose loss rises above its best by this share goes halfway back to its best iterate and steps half as
    # far from then on; None: never (the authors' plain AdamW)
    backtrack: float | None = None
    # each seed's gradient scaled down to at most this L2 norm before the step (ReNO's `clip_grad_norm_`, which it
    # takes at batch 1); None: never
    grad_clip: float | None = None
    optimizer: Callable[..., torch.optim.Optimizer] = adamw


@dataclass
class Objective:
    """What the loss of a seed depends on: the loss, its k steps, and the sampler it is rolled out with."""

    loss: LossSpec = field(default_factory=LossSpec)
    kstep: KStepSpec = field(default_factory=KStepSpec)
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
