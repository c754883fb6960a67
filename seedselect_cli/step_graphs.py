"""The denoising steps of seed optimisation as CUDA graphs (`runtime.cuda_graphs`).

Eager PyTorch launches each of a UNet call's kernels from Python. For Stable Diffusion at batch 1
that host work is several times the GPU's own (BENCHMARKS.md: 56,000 launches and 3 to 4 s of host
time per iteration on an H200, against 0.9 s of device time). A CUDA graph records a call's kernels
once and replays them with one launch: with these graphs an iteration there takes 1.09 s instead of 2.82 s.

`StepGraphs` holds, for one batch shape, every denoising step twice: its forward pass without
gradients, and its vector-Jacobian product (the step recomputed with gradients, then
`torch.autograd.grad`). That is the checkpointing of `sampling.ddim_rollout`, one checkpoint per
step, done by hand so that both halves have static shapes and can be captured; memory stays flat in
the number of steps. Inputs and outputs live in static buffers that every call overwrites, so a
rollout's backward pass must come before the next rollout (checked). `StepGraphCache.rollout` wraps
this in an autograd function: the loss and the optimiser do not change.

Off a CUDA device (`capture=False`) the same functions run eagerly on the same buffers. That is how
the tests check the bookkeeping against autograd on the CPU.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch.autograd.function import once_differentiable

from seedselect_cli.errors import UserError, first_line
from seedselect_cli.models import FrozenModels
from seedselect_cli.sampling import ddim_step

log = logging.getLogger(__name__)

WARMUP_ROUNDS = 2  # eager rounds of every step before capture: cuDNN, cuBLAS and autograd set up outside it
CACHED_SHAPES = 2  # a run meets at most two batch shapes: runtime.batch_size and a class's last, smaller batch


def capture_graph(call: Callable[[], None], pool, stream: torch.cuda.Stream) -> Callable[[], None]:
    """`call`'s CUDA work as a graph in memory pool `pool`: returns what replays it."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=stream):
        call()
    return graph.replay


class StepGraphs:
    """The forward pass and the vector-Jacobian product of each DDIM step, for one batch shape."""

    def __init__(self, models: FrozenModels, z_T: torch.Tensor, embeds: torch.Tensor, timesteps: torch.Tensor,
                 guidance_scale: float, capture: bool):
        self.models, self.guidance_scale = models, guidance_scale
        self.timesteps = [int(t) for t in timesteps]  # Python ints: the scheduler's arithmetic stays on the host
        self.z_T = z_T.detach().to(models.device, copy=True)  # static input buffers
        self.embeds = embeds.detach().clone()
        n = len(self.timesteps)
        self.latents = [torch.empty_like(self.z_T) for _ in range(n)]  # z after step i
        # dL/d(output) and dL/d(input) of the step being differentiated: the steps take turns, so they share
        self.grad_out, self.grad_in = torch.randn_like(self.z_T), torch.empty_like(self.z_T)
        self.generation = 0  # rollouts so far; a backward pass checks that its rollout is still the last
        forward = [functools.partial(self._forward, i) for i in range(n)]
        backward = [functools.partial(self._backward, i) for i in range(n)]
        self.forward_calls, self.backward_calls = self._capture(forward, backward) if capture else (forward, backward)

    def _input(self, i: int) -> torch.Tensor:
        return self.z_T if i == 0 else self.latents[i - 1]

    def _step(self, i: int, z: torch.Tensor) -> torch.Tensor:
        return ddim_step(self.models, z, self.timesteps[i], self.embeds, self.guidance_scale)

    def _forward(self, i: int) -> None:
        with torch.no_grad():
            self.latents[i].copy_(self._step(i, self._input(i)))

    def _backward(self, i: int) -> None:
        with torch.enable_grad():
            z = self._input(i).detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self._step(i, z), z, self.grad_out)
        self.grad_in.copy_(grad)

    def _capture(self, forward: list[Callable[[], None]], backward: list[Callable[[], None]]
                 ) -> tuple[list[Callable[[], None]], list[Callable[[], None]]]:
        """Each call as a CUDA graph, all in one memory pool. They are captured in the order a rollout
        and its backward pass replay them (steps 0..n-1, then n-1..0), which sharing a pool requires."""
        device = self.models.device
        stream = torch.cuda.Stream(device)  # warm-up and capture on one stream: no handle is first made mid-capture
        stream.wait_stream(torch.cuda.current_stream(device))
        begin = time.perf_counter()
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_ROUNDS):
                for call in [*forward, *reversed(backward)]:
                    call()
        torch.cuda.synchronize(device)
        pool = torch.cuda.graph_pool_handle()
        try:
            replays = [capture_graph(call, pool, stream) for call in [*forward, *reversed(backward)]]
        except RuntimeError as exc:  # an operation that cannot be captured, e.g. one that syncs with the host
            raise UserError(f"runtime.cuda_graphs: capturing the denoising steps failed ({first_line(exc)}); "
                            f"use runtime.cuda_graphs=false") from exc
        n = len(forward)
        log.info("captured %d denoising steps for batch shape %s in %.1f s", n, tuple(self.z_T.shape),
                 time.perf_counter() - begin)
        return replays[:n], replays[n:][::-1]

    def forward(self, z_T: torch.Tensor, embeds: torch.Tensor) -> list[torch.Tensor]:
        """Roll out from z_T: the latents after every step (static buffers, valid until the next call)."""
        self.z_T.copy_(z_T)
        self.embeds.copy_(embeds)
        for call in self.forward_calls:
            call()
        self.generation += 1
        return self.latents

    def backward(self, grads: dict[int, torch.Tensor]) -> torch.Tensor:
        """dL/dz_T, from dL/dz_i for the latents i in `grads` (those the loss saw), step by step backwards."""
        last = len(self.latents) - 1
        for i in range(last, -1, -1):
            direct = grads.get(i)  # from the loss, if it saw this latent
            later = None if i == last else self.grad_in  # through the later steps: dL/d(input of step i + 1)
            if later is None and direct is None:
                self.grad_out.zero_()
            elif later is None or direct is None:
                self.grad_out.copy_(direct if later is None else later)
            else:
                torch.add(later, direct, out=self.grad_out)
            self.backward_calls[i]()
        return self.grad_in.clone()


class _Rollout(torch.autograd.Function):
    """z_T -> the last `keep_last` latents, with the step graphs' backward pass as its gradient."""

    @staticmethod
    def forward(ctx, z_T: torch.Tensor, graphs: StepGraphs, embeds: torch.Tensor, keep_last: int):
        latents = graphs.forward(z_T, embeds)
        ctx.graphs, ctx.generation, ctx.first_kept = graphs, graphs.generation, len(latents) - keep_last
        return tuple(z.clone() for z in latents[-keep_last:])  # clones: the buffers are overwritten next time

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: torch.Tensor):
        if ctx.graphs.generation != ctx.generation:
            raise RuntimeError("the step graphs ran another rollout before this one's backward pass: with "
                               "runtime.cuda_graphs, call backward() after each rollout with gradients")
        kept = {ctx.first_kept + j: g for j, g in enumerate(grads) if g is not None}
        return ctx.graphs.backward(kept), None, None, None


class StepGraphCache:
    """The step graphs of the last `CACHED_SHAPES` batch shapes a run met; built on first use."""

    def __init__(self, models: FrozenModels, capture: bool):
        self.models, self.capture = models, capture
        self.entries: OrderedDict[tuple, StepGraphs] = OrderedDict()

    def rollout(self, z_T: torch.Tensor, embeds: torch.Tensor, timesteps: torch.Tensor, guidance_scale: float,
                keep_last: int) -> list[torch.Tensor]:
        """What `sampling.ddim_rollout` returns with checkpointing, differentiable in z_T.
        `embeds` are the UNet batch's text embeddings (`sampling.guided_embeddings`)."""
        key = (tuple(z_T.shape), z_T.dtype, tuple(embeds.shape), embeds.dtype, tuple(int(t) for t in timesteps),
               float(guidance_scale))
        graphs = self.entries.pop(key, None)
        if graphs is None:
            while len(self.entries) >= CACHED_SHAPES:  # free the oldest first: its pool is large
                self.entries.popitem(last=False)
            graphs = StepGraphs(self.models, z_T, embeds, timesteps, guidance_scale, self.capture)
        self.entries[key] = graphs
        return list(_Rollout.apply(z_T, graphs, embeds, keep_last))


def resolve_cuda_graphs(setting: str, device: torch.device, checkpointing: bool) -> bool:
    """Whether to capture step graphs for `runtime.cuda_graphs` (auto, true, false; any case): auto
    captures them wherever they can run, on a CUDA device with per-step checkpoints (on an H200 they
    made an iteration 2.6 times faster for the same memory: BENCHMARKS.md)."""
    setting = str(setting).lower()
    if setting == "true" and device.type != "cuda":
        raise UserError(f"runtime.cuda_graphs=true needs a CUDA device, not {device.type}; "
                        f"use runtime.cuda_graphs=auto or false")
    return setting == "true" or (setting == "auto" and device.type == "cuda" and checkpointing)


def enable_cuda_graphs(models: FrozenModels) -> FrozenModels:
    """Route the checkpointed rollouts of `models` through step graphs, in place; captured on a CUDA
    device, run eagerly elsewhere (what the tests check)."""
    models.step_graphs = StepGraphCache(models, capture=models.device.type == "cuda")
    return models
