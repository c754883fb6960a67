"""Activation checkpoints as CUDA graphs (`runtime.cuda_graphs`): the denoising steps and the loss's decodes.

Eager PyTorch launches each of a network call's kernels from Python. For Stable Diffusion at batch 1
that host work is several times the GPU's own (BENCHMARKS.md: 56,000 launches and 3 to 4 s of host
time per iteration on an H200, against under 1 s of device time). A CUDA graph records a call's
kernels once and replays them with one launch.

Seed optimisation checkpoints two kinds of call: each denoising step (`sampling.rollout`) and
the decode-and-embed of each kept latent (`optimize.semantic_embedding`). `checkpointed` runs such a
call y = fn(x, *context) with one activation checkpoint, as `torch.utils.checkpoint` does: forward
without gradients, and in the backward pass fn recomputed with gradients for the vector-Jacobian
product in x. With `runtime.cuda_graphs` both halves are CUDA graphs (`GraphedCall`), one pair per
call and batch shape, captured on first use: every call copies its inputs into the pair's static
buffers and its output out of them, so calls and backward passes may come in any order, and memory
stays flat in the number of steps as with checkpoints. The context (a step's text embeddings) gets
no gradient.

Off a CUDA device (`capture=False`) the same functions run eagerly on the same buffers. That is how
the tests check the bookkeeping against autograd on the CPU.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from seedselect_cli.errors import UserError, first_line

log = logging.getLogger(__name__)

WARMUP_ROUNDS = 2  # eager rounds of each call before capture: cuDNN, cuBLAS and autograd set up outside it
CACHED_SHAPES = 2  # a run meets at most two batch shapes: runtime.batch_size and a class's last, smaller batch


def capture_graph(call: Callable[[], None], pool, stream: torch.cuda.Stream) -> Callable[[], None]:
    """`call`'s CUDA work as a graph in memory pool `pool`: returns what replays it."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=stream):
        call()
    return graph.replay


class GraphedCall:
    """y = fn(x, *context) for one set of input shapes: its forward pass without gradients and its
    vector-Jacobian product in x, each on static buffers, captured as CUDA graphs or run eagerly."""

    def __init__(self, fn: Callable[..., torch.Tensor], x: torch.Tensor, context: tuple[torch.Tensor, ...]):
        self.fn = fn
        self.x = x.detach().clone()  # static buffers: every use copies its tensors in and out
        self.context = [c.detach().clone() for c in context]
        with torch.no_grad():
            self.y = torch.empty_like(fn(self.x, *self.context))
        self.grad_y, self.grad_x = torch.randn_like(self.y), torch.empty_like(self.x)  # random: warm-up input
        self.forward, self.backward = self._forward, self._backward  # replaced by replays once captured

    def _forward(self) -> None:
        with torch.no_grad():
            self.y.copy_(self.fn(self.x, *self.context))

    def _backward(self) -> None:
        with torch.enable_grad():
            x = self.x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.fn(x, *self.context), x, self.grad_y)
        self.grad_x.copy_(grad)

    def capture(self, pool, stream: torch.cuda.Stream, what: str) -> None:
        """Warm both halves up eagerly on `stream`, then capture them there into memory pool `pool`."""
        stream.wait_stream(torch.cuda.current_stream(self.x.device))
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_ROUNDS):
                self._forward()
                self._backward()
        torch.cuda.synchronize(self.x.device)
        try:
            self.forward, self.backward = capture_graph(self._forward, pool, stream), capture_graph(
                self._backward, pool, stream)
        except RuntimeError as exc:  # an operation that cannot be captured, e.g. one that syncs with the host
            raise UserError(f"runtime.cuda_graphs: capturing {what} failed ({first_line(exc)}); "
                            f"use runtime.cuda_graphs=false") from exc

    def load(self, x: torch.Tensor, context: tuple[torch.Tensor, ...]) -> None:
        self.x.copy_(x)
        for buffer, value in zip(self.context, context):
            buffer.copy_(value)


class _Checkpoint(torch.autograd.Function):
    """x -> fn(x, *context) through a `GraphedCall`, its vector-Jacobian product as the gradient."""

    @staticmethod
    def forward(ctx, call: GraphedCall, x: torch.Tensor, *context: torch.Tensor):
        call.load(x, context)
        call.forward()
        ctx.call = call
        ctx.save_for_backward(x, *context)  # the input again for the recomputation, as a checkpoint keeps it
        return call.y.clone()  # a copy: the buffer is overwritten by the next call

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        x, *context = ctx.saved_tensors
        call = ctx.call
        call.load(x, tuple(context))
        call.grad_y.copy_(grad_y)
        call.backward()
        return None, call.grad_x.clone(), *[None] * len(context)


class GraphCache:
    """The graphed calls of the last `CACHED_SHAPES` batch sizes a run met, each batch size's in one
    memory pool; captured on first use (on a CUDA device) or run eagerly (`capture=False`)."""

    def __init__(self, capture: bool):
        self.capture = capture
        self.batches: OrderedDict[int, dict[tuple, GraphedCall]] = OrderedDict()
        self.pools: dict[int, object] = {}
        self.stream: torch.cuda.Stream | None = None  # warm-up and capture on one stream: no handle made mid-capture

    def call(self, key: Hashable, fn: Callable[..., torch.Tensor], x: torch.Tensor, *context: torch.Tensor
             ) -> torch.Tensor:
        """fn(x, *context), differentiable in x, for the call named `key` (fn must not change for a key;
        a tuple key's first item says what the call is, in errors)."""
        batch = x.shape[0]
        calls = self.batches.pop(batch, None)
        if calls is None:
            while len(self.batches) >= CACHED_SHAPES:  # free the oldest first: its pool is large
                oldest, _ = self.batches.popitem(last=False)
                self.pools.pop(oldest, None)
            calls = {}
            if self.capture:
                log.info("capturing CUDA graphs for batch size %d as each call is first met (once per batch size)",
                         batch)
        self.batches[batch] = calls
        full_key = (key, *((tuple(t.shape), t.dtype) for t in (x, *context)))
        graphed = calls.get(full_key)
        if graphed is None:
            graphed = calls[full_key] = self._new(batch, key, fn, x, context)
        return _Checkpoint.apply(graphed, x, *context)

    def _new(self, batch: int, key: Hashable, fn, x: torch.Tensor, context: tuple[torch.Tensor, ...]) -> GraphedCall:
        graphed = GraphedCall(fn, x, context)
        if self.capture:
            begin = time.perf_counter()
            if batch not in self.pools:
                self.pools[batch] = torch.cuda.graph_pool_handle()
            if self.stream is None:
                self.stream = torch.cuda.Stream(x.device)
            graphed.capture(self.pools[batch], self.stream, key[0] if isinstance(key, tuple) else str(key))
            log.debug("captured %s at batch %d in %.2f s", key, batch, time.perf_counter() - begin)
        return graphed


def checkpointed(graphs: GraphCache | None, key: Hashable, fn: Callable[..., torch.Tensor], x: torch.Tensor,
                 *context: torch.Tensor) -> torch.Tensor:
    """fn(x, *context) with one activation checkpoint, differentiable in x: through the CUDA graphs of `graphs`
    when `runtime.cuda_graphs` made them (`key` names the call), else (None) `torch.utils.checkpoint`."""
    if graphs is not None:
        return graphs.call(key, fn, x, *context)
    return activation_checkpoint(fn, x, *context, use_reentrant=False)


def resolve_cuda_graphs(setting: str, device: torch.device, checkpointing: bool) -> bool:
    """Whether to capture CUDA graphs for `runtime.cuda_graphs` (auto, true, false; any case): auto
    captures them wherever they can run, on a CUDA device with per-step checkpoints."""
    setting = str(setting).lower()
    if setting == "true" and device.type != "cuda":
        raise UserError(f"runtime.cuda_graphs=true needs a CUDA device, not {device.type}; "
                        f"use runtime.cuda_graphs=auto or false")
    return setting == "true" or (setting == "auto" and device.type == "cuda" and checkpointing)


def graph_cache(device: torch.device) -> GraphCache:
    """The cache that routes a run's checkpointed calls through CUDA graphs: captured on a CUDA device, run
    eagerly elsewhere (what the tests check). The engine holds it and hands it to the sampler and the loss."""
    return GraphCache(capture=device.type == "cuda")
