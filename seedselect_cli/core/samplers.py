"""The samplers, one step at a time: each as a small function of (denoiser, schedule, step index, latents, context).

    ddim       DDIMScheduler, eta = 0 (Song et al. 2021)                       the paper's, and inversion's
    euler      EulerDiscreteScheduler, trailing timesteps                      SD-Turbo, SDXL-Turbo: 1 to 4 steps
    dpmpp_2m   DPMSolverMultistepScheduler, dpmsolver++, order 2 (Lu et al.)   the common 20-step choice
    lcm        LCMScheduler (Luo et al. 2023)                                  latent consistency models: 1 to 8 steps

Small functions in the k-diffusion manner: a `Schedule` holds the run's timesteps and the constants of
every step, read from the diffusers scheduler built for it (`make_schedule`) and never stepped, so no
step reads state another call set; each sampler's update is written out here, as diffusers' `step`
computes it, and tested against diffusers' own pipelines (tests/test_samplers.py). `Denoiser` is the
UNet with classifier-free guidance that every step calls. The seed z_T is unit Gaussian for every sampler;
`initial_state` scales it by the schedule's `init_noise_sigma`. DPM-Solver++'s second-order step also
carries the previous step's z_0 prediction beside the latents (`initial_state` adds it, `latents_of` takes
it off). LCM adds fresh noise between its steps; that noise belongs to the image like its seed (`lcm_noise`,
drawn from the image's init seed) and is passed in as the step's context (`step_context`), never optimised.
Chaining the steps into a differentiable rollout is `sampling.py`'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, LCMScheduler

from seedselect_cli.core.cuda_graphs import GraphCache
from seedselect_cli.core.frozen import FrozenModels
from seedselect_cli.core.prompts import uses_guidance
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


def host_timestep(t: torch.Tensor) -> int | float:
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
    out = denoiser(x / ((sigma ** 2 + 1) ** 0.5), host_timestep(schedule.timesteps[i]), *cond)
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
    out = denoiser(x, host_timestep(schedule.timesteps[i]), *cond)
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


def initial_state(schedule: Schedule, z_T: torch.Tensor) -> torch.Tensor:
    """What the first step takes from the unit seed z_T: z_T times the schedule's `init_noise_sigma`; for
    DPM-Solver++ beside zeros for the (not yet made) previous z_0 prediction, in the channels."""
    x = z_T * schedule.init_noise_sigma if schedule.init_noise_sigma != 1.0 else z_T
    if schedule.name == "dpmpp_2m":
        x = torch.cat([x, torch.zeros_like(x)], dim=1)
    return x


def step_context(schedule: Schedule, i: int, cond: tuple[torch.Tensor, ...], noise: torch.Tensor | None,
                 like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """What step i takes beside the latents: the UNet's conditioning, after LCM's noise where the step adds it
    (every step but the last), moved to the latents' (`like`) device and dtype."""
    if schedule.name != "lcm" or i == len(schedule) - 1:
        return cond
    return (noise[i].to(like.device, like.dtype), *cond)


def latents_of(schedule: Schedule, i: int, state: torch.Tensor) -> torch.Tensor:
    """The latents after step i in the variance-preserving space DDIM's are (z_t = sqrt(a) z_0 + sqrt(1 - a) eps):
    DPM-Solver++'s state without its z_0 prediction; Euler's divided by their factor sqrt(1 + sigma^2)."""
    latents = state.chunk(2, dim=1)[0] if schedule.name == "dpmpp_2m" else state
    if schedule.name == "euler":
        return latents / ((schedule.sigma(i + 1) ** 2 + 1) ** 0.5)
    return latents


def step_at(denoiser: Denoiser, schedule: Schedule, i: int):
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
    t = host_timestep(schedule.timesteps[i])
    return lambda x, *cond: ddim_step(denoiser, schedule, x, t, cond)
