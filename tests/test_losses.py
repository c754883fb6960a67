"""The loss terms against plain float64 formulas on fresh random inputs."""

from __future__ import annotations

import torch

from seedselect_cli.losses import appearance_loss, combine, kstep_semantic_loss, semantic_distance


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def test_cosine_and_euclidean_distance_match_formulas():
    g = torch.Generator().manual_seed(0)
    v, mu = unit(torch.randn(5, 12, generator=g, dtype=torch.float64)), torch.randn(12, generator=g, dtype=torch.float64)
    expected_cos = torch.tensor([1 - float(v[i] @ mu) / float(mu.norm()) for i in range(5)], dtype=torch.float64)
    torch.testing.assert_close(semantic_distance(v, mu, "cosine"), expected_cos)
    expected_l2 = torch.tensor([float(((v[i] - mu) ** 2).sum().sqrt()) for i in range(5)], dtype=torch.float64)
    torch.testing.assert_close(semantic_distance(v, mu, "euclidean"), expected_l2)


def test_kstep_loss_is_the_weighted_sum_over_steps():
    g = torch.Generator().manual_seed(1)
    embeds = [unit(torch.randn(3, 8, generator=g, dtype=torch.float64)) for _ in range(3)]
    mu = unit(torch.randn(8, generator=g, dtype=torch.float64))
    weights = [0.05, 0.25, 0.7]
    expected = sum(w * (1 - e @ mu) for w, e in zip(weights, embeds))
    torch.testing.assert_close(kstep_semantic_loss(embeds, mu, weights, "cosine"), expected)


def test_appearance_loss_is_mean_squared_error_per_seed():
    g = torch.Generator().manual_seed(2)
    z, mu = torch.randn(4, 4, 6, 6, generator=g, dtype=torch.float64), torch.randn(4, 6, 6, generator=g, dtype=torch.float64)
    expected = torch.stack([((z[i] - mu) ** 2).mean() for i in range(4)])
    torch.testing.assert_close(appearance_loss(z, mu), expected)


def test_lambda_weights_the_two_terms():
    g = torch.Generator().manual_seed(3)
    sem, app = torch.rand(4, generator=g), torch.rand(4, generator=g)
    torch.testing.assert_close(combine(sem, app, 0.0).total, app)
    torch.testing.assert_close(combine(sem, app, 1.0).total, sem)
    torch.testing.assert_close(combine(sem, app, 0.3).total, 0.3 * sem + 0.7 * app)
