"""The differentiable DDIM sampler against a plain float64 DDIM, with and without checkpointing."""

from __future__ import annotations

import torch

from seedselect_cli.core.prompts import encode_prompt, guided_embeddings
from seedselect_cli.core.samplers import Denoiser, ddim_schedule, ddim_step
from seedselect_cli.core.sampling import rollout


def plain_ddim(models, z, text_embeds, timesteps, w):
    """Textbook DDIM, eta = 0 (Song et al. 2021, eq. 12), with separate cond / uncond UNet calls."""
    alphas = models.scheduler.alphas_cumprod.double()
    step = models.scheduler.config.num_train_timesteps // len(timesteps)
    latents = []
    for t in timesteps:
        cond, uncond = (text_embeds.hidden[i:i + 1].expand(len(z), -1, -1) for i in (1, 0))
        eps_c = models.unet(z, t, encoder_hidden_states=cond).sample
        eps_u = models.unet(z, t, encoder_hidden_states=uncond).sample
        eps = eps_u + w * (eps_c - eps_u)
        a_t = alphas[t]
        prev = int(t) - step
        a_prev = alphas[prev] if prev >= 0 else alphas[0]  # set_alpha_to_one=False
        x0 = (z - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        z = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        latents.append(z)
    return latents


def inputs(models, seed: int, batch: int, steps: int, prompt: str):
    """Fresh random seeds in the models' dtype, the prompt's embeddings, and the timesteps."""
    z = torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(seed)).to(models.dtype)
    return z, encode_prompt(models, prompt), ddim_schedule(models, steps)


def test_rollout_matches_plain_ddim_in_float64(tiny_models64):
    m = tiny_models64
    z, embeds, timesteps = inputs(m, 0, 1, 5, "a photo of a pine warbler")
    with torch.no_grad():
        ours = rollout(m, z, embeds, timesteps, guidance_scale=7.5, keep_last=5)
        plain = plain_ddim(m, z, embeds, timesteps, 7.5)
    assert len(ours) == 5
    for a, b in zip(ours, plain):
        # diffusers computes the schedule coefficients in float32: agreement to ~1e-7, not 1e-15
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_guidance_off_uses_the_conditional_pass_only(tiny_models64):
    m = tiny_models64
    z, embeds, timesteps = inputs(m, 1, 2, 3, "a red disc")
    with torch.no_grad():
        ours = ddim_step(Denoiser(m, 1.0), timesteps, z, timesteps[0], guided_embeddings(embeds, 2, 1.0))
        plain_w1 = plain_ddim(m, z, embeds, timesteps, 1.0)[0]
    torch.testing.assert_close(ours, plain_w1, rtol=1e-5, atol=1e-6)


def test_checkpointed_rollout_gives_same_latents_and_gradients(tiny_models):
    m = tiny_models
    z0, embeds, timesteps = inputs(m, 2, 2, 6, "a photo of a hand")
    target = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(20))
    results = []
    for checkpoint in (True, False):
        z = z0.clone().requires_grad_(True)
        kept = rollout(m, z, embeds, timesteps, 7.5, keep_last=3, checkpoint=checkpoint)
        loss = sum((k - target).pow(2).mean() * (j + 1) for j, k in enumerate(kept))
        loss.backward()
        results.append(([k.detach() for k in kept], z.grad.clone()))
    (lat_ck, grad_ck), (lat_plain, grad_plain) = results
    for a, b in zip(lat_ck, lat_plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert grad_plain.abs().sum() > 0
    torch.testing.assert_close(grad_ck, grad_plain, rtol=1e-5, atol=1e-7)


def test_keep_last_returns_the_last_k_latents_in_order(tiny_models):
    m = tiny_models
    z, embeds, timesteps = inputs(m, 3, 1, 5, "a tiger cat")
    with torch.no_grad():
        every = rollout(m, z, embeds, timesteps, 3.0, keep_last=5)
        last3 = rollout(m, z, embeds, timesteps, 3.0, keep_last=3)
    assert len(last3) == 3
    for a, b in zip(last3, every[-3:]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
