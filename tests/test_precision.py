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
from seedselect_cli.core.prompts import encode_prompt
from seedselect_cli.core.samplers import ddim_schedule
from seedselect_cli.core.sampling import sample_images
from seedselect_cli.devices import resolve_dtype
from seedselect_cli.files.assets import asset_path
from seedselect_cli.files.datasets import fill_template
from seedselect_cli.files.tensor_cache import TensorCache
from seedselect_cli.models import load_models
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


@pytest.mark.slow
def test_the_gpu_default_finds_float32s_seed_at_the_default_loss_near_its_lowest_optimum(tmp_path):
    """The default `method=select` (without its backtracking, `optim.backtrack=null`) at the toy world's guidance 2: sea finch's image 2 (seed 0), whose optimum is
    the lowest of `scripts/precision_check.py`'s table (loss 0.0095), where a float16 network's loss error is a
    tenth of the loss. With the text encoder in float16 too, float16 ended at 1.086 of float32's loss there (this
    test: 1.104), and with the UNet, the VAE, both, or the CLIP image encoder put back in float32 still at 1.09 to
    1.10; with the text encoder in float32 (`models.component_dtype`, what every run now does) at 1.020 (this
    test, one seed alone: 1.002). 30 iterations from the run's start (its selected candidate), each dtype's seed
    scored by float32."""
    from seedselect_cli.core.engine import image_centroids
    from seedselect_cli.files.seed_files import load_seed_file
    from seedselect_cli.pipeline import run_optimize

    concept, index = "sea finch", 2
    shipped = ["method=select", "sampler.steps=10", "runtime.cache=false", f"dataset.classes=[{concept}]"]  # 16 starts
    config = make_config([*shipped, f"n_images={index + 1}", f"runtime.batch_size={index + 1}", "optim.iterations=1"],
                         name="toyworld")
    entry = next(e for e in run_optimize(config, tmp_path / "run") if e["index"] == index)
    start = load_seed_file(tmp_path / "run" / entry["seed_file"]).initial[None]
    # the authors' AdamW, as measured: this test holds the networks' arithmetic (the text encoder in float32) at the
    # optimum it was measured at; with the default's backtracking both dtypes end elsewhere, at 0.0112 (1.000)
    config = make_config([*shipped, "optim.iterations=30", "optim.backtrack=null"], name="toyworld")
    exact = load_models(config.model, torch.device("cpu"), torch.float32)
    paths = sorted(Path(asset_path(f"toyworld/references/{concept}")).glob("*.png"))
    encodings = load_encodings(exact, paths, config.sampler.height, config.sampler.width, config.dataset.resize_mode,
                               TensorCache(None, "none"), concept)
    targets = image_centroids(encodings, config.seed, concept, [index], config.loss)
    prompt = fill_template(config.dataset.prompt_template, concept)
    low = load_models(config.model, torch.device("cpu"), resolve_dtype("auto", torch.device("cuda")))
    assert low.text_encoder.dtype == torch.float32 and low.unet.dtype == torch.float16
    found = {models.dtype: optimize_seeds(models, start, targets, encode_prompt(models, prompt), config.objective(),
                                          config.optim_spec())[0].optimized[None] for models in (exact, low)}
    with torch.no_grad():
        scored = {dtype: seed_objective(exact, z, targets, encode_prompt(exact, prompt),
                                        ddim_schedule(exact, config.sampler.steps), config.objective()).total.item()
                  for dtype, z in found.items()}
    ratio = scored[low.dtype] / scored[torch.float32]
    print(f"float32's loss {scored[torch.float32]:.5f}, at float16's seed {scored[low.dtype]:.5f}: ratio {ratio:.3f}")
    assert scored[torch.float32] < 0.011  # the seed of the table, near its low optimum
    assert ratio < 1.05, ratio


@pytest.mark.slow
def test_the_default_float16_and_a_moved_start_end_where_float32_does(tmp_path):
    """The default `method=select` (which backtracks, `optim.backtrack=0.5`, in optimize) on the seed that was beyond
    the issue's 5 % without backtracking: marsh finch's image 1 (seed 0), its 24 iterations at batch 1, each end
    scored by float32. Measured without backtracking (`optim.backtrack=null`): float32 ends at 0.0377, float16 at
    0.885 of that and float32 from the start moved by 1e-4 of its spread at 1.027 (at 30 iterations: 0.803 and 1.092;
    4 images at a time, float16 1.133): AdamW's first step at lr 0.1 throws the seed out of its basin and where it
    lands is chaotic (BENCHMARKS.md, "The chaotic seed is AdamW's first step"). With it: float32 0.0224, float16
    1.001, moved 1.000 (this test fails without it: checked)."""
    from seedselect_cli.core.engine import image_centroids
    from seedselect_cli.files.seed_files import load_seed_file
    from seedselect_cli.pipeline import run_optimize

    concept, index = "marsh finch", 1
    shipped = ["method=select", "sampler.steps=10", "runtime.cache=false", f"dataset.classes=[{concept}]"]
    config = make_config([*shipped, f"n_images={index + 1}", f"runtime.batch_size={index + 1}", "optim.iterations=1"],
                         name="toyworld")
    entry = next(e for e in run_optimize(config, tmp_path / "run") if e["index"] == index)
    start = load_seed_file(tmp_path / "run" / entry["seed_file"]).initial[None]
    config = make_config([*shipped, "optim.iterations=24"], name="toyworld")  # the default's 24 iterations
    assert config.optim.backtrack == 0.5  # method=select's default, not set here
    exact = load_models(config.model, torch.device("cpu"), torch.float32)
    low = load_models(config.model, torch.device("cpu"), resolve_dtype("auto", torch.device("cuda")))
    paths = sorted(Path(asset_path(f"toyworld/references/{concept}")).glob("*.png"))
    encodings = load_encodings(exact, paths, config.sampler.height, config.sampler.width, config.dataset.resize_mode,
                               TensorCache(None, "none"), concept)
    targets = image_centroids(encodings, config.seed, concept, [index], config.loss)
    prompt = fill_template(config.dataset.prompt_template, concept)
    moved = start + 1e-4 * start.std() * torch.randn(start.shape, generator=torch.Generator().manual_seed(1))
    scored = {}
    for name, models, z0 in (("float32", exact, start), ("float16", low, start), ("float32, moved", exact, moved)):
        z = optimize_seeds(models, z0, targets, encode_prompt(models, prompt), config.objective(),
                           config.optim_spec())[0].optimized[None]
        with torch.no_grad():
            scored[name] = seed_objective(exact, z, targets, encode_prompt(exact, prompt),
                                          ddim_schedule(exact, config.sampler.steps), config.objective()).total.item()
    ratios = {name: value / scored["float32"] for name, value in scored.items()}
    print(f"float32's loss {scored['float32']:.5f}; ratios {ratios}")
    assert 0.95 < ratios["float16"] < 1.05 and 0.99 < ratios["float32, moved"] < 1.01, ratios
