"""The SeedSelect loop on the tiny components: gradients, lambda, k-step, best iterate, batching, backtracking."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import seedselect_cli.core.optimize as optimize_module
from seedselect_cli.core.losses import semantic_distance
from seedselect_cli.core.optimize import (
    backtracking_step,
    clip_seed_gradients,
    optimize_seeds,
    seed_objective,
    semantic_embedding,
)
from seedselect_cli.core.prompts import encode_prompt
from seedselect_cli.core.samplers import ddim_schedule
from seedselect_cli.core.sampling import rollout
from seedselect_cli.core.targets import Centroids
from tests.conftest import make_config


def random_target(seed: int) -> Centroids:
    g = torch.Generator().manual_seed(seed)
    semantic = torch.nn.functional.normalize(torch.randn(16, generator=g), dim=0)
    return Centroids(semantic=semantic, appearance=torch.randn(4, 16, 16, generator=g), count=3)


def seeds(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


def with_loss(config, **changes):
    return dataclasses.replace(config, loss=dataclasses.replace(config.loss, **changes))


def objective_grad(models, config, target, z0):
    z = z0.clone().requires_grad_(True)
    terms = seed_objective(models, z, target, encode_prompt(models, "a red disc"), ddim_schedule(models, 4), config.objective())
    terms.total.sum().backward()
    return terms, z.grad


def test_gradient_reaches_the_seed_and_only_the_seed(tiny_models):
    config = make_config()
    _terms, grad = objective_grad(tiny_models, config, random_target(0), seeds(2))
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    for module in (tiny_models.unet, tiny_models.vae, tiny_models.text_encoder, tiny_models.image_encoder):
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())


@pytest.mark.parametrize("lam, unused", [(0.0, "semantic"), (1.0, "appearance")])
def test_lambda_zero_and_one_use_one_term_only(tiny_models, lam, unused):
    config = with_loss(make_config(), lam=lam)
    target = random_target(1)
    other = random_target(2)  # differs in both centroids; only the unused one is swapped in
    swapped = dataclasses.replace(target, **{unused: getattr(other, unused)})
    terms_a, grad_a = objective_grad(tiny_models, config, target, seeds(1, 3))
    terms_b, grad_b = objective_grad(tiny_models, config, swapped, seeds(1, 3))
    torch.testing.assert_close(terms_a.total, terms_b.total, rtol=0, atol=0)
    torch.testing.assert_close(grad_a, grad_b, rtol=0, atol=0)
    used = "appearance" if unused == "semantic" else "semantic"
    torch.testing.assert_close(terms_a.total, getattr(terms_a, used))


def test_kstep_loss_uses_exactly_the_last_k_latents_with_their_weights(tiny_models, monkeypatch):
    config = make_config(["kstep=authors"])
    target = random_target(4)
    z = seeds(1, 5)
    embeds = encode_prompt(tiny_models, "a red disc")
    timesteps = ddim_schedule(tiny_models, 4)
    seen = []
    monkeypatch.setattr(optimize_module, "semantic_embedding",
                        lambda models, latents: seen.append(latents.detach()) or semantic_embedding(models, latents))
    with torch.no_grad():
        terms = seed_objective(tiny_models, z, target, embeds, timesteps, config.objective())
        every = rollout(tiny_models, z, embeds, timesteps, config.sampler.guidance_scale, keep_last=4)
        expected = sum(w * semantic_distance(semantic_embedding(tiny_models, lat), target.semantic, "cosine")
                       for w, lat in zip(config.kstep.weights, every[-3:]))
    assert len(seen) == 3
    for a, b in zip(seen, every[-3:]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(terms.semantic, expected)


@pytest.mark.slow
def test_loss_falls_and_best_iterate_is_kept(tiny_models):
    config = make_config(["optim.iterations=6"])
    target = random_target(6)
    embeds = encode_prompt(tiny_models, "a red disc")
    [result] = optimize_seeds(tiny_models, seeds(1, 7), target, embeds, config.objective(), config.optim_spec())
    history = result.loss_history
    assert len(history) == 6 and history[-1] < history[0]
    assert result.loss == min(history) and result.best_iteration == history.index(min(history))
    with torch.no_grad():  # the kept seed really has the recorded loss
        terms = seed_objective(tiny_models, result.optimized[None], target, embeds,
                               ddim_schedule(tiny_models, config.sampler.steps), config.objective())
    assert terms.total.item() == pytest.approx(result.loss, rel=1e-5)
    assert not torch.equal(result.optimized, result.initial)


def test_the_last_iteration_runs_no_backward_pass_and_finds_the_same_seeds(tiny_models, monkeypatch):
    """Its step would never be evaluated: 4 iterations take 3 backward passes, and their losses and best iterates are
    those of the first 4 of a longer run, whose fourth iteration did run one."""
    config = make_config(["optim.iterations=6"])
    target, z = random_target(31), seeds(2, 32)
    embeds = encode_prompt(tiny_models, "a red disc")
    backward = []
    original = optimize_module.scaled_backward
    monkeypatch.setattr(optimize_module, "scaled_backward", lambda *a: backward.append(1) or original(*a))
    longer = optimize_seeds(tiny_models, z, target, embeds, config.objective(), config.optim_spec())
    assert len(backward) == 5
    backward.clear()
    shorter = optimize_seeds(tiny_models, z, target, embeds, config.objective(), config.optim_spec(), iterations=4)
    assert len(backward) == 3
    for short, long in zip(shorter, longer):
        assert short.loss_history == pytest.approx(long.loss_history[:4], rel=1e-6)
        assert short.best_iteration == min(range(4), key=long.loss_history.__getitem__)
        assert short.loss == pytest.approx(min(long.loss_history[:4]), rel=1e-6)


@pytest.mark.slow
def test_prompt_is_encoded_once_not_per_iteration(tiny_models, monkeypatch):
    calls = []
    original = tiny_models.text_encoder.forward
    monkeypatch.setattr(tiny_models.text_encoder, "forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    embeds = encode_prompt(tiny_models, "a red disc")
    optimize_seeds(tiny_models, seeds(1), random_target(8), embeds, make_config().objective(), make_config().optim_spec())
    assert len(calls) == 1


@pytest.mark.slow
def test_batched_seeds_match_seeds_optimised_alone(tiny_models):
    config = make_config()
    target = random_target(9)
    embeds = encode_prompt(tiny_models, "a red disc")
    z = seeds(3, 10)
    _, grad_together = objective_grad(tiny_models, config, target, z)
    together = optimize_seeds(tiny_models, z, target, embeds, config.objective(), config.optim_spec())
    for i in range(3):
        _, grad_alone = objective_grad(tiny_models, config, target, z[i:i + 1])
        torch.testing.assert_close(grad_together[i:i + 1], grad_alone, rtol=1e-4, atol=1e-7)
        [alone] = optimize_seeds(tiny_models, z[i:i + 1], target, embeds, config.objective(), config.optim_spec())
        # Adam divides by sqrt(v): float32 rounding between batched and single kernels is amplified
        # where a gradient is near zero, so the seeds after 3 steps agree to 1e-4, not to 1e-7.
        torch.testing.assert_close(together[i].optimized, alone.optimized, rtol=1e-3, atol=2e-4)
        assert together[i].loss_history == pytest.approx(alone.loss_history, rel=1e-4)


def test_the_seed_norm_prior_adds_exactly_its_weighted_term(tiny_models):
    from seedselect_cli.core.losses import seed_norm_prior

    z = seeds(2, 40) * 1.3
    with torch.no_grad():
        plain = seed_objective(tiny_models, z, random_target(41), encode_prompt(tiny_models, "a red disc"),
                               ddim_schedule(tiny_models, 4), make_config().objective())
        prior = seed_objective(tiny_models, z, random_target(41), encode_prompt(tiny_models, "a red disc"),
                               ddim_schedule(tiny_models, 4), make_config(["loss.norm_weight=0.5"]).objective())
    torch.testing.assert_close(prior.total - plain.total, 0.5 * seed_norm_prior(z))


def test_backtracking_steps_each_seed_by_its_share_and_sends_a_risen_seed_halfway_back():
    """`optim.backtrack`'s step against AdamW stepping alone, on fresh random seeds and gradients: a seed at full
    share steps exactly as AdamW does, one at a quarter a quarter as far, and a seed whose loss rose goes halfway
    back to its best iterate with its AdamW moments as they were before the step."""
    g = torch.Generator().manual_seed(41)
    z = torch.randn(3, 4, 5, 5, generator=g).requires_grad_(True)
    plain = z.detach().clone().requires_grad_(True)
    ours_opt, plain_opt = torch.optim.AdamW([z], lr=0.1), torch.optim.AdamW([plain], lr=0.1)
    for _ in range(2):  # moments that are not zero
        grad = torch.randn(z.shape, generator=g)
        z.grad, plain.grad = grad.clone(), grad.clone()
        ours_opt.step()
        plain_opt.step()
    torch.testing.assert_close(z, plain, rtol=0, atol=0)
    best = torch.randn(z.shape, generator=g)
    before = z.detach().clone()
    moments = {k: v.clone() for k, v in ours_opt.state[z].items() if k != "step"}
    grad = torch.randn(z.shape, generator=g)
    z.grad, plain.grad = grad.clone(), grad.clone()
    backtracking_step(ours_opt, z, best, torch.tensor([1.0, 0.25, 0.5]), torch.tensor([False, False, True]))
    plain_opt.step()
    torch.testing.assert_close(z[0], plain[0], rtol=0, atol=0)
    torch.testing.assert_close(z[1], before[1] + 0.25 * (plain[1] - before[1]))
    torch.testing.assert_close(z[2], (best[2] + before[2]) / 2)
    for key, value in moments.items():
        torch.testing.assert_close(ours_opt.state[z][key][2], value[2], rtol=0, atol=0)
        torch.testing.assert_close(ours_opt.state[z][key][:2], plain_opt.state[plain][key][:2], rtol=0, atol=0)


def test_grad_clip_scales_each_seeds_gradient_as_clip_grad_norm_scales_that_seed_alone():
    """`optim.grad_clip` against `torch.nn.utils.clip_grad_norm_` on each seed as its own parameter (ReNO's one
    seed), on fresh gradients of norms above and below the clip: a seed's clipped gradient does not depend on its
    batch, and one within the clip is left as it is."""
    g = torch.Generator().manual_seed(59)
    grad = torch.randn(4, 4, 6, 6, generator=g, dtype=torch.float64) * torch.tensor([3.0, 0.005, 0.4, 50.0],
                                                                                      dtype=torch.float64).view(-1, 1, 1, 1)
    clipped = grad.clone()
    clip_seed_gradients(clipped, 0.1)
    for row in range(4):
        alone = grad[row].clone().requires_grad_(True)
        alone.grad = grad[row].clone()
        torch.nn.utils.clip_grad_norm_([alone], 0.1)
        torch.testing.assert_close(clipped[row], alone.grad, rtol=1e-12, atol=0)
    assert torch.equal(clipped[1], grad[1])  # norm about 0.005 * 12: within the clip
    assert clipped.flatten(1).norm(dim=1).max() <= 0.1 + 1e-9


@pytest.mark.slow
def test_renos_recipe_steps_each_seed_as_renos_loop_steps_it_alone(tiny_models):
    """`optim.grad_clip` with SGD and Nesterov momentum (ReNO's optimiser) in a batch of two, against ReNO's trainer
    loop written out for each seed alone: evaluate, backward, `clip_grad_norm_`, step; the last iterate is evaluated
    and not stepped, and the best iterate is kept. The clip is ReNO's 0.1 over 10: the tiny networks' gradients
    (norm about 0.02) would pass ReNO's own unclipped."""
    overrides = ["optim.optimizer._target_=torch.optim.SGD", "+optim.optimizer.momentum=0.9",
                 "+optim.optimizer.nesterov=true", "optim.lr=5", "optim.grad_clip=0.01", "optim.iterations=4", "optim.lr_drop_factor=1",
                 "optim.backtrack=null", "loss.norm_weight=0.01"]
    config = make_config(overrides)
    target, z = random_target(60), seeds(2, 61)
    embeds = encode_prompt(tiny_models, "a red disc")
    schedule = ddim_schedule(tiny_models, config.sampler.steps)
    together = optimize_seeds(tiny_models, z, target, embeds, config.objective(), config.optim_spec())
    for i in range(2):
        seed = z[i:i + 1].clone().requires_grad_(True)
        sgd = torch.optim.SGD([seed], lr=5, momentum=0.9, nesterov=True)
        losses, iterates, norms = [], [], []
        for it in range(4):
            sgd.zero_grad()
            terms = seed_objective(tiny_models, seed, target, embeds, schedule, config.objective())
            losses.append(terms.total.item())
            iterates.append(seed.detach().clone())
            if it < 3:
                terms.total.sum().backward()
                norms.append(float(torch.nn.utils.clip_grad_norm_([seed], 0.01)))
                sgd.step()
        assert min(norms) > 0.01  # every step clipped
        best = min(range(4), key=losses.__getitem__)
        assert together[i].loss_history == pytest.approx(losses, rel=1e-5)
        assert together[i].best_iteration == best
        torch.testing.assert_close(together[i].optimized, iterates[best][0], rtol=1e-5, atol=1e-6)
