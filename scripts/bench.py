"""Speed and memory of seed optimisation: our default path against a plain one, in one table.

Builds the paper's architectures from their configs with random weights (Stable Diffusion 2.1-base
UNet and VAE, the CLIP ViT-H-14 vision tower), so it needs no download: speed and memory do not
depend on the weights' values. For each mode and batch size it measures seconds per iteration
(median after warm-up; CUDA events on a GPU), peak memory, the FLOPs of one iteration
(`torch.utils.flop_counter`, recomputation included) and the rate achieved, and seconds per
bootstrapped image (`--bootstrap-candidates` scored starts, each a forward pass without gradients, and
`--bootstrap-iterations` iterations at that batch size, the last a forward pass alone, plus the render: the
default method's bootstrap).
On a GPU, peak memory is the most PyTorch held on the device while timing (reserved memory, with
the CUDA graphs' pools: their working memory is never "allocated" during a replay); on the CPU, the
process's high-water mark of resident memory.

    fast      networks in --dtype, seed and loss in float32, one checkpoint per denoising step, eager
              (runtime.cuda_graphs=false)
    graphed   the fast path with its checkpointed calls (the denoising steps, the decodes and CLIP) as
              CUDA graphs: the default path on a GPU (runtime.cuda_graphs=auto; the capture is warm-up).
              On the CPU the same calls run eagerly
    compiled  the fast path with torch.compile (runtime.compile; the first calls, which compile, are warm-up)
    compiled-graphed  both
    plain     what the authors' code does: float32, every UNet block checkpointed, the same loss

    python scripts/bench.py                       # the paper's setting, batch 1 and 8, on the GPU
    python scripts/bench.py --tiny                # the tiny components on the CPU, seconds
    python scripts/bench.py --model sd_turbo      # SD-Turbo's setting: Euler, 1 step, no guidance, k = 1
    python scripts/bench.py --flops --model sd_turbo   # its arithmetic, counted on the meta device (no GPU)
    python scripts/bench.py --model sdxl --batch 1   # SDXL at 1024 px, 20 DDIM steps, CFG 5: memory and speed
    python scripts/bench.py --model sdxl_turbo       # SDXL-Turbo: Euler, 1 step, no guidance, 512 px
    python scripts/bench.py --memory-budget auto     # runtime.memory_budget: keep the steps that fit, recompute the rest
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from seedselect_cli.config import Config, ModelConfig, compose_config
from seedselect_cli.core.cuda_graphs import checkpointed, graph_cache
from seedselect_cli.core.frozen import FrozenModels
from seedselect_cli.core.optimize import scaled_backward, seed_objective
from seedselect_cli.core.prompts import PromptEmbeds, conditioning
from seedselect_cli.core.samplers import Denoiser, make_schedule
from seedselect_cli.core.sampling import sample_images, step_activation_bytes, steps_within_budget
from seedselect_cli.core.targets import Centroids
from seedselect_cli.devices import DTYPES, memory_budget_bytes, resolve_device, resolve_dtype
from seedselect_cli.models import compile_models, load_models, vae_dtype

SD21_BASE_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "cross_attention_dim": 1024,
    "block_out_channels": (320, 640, 1280, 1280), "attention_head_dim": (5, 10, 20, 20), "use_linear_projection": True,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
}
SD21_BASE_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4, "sample_size": 512,
}
# SDXL base 1.0's UNet (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json); SDXL-Turbo's is the same
SDXL_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "cross_attention_dim": 2048,
    "block_out_channels": (320, 640, 1280), "attention_head_dim": (5, 10, 20), "use_linear_projection": True,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10), "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # six time ids x 256, and the 1280-wide pooled text embedding
}
SDXL_VAE = {**SD21_BASE_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
CLIP_VIT_H_14 = {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 16, "num_hidden_layers": 32,
                     "patch_size": 14, "image_size": 224, "projection_dim": 1024, "hidden_act": "gelu"}


def bench_config(overrides: list[str]) -> Config:
    """The demo config with the paper's loss and optimiser (`method=paper`, what the authors' plain path computes)
    and the benchmark's sampler settings."""
    return compose_config("demo", ["method=paper", *overrides])


# --model: the architecture and its sampler preset (the model's config in seedselect_cli/configs)
PRESETS = {
    "sd21": {"title": "SD 2.1-base", "sampler": "ddim", "steps": 20, "k": 3, "guidance": 7.5, "height": 512},
    "sd_turbo": {"title": "SD-Turbo (SD 2.1's UNet)", "sampler": "euler", "steps": 1, "k": 1, "guidance": 0.0,
                 "height": 512},
    "sdxl": {"title": "SDXL base", "sampler": "ddim", "steps": 20, "k": 3, "guidance": 5.0, "height": 1024},
    "sdxl_turbo": {"title": "SDXL-Turbo (SDXL's UNet)", "sampler": "euler", "steps": 1, "k": 1, "guidance": 0.0,
                   "height": 512},
}


def real_models(device: torch.device, dtype: torch.dtype, model: str = "sd21") -> FrozenModels:
    """The paper's architectures (`model`: sd21, sd_turbo) or SDXL's (sdxl, sdxl_turbo) with random weights,
    built on `device` (no text encoders: the prompt's embeddings are fixed random tensors, computed once per
    class in real runs). SDXL's VAE stays in float32 when the networks are in float16, as `load_models` keeps it."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModelWithProjection

    diffusers_logging.set_verbosity_error()  # its advice on .to(dtype) is for checkpoints
    torch.manual_seed(0)
    xl = model.startswith("sdxl")
    with torch.device(device):
        unet = UNet2DConditionModel(**(SDXL_UNET if xl else SD21_BASE_UNET))
        vae = AutoencoderKL(**(SDXL_VAE if xl else SD21_BASE_VAE))
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VIT_H_14))
    freeze = (lambda m, dtype=dtype: m.to(dtype=dtype).eval().requires_grad_(False))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    return FrozenModels(vae=freeze(vae, vae_dtype({"unet": unet, "vae": vae}, dtype)), unet=freeze(unet),
                        text_encoder=None, tokenizer=None, scheduler=scheduler, image_encoder=freeze(encoder),
                        image_processor=processor, name=f"{model} (random)", device=device, dtype=dtype)


class _Replay(torch.autograd.Function):
    """A replayed graph pair as the counter sees it: one operation forward (its output, `y` made
    beforehand), one backward (the gradient, of x's shape)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor):
        ctx.like = x
        return y.clone()

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        return torch.ones_like(ctx.like), None


class ReplayedCalls:
    """Stands in for `runtime.cuda_graphs`' cache when counting: a replayed graph dispatches no
    operation, so each checkpointed call counts as one and what is left is what stays eager. Each call's
    output comes from an iteration through `recording()` before."""

    def __init__(self):
        self.outputs: dict = {}

    def recording(self) -> _Recording:
        return _Recording(self.outputs)

    def call(self, key, fn, x, *context):
        return _Replay.apply(x, self.outputs[key])


class _Recording:
    """Runs each checkpointed call as `runtime.cuda_graphs=false` does (the same operations, so the iteration
    through it counts as the plain one) and keeps its output for `ReplayedCalls`."""

    def __init__(self, outputs: dict):
        self.outputs = outputs

    def call(self, key, fn, x, *context):
        out = checkpointed(None, key, fn, x, *context)
        self.outputs.setdefault(key, out.detach())
        return out


def iteration_inputs(models: FrozenModels, batch: int, args):
    """Seeds, centroids and text embeddings for `batch` seeds on the models' device (meta too)."""
    device = models.device
    g = torch.Generator().manual_seed(1)
    shape = models.latent_shape(args.height, args.height)
    z = torch.randn(batch, *shape, generator=g).to(device).requires_grad_(True)
    dim = models.image_encoder.config.projection_dim
    target = Centroids(torch.nn.functional.normalize(torch.randn(dim, generator=g), dim=0).to(device),
                       torch.randn(*shape, generator=g).to(device), count=5)
    unet = models.unet.config
    text = PromptEmbeds(torch.randn(2, 77, unet.cross_attention_dim, generator=g).to(device, models.dtype))
    if models.is_xl:  # the pooled embedding: what the added embedding takes beside the six time ids
        pooled = unet.projection_class_embeddings_input_dim - 6 * unet.addition_time_embed_dim
        text = PromptEmbeds(text.hidden, torch.randn(2, pooled, generator=g).to(device, models.dtype))
    return z, target, text


def count_flops(config, args) -> list[tuple[str, float, int]]:
    """TFLOP and operations (aten operations that are not views: roughly the kernels launched from
    Python) of each network call and of one optimisation iteration, on meta tensors."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    class OperationCounter(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += not (func.is_view or func is torch.ops.aten._unsafe_view.default)
            return func(*args, **(kwargs or {}))

    meta = torch.device("meta")
    models = real_models(meta, DTYPES["bfloat16"], args.model)
    z, target, text = iteration_inputs(models, 1, args)
    latents = torch.randn(z.shape, device=meta, dtype=models.dtype)
    guided = args.guidance > 1.0
    denoiser = Denoiser(models, args.guidance)
    calls = {
        f"UNet, batch {1 + guided}{' (CFG)' if guided else ''}": lambda: denoiser(
            latents, 500, *conditioning(models, text, latents, args.guidance)),
        "VAE decode": lambda: models.vae.decode(latents.to(models.vae.dtype)),
        "CLIP image": lambda: models.image_encoder(pixel_values=torch.randn(1, 3, 224, 224, device=meta,
                                                                            dtype=models.dtype)),
    }
    timesteps = make_schedule(models, args.steps, args.sampler)

    def iteration(graphs=None) -> None:
        seed_objective(models, z, target, text, timesteps, config.objective(), graphs=graphs).total.sum().backward()

    replayed = ReplayedCalls()
    calls["one iteration, batch 1 (forward, backward, recomputation)"] = lambda: iteration(replayed.recording())
    calls["  of which eager with runtime.cuda_graphs (graph launches count 1)"] = lambda: iteration(replayed)
    out = []
    for name, call in calls.items():
        with FlopCounterMode(display=False) as flops, OperationCounter() as operations:
            call()
        out.append((name, flops.get_total_flops() / 1e12, operations.count))
    return out


def attention_backends(names: list[str] | None):
    """A context allowing only these scaled-dot-product attention backends (None: PyTorch's choice)."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not names:
        return contextlib.nullcontext()
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    return sdpa_kernel([backends[n] for n in names])


def print_table(table: Table) -> None:
    """On a terminal at its width; into a log file at 160 columns, so that no column is cut."""
    Console(width=None if sys.stdout.isatty() else 160).print(table)


def largest_blocks(count: int = 12) -> None:
    """The largest live GPU allocations and the Python lines that made them (needs --memory-history)."""
    blocks = [block for segment in torch.cuda.memory._snapshot()["segments"] for block in segment["blocks"]
              if block["state"] == "active_allocated"]
    blocks.sort(key=lambda block: -block["size"])
    total = sum(block["size"] for block in blocks)
    print(f"{len(blocks)} live blocks, {total / 2**30:.2f} GiB; the largest:")
    for block in blocks[:count]:
        frames = [f for f in block.get("frames", []) if f["filename"].endswith(".py")][:4]
        where = " <- ".join(f"{Path(f['filename']).name}:{f['line']} {f['name']}" for f in frames)
        print(f"  {block['size'] / 2**20:10.1f} MiB  {where}")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn) -> float:
    """Seconds that `fn()` takes (CUDA events on a GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def profile(device: torch.device, iteration) -> None:
    """Where one iteration's time goes: the host's and the device's busiest operations, and the
    wall time against the device's busy time (far apart means the host cannot launch fast enough)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    begin = time.perf_counter()
    with torch_profile(activities=activities) as prof:
        iteration()
        synchronize(device)
    wall = time.perf_counter() - begin
    events = prof.key_averages()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(events.table(sort_by=sort, row_limit=20, max_name_column_width=60))
    if device.type == "cuda":
        print(events.table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))
    # the device's own events (kernels, copies), as the table's total counts them: the host's operations
    # and annotations repeat their kernels' time
    busy = (sum(e.self_device_time_total for e in events
                if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation) / 1e6
            if device.type == "cuda" else float("nan"))
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    print(f"profile: wall {wall:.3f} s (with the profiler), device busy {busy:.3f} s, {launches} kernel launches")


def iteration_flops(models: FrozenModels, config, batch: int, args, kept: int = 0) -> float:
    """FLOPs of one iteration (forward, backward, the recomputation of all but `kept` steps) at this batch size.
    `models` run it eagerly: a replayed CUDA graph dispatches no operation to count. The real architectures are
    counted on the meta device, which allocates nothing (counting on the GPU itself ran out of memory
    at batch 4: FlopCounterMode there held 139 GB)."""
    from torch.utils.flop_counter import FlopCounterMode

    z, target, text = iteration_inputs(models, batch, args)
    with FlopCounterMode(display=False) as counter:
        seed_objective(models, z, target, text, make_schedule(models, args.steps, args.sampler),
                       config.objective(), unchecked_steps=kept).total.sum().backward()
    return counter.get_total_flops()


class ReducedGroupNorm(torch.nn.GroupNorm):
    """Group norm from `var_mean` and one `addcmul`, in float32 (or wider): it keeps the input's memory
    format. PyTorch's CUDA group norm (before the NHWC kernels of pytorch#191945, in 2.11 say) makes its
    input contiguous (NCHW), so in a channels-last network every norm transposes in and out; its
    statistics kernel also gives each group one block, 32 blocks at batch 1, however large the group."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = x.unflatten(1, (self.num_groups, -1))  # (B, G, C/G, *spatial): a view in any layout
        wide = torch.promote_types(x.dtype, torch.float32)
        var, mean = torch.var_mean(groups.to(wide), dim=tuple(range(2, groups.dim())), correction=0, keepdim=True)

        def per_channel(t: torch.Tensor) -> torch.Tensor:  # (B, G, 1, ...) -> (B, C, 1, ...)
            return t.expand(*groups.shape[:3], *t.shape[3:]).flatten(1, 2)

        scale = per_channel(torch.rsqrt(var + self.eps))
        shift = per_channel(-mean) * scale
        if self.affine:
            weight = self.weight.to(wide).view(-1, *[1] * (x.dim() - 2))
            scale, shift = scale * weight, shift * weight + self.bias.to(wide).view_as(weight)
        return torch.addcmul(shift, x, scale).to(x.dtype)  # the (B, C, 1, ...) factors broadcast: x's layout


def use_reduced_group_norm(module: torch.nn.Module) -> None:
    for child in module.modules():
        if type(child) is torch.nn.GroupNorm:
            child.__class__ = ReducedGroupNorm


COUNTED: dict[tuple, float] = {}  # FLOPs per iteration within one `main`, by what changes them


def prepare(models: FrozenModels, mode: str, args, accelerate: bool = True) -> FrozenModels:
    """`models` set up for `mode`, in place; without `accelerate`, not compiled (the graphed modes get their
    CUDA graphs in `measure`)."""
    if args.channels_last and mode != "plain":  # plain is the authors' path as it is
        for module in (models.unet, models.vae) if args.channels_last == "all" else (models.unet,):
            module.to(memory_format=torch.channels_last)
    if args.group_norm == "reduced" and mode != "plain":
        for module in (models.unet, models.vae):
            use_reduced_group_norm(module)
    if mode == "plain":
        models.unet.enable_gradient_checkpointing()
        models.unet.train(False)
    if accelerate and mode in ("compiled", "compiled-graphed"):
        compile_models(models, args.compile_mode)
    return models


def measure(models: FrozenModels, mode: str, config, batch: int, args) -> dict:
    """One mode at one batch size: s/iteration, peak memory, FLOPs per iteration, s per bootstrap image."""
    device = models.device
    z, target, text = iteration_inputs(models, batch, args)
    timesteps = make_schedule(models, args.steps, args.sampler)
    optimizer = torch.optim.AdamW([z], lr=0.1)
    graphs = graph_cache(device) if mode in ("graphed", "compiled-graphed") else None
    kept = 0  # runtime.memory_budget: the steps whose activations stay, as the engine counts them
    if args.memory_budget != "0" and mode != "plain":
        budget = memory_budget_bytes(args.memory_budget, device)
        kept = steps_within_budget(budget, step_activation_bytes(models, z.detach(), text, timesteps,
                                                                 config.sampler.guidance_scale), args.steps)

    def iteration() -> None:
        optimizer.zero_grad(set_to_none=True)
        scaled_backward(seed_objective(models, z, target, text, timesteps, config.objective(), unchecked_steps=kept,
                                       graphs=graphs).total, z)
        optimizer.step()

    begin = time.perf_counter()
    for _ in range(args.warmup):
        iteration()
    synchronize(device)
    warmup = time.perf_counter() - begin  # with torch.compile or CUDA graphs: the compilation or capture
    if device.type == "cuda":  # the warm-up's cached blocks go back; the CUDA graphs' memory pools stay
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    seconds = statistics.median(timed(device, iteration) for _ in range(args.iterations))
    # What the process holds on the device: PyTorch's reserved memory, which includes the graphs' pools
    # (a replayed graph allocates nothing, so their working memory never shows as allocated).
    peak = (torch.cuda.max_memory_reserved(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    allocated = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak
    if args.profile:
        profile(device, iteration)

    def render() -> None:  # one image at batch 1, as bootstrap renders each image it writes
        sample_images(models, z.detach()[:1], text, args.steps, config.sampler.guidance_scale, args.sampler)

    render()  # untimed: with torch.compile the first render compiles, once per run
    render_s = timed(device, render)

    def score() -> None:  # the loss of each seed of the batch without gradients: one candidate start
        with torch.no_grad():  # (bootstrap.candidates), or the last iteration, whose step is never taken
            seed_objective(models, z.detach(), target, text, timesteps, config.objective())

    score()  # untimed, as the render: with torch.compile the first call compiles
    score_s = timed(device, score)
    # a single start is not scored (the engine keeps it); the last of the iterations is a forward pass alone
    forward_only = (args.bootstrap_candidates if args.bootstrap_candidates > 1 else 0) + min(args.bootstrap_iterations, 1)
    key = (mode == "plain", models.dtype, args.channels_last, batch, kept)
    if key not in COUNTED:  # the same work in every mode of one dtype and layout: counted once (tens of seconds
        # each; the tiny components are counted as they are, the real architectures on the meta device)
        counted = models if args.tiny else prepare(real_models(torch.device("meta"), models.dtype, args.model), mode,
                                                   args, accelerate=False)
        COUNTED[key] = iteration_flops(counted, config, batch, args, kept)
    flops = COUNTED[key]
    return {"batch": batch, "s_per_iteration": seconds, "peak_memory_gb": peak / 2**30,
            "peak_allocated_gb": allocated / 2**30, "tflop_per_iteration":
            flops / 1e12, "tflops": flops / 1e12 / seconds,
            "s_per_bootstrap_image": (max(args.bootstrap_iterations - 1, 0) * seconds + forward_only * score_s) / batch
            + render_s, "warmup_s": warmup, "render_s": render_s, "score_s": score_s, "kept_steps": kept}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny components on the CPU (SDXL's shape with --model sdxl*)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="of the fast mode; auto: float16 on a GPU, float32 on the CPU")
    parser.add_argument("--height", type=int, default=None, help="image size (default: the model's; tiny 32)")
    parser.add_argument("--model", default="sd21", choices=list(PRESETS),
                        help="the architecture, with its preset: sd21 ddim 20 steps CFG 7.5 512 px k=3; sd_turbo "
                             "(SD 2.1's UNet) euler 1 step CFG 0 512 px k=1; sdxl ddim 20 steps CFG 5 1024 px k=3; "
                             "sdxl_turbo (SDXL's UNet) euler 1 step CFG 0 512 px k=1")
    parser.add_argument("--sampler", default=None, choices=["ddim", "euler", "dpmpp_2m"], help="default: the model's")
    parser.add_argument("--steps", type=int, default=None, help="default: the model's")
    parser.add_argument("--k", type=int, default=None, help="default: the model's")
    parser.add_argument("--guidance", type=float, default=None, help="default: the model's")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--modes", nargs="+", default=["graphed", "plain"],
                        choices=["fast", "compiled", "graphed", "compiled-graphed", "plain"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=5, help="timed iterations (the median is reported)")
    parser.add_argument("--bootstrap-iterations", type=int, default=5)
    parser.add_argument("--bootstrap-candidates", type=int, default=8,
                        help="starts scored per bootstrapped image (the default method's; the paper's scheme: 1)")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="the device's dense rate for --dtype")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--compile-mode", default=None, help="torch.compile's mode for the compiled rows")
    parser.add_argument("--channels-last", nargs="?", const="all", default=None, choices=["all", "unet"],
                        help="channels-last memory format for the UNet and VAE (all) or the UNet alone (unet); "
                             "compiled modes put both in it anyway")
    parser.add_argument("--group-norm", default="native", choices=["native", "reduced"],
                        help="the UNet's and VAE's group norms: PyTorch's, or from reductions that keep "
                             "channels-last (ReducedGroupNorm)")
    parser.add_argument("--sdpa", nargs="+", default=None, choices=["flash", "efficient", "cudnn", "math"],
                        help="the attention backends allowed (default: PyTorch's choice)")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="torch.backends.cudnn.benchmark: time the convolution algorithms, pick among those that fit")
    parser.add_argument("--cudnn-workspace-mb", type=int, default=None,
                        help="cap cuDNN's workspace per convolution (CUDNN_CONV_WSCAP_DBG)")
    parser.add_argument("--memory-budget", default="0",
                        help="runtime.memory_budget for our modes: GB for the activations of kept denoising steps "
                             "(auto: half the device's free memory); 0 recomputes every step, as by default")
    parser.add_argument("--memory-history", action="store_true",
                        help="record where GPU memory is allocated; on out of memory, print the largest live blocks")
    parser.add_argument("--profile", action="store_true",
                        help="print torch.profiler's busiest operations for one iteration of each row")
    parser.add_argument("--flops", action="store_true",
                        help="only count the FLOPs and operations of the paper's setting (meta device)")
    args = parser.parse_args(argv)
    COUNTED.clear()  # another call of main may count other models, steps or sizes
    preset = PRESETS[args.model]
    args.sampler = args.sampler or preset["sampler"]
    args.steps = args.steps or preset["steps"]
    args.k = args.k or preset["k"]
    args.guidance = args.guidance if args.guidance is not None else preset["guidance"]
    if args.cudnn_workspace_mb is not None:  # read when cuDNN first runs a convolution
        os.environ["CUDNN_CONV_WSCAP_DBG"] = str(args.cudnn_workspace_mb)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if args.memory_history and torch.cuda.is_available():
        torch.cuda.memory._record_memory_history(max_entries=200_000, stacks="python")
    device = torch.device("cpu") if args.tiny else resolve_device(args.device)
    args.height = args.height or (32 if args.tiny else preset["height"])
    weights = [0.05, 0.25, 0.7] if args.k == 3 else [1 / args.k] * args.k  # the authors' weights for k = 3
    config = bench_config([f"sampler.name={args.sampler}", f"sampler.steps={args.steps}", f"kstep.k={args.k}",
                          f"kstep.weights={weights}",
                          f"sampler.guidance_scale={args.guidance}", f"sampler.height={args.height}",
                          f"sampler.width={args.height}"])

    if args.flops:
        counts = count_flops(config, args)
        table = Table(title=f"FLOPs: {preset['title']} + CLIP ViT-H-14, {args.height} px, {args.sampler}, {args.steps} steps, "
                            f"k={args.k}, CFG {args.guidance:g}")
        for column in ("call", "TFLOP", f"floor at {args.peak_tflops:g} TFLOP/s", "operations"):
            table.add_column(column, justify="left" if column == "call" else "right")
        for name, tflop, operations in counts:
            table.add_row(name, f"{tflop:.3f}", f"{tflop / args.peak_tflops * 1000:.1f} ms", f"{operations:,}")
        print_table(table)
        return [{"call": name, "tflop": tflop, "operations": operations} for name, tflop, operations in counts]

    rows = []
    fast_dtype = resolve_dtype(args.dtype, device)
    for mode in args.modes:
        dtype = torch.float32 if mode == "plain" else fast_dtype
        tiny = "tiny_sdxl" if args.model.startswith("sdxl") else "tiny"  # the tiny components in the model's shape
        models = (load_models(ModelConfig(pretrained=tiny, image_encoder="tiny"), device, dtype) if args.tiny
                  else real_models(device, dtype, args.model))
        mode_config = dataclasses.replace(config, sampler=dataclasses.replace(
            config.sampler, checkpointing=mode != "plain"))
        prepare(models, mode, args)
        for batch in args.batch:
            row = {"mode": mode, "dtype": str(dtype).removeprefix("torch."), "batch": batch}
            try:
                with attention_backends(args.sdpa):
                    row |= measure(models, mode, mode_config, batch, args)
                row["fraction_of_peak"] = row["tflops"] / args.peak_tflops
            except torch.OutOfMemoryError as exc:  # a large batch may not fit: say where, go on
                frames = [f for f in traceback.extract_tb(exc.__traceback__) if "seedselect" in f.filename]
                where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
                row["out_of_memory"] = f"{where}: {str(exc).splitlines()[0][:160]}"
                Console(stderr=True).print(f"[red]{mode} batch {batch}: out of memory at {row['out_of_memory']}")
                if args.memory_history:
                    print(str(exc))
                    largest_blocks()
                torch.cuda.empty_cache()
            rows.append(row)
        del models
        if device.type == "cuda":
            torch.cuda.empty_cache()

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    table = Table(title=f"seedselect bench: {'tiny' if args.tiny else preset['title'] + ' + CLIP ViT-H-14'}, "
                        f"{args.height} px, {args.steps} steps, k={args.k}, CFG {args.guidance}, on {name}"
                        + (f", channels-last: {args.channels_last}" if args.channels_last else "")
                        + (f", {args.group_norm} group norm" if args.group_norm != "native" else ""))
    for column in ("mode", "dtype", "batch", "kept steps", "s/it", "peak GB", "TFLOP/it", "TFLOP/s", "of peak",
                   "s/img boot", "plain/best", "warm-up s"):
        table.add_column(column, justify="left" if column in ("mode", "dtype") else "right")
    best: dict[int, float] = {}  # the fastest of our modes, per batch size: plain's ratio is against it
    for r in rows:
        if r["mode"] != "plain" and "s_per_iteration" in r:
            best[r["batch"]] = min(r["s_per_iteration"], best.get(r["batch"], float("inf")))
    short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    for r in rows:
        if r.get("out_of_memory"):
            table.add_row(r["mode"], short[r["dtype"]], str(r["batch"]), "", "out of memory", *[""] * 7)
            continue
        ratio = r["s_per_iteration"] / best[r["batch"]] if r["mode"] == "plain" and r["batch"] in best else None
        table.add_row(r["mode"], short[r["dtype"]], str(r["batch"]), f"{r['kept_steps']}/{args.steps}",
                      f"{r['s_per_iteration']:.3f}",
                      f"{r['peak_memory_gb']:.2f}", f"{r['tflop_per_iteration']:.3f}", f"{r['tflops']:.2f}",
                      f"{r['fraction_of_peak']:.1%}", f"{r['s_per_bootstrap_image']:.3f}",
                      f"{ratio:.1f}x" if ratio else "", f"{r['warmup_s']:.1f}")
    print_table(table)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": name, "args": vars(args), "rows": rows}, handle, indent=2)
    return rows


if __name__ == "__main__":
    main()
