"""runtime.memory_budget: steps whose activations fit are kept instead of recomputed; the numbers stay the same."""

from __future__ import annotations

import pytest
import torch

from seedselect_cli.config import ModelConfig
from seedselect_cli.core.optimize import optimize_seeds
from seedselect_cli.core.prompts import encode_prompt
from seedselect_cli.core.samplers import make_schedule
from seedselect_cli.core.sampling import rollout, step_activation_bytes
from seedselect_cli.core.targets import Centroids
from seedselect_cli.devices import memory_budget_bytes
from seedselect_cli.errors import UserError
from seedselect_cli.files.assets import asset_path
from seedselect_cli.models import load_models
from seedselect_cli.pipeline import engine_for
from tests.conftest import make_config


def saved_bytes(models, z, embeds, schedule, unchecked: int) -> int:
    """What autograd holds for the backward pass after a rollout (each storage once)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        rollout(models, z.clone().requires_grad_(True), embeds, schedule, 5.0, unchecked_steps=unchecked)
    return sum(seen.values())


def test_without_a_budget_steps_keep_only_their_latents_and_with_one_their_activations(tiny_models):
    embeds = encode_prompt(tiny_models, "a red disc")
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    flat = [saved_bytes(tiny_models, z, embeds, make_schedule(tiny_models, n), 0) for n in (4, 8)]
    kept = [saved_bytes(tiny_models, z, embeds, make_schedule(tiny_models, n), n) for n in (4, 8)]
    assert flat[1] - flat[0] == 4 * z.nbytes  # four more steps keep only the latents between them
    per_step = step_activation_bytes(tiny_models, z, embeds, make_schedule(tiny_models, 8), 5.0)
    assert kept[1] - kept[0] == pytest.approx(4 * per_step, rel=0.05)  # four more kept steps
    assert per_step > 50 * z.nbytes


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "euler"])
def test_keeping_steps_gives_the_same_seeds_as_recomputing_them(name):
    """On the trained toy world: the same losses and optimised seeds, bit for bit, whatever the budget."""
    models = load_models(ModelConfig(pretrained=asset_path("toyworld"), image_encoder=asset_path("toyworld/clip")),
                         torch.device("cpu"), torch.float32)
    config = make_config([f"sampler.name={name}", "sampler.steps=6", "optim.iterations=3"], name="toyworld")
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(17))
    g = torch.Generator().manual_seed(9)
    target = Centroids(torch.nn.functional.normalize(torch.randn(models.image_encoder.config.projection_dim,
                                                                 generator=g), dim=0), torch.randn(4, 8, 8, generator=g), 5)
    embeds = encode_prompt(models, "a photo of a rock warbler")
    runs = [optimize_seeds(models, z, target, embeds, config.objective(), config.optim_spec(), unchecked_steps=k)
            for k in (0, 3, 6)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert a.loss_history == b.loss_history
            assert torch.equal(a.optimized, b.optimized)


def test_the_engine_keeps_as_many_steps_as_the_budget_holds(tiny_models, caplog):
    caplog.set_level("INFO", logger="seedselect_cli.core.engine")
    config = make_config(["sampler.steps=8"])
    engine = engine_for(tiny_models, config)
    target = engine.class_target("red_disc", "a red disc", None)
    z = torch.randn(2, 4, 16, 16)
    per_step = step_activation_bytes(tiny_models, z, target.text_embeds, make_schedule(tiny_models, 8), 7.5)
    assert engine.unchecked_steps(target, z, None) == 0  # no budget: recompute every step
    for budget, kept in ((per_step * 3.5, 3), (per_step * 100, 8), (per_step * 0.5, 0)):
        engine.memory_budget = budget
        assert engine.unchecked_steps(target, z, None) == kept
    assert "3 of 8 denoising steps keep their activations" in caplog.text  # said once, when measured
    assert caplog.text.count("denoising steps keep") == 1


def test_the_toy_world_configs_keep_their_steps():
    """The toy world's steps are small and it runs on the CPU, where keeping them is 1.7 times faster (BENCHMARKS.md);
    the other configs recompute every step unless told otherwise (on a GPU the trade against CUDA graphs is open)."""
    for name in ("demo", "toyworld", "toyworld_turbo"):
        assert make_config([], name=name).runtime.memory_budget == "auto"
    assert str(make_config([], name="tiny").runtime.memory_budget) == "0"
    assert str(make_config([f"dataset.root={asset_path('demo/red_disc')}"], name="folder").runtime.memory_budget) == "0"


def test_the_budget_setting():
    assert memory_budget_bytes("1.5", torch.device("cpu")) == 1.5 * 2**30
    assert memory_budget_bytes("auto", torch.device("cpu")) > 0  # half the machine's available memory
    with pytest.raises(UserError, match=r"runtime.memory_budget='lots' is invalid"):
        make_config(["runtime.memory_budget=lots"])
    assert make_config(["runtime.memory_budget=auto"]).runtime.memory_budget == "auto"
