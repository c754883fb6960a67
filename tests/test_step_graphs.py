"""The denoising steps as CUDA graphs (`runtime.cuda_graphs`): their bookkeeping against autograd.

On the CPU the step graphs run eagerly on their static buffers, which is everything but the capture:
the backward pass step by step, the gradients of the k kept latents added on the way, the buffers
that each call overwrites. With torch.cuda's streams and graphs faked, the capture's own bookkeeping
(its order, and a failed capture's error) runs too. The last two tests capture for real, on CUDA.
"""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

import seedselect_cli.step_graphs as step_graphs_module
from seedselect_cli.errors import UserError
from seedselect_cli.optimize import optimize_seeds, seed_objective
from seedselect_cli.references import Centroids
from seedselect_cli.sampling import ddim_rollout, encode_prompt, set_timesteps
from seedselect_cli.step_graphs import CACHED_SHAPES, StepGraphCache, enable_cuda_graphs
from tests.conftest import make_config
from tests.layouts import make_cub

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="captures CUDA graphs: needs a CUDA device")


def graphed(models):
    """A copy of the shared tiny models whose checkpointed rollouts go through step graphs."""
    return enable_cuda_graphs(dataclasses.replace(models, step_graphs=None))


def rollout_and_gradient(models, z0, embeds, timesteps, checkpoint=True, keep=3, seed=0):
    """The kept latents and dL/dz_T of a loss that weighs each kept latent differently and non-linearly."""
    g = torch.Generator().manual_seed(seed)
    targets = [torch.randn(z0.shape, generator=g).to(z0.device, z0.dtype) for _ in range(keep)]
    z = z0.clone().requires_grad_(True)
    kept = ddim_rollout(models, z, embeds, timesteps, 5.0, keep_last=keep, checkpoint=checkpoint)
    loss = sum((j + 1) * (k - t).pow(2).mean() + (k * t).sum().tanh() for j, (k, t) in enumerate(zip(kept, targets)))
    loss.backward()
    return [k.detach() for k in kept], z.grad


@pytest.mark.parametrize("keep", [1, 3])
def test_step_graphs_match_autograd_through_the_whole_rollout_in_float64(tiny_models64, keep):
    plain, steps = tiny_models64, graphed(tiny_models64)
    z0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    embeds, timesteps = encode_prompt(plain, "a photo of a pine warbler"), set_timesteps(plain, 6)
    lat_plain, grad_plain = rollout_and_gradient(plain, z0, embeds, timesteps, checkpoint=False, keep=keep)
    lat_graph, grad_graph = rollout_and_gradient(steps, z0, embeds, timesteps, keep=keep)
    assert len(lat_graph) == keep and grad_plain.abs().min() > 0
    for a, b in zip(lat_graph, lat_plain):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_graph, grad_plain, rtol=1e-10, atol=1e-12)


def test_step_graphs_give_the_checkpointed_losses_and_optimised_seeds(tiny_models):
    """Through the loss and the optimiser, in float32: the same as per-step activation checkpoints."""
    config = make_config(["sampler.steps=5", "kstep.k=3", "kstep.weights=[0.2,0.3,0.5]", "loss.lam=0.5"])
    steps = graphed(tiny_models)
    g = torch.Generator().manual_seed(5)
    z0 = torch.randn(2, 4, 16, 16, generator=g)
    dim = tiny_models.image_encoder.config.projection_dim
    centroids = Centroids(torch.nn.functional.normalize(torch.randn(dim, generator=g), dim=0),
                          torch.randn(4, 16, 16, generator=g), count=3)
    embeds, timesteps = encode_prompt(tiny_models, "a snow wren"), set_timesteps(tiny_models, 5)
    results = []
    for models in (tiny_models, steps):
        z = z0.clone().requires_grad_(True)
        terms = seed_objective(models, z, centroids, embeds, timesteps, config)
        terms.total.sum().backward()
        results.append((terms.total.detach(), z.grad))
    (loss_a, grad_a), (loss_b, grad_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
    scale = grad_a.abs().max().item()
    assert scale > 0
    # float32 sums the kept latents' gradients in another order: agreement to float32's rounding
    torch.testing.assert_close(grad_b, grad_a, rtol=1e-5, atol=1e-5 * scale)

    runs = [optimize_seeds(models, z0, centroids, embeds, config) for models in (tiny_models, steps)]
    for a, b in zip(*runs):
        assert a.loss_history == pytest.approx(b.loss_history, rel=1e-5)
        # AdamW divides by the gradient's running RMS: where it is near 0, rounding moves a seed by more
        torch.testing.assert_close(b.optimized, a.optimized, rtol=0, atol=1e-4)


def test_a_second_rollout_before_the_backward_pass_is_refused(tiny_models):
    steps = graphed(tiny_models)
    embeds, timesteps = encode_prompt(tiny_models, "a hand"), set_timesteps(tiny_models, 3)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    first = ddim_rollout(steps, z, embeds, timesteps, 5.0)[-1]
    second = ddim_rollout(steps, z * 2, embeds, timesteps, 5.0)[-1]  # overwrites the buffers of the first
    with pytest.raises(RuntimeError, match="another rollout before"):
        first.sum().backward()
    second.sum().backward()  # the last one is fine
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_no_gradients_no_graphs_and_one_cache_entry_per_batch_shape(tiny_models):
    steps = graphed(tiny_models)
    cache: StepGraphCache = steps.step_graphs
    embeds, timesteps = encode_prompt(tiny_models, "a hand"), set_timesteps(tiny_models, 3)
    with torch.no_grad():  # rendering: the plain rollout
        ddim_rollout(steps, torch.randn(1, 4, 16, 16), embeds, timesteps, 5.0)
    assert not cache.entries

    def rollout(batch: int):
        z = torch.randn(batch, 4, 16, 16, requires_grad=True)
        ddim_rollout(steps, z, embeds, timesteps, 5.0)[-1].sum().backward()

    rollout(1)
    first = next(iter(cache.entries.values()))
    rollout(1)
    assert list(cache.entries.values()) == [first]  # the same graphs again
    for batch in range(2, CACHED_SHAPES + 2):
        rollout(batch)
    assert len(cache.entries) == CACHED_SHAPES and first not in cache.entries.values()  # the oldest went


@pytest.fixture
def fake_capture(monkeypatch) -> list:
    """torch.cuda's streams and graphs faked, so that the capture's own bookkeeping runs on the CPU:
    a "captured" call is recorded, and "replayed" by calling it again. Returns the recorded calls."""
    class Stream:
        def __init__(self, device=None):
            pass

        def wait_stream(self, other):
            pass

    for name, fake in [("Stream", Stream), ("current_stream", lambda device=None: Stream()),
                       ("stream", lambda stream: contextlib.nullcontext()), ("synchronize", lambda device=None: None),
                       ("graph_pool_handle", lambda: "pool")]:
        monkeypatch.setattr(torch.cuda, name, fake)
    captured = []

    def capture_graph(call, pool, stream):
        captured.append(call)
        return call

    monkeypatch.setattr(step_graphs_module, "capture_graph", capture_graph)
    return captured


def captured_copy(models):
    copy = dataclasses.replace(models, step_graphs=None)
    copy.step_graphs = StepGraphCache(copy, capture=True)
    return copy


def test_the_capture_replays_each_step_in_its_place(tiny_models64, fake_capture):
    """Captured in replay order (forward 0..n-1, then backward n-1..0), and handed back in step order."""
    plain, steps = tiny_models64, captured_copy(tiny_models64)
    z0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    embeds, timesteps = encode_prompt(plain, "a sea gull"), set_timesteps(plain, 5)
    lat_plain, grad_plain = rollout_and_gradient(plain, z0, embeds, timesteps, checkpoint=False)
    lat_graph, grad_graph = rollout_and_gradient(steps, z0, embeds, timesteps)
    for a, b in zip(lat_graph, lat_plain):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_graph, grad_plain, rtol=1e-10, atol=1e-12)
    order = [(call.func.__name__, call.args[0]) for call in fake_capture]
    assert order == [("_forward", i) for i in range(5)] + [("_backward", i) for i in reversed(range(5))]
    (graphs,) = steps.step_graphs.entries.values()
    assert [c.args[0] for c in graphs.forward_calls] == [c.args[0] for c in graphs.backward_calls] == list(range(5))


def test_a_failed_capture_is_one_clear_error(tiny_models, fake_capture, monkeypatch):
    def cannot_capture(call, pool, stream):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore detail")

    monkeypatch.setattr(step_graphs_module, "capture_graph", cannot_capture)
    steps = captured_copy(tiny_models)
    z = torch.randn(1, 4, 16, 16, requires_grad=True)
    with pytest.raises(UserError, match=r"capturing the denoising steps failed \(CUDA error: operation not "
                                        r"permitted when stream is capturing\); use runtime.cuda_graphs=false$"):
        ddim_rollout(steps, z, encode_prompt(tiny_models, "a hand"), set_timesteps(tiny_models, 2), 5.0)


@needs_cuda
def test_captured_step_graphs_match_eager_autograd_on_cuda():
    """Captured graphs against eager autograd without checkpointing, in float64 so that different
    kernels (eager, captured) cannot hide a wrong gradient behind rounding."""
    from seedselect_cli.config import ModelConfig
    from seedselect_cli.models import load_models

    models = load_models(ModelConfig(pretrained="tiny", image_encoder="tiny"), torch.device("cuda"), torch.float64)
    steps = graphed(models)
    assert steps.step_graphs.capture
    embeds, timesteps = encode_prompt(models, "a pine warbler"), set_timesteps(models, 4)
    for seed in (0, 1):  # the second replay reads new inputs from the static buffers
        z0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).cuda()
        lat_a, grad_a = rollout_and_gradient(models, z0, embeds, timesteps, checkpoint=False, seed=seed)
        lat_b, grad_b = rollout_and_gradient(steps, z0, embeds, timesteps, seed=seed)
        for a, b in zip(lat_b, lat_a):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        assert grad_a.abs().min() > 0
        torch.testing.assert_close(grad_b, grad_a, rtol=1e-8, atol=1e-12)
    assert len(steps.step_graphs.entries) == 1


@needs_cuda
def test_optimize_and_bootstrap_with_cuda_graphs_find_the_same_seeds(tmp_path):
    """The commands as users run them, with a full batch and a smaller last one (two batch shapes)."""
    from safetensors.torch import load_file

    from seedselect_cli.pipeline import run_bootstrap, run_optimize

    root = make_cub(tmp_path / "CUB_200_2011")
    seeds = {}
    for graphs in (False, True):
        config = make_config(["model=tiny", "sampler=tiny", f"dataset.root={root}", "runtime.device=cuda",
                              "runtime.dtype=float32", "n_images=3", "runtime.batch_size=2", "bootstrap.n_images=3",
                              "bootstrap.global_iterations=2", "bootstrap.iterations=2",
                              f"runtime.cuda_graphs={graphs}"], name="cub_tail")
        for run in (run_optimize, run_bootstrap):
            run_dir = tmp_path / f"{run.__name__}-{graphs}"
            with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # float32 convolutions, not TF32
                assert len(run(config, run_dir)) == 6
            seeds[run.__name__, graphs] = {p.name + p.parent.name: load_file(p)["optimized"]
                                          for p in run_dir.glob("seeds/*/*")}
    for run in ("run_optimize", "run_bootstrap"):
        eager, graphed = seeds[run, False], seeds[run, True]
        assert eager.keys() == graphed.keys() and len(eager) == 6
        for name in eager:
            # Captured and eager kernels round differently, and AdamW's first steps move each element by
            # about lr whatever its gradient's size: elements whose gradient is near zero may part by
            # up to lr. So the seeds are compared as wholes, not element by element.
            moved = (graphed[name] - eager[name]).norm() / eager[name].norm()
            print(f"{run} {name}: seeds differ by {float(moved):.2e} of their norm")
            assert moved < 1e-3, (run, name, float(moved))


@pytest.mark.parametrize("setting, device, checkpointing, wanted", [
    ("auto", "cuda", True, True), ("auto", "cuda", False, False), ("auto", "cpu", True, False),
    ("auto", "mps", True, False), ("True", "cuda", True, True), ("False", "cuda", True, False),
    ("false", "cpu", True, False),
])
def test_cuda_graphs_are_captured_by_default_wherever_they_can_run(setting, device, checkpointing, wanted):
    from seedselect_cli.step_graphs import resolve_cuda_graphs

    assert resolve_cuda_graphs(setting, torch.device(device), checkpointing) is wanted


def test_cuda_graphs_asked_for_off_cuda_are_an_error():
    from seedselect_cli.errors import UserError
    from seedselect_cli.step_graphs import resolve_cuda_graphs

    with pytest.raises(UserError, match=r"^runtime.cuda_graphs=true needs a CUDA device, not cpu; use "
                                        r"runtime.cuda_graphs=auto or false$"):
        resolve_cuda_graphs("True", torch.device("cpu"), True)
