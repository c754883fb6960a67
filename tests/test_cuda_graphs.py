"""The checkpointed calls as CUDA graphs (`runtime.cuda_graphs`): their bookkeeping against autograd.

On the CPU the graphed calls run eagerly on their static buffers, which is everything but the capture:
the backward pass call by call, the gradients of the k kept latents added on the way, the buffers
that each call overwrites. With torch.cuda's streams and graphs faked, the capture's own bookkeeping
(its order, and a failed capture's error) runs too. The last tests capture for real, on CUDA.
"""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

import seedselect_cli.core.cuda_graphs as cuda_graphs_module
from seedselect_cli.core.cuda_graphs import CACHED_SHAPES, GraphCache, graph_cache, resolve_cuda_graphs
from seedselect_cli.core.optimize import optimize_seeds, seed_objective
from seedselect_cli.core.prompts import encode_prompt
from seedselect_cli.core.samplers import ddim_schedule
from seedselect_cli.core.sampling import rollout
from seedselect_cli.core.targets import Centroids
from seedselect_cli.errors import UserError
from tests.conftest import make_config
from tests.layouts import make_cub

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="captures CUDA graphs: needs a CUDA device")


def rollout_and_gradient(models, z0, embeds, timesteps, checkpoint=True, keep=3, seed=0, graphs=None):
    """The kept latents and dL/dz_T of a loss that weighs each kept latent differently and non-linearly."""
    g = torch.Generator().manual_seed(seed)
    targets = [torch.randn(z0.shape, generator=g).to(z0.device, z0.dtype) for _ in range(keep)]
    z = z0.clone().requires_grad_(True)
    kept = rollout(models, z, embeds, timesteps, 5.0, keep_last=keep, checkpoint=checkpoint, graphs=graphs)
    loss = sum((j + 1) * (k - t).pow(2).mean() + (k * t).sum().tanh() for j, (k, t) in enumerate(zip(kept, targets)))
    loss.backward()
    return [k.detach() for k in kept], z.grad


def objective_and_gradient(models, z0, centroids, embeds, timesteps, config, graphs=None):
    z = z0.clone().requires_grad_(True)
    terms = seed_objective(models, z, centroids, embeds, timesteps, config.objective(), graphs=graphs)
    terms.total.sum().backward()
    return terms.total.detach(), z.grad


def random_centroids(models, g, dtype=torch.float32):
    dim = models.image_encoder.config.projection_dim
    return Centroids(torch.nn.functional.normalize(torch.randn(dim, generator=g, dtype=dtype), dim=0),
                     torch.randn(4, 16, 16, generator=g, dtype=dtype), count=3)


@pytest.mark.slow
@pytest.mark.parametrize("keep", [1, 3])
def test_graphed_steps_match_autograd_through_the_whole_rollout_in_float64(tiny_models64, keep):
    models, graphs = tiny_models64, graph_cache(tiny_models64.device)
    z0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    embeds, timesteps = encode_prompt(models, "a photo of a pine warbler"), ddim_schedule(models, 6)
    lat_plain, grad_plain = rollout_and_gradient(models, z0, embeds, timesteps, checkpoint=False, keep=keep)
    lat_graph, grad_graph = rollout_and_gradient(models, z0, embeds, timesteps, keep=keep, graphs=graphs)
    assert len(lat_graph) == keep and grad_plain.abs().min() > 0
    for a, b in zip(lat_graph, lat_plain):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_graph, grad_plain, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_sdxls_three_conditioning_tensors_go_through_the_graphed_steps_in_float64(sampler):
    """SDXL's steps carry the pooled embedding and the added time ids beside the hidden states: through the graph
    cache's static buffers the latents and dL/dz_T are autograd's without checkpoints, in float64."""
    from seedselect_cli.config import ModelConfig
    from seedselect_cli.core.samplers import make_schedule
    from seedselect_cli.models import load_models

    models = load_models(ModelConfig(pretrained="tiny_sdxl", image_encoder="tiny"), torch.device("cpu"),
                         torch.float64, with_image_encoder=False)
    z0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    embeds, schedule = encode_prompt(models, "a photo of a pine warbler", "a blur"), make_schedule(models, 4, sampler)
    lat_plain, grad_plain = rollout_and_gradient(models, z0, embeds, schedule, checkpoint=False, keep=2)
    lat_graph, grad_graph = rollout_and_gradient(models, z0, embeds, schedule, keep=2, graphs=graph_cache(models.device))
    assert grad_plain.abs().max() > 0
    for a, b in zip(lat_graph, lat_plain):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_graph, grad_plain, rtol=1e-10, atol=1e-12 * grad_plain.abs().max().item())


@pytest.mark.slow
def test_graphed_calls_give_the_checkpointed_losses_and_optimised_seeds(tiny_models):
    """Through the loss and the optimiser, in float32: the same as per-step activation checkpoints."""
    config = make_config(["sampler.steps=5", "kstep.k=3", "kstep.weights=[0.2,0.3,0.5]", "loss.lam=0.5"])
    g = torch.Generator().manual_seed(5)
    z0 = torch.randn(2, 4, 16, 16, generator=g)
    centroids = random_centroids(tiny_models, g)
    embeds, timesteps = encode_prompt(tiny_models, "a snow wren"), ddim_schedule(tiny_models, 5)
    results = []
    for graphs in (None, graph_cache(tiny_models.device)):
        z = z0.clone().requires_grad_(True)
        terms = seed_objective(tiny_models, z, centroids, embeds, timesteps, config.objective(), graphs=graphs)
        terms.total.sum().backward()
        results.append((terms.total.detach(), z.grad))
    (loss_a, grad_a), (loss_b, grad_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
    scale = grad_a.abs().max().item()
    assert scale > 0
    # float32 sums the kept latents' gradients in another order: agreement to float32's rounding
    torch.testing.assert_close(grad_b, grad_a, rtol=1e-5, atol=1e-5 * scale)

    runs = [optimize_seeds(tiny_models, z0, centroids, embeds, config.objective(), config.optim_spec(), graphs=graphs)
            for graphs in (None, graph_cache(tiny_models.device))]
    for a, b in zip(*runs):
        assert a.loss_history == pytest.approx(b.loss_history, rel=1e-5)
        # AdamW divides by the gradient's running RMS: where it is near 0, rounding moves a seed by more
        torch.testing.assert_close(b.optimized, a.optimized, rtol=0, atol=1e-4)


def test_the_loss_through_graphed_decodes_and_steps_matches_autograd_in_float64(tiny_models64):
    """The whole objective, its decodes and CLIP calls graphed as well, against autograd without any
    checkpoint: float64, so that a wrong gradient cannot hide behind rounding."""
    config = make_config(["sampler.steps=4", "kstep.k=3", "kstep.weights=[0.2,0.3,0.5]", "loss.lam=0.7"])
    plain, graphs = tiny_models64, graph_cache(tiny_models64.device)
    g = torch.Generator().manual_seed(21)
    z0 = torch.randn(2, 4, 16, 16, generator=g, dtype=torch.float64)
    centroids = random_centroids(plain, g, torch.float64)
    embeds, timesteps = encode_prompt(plain, "a rock warbler"), ddim_schedule(plain, 4)
    loss_a, grad_a = objective_and_gradient(plain, z0, centroids, embeds, timesteps,
                                            dataclasses.replace(config, sampler=dataclasses.replace(
                                                config.sampler, checkpointing=False)))
    loss_b, grad_b = objective_and_gradient(plain, z0, centroids, embeds, timesteps, config, graphs)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-12, atol=0)
    assert grad_a.abs().min() > 0
    torch.testing.assert_close(grad_b, grad_a, rtol=1e-10, atol=1e-13)
    (cached,) = graphs.batches.values()
    assert sorted(key[0][0] for key in cached) == ["the decodes and CLIP embeddings"] + ["the denoising steps"] * 4


def test_rollouts_and_backward_passes_may_come_in_any_order(tiny_models64):
    """Each call keeps its own input, so a later rollout does not spoil an earlier one's gradient."""
    plain, graphs = tiny_models64, graph_cache(tiny_models64.device)
    embeds, timesteps = encode_prompt(plain, "a hand"), ddim_schedule(plain, 3)
    g = torch.Generator().manual_seed(2)
    seeds = [torch.randn(1, 4, 16, 16, generator=g, dtype=torch.float64) for _ in range(2)]
    leaves = [z.clone().requires_grad_(True) for z in seeds]
    outputs = [rollout(plain, z, embeds, timesteps, 5.0, graphs=graphs)[-1] for z in leaves]  # both rollouts first
    for j in (1, 0):  # then the second one's backward pass before the first one's
        outputs[j].pow(2).mean().backward()
    for leaf, z in zip(leaves, seeds):
        z = z.clone().requires_grad_(True)
        rollout(plain, z, embeds, timesteps, 5.0, checkpoint=False)[-1].pow(2).mean().backward()
        assert z.grad.abs().min() > 0
        torch.testing.assert_close(leaf.grad, z.grad, rtol=1e-10, atol=1e-13)


def test_no_gradients_no_graphs_and_one_cache_entry_per_batch_shape(tiny_models):
    cache: GraphCache = graph_cache(tiny_models.device)
    embeds, timesteps = encode_prompt(tiny_models, "a hand"), ddim_schedule(tiny_models, 3)
    with torch.no_grad():  # rendering: the plain rollout
        rollout(tiny_models, torch.randn(1, 4, 16, 16), embeds, timesteps, 5.0, graphs=cache)
    assert not cache.batches

    def roll_back(batch: int):
        z = torch.randn(batch, 4, 16, 16, requires_grad=True)
        rollout(tiny_models, z, embeds, timesteps, 5.0, graphs=cache)[-1].sum().backward()

    roll_back(1)
    first = dict(cache.batches[1])
    assert len(first) == 3  # one graphed call per step
    roll_back(1)
    assert cache.batches[1] == first  # the same calls again
    for batch in range(2, CACHED_SHAPES + 2):
        roll_back(batch)
    assert len(cache.batches) == CACHED_SHAPES and 1 not in cache.batches  # the oldest went



def test_the_engine_hands_its_graphs_to_the_sampler_and_the_loss(tiny_models):
    """The graph cache is the engine's, not the frozen models': every checkpointed call of a batch goes through
    it, and the batch optimises as without it."""
    from seedselect_cli.core.bootstrap import Batch
    from seedselect_cli.core.frozen import FrozenModels
    from seedselect_cli.pipeline import engine_for

    assert "graphs" not in {f.name for f in dataclasses.fields(FrozenModels)}
    engine = engine_for(tiny_models, make_config(["sampler.steps=3", "optim.iterations=2"]))
    assert engine.graphs is None  # runtime.cuda_graphs=auto: none off CUDA
    target = engine.class_target("red_disc", "a red disc", None)
    g = torch.Generator().manual_seed(31)
    z0, centroids = torch.randn(2, 4, 16, 16, generator=g), random_centroids(tiny_models, g)
    runs = []
    for graphs in (None, graph_cache(tiny_models.device)):
        engine.graphs = graphs
        runs.append(engine.run_batch(target, Batch([0, 1], [5, 6], z0.clone(), centroids, 2, [{}, {}])))
    (cached,) = engine.graphs.batches.values()
    assert sorted(key[0][0] for key in cached) == ["the decodes and CLIP embeddings"] + ["the denoising steps"] * 3
    for a, b in zip(*runs):
        assert a.loss_history == pytest.approx(b.loss_history, rel=1e-5)

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
                       ("graph_pool_handle", lambda: object())]:
        monkeypatch.setattr(torch.cuda, name, fake)
    captured = []

    def capture_graph(call, pool, stream):
        captured.append((call, pool))
        return call

    monkeypatch.setattr(cuda_graphs_module, "capture_graph", capture_graph)
    return captured


@pytest.mark.slow
def test_each_call_is_captured_once_forward_then_backward_in_its_batch_pool(tiny_models64, fake_capture):
    plain, graphs = tiny_models64, GraphCache(capture=True)
    z0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    embeds, timesteps = encode_prompt(plain, "a sea gull"), ddim_schedule(plain, 5)
    lat_plain, grad_plain = rollout_and_gradient(plain, z0, embeds, timesteps, checkpoint=False)
    for _ in range(2):  # the second time replays what the first captured
        lat_graph, grad_graph = rollout_and_gradient(plain, z0, embeds, timesteps, graphs=graphs)
        for a, b in zip(lat_graph, lat_plain):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad_graph, grad_plain, rtol=1e-10, atol=1e-12)
    (cached,) = graphs.batches.values()
    in_order = [cached[key] for key in cached]  # first use first: the steps in sampling order
    assert [key[0][4] for key in cached] == [int(t) for t in timesteps]
    assert [(call.__self__, call.__name__) for call, _ in fake_capture] == [
        (graphed_call, half) for graphed_call in in_order for half in ("_forward", "_backward")]
    assert len({id(pool) for _, pool in fake_capture}) == 1  # one memory pool for the batch size
    rollout_and_gradient(plain, z0[:1], embeds, timesteps, graphs=graphs)
    assert len({id(pool) for _, pool in fake_capture}) == 2  # another for another batch size


def test_a_failed_capture_is_one_clear_error(tiny_models, fake_capture, monkeypatch):
    def cannot_capture(call, pool, stream):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore detail")

    monkeypatch.setattr(cuda_graphs_module, "capture_graph", cannot_capture)
    z = torch.randn(1, 4, 16, 16, requires_grad=True)
    with pytest.raises(UserError, match=r"capturing the denoising steps failed \(CUDA error: operation not "
                                        r"permitted when stream is capturing\); use runtime.cuda_graphs=false$"):
        rollout(tiny_models, z, encode_prompt(tiny_models, "a hand"), ddim_schedule(tiny_models, 2), 5.0,
                graphs=GraphCache(capture=True))


@needs_cuda
def test_captured_graphs_match_eager_autograd_on_cuda():
    """Captured graphs against eager autograd without checkpointing, in float64 so that different
    kernels (eager, captured) cannot hide a wrong gradient behind rounding."""
    from seedselect_cli.config import ModelConfig
    from seedselect_cli.models import load_models

    models = load_models(ModelConfig(pretrained="tiny", image_encoder="tiny"), torch.device("cuda"), torch.float64)
    graphs = graph_cache(models.device)
    assert graphs.capture
    embeds, timesteps = encode_prompt(models, "a pine warbler"), ddim_schedule(models, 4)
    for seed in (0, 1):  # the second replay reads new inputs from the static buffers
        z0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).cuda()
        lat_a, grad_a = rollout_and_gradient(models, z0, embeds, timesteps, checkpoint=False, seed=seed)
        lat_b, grad_b = rollout_and_gradient(models, z0, embeds, timesteps, seed=seed, graphs=graphs)
        for a, b in zip(lat_b, lat_a):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        assert grad_a.abs().min() > 0
        torch.testing.assert_close(grad_b, grad_a, rtol=1e-8, atol=1e-12)
    assert list(graphs.batches) == [2]

    # the whole objective, the decodes and CLIP captured as well
    config = make_config(["sampler.steps=4", "kstep.k=3", "kstep.weights=[0.2,0.3,0.5]", "loss.lam=0.7"])
    eager = dataclasses.replace(config, sampler=dataclasses.replace(config.sampler, checkpointing=False))
    g = torch.Generator().manual_seed(3)
    centroids = random_centroids(models, g, torch.float64).to(models.device)
    for seed in (0, 1):
        z0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).cuda()
        loss_a, grad_a = objective_and_gradient(models, z0, centroids, embeds, timesteps, eager)
        loss_b, grad_b = objective_and_gradient(models, z0, centroids, embeds, timesteps, config, graphs)
        torch.testing.assert_close(loss_b, loss_a, rtol=1e-10, atol=0)
        torch.testing.assert_close(grad_b, grad_a, rtol=1e-8, atol=1e-12)


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
    assert resolve_cuda_graphs(setting, torch.device(device), checkpointing) is wanted


def test_cuda_graphs_asked_for_off_cuda_are_an_error():
    with pytest.raises(UserError, match=r"^runtime.cuda_graphs=true needs a CUDA device, not cpu; use "
                                        r"runtime.cuda_graphs=auto or false$"):
        resolve_cuda_graphs("True", torch.device("cpu"), True)
