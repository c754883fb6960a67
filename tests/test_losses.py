"""The loss terms against plain float64 formulas on fresh random inputs."""

from __future__ import annotations

import math

import pytest
import torch

from seedselect_cli.core.losses import (
    appearance_loss,
    combine,
    contrastive_semantic_loss,
    kstep_semantic_loss,
    seed_norm_prior,
    semantic_distance,
)


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


def plain_contrastive(v, target, classes, c, distance, tau):
    """The README's formula ("The method, as implemented"), one seed and one class at a time, in Python floats."""
    def dist(a, b):
        if distance == "cosine":
            return 1 - float(a @ b) / (float(a.norm()) * float(b.norm()))
        return float((a - b).norm())
    out = []
    for i in range(v.shape[0]):
        mu = [target[i] if j == c else classes[j] for j in range(classes.shape[0])]
        logits = [math.exp(-dist(mu_j, v[i]) / tau) for mu_j in mu]
        out.append(-math.log(logits[c] / sum(logits)))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_contrastive_loss_matches_the_formula(distance):
    g = torch.Generator().manual_seed(4)
    v = unit(torch.randn(3, 10, generator=g, dtype=torch.float64))
    classes = unit(torch.randn(5, 10, generator=g, dtype=torch.float64))
    target = unit(torch.randn(3, 10, generator=g, dtype=torch.float64))  # per-seed (bootstrap subsets)
    for tau in (0.05, 1.0):
        got = contrastive_semantic_loss(v, target, classes, 2, distance, tau)
        torch.testing.assert_close(got, plain_contrastive(v, target, classes, 2, distance, tau))
    shared = contrastive_semantic_loss(v, classes[1], classes, 1, distance, 0.1)  # one centroid for all
    torch.testing.assert_close(shared, plain_contrastive(v, classes[1].expand(3, -1), classes, 1, distance, 0.1))


def test_contrastive_loss_prefers_the_own_class_and_enters_the_kstep_sum():
    g = torch.Generator().manual_seed(5)
    classes = unit(torch.randn(4, 8, generator=g, dtype=torch.float64))
    near_own, near_other = unit(classes[0] + 0.05), unit(classes[3] + 0.05)
    loss = contrastive_semantic_loss(torch.stack([near_own, near_other]), classes[0], classes, 0, "cosine", 0.05)
    assert loss[0] < math.log(4) < loss[1]  # log N: the loss of an embedding equally far from all classes
    embeds = [unit(torch.randn(2, 8, generator=g, dtype=torch.float64)) for _ in range(2)]
    weights = [0.3, 0.7]
    expected = sum(w * contrastive_semantic_loss(e, classes[2], classes, 2, "cosine", 0.1)
                   for w, e in zip(weights, embeds))
    got = kstep_semantic_loss(embeds, classes[2], weights, "cosine", contrast=(classes, 2, 0.1))
    torch.testing.assert_close(got, expected)


def chi_nll(r: float, d: int) -> float:
    """-log chi_d(r), the textbook density, in Python floats."""
    return -((d - 1) * math.log(r) - r * r / 2 - (d / 2 - 1) * math.log(2) - math.lgamma(d / 2))


def test_seed_norm_prior_is_the_chi_negative_log_likelihood_from_its_mode():
    g = torch.Generator().manual_seed(6)
    z = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64) * torch.tensor([0.8, 1.0, 1.3]).view(3, 1, 1, 1)
    d = 4 * 8 * 8
    expected = [chi_nll(float(z[i].norm()), d) - chi_nll(math.sqrt(d - 1), d) for i in range(3)]
    torch.testing.assert_close(seed_norm_prior(z).double(), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-4, atol=1e-3)
    at_mode = z[1:2] / z[1].norm() * math.sqrt(d - 1)
    assert abs(seed_norm_prior(at_mode).item()) < 1e-3 and (seed_norm_prior(z) > 0).all()


def test_seed_norm_prior_in_float16_does_not_overflow_and_pulls_towards_the_mode():
    g = torch.Generator().manual_seed(7)
    z = (torch.randn(2, 4, 64, 64, generator=g) * 1.2).half()  # the SD 2.1 seed at 512 px: d = 16384
    prior = seed_norm_prior(z)
    assert prior.dtype == torch.float32 and torch.isfinite(prior).all()
    torch.testing.assert_close(prior, seed_norm_prior(z.double()).float(), rtol=1e-2, atol=0.5)
    z32 = z.float().requires_grad_(True)
    seed_norm_prior(z32).sum().backward()
    assert ((z32.grad * z32).flatten(1).sum(1) > 0).all()  # descending shrinks a seed that is too long


def test_the_prior_enters_the_total_with_its_weight():
    g = torch.Generator().manual_seed(8)
    sem, app, norm = torch.rand(3, generator=g), torch.rand(3, generator=g), torch.rand(3, generator=g)
    torch.testing.assert_close(combine(sem, app, 0.3, norm, 0.5).total, 0.3 * sem + 0.7 * app + 0.5 * norm)
    torch.testing.assert_close(combine(sem, app, 0.3, norm, 0.0).total, 0.3 * sem + 0.7 * app)
