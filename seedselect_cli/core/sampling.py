"""The differentiable DDIM sampler: z_T -> z_0 with classifier-free guidance.

Small functions in the k-diffusion manner; gradient mode is the caller's. With `checkpoint=True`
each denoising step is one activation checkpoint, so only the latents between steps are kept and
memory does not grow with the number of steps (the step is recomputed in the backward pass).
With `runtime.cuda_graphs` each checkpointed step is a pair of CUDA graphs (`cuda_graphs.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

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


@dataclass(frozen=True)
class Schedule:
    """The timesteps of one sampling run, noisiest first, and the DDIM scheduler that steps along them.

    Built for the run from the model's scheduler config (`ddim_schedule`) and passed to every step, in the
    manner of k-diffusion's samplers: no step reads state that another call set (`FrozenModels.scheduler`
    is the model's config and is never stepped)."""

    scheduler: DDIMScheduler
    timesteps: torch.Tensor

    def __len__(self) -> int:
        return len(self.timesteps)

    def __iter__(self):
        return iter(self.timesteps)

    def __getitem__(self, i):
        return self.timesteps[i]


def ddim_schedule(models: FrozenModels, steps: int) -> Schedule:
    """The DDIM schedule of `steps` sampling steps on the model's own noise schedule."""
    scheduler = DDIMScheduler.from_config(models.scheduler.config)
    scheduler.set_timesteps(steps)
    return Schedule(scheduler, scheduler.timesteps)


def uses_guidance(guidance_scale: float) -> bool:
    """Whether classifier-free guidance runs: a scale of 1 or less is the conditional pass alone (as diffusers)."""
    return guidance_scale > 1.0


def guided_embeddings(text_embeds: torch.Tensor, batch: int, guidance_scale: float) -> torch.Tensor:
    """Embeddings for a UNet batch: [uncond x batch, cond x batch] with guidance, [cond x batch] without."""
    if uses_guidance(guidance_scale):
        return text_embeds.repeat_interleave(batch, dim=0)
    return text_embeds[1:].expand(batch, -1, -1)


@dataclass(frozen=True)
class Denoiser:
    """eps(z, t) of the frozen UNet with classifier-free guidance, decided once from its scale: the
    unconditional pass batched with the conditional one when it runs, the conditional pass alone when not."""

    models: FrozenModels
    guidance_scale: float

    @property
    def guided(self) -> bool:
        return uses_guidance(self.guidance_scale)

    def __call__(self, z: torch.Tensor, t: torch.Tensor | int, embeds: torch.Tensor, schedule: Schedule
                 ) -> torch.Tensor:
        """eps = eps_u + w (eps_c - eps_u) (Ho & Salimans 2022, eq. 6) for `embeds` from `guided_embeddings`. A
        Python int `t` becomes a tensor on z's device by a fill, not a copy from the host, so that the step can
        be captured in a CUDA graph."""
        models = self.models
        model_in = torch.cat([z, z]) if self.guided else z
        model_in = schedule.scheduler.scale_model_input(model_in, t).to(models.dtype)
        t_model = t if torch.is_tensor(t) else torch.full((), t, dtype=torch.long, device=z.device)
        eps = models.unet(model_in, t_model, encoder_hidden_states=embeds).sample.to(z.dtype)
        if self.guided:
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + self.guidance_scale * (eps_cond - eps_uncond)
        return eps


def ddim_step(denoiser: Denoiser, schedule: Schedule, z: torch.Tensor, t: torch.Tensor | int, embeds: torch.Tensor
              ) -> torch.Tensor:
    """One DDIM step, eta = 0 (Song et al. 2021, eq. 12), with classifier-free guidance."""
    eps = denoiser(z, t, embeds, schedule)
    return schedule.scheduler.step(eps, t, z, eta=0.0).prev_sample


def ddim_rollout(models: FrozenModels, z_T: torch.Tensor, text_embeds: torch.Tensor, schedule: Schedule,
                 guidance_scale: float, keep_last: int = 1, checkpoint: bool = True) -> list[torch.Tensor]:
    """Run DDIM from z_T (float32, (B, C, h, w)) along `schedule` and return the latents after each of the
    last `keep_last` steps, oldest first: the last one is z_0."""
    denoiser = Denoiser(models, guidance_scale)
    embeds = guided_embeddings(text_embeds, z_T.shape[0], guidance_scale)
    use_checkpoint = checkpoint and torch.is_grad_enabled()
    z, kept = z_T, []
    for i, t in enumerate(schedule.timesteps):
        if use_checkpoint:
            step = _step_at(denoiser, schedule, int(t))
            z = checkpointed(models, ("the denoising steps", int(t), len(schedule), float(guidance_scale)), step, z, embeds)
        else:
            z = ddim_step(denoiser, schedule, z, t, embeds)
        if i >= len(schedule) - keep_last:
            kept.append(z)
    return kept


def _step_at(denoiser: Denoiser, schedule: Schedule, t: int):
    """z, embeds -> the DDIM step at timestep t. A Python int t keeps the scheduler's arithmetic on the
    host and fills the UNet's timestep on the device, so that the step can be captured in a CUDA graph."""
    def step(z: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        return ddim_step(denoiser, schedule, z, t, embeds)
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
    schedule = Schedule(inverse, inverse.timesteps)
    denoiser = Denoiser(models, guidance_scale)
    embeds = guided_embeddings(text_embeds, z_0.shape[0], guidance_scale)
    z = z_0.to(models.device, torch.float32)
    for t in schedule.timesteps:
        z = inverse.step(denoiser(z, t, embeds, schedule), t, z).prev_sample
    return z


@torch.no_grad()
def sample_images(models: FrozenModels, z_T: torch.Tensor, text_embeds: torch.Tensor, steps: int,
                  guidance_scale: float) -> list:
    """The images a batch of seeds gives: DDIM, decode, 8-bit PIL. What `generate` repeats exactly."""
    z_0 = ddim_rollout(models, z_T.to(models.device, torch.float32), text_embeds, ddim_schedule(models, steps),
                       guidance_scale)[-1]
    return to_pil(models, vae_decode(models, z_0))
