"""The differentiable samplers: z_T -> z_0 with classifier-free guidance, over an explicit schedule.

    ddim       DDIMScheduler, eta = 0 (Song et al. 2021)                       the paper's, and inversion's
    euler      EulerDiscreteScheduler, trailing timesteps                      SD-Turbo, SDXL-Turbo: 1 to 4 steps
    dpmpp_2m   DPMSolverMultistepScheduler, dpmsolver++, order 2 (Lu et al.)   the common 20-step choice
    lcm        LCMScheduler (Luo et al. 2023)                                  latent consistency models: 1 to 8 steps

Small functions in the k-diffusion manner: a `Schedule` holds the run's timesteps and the constants of
every step, read from the diffusers scheduler built for it (`make_schedule`) and never stepped, so no
step reads state another call set; each sampler's update is written out here, as diffusers' `step`
computes it, and tested against diffusers' own pipelines (tests/test_samplers.py). The prompt's embeddings
(`PromptEmbeds`) become the UNet's conditioning once per rollout (`conditioning`): the hidden states for SD;
for SDXL also the pooled embedding and the added time ids, which travel beside them as each step's context.
The seed z_T is unit Gaussian for every sampler; the rollout scales it by the schedule's `init_noise_sigma`.
Latents returned for the k-step loss are in the variance-preserving space DDIM's are
(z_t = sqrt(a) z_0 + sqrt(1 - a) eps).

Gradient mode is the caller's. With `checkpoint=True` each denoising step is one activation checkpoint,
so only the latents between steps are kept and memory does not grow with the number of steps (the step
is recomputed in the backward pass); with `runtime.cuda_graphs` each is a pair of CUDA graphs
(`cuda_graphs.py`). DPM-Solver++'s second-order step also carries the previous step's z_0 prediction:
it travels beside the latents through the checkpoint, so its gradient flows too. LCM adds fresh noise
between its steps; that noise belongs to the image like its seed (`lcm_noise`, drawn from the image's
init seed) and is passed in, never optimised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import (
    DDIMInverseScheduler,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
)

from seedselect_cli.core.cuda_graphs import GraphCache, checkpointed
from seedselect_cli.core.encoders import to_pil, vae_decode
from seedselect_cli.core.frozen import FrozenModels
from seedselect_cli.derive import derived_int
from seedselect_cli.limits import SAMPLER_NAMES

# `sampler.name` -> the diffusers scheduler whose arithmetic it is, and the settings it is built with
SAMPLERS: dict[str, tuple[type, dict]] = {
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {"timestep_spacing": "trailing"}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                               "solver_type": "midpoint", "final_sigmas_type": "zero"}),
    "lcm": (LCMScheduler, {}),
}
assert tuple(SAMPLERS) == SAMPLER_NAMES


@dataclass(frozen=True)
class PromptEmbeds:
    """c(y) of [negative prompt, prompt], computed once per prompt: the text encoder's hidden states (2, L, D) and,
    for SDXL, the second encoder's pooled embedding (2, P), which its UNet takes beside the added time ids."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None


@torch.no_grad()
def encode_prompt(models: FrozenModels, prompt: str, negative_prompt: str = "") -> PromptEmbeds:
    """Text embeddings of [negative prompt, prompt], as diffusers' pipelines compute them. SD: the text encoder's
    last hidden states. SDXL (`StableDiffusionXLPipeline.encode_prompt`): both encoders' penultimate hidden states
    side by side and the second's pooled projection; an empty negative prompt gives zeros where the checkpoint says
    `force_zeros_for_empty_prompt` (SDXL's default, what its pipeline draws when no negative prompt is given)."""
    if models.text_encoder_2 is None:
        ids = _token_ids(models.tokenizer, [negative_prompt, prompt], models.device)
        return PromptEmbeds(models.text_encoder(ids)[0].to(models.unet.dtype))
    hidden, pooled = [], None
    for tokenizer, encoder in ((models.tokenizer, models.text_encoder), (models.tokenizer_2, models.text_encoder_2)):
        out = encoder(_token_ids(tokenizer, [negative_prompt, prompt], models.device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        if out[0].ndim == 2:  # the projection model's text_embeds: the pooled embedding
            pooled = out[0]
    hidden = torch.cat(hidden, dim=-1)
    if not negative_prompt and models.force_zeros_for_empty_prompt:
        hidden, pooled = hidden.clone(), pooled.clone()
        hidden[0], pooled[0] = 0.0, 0.0
    return PromptEmbeds(hidden.to(models.unet.dtype), pooled.to(models.unet.dtype))


def _token_ids(tokenizer, texts: list[str], device: torch.device) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def scheduler_for(name: str, config) -> object:
    """The diffusers scheduler of sampler `name` on a checkpoint's noise schedule (its scheduler config)."""
    cls, settings = SAMPLERS[name]
    return cls.from_config({**dict(config), **settings})


@dataclass(frozen=True)
class Schedule:
    """One sampling run: which sampler, its timesteps (noisiest first), and the scheduler built for it, from
    which each step's constants are read by index. Passed to every step; nothing in it changes."""

    name: str
    scheduler: object  # a diffusers scheduler with set_timesteps done; read, never stepped
    timesteps: torch.Tensor

    def __len__(self) -> int:
        return len(self.timesteps)

    def __iter__(self):
        return iter(self.timesteps)

    def __getitem__(self, i):
        return self.timesteps[i]

    @property
    def init_noise_sigma(self) -> float:
        return float(self.scheduler.init_noise_sigma)

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    def sigma(self, i: int) -> float:
        """Euler and DPM-Solver's sigma_i = sqrt((1 - a) / a) of step i (i = len: the final 0)."""
        return float(self.scheduler.sigmas[i])


def make_schedule(models: FrozenModels, steps: int, name: str = "ddim") -> Schedule:
    """The schedule of `steps` steps of sampler `name` on the model's own noise schedule."""
    scheduler = scheduler_for(name, models.scheduler.config)
    scheduler.set_timesteps(steps)
    return Schedule(name, scheduler, scheduler.timesteps)


def ddim_schedule(models: FrozenModels, steps: int) -> Schedule:
    """The DDIM schedule of `steps` sampling steps on the model's own noise schedule."""
    return make_schedule(models, steps, "ddim")


def uses_guidance(guidance_scale: float) -> bool:
    """Whether classifier-free guidance runs: a scale of 1 or less is the conditional pass alone (as diffusers)."""
    return guidance_scale > 1.0


def guided_embeddings(text_embeds: PromptEmbeds, batch: int, guidance_scale: float,
                      size: tuple[int, int] | None = None) -> tuple[torch.Tensor, ...]:
    """The UNet's conditioning for a batch, [uncond x batch, cond x batch] with guidance, [cond x batch] without:
    (hidden states,) for SD; for SDXL also the pooled embeddings and the added time ids at image `size` (height,
    width): original size, crop (0, 0) and target size, its pipeline's defaults."""
    rows = (lambda t: t.repeat_interleave(batch, dim=0)) if uses_guidance(guidance_scale) else (
        lambda t: t[1:].expand(batch, *t.shape[1:]))
    if text_embeds.pooled is None:
        return (rows(text_embeds.hidden),)
    if size is None:
        raise ValueError("SDXL's conditioning needs the image size for its added time ids")
    time_ids = torch.tensor([[*size, 0, 0, *size]] * 2, dtype=text_embeds.hidden.dtype, device=text_embeds.hidden.device)
    return rows(text_embeds.hidden), rows(text_embeds.pooled), rows(time_ids)


def conditioning(models: FrozenModels, text_embeds: PromptEmbeds, z: torch.Tensor, guidance_scale: float
                 ) -> tuple[torch.Tensor, ...]:
    """`guided_embeddings` for a batch of latents z (B, C, h, w): the image size is the latents' times the VAE's."""
    f = models.vae_scale_factor
    return guided_embeddings(text_embeds, z.shape[0], guidance_scale, (z.shape[-2] * f, z.shape[-1] * f))


@dataclass(frozen=True)
class Denoiser:
    """The UNet's output at (z, t) with classifier-free guidance, decided once from its scale: the
    unconditional pass batched with the conditional one when it runs, the conditional pass alone when not.
    `graphs`: the CUDA-graph cache its checkpointed steps run through (`runtime.cuda_graphs`), if any."""

    models: FrozenModels
    guidance_scale: float
    graphs: GraphCache | None = None

    @property
    def guided(self) -> bool:
        return uses_guidance(self.guidance_scale)

    def __call__(self, model_in: torch.Tensor, t: torch.Tensor | float, *cond: torch.Tensor) -> torch.Tensor:
        """out = out_u + w (out_c - out_u) (Ho & Salimans 2022, eq. 6) for the conditioning `cond` from
        `guided_embeddings`, on the input as the sampler scaled it. A Python number `t` becomes a tensor on the
        device by a fill, not a copy from the host, so that the step can be captured in a CUDA graph."""
        models = self.models
        x = torch.cat([model_in, model_in]) if self.guided else model_in
        if not torch.is_tensor(t):
            t = torch.full((), t, dtype=torch.long if isinstance(t, int) else torch.float32, device=model_in.device)
        added = {"text_embeds": cond[1], "time_ids": cond[2]} if len(cond) == 3 else None
        out = models.unet(x.to(models.unet.dtype), t, encoder_hidden_states=cond[0],
                          added_cond_kwargs=added).sample.to(model_in.dtype)
        if self.guided:
            out_uncond, out_cond = out.chunk(2)
            out = out_uncond + self.guidance_scale * (out_cond - out_uncond)
        return out


def _host(t: torch.Tensor) -> int | float:
    """A timestep as a Python number: ints stay ints (DDIM, DPM-Solver), Euler's are floats."""
    return int(t) if not t.is_floating_point() else float(t)


def ddim_step(denoiser: Denoiser, schedule: Schedule, z: torch.Tensor, t: torch.Tensor | int,
              cond: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """One DDIM step, eta = 0 (Song et al. 2021, eq. 12), with classifier-free guidance. DDIM's `step` reads
    nothing but the schedule's constants."""
    eps = denoiser(z, t, *cond)
    return schedule.scheduler.step(eps, t, z, eta=0.0).prev_sample


def euler_step(denoiser: Denoiser, schedule: Schedule, i: int, x: torch.Tensor, cond: tuple[torch.Tensor, ...]
               ) -> torch.Tensor:
    """Step i of Euler's method in sigma space (Karras et al. 2022, alg. 1 without churn), as diffusers'
    `EulerDiscreteScheduler.step`: x_{i+1} = x + (x - x0) / sigma_i (sigma_{i+1} - sigma_i)."""
    sigma, sigma_next = schedule.sigma(i), schedule.sigma(i + 1)
    out = denoiser(x / ((sigma ** 2 + 1) ** 0.5), _host(schedule.timesteps[i]), *cond)
    if schedule.prediction_type == "v_prediction":
        x0 = out * (-sigma / (sigma ** 2 + 1) ** 0.5) + x / (sigma ** 2 + 1)
    else:
        x0 = x - sigma * out
    return x + (x - x0) / sigma * (sigma_next - sigma)


def _alpha_sigma(sigma: float) -> tuple[float, float, float]:
    """alpha_t, sigma_t and lambda_t = log(alpha_t / sigma_t) of a sigma (lambda of sigma 0: infinity)."""
    alpha = 1 / (sigma ** 2 + 1) ** 0.5
    return alpha, sigma * alpha, (math.log(1 / sigma) if sigma > 0 else math.inf)


def dpmpp_2m_step(denoiser: Denoiser, schedule: Schedule, i: int, state: torch.Tensor,
                  cond: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Step i of DPM-Solver++(2M) (Lu et al. 2022, alg. 2), as diffusers' multistep scheduler computes it
    (midpoint; first order at the first and, with a final sigma of 0, the last step). `state` is the
    latents and the previous step's z_0 prediction, side by side in the channels; so is the result."""
    x, x0_prev = state.chunk(2, dim=1)
    alpha_s, sigma_s, lambda_s = _alpha_sigma(schedule.sigma(i))
    alpha_t, sigma_t, lambda_t = _alpha_sigma(schedule.sigma(i + 1))
    out = denoiser(x, _host(schedule.timesteps[i]), *cond)
    x0 = alpha_s * x - sigma_s * out if schedule.prediction_type == "v_prediction" else (x - sigma_s * out) / alpha_s
    h = lambda_t - lambda_s
    step = alpha_t * (math.exp(-h) - 1.0)  # -alpha_t (1 - e^-h)
    x_next = sigma_t / sigma_s * x - step * x0
    if not (i == 0 or i == len(schedule) - 1):  # second order: the slope from the previous z_0 prediction
        r = (lambda_s - _alpha_sigma(schedule.sigma(i - 1))[2]) / h
        x_next = x_next - 0.5 * step * (1.0 / r) * (x0 - x0_prev)
    return torch.cat([x_next, x0], dim=1)


def lcm_step(denoiser: Denoiser, schedule: Schedule, i: int, x: torch.Tensor, cond: tuple[torch.Tensor, ...],
             noise: torch.Tensor | None) -> torch.Tensor:
    """Step i of LCM's multistep sampling, as diffusers' `LCMScheduler.step`: the consistency function's z_0
    (c_skip x + c_out x0), then, before the last step, noised again to the next timestep with `noise`."""
    scheduler = schedule.scheduler
    t = int(schedule.timesteps[i])
    last = i == len(schedule) - 1
    a_t = float(scheduler.alphas_cumprod[t])
    out = denoiser(x, t, *cond)
    if schedule.prediction_type == "v_prediction":
        x0 = a_t ** 0.5 * x - (1 - a_t) ** 0.5 * out
    else:
        x0 = (x - (1 - a_t) ** 0.5 * out) / a_t ** 0.5
    c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(t)
    denoised = c_out * x0 + c_skip * x
    if last:
        return denoised
    a_next = float(scheduler.alphas_cumprod[int(schedule.timesteps[i + 1])])
    return a_next ** 0.5 * denoised + (1 - a_next) ** 0.5 * noise


def step_noise(sampler: str, init_seeds: list[int], shape: tuple[int, ...], steps: int) -> torch.Tensor | None:
    """The noise `sampler` adds between its steps for images with these init seeds (as their seed files record
    them): LCM's (`lcm_noise`), None for the deterministic samplers."""
    return lcm_noise(init_seeds, shape, steps) if sampler == "lcm" and steps > 1 else None


def lcm_noise(init_seeds: list[int], shape: tuple[int, ...], steps: int) -> torch.Tensor:
    """The noise LCM adds after each step but the last, for images with these init seeds: (steps - 1, B, C, h, w),
    each image's from its own generator (so neither its batch nor the device changes it), drawn on the CPU."""
    per_image = [torch.randn((max(steps - 1, 0), *shape), generator=torch.Generator().manual_seed(
        derived_int(seed, "lcm") >> 1)) for seed in init_seeds]
    return torch.stack(per_image, dim=1)


def _to_vp(schedule: Schedule, i: int, x: torch.Tensor) -> torch.Tensor:
    """The latents after step i in the variance-preserving space (Euler's carry a factor sqrt(1 + sigma^2))."""
    if schedule.name == "euler":
        return x / ((schedule.sigma(i + 1) ** 2 + 1) ** 0.5)
    return x


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
    x = z_T * schedule.init_noise_sigma if schedule.init_noise_sigma != 1.0 else z_T
    if schedule.name == "dpmpp_2m":
        x = torch.cat([x, torch.zeros_like(x)], dim=1)
    kept = []
    for i in range(n):
        step = _step_at(denoiser, schedule, i)
        context = cond if schedule.name != "lcm" or i == n - 1 else (noise[i].to(x.device, x.dtype), *cond)
        if use_checkpoint and i >= unchecked_steps:
            key = ("the denoising steps", schedule.name, i, n, _host(schedule.timesteps[i]), float(guidance_scale))
            x = checkpointed(denoiser.graphs, key, step, x, *context)
        else:
            x = step(x, *context)
        if i >= n - keep_last:
            latents = x.chunk(2, dim=1)[0] if schedule.name == "dpmpp_2m" else x
            kept.append(_to_vp(schedule, i, latents))
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

    x = z_T.detach().requires_grad_(True) * schedule.init_noise_sigma
    if schedule.name == "dpmpp_2m":
        x = torch.cat([x, torch.zeros_like(x)], dim=1)
    context = cond if schedule.name != "lcm" or len(schedule) == 1 else (noise[0].to(x.device, x.dtype), *cond)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        _step_at(denoiser, schedule, 0)(x, *context)
    return sum(seen.values())


def steps_within_budget(budget_bytes: float | None, step_bytes: int, steps: int) -> int:
    """How many of `steps` denoising steps keep their activations (`step_bytes` each, `step_activation_bytes`)
    within `budget_bytes` (`runtime.memory_budget`); the rest are recomputed. None or 0: none is kept."""
    if not budget_bytes:
        return 0
    return min(steps, int(budget_bytes // max(step_bytes, 1)))


def _step_at(denoiser: Denoiser, schedule: Schedule, i: int):
    """x, *context -> step i of the schedule's sampler; the context is the UNet's conditioning, after LCM's noise
    where a step adds it. The timestep is a Python number: the scheduler's
    arithmetic stays on the host and the UNet's timestep is filled on the device, so that the step can be
    captured in a CUDA graph."""
    if schedule.name == "euler":
        return lambda x, *cond: euler_step(denoiser, schedule, i, x, cond)
    if schedule.name == "dpmpp_2m":
        return lambda x, *cond: dpmpp_2m_step(denoiser, schedule, i, x, cond)
    if schedule.name == "lcm":
        if i == len(schedule) - 1:
            return lambda x, *cond: lcm_step(denoiser, schedule, i, x, cond, None)
        return lambda x, noise, *cond: lcm_step(denoiser, schedule, i, x, cond, noise)
    t = _host(schedule.timesteps[i])
    return lambda x, *cond: ddim_step(denoiser, schedule, x, t, cond)


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
