"""The low-precision path against float32: the seed, its gradient and the loss stay float32, the networks
run in bfloat16 or float16. On the tiny components the results agree within stated tolerances; on the
trained toy world, the dtype a GPU gets by default finds the seeds float32 finds. The default on the CPU
stays float32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from seedselect_cli.config import ModelConfig
from seedselect_cli.core.optimize import optimize_seeds, scaled_backward, seed_objective
from seedselect_cli.core.sampling import ddim_schedule, encode_prompt, sample_images
from seedselect_cli.files.assets import asset_path
from seedselect_cli.files.datasets import fill_template
from seedselect_cli.files.tensor_cache import TensorCache
from seedselect_cli.models import load_models, resolve_dtype
from seedselect_cli.references import load_encodings
from tests.conftest import make_config
from tests.test_optimize import random_target, seeds

# Stated tolerances: loss within 1 % (relative), each seed's gradient within 10 % in norm and
# pointing the same way (cosine similarity above 0.99).
LOSS_RTOL, GRAD_RTOL, GRAD_COS = 0.01, 0.10, 0.99


def loss_and_grad(dtype: torch.dtype):
    models = load_models(ModelConfig(pretrained="tiny", image_encoder="tiny"), torch.device("cpu"), dtype)
    z = seeds(3, 31).requires_grad_(True)
    terms = seed_objective(models, z, random_target(30), encode_prompt(models, "a red disc"),
                           ddim_schedule(models, 4), make_config().objective())
    terms.total.sum().backward()
    return terms, z.grad


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_losses_and_gradients_match_float32(dtype):
    reference, reference_grad = loss_and_grad(torch.float32)
    terms, grad = loss_and_grad(dtype)
    assert terms.total.dtype == torch.float32 and grad.dtype == torch.float32  # seed and loss in float32
    torch.testing.assert_close(terms.total, reference.total, rtol=LOSS_RTOL, atol=0)
    for ours, theirs in zip(grad.flatten(1), reference_grad.flatten(1)):
        assert torch.nn.functional.cosine_similarity(ours, theirs, dim=0) > GRAD_COS
        assert ((ours - theirs).norm() / theirs.norm()) < GRAD_RTOL


def test_the_default_dtype_is_float32_on_the_cpu_and_float16_on_a_gpu():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16


@pytest.mark.slow
def test_the_gpu_default_finds_the_seeds_float32_finds_on_the_toy_world():
    """The GPU issue's part 1 on the trained toy world, not random networks: with the networks in the dtype `auto`
    gives a GPU (run here on the CPU) and the seed and loss in float32, 10 DDIM steps, the paper's loss (the harder
    case: L_sem and L_app pull against each other; the default `method=select` optimises L_sem alone, and this test
    also passed on it) and 15 iterations from the same fresh starts (30 in `scripts/precision_check.py`'s table:
    float16 kernels are slow on a CPU), every seed ends within 5 % of float32's loss (both scored by float32)
    and the judge says the same of their images; and at float32's optimised seeds, where the loss's terms pull
    against each other and the gradient is small, the low dtype's gradient points float32's way (cosine above
    0.97; measured on the current world at 15 iterations: float16 0.99995 and 0.9996, loss ratios 1.002 and
    0.942; at 30: 0.9997 and 0.981, 1.001 and 0.904). On the previous
    world bfloat16, the default before, missed both: a final loss 10.5 % above float32's for one seed of eight
    (BENCHMARKS.md, "Low precision against float32 on the trained toy world"), and cosines 0.79 and 0.997 at
    this test's two seeds (float16 there: 0.9994 and 0.996)."""
    from tests.test_toyworld import judge_verdicts

    low = resolve_dtype("auto", torch.device("cuda"))
    concept = "marsh finch"  # a tail concept
    config = make_config([f"dataset.classes=[{concept}]", "method=paper", "sampler.steps=10", "optim.iterations=15"],
                         name="toyworld")  # the paper's loss, whose two terms pull against each other
    exact = load_models(config.model, torch.device("cpu"), torch.float32)
    paths = sorted(Path(asset_path(f"toyworld/references/{concept}")).glob("*.png"))
    centroids = load_encodings(exact, paths, config.sampler.height, config.sampler.width, config.dataset.resize_mode,
                               TensorCache(None, "none"), concept).centroids()
    prompt = fill_template(config.dataset.prompt_template, concept)
    starts = torch.randn((2, *exact.latent_shape(config.sampler.height, config.sampler.width)),
                         generator=torch.Generator().manual_seed(2212))
    found, images, gradients = {}, {}, {}
    for models in (exact, load_models(config.model, torch.device("cpu"), low)):
        text = encode_prompt(models, prompt)
        results = optimize_seeds(models, starts, centroids, text, config.objective(), config.optim_spec())
        found[models.dtype] = torch.stack([r.optimized for r in results])
        images[models.dtype] = judge_verdicts(sample_images(models, found[models.dtype], text, config.sampler.steps,
                                                            config.sampler.guidance_scale))
        z = found[torch.float32].clone().requires_grad_(True)
        scaled_backward(seed_objective(models, z, centroids, text, ddim_schedule(models, config.sampler.steps),
                                       config.objective()).total, z)
        gradients[models.dtype] = z.grad.flatten(1)
    with torch.no_grad():  # each dtype's seeds, scored by float32
        scored = {dtype: seed_objective(exact, z, centroids, encode_prompt(exact, prompt),
                                        ddim_schedule(exact, config.sampler.steps), config.objective()).total
                  for dtype, z in found.items()}
    ratio = scored[low] / scored[torch.float32]
    cosine = torch.nn.functional.cosine_similarity(gradients[low], gradients[torch.float32], dim=1)
    print(f"{low}: float32's loss at its seeds over float32's own {ratio.tolist()}; verdicts {images}; "
          f"gradient cosine at float32's seeds {cosine.tolist()}")
    assert (ratio < 1.05).all(), ratio
    assert images[low] == images[torch.float32]
    assert (cosine > 0.97).all(), cosine
