"""Memory of the differentiable DDIM rollout against the number of sampling steps, on the CPU.

    python scripts/memory_vs_steps.py [--size 192] [--steps 10 50]

For each step count, with and without per-step checkpointing: the bytes autograd keeps for the
backward pass (what checkpointing is meant to bound) on the tiny components. The graphed steps of
`runtime.cuda_graphs` keep the same latents, plus static buffers (run eagerly here, as on any CPU). Run it under
`MALLOC_TRIM_THRESHOLD_=0 MALLOC_MMAP_THRESHOLD_=65536` and `/usr/bin/time -v` to see peak RSS too
(without them glibc keeps freed memory and RSS grows with every recomputation).
"""

from __future__ import annotations

import argparse

import torch

from seedselect_cli.config import ModelConfig
from seedselect_cli.core.cuda_graphs import GraphCache, graph_cache
from seedselect_cli.core.prompts import encode_prompt
from seedselect_cli.core.samplers import ddim_schedule
from seedselect_cli.core.sampling import rollout
from seedselect_cli.models import load_models


def saved_bytes(models, steps: int, size: int, checkpoint: bool, graphs: GraphCache | None = None) -> int:
    """Bytes of the tensors autograd saves in one rollout (distinct tensors, counted once)."""
    held: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        held[id(tensor)] = tensor.numel() * tensor.element_size()
        return tensor

    shape = models.latent_shape(size, size)
    z = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    embeds = encode_prompt(models, "a red disc")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        rollout(models, z, embeds, ddim_schedule(models, steps), 7.5, keep_last=3, checkpoint=checkpoint, graphs=graphs)
    return sum(held.values())


def graphed_bytes(models, steps: int, size: int) -> int:
    """Bytes autograd saves in one graphed rollout, plus the static buffers of its graphed steps."""
    graphs = graph_cache(models.device)
    held = saved_bytes(models, steps, size, checkpoint=True, graphs=graphs)
    (calls,) = graphs.batches.values()
    buffers = [t for call in calls.values() for t in (call.x, *call.context, call.y, call.grad_y, call.grad_x)]
    return held + sum(t.numel() * t.element_size() for t in buffers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=192, help="image side in pixels")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 50])
    args = parser.parse_args()
    models = load_models(ModelConfig(pretrained="tiny", image_encoder="tiny"), torch.device("cpu"), torch.float32)
    print(f"{'steps':>5} | {'rollout':>15} | kept for backward")
    for name in ("checkpointed", "not checkpointed", "graphed"):
        for steps in args.steps:
            held = (graphed_bytes(models, steps, args.size) if name == "graphed"
                    else saved_bytes(models, steps, args.size, checkpoint=name == "checkpointed"))
            print(f"{steps:>5} | {name:>15} | {held / 2**20:10.1f} MiB")


if __name__ == "__main__":
    main()
