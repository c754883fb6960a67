"""Memory of the differentiable DDIM rollout against the number of sampling steps, on the CPU.

    python scripts/memory_vs_steps.py [--size 192] [--steps 10 50]

For each step count, with and without per-step checkpointing: the bytes autograd keeps for the
backward pass (what checkpointing is meant to bound) on the tiny components. The step graphs of
`runtime.cuda_graphs` keep theirs in static buffers instead (run eagerly here, as on any CPU). Run it under
`MALLOC_TRIM_THRESHOLD_=0 MALLOC_MMAP_THRESHOLD_=65536` and `/usr/bin/time -v` to see peak RSS too
(without them glibc keeps freed memory and RSS grows with every recomputation).
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from seedselect_cli.config import ModelConfig
from seedselect_cli.models import load_models
from seedselect_cli.sampling import ddim_rollout, encode_prompt, set_timesteps
from seedselect_cli.step_graphs import enable_cuda_graphs


def saved_bytes(models, steps: int, size: int, checkpoint: bool) -> int:
    """Bytes of the tensors autograd saves in one rollout (distinct tensors, counted once)."""
    held: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        held[id(tensor)] = tensor.numel() * tensor.element_size()
        return tensor

    shape = models.latent_shape(size, size)
    z = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    embeds = encode_prompt(models, "a red disc")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        ddim_rollout(models, z, embeds, set_timesteps(models, steps), 7.5, keep_last=3, checkpoint=checkpoint)
    return sum(held.values())


def step_graph_bytes(models, steps: int, size: int) -> int:
    """Bytes of the static buffers the step graphs keep for one rollout and its backward pass."""
    graphed = enable_cuda_graphs(dataclasses.replace(models, step_graphs=None))
    z = torch.randn(1, *models.latent_shape(size, size), generator=torch.Generator().manual_seed(0))
    kept = ddim_rollout(graphed, z.requires_grad_(True), encode_prompt(models, "a red disc"),
                        set_timesteps(models, steps), 7.5, keep_last=3)
    sum(k.sum() for k in kept).backward()
    (graphs,) = graphed.step_graphs.entries.values()
    buffers = [graphs.z_T, graphs.embeds, *graphs.latents, graphs.grad_out, graphs.grad_in]
    return sum(t.numel() * t.element_size() for t in buffers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=192, help="image side in pixels")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 50])
    args = parser.parse_args()
    models = load_models(ModelConfig(pretrained="tiny", image_encoder="tiny"), torch.device("cpu"), torch.float32)
    print(f"{'steps':>5} | {'rollout':>15} | kept for backward")
    for name in ("checkpointed", "not checkpointed", "step graphs"):
        for steps in args.steps:
            held = (step_graph_bytes(models, steps, args.size) if name == "step graphs"
                    else saved_bytes(models, steps, args.size, checkpoint=name == "checkpointed"))
            print(f"{steps:>5} | {name:>15} | {held / 2**20:10.1f} MiB")


if __name__ == "__main__":
    main()
