"""The differentiable DDIM sampler: z_T -> z_0 with classifier-free guidance.

Small functions in the k-diffusion manner; gradient mode is the caller's. With `checkpoint=True`
each denoising step is one activation checkpoint, so only the latents between steps are kept and
memory does not grow with the number of steps (the step is recomputed in the backward pass).
With `runtime.cuda_graphs` each checkpointed step is a pair of CUDA graphs (`cuda_graphs.py`).
"""

from __future__ import annotations

import torch
from diffusers import DDIMInverseScheduler

from seedselect_cli.core.cuda_graphs import checkpointed
from seedselect_cli.core.encoders import to_pil, vae_decode
from seedselect_cli.core.frozen import FrozenModels


@torch.no_grad()
def encode_prompt(models: FrozenModels, prompt: str, negative_prompt: str = "") -> torch.Tensor:
    """Text embeddings c(y) of [negative prompt, prompt]: (2, L, D). Computed once per prompt."""
    tokens = models.tokenizer(
        [negative_prompt, prompt], padding="max_length", max_length=models.tokenizer.model_max_length,
        truncation=True, return_tensors="pt",
    )
    return models.text_encoder(tokens.input_ids.to(models.device))[0].to(models.dtype)


def set_timesteps(models: FrozenModels, steps: int) -> torch.Tensor:
    """The DDIM timesteps for `steps` sampling steps, from noisiest to cleanest."""
    models.scheduler.set_timesteps(steps)
    return models.scheduler.timesteps


def uses_guidance(guidance_scale: float) -> bool:
    """Whether classifier-free guidance runs: a scale of 1 or less is the conditional pass alone (as diffusers)."""
    return guidance_scale > 1.0


def guided_embeddings(text_embeds: torch.Tensor, batch: int, guidance_scale: float) -> torch.Tensor:
    """Embeddings for a UNet batch: [uncond x batch, cond x batch] with guidance, [cond x batch] without."""
    if uses_guidance(guidance_scale):
        return text_embeds.repeat_interleave(batch, dim=0)
    return text_embeds[1:].expand(batch, -1, -1)


def guided_noise(models: FrozenModels, z: torch.Tensor, t: torch.Tensor | int, embeds: torch.Tensor,
                 guidance_scale: float) -> torch.Tensor:
    """eps(z, t) with classifier-free guidance eps = eps_u + w (eps_c - eps_u) (Ho & Salimans 2022, eq. 6),
    the unconditional pass batched with the conditional one. A Python int `t` becomes a tensor on z's
    device by a fill, not a copy from the host, so that the step can be captured in a CUDA graph."""
    guided = uses_guidance(guidance_scale)
    model_in = torch.cat([z, z]) if guided else z
    model_in = models.scheduler.scale_model_input(model_in, t).to(models.dtype)
    t_model = t if torch.is_tensor(t) else torch.full((), t, dtype=torch.long, device=z.device)
    eps = models.unet(model_in, t_model, encoder_hidden_states=embeds).sample.to(z.dtype)
    if guided:
        eps_uncond, eps_cond = eps.chunk(2)
        eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
    return eps


def ddim_step(models: FrozenModels, z: torch.Tensor, t: torch.Tensor | int, embeds: torch.Tensor,
              guidance_scale: float) -> torch.Tensor:
    """One DDIM step, eta = 0 (Song et al. 2021, eq. 12), with classifier-free guidance."""
    eps = guided_noise(models, z, t, embeds, guidance_scale)
    return models.scheduler.step(eps, t, z, eta=0.0).prev_sample


def ddim_rollout(models: FrozenModels, z_T: torch.Tensor, text_embeds: torch.Tensor, timesteps: torch.Tensor,
                 guidance_scale: float, keep_last: int = 1, checkpoint: bool = True) -> list[torch.Tensor]:
    """Run DDIM from z_T (float32, (B, C, h, w)) and return the latents after each of the last
    `keep_last` steps, oldest first: the last one is z_0."""
    embeds = guided_embeddings(text_embeds, z_T.shape[0], guidance_scale)
    use_checkpoint = checkpoint and torch.is_grad_enabled()
    z, kept = z_T, []
    for i, t in enumerate(timesteps):
        if use_checkpoint:
            step = _step_at(models, int(t), guidance_scale)
            z = checkpointed(models, ("the denoising steps", int(t), float(guidance_scale)), step, z, embeds)
        else:
            z = ddim_step(models, z, t, embeds, guidance_scale)
        if i >= len(timesteps) - keep_last:
            kept.append(z)
    return kept


def _step_at(models: FrozenModels, t: int, guidance_scale: float):
    """z, embeds -> the DDIM step at timestep t. A Python int t keeps the scheduler's arithmetic on the
    host and fills the UNet's timestep on the device, so that the step can be captured in a CUDA graph."""
    def step(z: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        return ddim_step(models, z, t, embeds, guidance_scale)
    return step


@torch.no_grad()
def ddim_invert(models: FrozenModels, z_0: torch.Tensor, text_embeds: torch.Tensor, steps: int,
                guidance_scale: float = 1.0) -> torch.Tensor:
    """DDIM inversion (Song et al. 2021, eq. 13 run backwards; Dhariwal & Nichol 2021, eq. 55): the seed
    z_T from which `steps` DDIM steps lead back to the latents z_0 (float32, (B, C, h, w)).

    Each step reuses eps at the next timestep, the usual approximation, so the round trip is exact only
    as the step count grows. diffusers' `DDIMInverseScheduler`, built from the sampler's own config,
    ends at the sampler's first timestep.
    """
    inverse = DDIMInverseScheduler.from_config(models.scheduler.config)
    inverse.set_timesteps(steps)
    embeds = guided_embeddings(text_embeds, z_0.shape[0], guidance_scale)
    z = z_0.to(models.device, torch.float32)
    for t in inverse.timesteps:
        eps = guided_noise(models, z, t, embeds, guidance_scale)
        z = inverse.step(eps, t, z).prev_sample
    return z


@torch.no_grad()
def sample_images(models: FrozenModels, z_T: torch.Tensor, text_embeds: torch.Tensor, steps: int,
                  guidance_scale: float) -> list:
    """The images a batch of seeds gives: DDIM, decode, 8-bit PIL. What `generate` repeats exactly."""
    timesteps = set_timesteps(models, steps)
    z_0 = ddim_rollout(models, z_T.to(models.device, torch.float32), text_embeds, timesteps, guidance_scale)[-1]
    return to_pil(models, vae_decode(models, z_0))
