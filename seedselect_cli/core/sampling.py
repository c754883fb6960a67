"""The differentiable rollout z_T -> z_0 (`rollout`) over a sampler's steps (`samplers.py`), the memory it keeps
for the backward pass, DDIM inversion, and the images a batch of seeds gives (`sample_images`).

Gradient mode is the caller's. With `checkpoint=True` each denoising step is one activation checkpoint,
so only the latents between steps are kept and memory does not grow with the number of steps (the step
is recomputed in the backward pass); `runtime.memory_budget` lets the first steps keep their activations
instead (`step_activation_bytes`, `steps_within_budget`); with `runtime.cuda_graphs` each recomputed step
is a pair of CUDA graphs (`cuda_graphs.py`). DPM-Solver++'s previous z_0 prediction travels beside the
latents through the checkpoint, so its gradient flows too. Latents returned for the k-step loss are in the
variance-preserving space DDIM's are (z_t = sqrt(a) z_0 + sqrt(1 - a) eps).
"""

from __future__ import annotations

import torch
from diffusers import DDIMInverseScheduler

from seedselect_cli.core.cuda_graphs import GraphCache, checkpointed
from seedselect_cli.core.encoders import to_pil, vae_decode
from seedselect_cli.core.frozen import FrozenModels
from seedselect_cli.core.prompts import PromptEmbeds, conditioning
from seedselect_cli.core.samplers import (
    Denoiser,
    Schedule,
    host_timestep,
    initial_state,
    latents_of,
    make_schedule,
    step_at,
    step_context,
)


def rollout(models: FrozenModels, z_T: torch.Tensor, text_embeds: PromptEmbeds, schedule: Schedule,
            guidance_scale: float, keep_last: int = 1, checkpoint: bool = True,
            noise: torch.Tensor | None = None, unchecked_steps: int = 0, graphs: GraphCache | None = None
            ) -> list[torch.Tensor]:
    """Run the schedule's sampler from the seed z_T (float32, (B, C, h, w), unit Gaussian) and return the latents
    after each of the last `keep_last` steps, oldest first: the last one is z_0. `noise`: LCM's noise between
    steps, (steps - 1, B, C, h, w) (`lcm_noise`); the other samplers add none. With `checkpoint`, the first
    `unchecked_steps` steps keep their activations for the backward pass (`runtime.memory_budget`) and the
    rest are recomputed in it: the same numbers, less recomputation, more memory; `graphs`, the CUDA graphs the
    recomputed steps run through (`cuda_graphs.graph_cache`), else `torch.utils.checkpoint`."""
    if schedule.name == "lcm" and len(schedule) > 1 and (noise is None or noise.shape[0] != len(schedule) - 1):
        raise ValueError("the lcm sampler needs its noise between steps: pass noise=lcm_noise(...)")
    denoiser = Denoiser(models, guidance_scale, graphs)
    cond = conditioning(models, text_embeds, z_T, guidance_scale)
    use_checkpoint = checkpoint and torch.is_grad_enabled()
    n = len(schedule)
    x = initial_state(schedule, z_T)
    kept = []
    for i in range(n):
        step = step_at(denoiser, schedule, i)
        context = step_context(schedule, i, cond, noise, x)
        if use_checkpoint and i >= unchecked_steps:
            key = ("the denoising steps", schedule.name, i, n, host_timestep(schedule.timesteps[i]), float(guidance_scale))
            x = checkpointed(denoiser.graphs, key, step, x, *context)
        else:
            x = step(x, *context)
        if i >= n - keep_last:
            kept.append(latents_of(schedule, i, x))
    return kept


def step_activation_bytes(models: FrozenModels, z_T: torch.Tensor, text_embeds: PromptEmbeds, schedule: Schedule,
                          guidance_scale: float, noise: torch.Tensor | None = None) -> int:
    """The bytes autograd keeps for the backward pass of one denoising step of this batch, if it is not
    checkpointed: the tensors it saves, each storage counted once, measured by running the first step. The
    weights and the text embeddings, which every step shares and memory holds anyway, are left out."""
    denoiser = Denoiser(models, guidance_scale)
    cond = conditioning(models, text_embeds, z_T, guidance_scale)
    shared = {t.untyped_storage().data_ptr() for t in (*models.unet.parameters(), *models.unet.buffers(), *cond)}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in shared:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        x = initial_state(schedule, z_T.detach().requires_grad_(True))
        step_at(denoiser, schedule, 0)(x, *step_context(schedule, 0, cond, noise, x))
    return sum(seen.values())


def steps_within_budget(budget_bytes: float | None, step_bytes: int, steps: int) -> int:
    """How many of `steps` denoising steps keep their activations (`step_bytes` each, `step_activation_bytes`)
    within `budget_bytes` (`runtime.memory_budget`); the rest are recomputed. None or 0: none is kept."""
    if not budget_bytes:
        return 0
    return min(steps, int(budget_bytes // max(step_bytes, 1)))


@torch.no_grad()
def ddim_invert(models: FrozenModels, z_0: torch.Tensor, text_embeds: PromptEmbeds, steps: int,
                guidance_scale: float = 1.0) -> torch.Tensor:
    """DDIM inversion (Song et al. 2021, eq. 13 run backwards; Dhariwal & Nichol 2021, eq. 55): the seed
    z_T from which `steps` DDIM steps lead back to the latents z_0 (float32, (B, C, h, w)).

    Each step reuses eps at the next timestep, the usual approximation, so the round trip is exact only
    as the step count grows. diffusers' `DDIMInverseScheduler`, built from the model's own config, ends
    at the sampler's first timestep. Other samplers start from the inverted seed too (`init=inversion`,
    `nao`, `reference`): a start near the references, exact only for DDIM.
    """
    inverse = DDIMInverseScheduler.from_config(models.scheduler.config)
    inverse.set_timesteps(steps)
    denoiser = Denoiser(models, guidance_scale)
    z = z_0.to(models.device, torch.float32)
    cond = conditioning(models, text_embeds, z, guidance_scale)
    for t in inverse.timesteps:
        z = inverse.step(denoiser(z, t, *cond), t, z).prev_sample
    return z


@torch.no_grad()
def sample_images(models: FrozenModels, z_T: torch.Tensor, text_embeds: PromptEmbeds, steps: int,
                  guidance_scale: float, sampler: str = "ddim", noise: torch.Tensor | None = None) -> list:
    """The images a batch of seeds gives: the sampler, decode, 8-bit PIL. What `generate` repeats exactly."""
    z_0 = rollout(models, z_T.to(models.device, torch.float32), text_embeds, make_schedule(models, steps, sampler),
                  guidance_scale, noise=noise)[-1]
    return to_pil(models, vae_decode(models, z_0))
