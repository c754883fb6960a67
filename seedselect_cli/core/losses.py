"""The SeedSelect losses (the paper's section 3), per seed so that a batch of seeds stays independent.

    L_sem = sum_j w_j dist(mu_v, v_j)        over the latents after each of the last k steps
    L_app = mean((z_0 - mu_z)^2)             loss.appearance=centroid (the paper); nearest: min over the
                                             references' latents instead of their mean mu_z; assigned: the
                                             image's own reference in place of mu_z
    L     = lam * L_sem + (1 - lam) * L_app

With `loss.semantic=contrastive` each dist(mu_v, v_j) becomes the contrastive loss over the classes
of the run, -log softmax_c(-dist(mu_v^c, v_j) / tau) at the seed's own class. With
`loss.norm_weight` > 0 the seed-norm prior is added: the negative log-likelihood of ||z_T|| under
the chi distribution of a d-dimensional standard normal seed (NAO, arXiv 2306.08687).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def semantic_distance(embeds: torch.Tensor, centroid: torch.Tensor, distance: str) -> torch.Tensor:
    """dist(mu_v, v) for each row of `embeds` (B, D): cosine distance 1 - cos, or Euclidean ||v - mu_v||."""
    if distance == "cosine":
        return 1.0 - F.cosine_similarity(embeds, centroid.expand_as(embeds), dim=-1)
    if distance == "euclidean":
        return (embeds - centroid).norm(dim=-1)
    raise ValueError(f"unknown distance {distance!r}")


def pairwise_distance(embeds: torch.Tensor, centroids: torch.Tensor, distance: str) -> torch.Tensor:
    """dist(mu_v^c, v) for every row of `embeds` (B, D) and every centroid (N, D): (B, N)."""
    if distance == "cosine":
        return 1.0 - F.normalize(embeds, dim=-1) @ F.normalize(centroids, dim=-1).T
    if distance == "euclidean":
        return torch.cdist(embeds, centroids)
    raise ValueError(f"unknown distance {distance!r}")


def contrastive_semantic_loss(embeds: torch.Tensor, centroid: torch.Tensor, classes: torch.Tensor,
                              class_index: int, distance: str, temperature: float) -> torch.Tensor:
    """-log( exp(-d(mu_v^c, v)/tau) / sum_c' exp(-d(mu_v^c', v)/tau) ), one per seed (B,).

    `classes` (N, D) holds every class's mu_v; row `class_index` is replaced by this seed's own
    target `centroid` ((D,) or (B, D), e.g. a bootstrap subset's centroid).
    """
    own = semantic_distance(embeds, centroid, distance)  # (B,)
    others = pairwise_distance(embeds, classes.to(embeds.dtype), distance)  # (B, N)
    column = torch.arange(classes.shape[0], device=embeds.device) == class_index
    dist = torch.where(column, own[:, None], others)
    return -torch.log_softmax(-dist / temperature, dim=-1)[:, class_index]


def kstep_semantic_loss(step_embeds: list[torch.Tensor], centroid: torch.Tensor, weights: list[float],
                        distance: str, contrast: tuple[torch.Tensor, int, float] | None = None) -> torch.Tensor:
    """k-step semantic loss: sum_j w_j dist(mu_v, v_j), one per seed (B,).

    With `contrast=(classes, class_index, temperature)` each term is the contrastive loss instead.
    """
    if len(step_embeds) != len(weights):
        raise ValueError(f"{len(step_embeds)} latents for {len(weights)} k-step weights")
    if contrast is None:
        return sum(w * semantic_distance(v, centroid, distance) for w, v in zip(weights, step_embeds))
    classes, class_index, temperature = contrast
    return sum(w * contrastive_semantic_loss(v, centroid, classes, class_index, distance, temperature)
               for w, v in zip(weights, step_embeds))


def appearance_loss(z_0: torch.Tensor, centroid: torch.Tensor) -> torch.Tensor:
    """L_app = mean over elements of (z_0 - mu_z)^2, one per seed (B,)."""
    return (z_0.float() - centroid).pow(2).flatten(1).mean(dim=1)


def nearest_appearance_loss(z_0: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """min_i mean((z_0 - E(I_i))^2) over the references' latents, (n, C, h, w) shared or (B, n, C, h, w) per
    seed: one per seed (B,). The mean latent decodes to an average image (a blob at the mean place);
    the nearest reference is an image."""
    refs = references if references.ndim == z_0.ndim + 1 else references.expand(z_0.shape[0], *references.shape)
    return (z_0.float()[:, None] - refs).pow(2).flatten(2).mean(dim=2).min(dim=1).values


def seed_norm_prior(z_T: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """-log chi_d(||z_T||) + log chi_d(sqrt(d - 1)), one per seed (B,): 0 at the chi mode, about
    (r - sqrt(d - 1))^2 near it. In float32 (or `dtype`) whatever the seed's dtype: r^(d-1) overflows
    float16.

        chi_d(r) = r^(d-1) exp(-r^2 / 2) / (2^(d/2 - 1) Gamma(d/2)),   d = C * H * W
    """
    z = z_T.to(dtype).flatten(1)
    d = z.shape[1]
    r = z.norm(dim=1)
    mode = math.sqrt(d - 1)

    def nll(radius):  # the normalising constant cancels in the difference
        return -(d - 1) * torch.log(radius) + radius ** 2 / 2

    return nll(r) - nll(torch.tensor(mode, dtype=dtype, device=r.device))


@dataclass
class LossTerms:
    """Per-seed losses, each of shape (B,)."""

    total: torch.Tensor
    semantic: torch.Tensor
    appearance: torch.Tensor


def combine(semantic: torch.Tensor, appearance: torch.Tensor, lam: float, norm: torch.Tensor | None = None,
            norm_weight: float = 0.0) -> LossTerms:
    """L = lam * L_sem + (1 - lam) * L_app [+ norm_weight * L_norm]; a zero weight drops its term from
    the graph entirely."""
    total = 0.0
    if lam > 0:
        total = total + lam * semantic
    if lam < 1:
        total = total + (1.0 - lam) * appearance
    if norm is not None and norm_weight > 0:
        total = total + norm_weight * norm
    return LossTerms(total=total, semantic=semantic, appearance=appearance)
