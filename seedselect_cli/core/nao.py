"""Norm-aware centroids of seeds (NAO: Samuel et al., "Norm-guided latent space exploration for
text-to-image generation", arXiv 2306.08687).

A d-dimensional standard normal seed has a norm that follows the chi distribution with d degrees of
freedom: nearly all seeds lie on a thin shell of radius about sqrt(d). The Euclidean mean of n seeds
lies far inside it (norm about sqrt(d / n)), where the model has hardly ever started from. NAO's
centroid is the end point shared by paths from every seed along which each point is likely under
the chi distribution. Here the paths are discretised into points and optimised with the centroid:

    minimise  mean_{points p} nll(||p||)  +  mu * mean_i (m + 1) sum_j ||p_i,j+1 - p_i,j||^2

over the centroid c and the m inner points of each path p_i,0 = x_i, ..., p_i,m+1 = c, where
nll = -log chi_d(||p||) + log chi_d(mode) (`losses.seed_norm_prior`) and the second term is each
path's squared length when its points are evenly spaced (mu -> infinity gives the Euclidean mean).
For seeds drawn independently the result points where the Euclidean mean points and only its norm
changes, so `rescaled_centroid`, the mean moved to the chi mode, is the cheap variant.
"""

from __future__ import annotations

import math

import torch

from seedselect_cli.core.losses import seed_norm_prior


def chi_mode(d: int) -> float:
    """The most likely norm of a d-dimensional standard normal seed, sqrt(d - 1)."""
    return math.sqrt(d - 1)


def rescaled_centroid(seeds: torch.Tensor) -> torch.Tensor:
    """The Euclidean mean of `seeds` (n, ...) moved along its direction to the chi mode: (...)."""
    mean = seeds.double().mean(dim=0)
    return (mean * chi_mode(mean.numel()) / mean.norm()).to(seeds.dtype)


def nao_centroid(seeds: torch.Tensor, points: int = 8, length_weight: float = 0.01,
                 iterations: int = 100) -> torch.Tensor:
    """NAO's centroid of `seeds` (n, ...): the shared end of likely paths from every seed, (...).

    Optimised in float64 with L-BFGS from straight paths to the Euclidean mean; deterministic.
    """
    n, shape = seeds.shape[0], seeds.shape[1:]
    x = seeds.detach().double().flatten(1).cpu()
    d = x.shape[1]
    mean = x.mean(dim=0)
    t = torch.linspace(0, 1, points + 2, dtype=torch.float64)[1:-1, None]  # inner points of each path
    inner = (x[:, None] * (1 - t) + mean * t).clone().requires_grad_(True)  # (n, m, d)
    centroid = mean.clone().requires_grad_(True)
    segments = points + 1
    optimizer = torch.optim.LBFGS([inner, centroid], max_iter=iterations, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-9, tolerance_change=1e-12)

    def objective() -> torch.Tensor:
        path = torch.cat([x[:, None], inner, centroid.expand(n, 1, d)], dim=1)  # (n, m + 2, d)
        likely = seed_norm_prior(torch.cat([inner.reshape(-1, d), centroid[None]]), dtype=torch.float64).mean()
        length = segments * (path[:, 1:] - path[:, :-1]).pow(2).sum(dim=(1, 2)).mean()
        return likely + length_weight * length

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    optimizer.step(closure)
    return centroid.detach().reshape(shape).to(seeds.dtype)
