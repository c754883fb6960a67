"""Where seeds start: DDIM inversion, NAO centroids, the noise mix, the inversion cache, and runs with init."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from seedselect_cli.config import ModelConfig
from seedselect_cli.core import initial_seeds
from seedselect_cli.core.initial_seeds import init_seed_for, initial_noise, mix
from seedselect_cli.core.nao import chi_mode, nao_centroid, rescaled_centroid
from seedselect_cli.core.prompts import encode_prompt
from seedselect_cli.core.samplers import ddim_schedule
from seedselect_cli.core.sampling import ddim_invert, rollout, sample_images
from seedselect_cli.core.targets import ReferenceEncodings
from seedselect_cli.evaluate import read_run, render_baseline
from seedselect_cli.files.assets import asset_path
from seedselect_cli.files.tensor_cache import TensorCache
from seedselect_cli.models import load_models
from seedselect_cli.pipeline import run_bootstrap, run_optimize, seed_starts
from seedselect_cli.references import load_encodings
from seedselect_cli.tool_config import EvaluateConfig
from tests.conftest import make_config
from tests.runs import read_manifest

# --- DDIM inversion ------------------------------------------------------------------------------


def plain_inversion(models, z, text_embeds, steps):
    """Textbook DDIM inversion in float64: each step from t - s to t with eps(z, t), conditional only."""
    alphas = models.scheduler.alphas_cumprod.double()
    s = models.scheduler.config.num_train_timesteps // steps
    offset = models.scheduler.config.steps_offset
    cond = text_embeds.hidden[1:].expand(len(z), -1, -1)
    for t in range(offset, offset + steps * s, s):
        eps = models.unet(z, torch.tensor(t), encoder_hidden_states=cond).sample
        a_from = alphas[t - s] if t - s >= 0 else alphas[0]  # set_alpha_to_one=False
        x0 = (z - (1 - a_from).sqrt() * eps) / a_from.sqrt()
        z = alphas[t].sqrt() * x0 + (1 - alphas[t]).sqrt() * eps
    return z


def test_inversion_matches_textbook_inversion_in_float64(tiny_models64):
    m = tiny_models64
    z_0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    embeds = encode_prompt(m, "a photo of a pine warbler")
    with torch.no_grad():
        plain = plain_inversion(m, z_0, embeds, 5)
    torch.testing.assert_close(ddim_invert(m, z_0, embeds, 5).double(), plain, rtol=1e-6, atol=1e-6)


class NoiseOfTimeOnly(torch.nn.Module):
    """A stand-in UNet whose eps depends on t alone: then DDIM is exactly invertible."""

    dtype = torch.float64  # what a diffusers model reports, and the rollout casts its input to

    def __init__(self, shape):
        super().__init__()
        self.pattern = torch.randn(shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def forward(self, sample, t, encoder_hidden_states, added_cond_kwargs=None):
        return SimpleNamespace(sample=(self.pattern * torch.cos(torch.as_tensor(t, dtype=torch.float64) / 300))
                               .expand_as(sample).to(sample.dtype))


@pytest.mark.parametrize("steps", [4, 10, 25])
def test_inversion_is_the_exact_inverse_of_the_sampler_when_eps_does_not_depend_on_z(tiny_models64, steps):
    """Checks that the inverse scheduler's timesteps line up with the sampler's, step for step (a step off
    gives errors of order 0.1; what is left is the schedulers' float32 arithmetic)."""
    m = dataclasses.replace(tiny_models64, unet=NoiseOfTimeOnly((4, 16, 16)))
    z_0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(steps), dtype=torch.float64)
    embeds = encode_prompt(tiny_models64, "a photo of a pine warbler")
    z_T = ddim_invert(m, z_0, embeds, steps).double()
    with torch.no_grad():
        back = rollout(m, z_T, embeds, ddim_schedule(m, steps), 1.0, checkpoint=False)[-1]
    torch.testing.assert_close(back, z_0, rtol=1e-5, atol=1e-5)
    assert (z_T - z_0).norm() > 0.1 * z_0.norm()  # it did move


@pytest.fixture(scope="module")
def toy_models():
    config = ModelConfig(pretrained=asset_path("toyworld"), image_encoder=asset_path("toyworld/clip"),
                         local_files_only=True)
    return load_models(config, torch.device("cpu"), torch.float32)


def toy_references(concept: str) -> list[Path]:
    return sorted(Path(asset_path(f"toyworld/references/{concept}")).iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("steps, bound", [(10, 0.15), (50, 0.04)])
def test_inversion_reconstructs_the_references_of_the_trained_toy_world(toy_models, steps, bound):
    """DDIM there and back: the relative error ||z_0' - z_0|| / ||z_0|| of each reference's latents stays
    under 15 % at the toy world's 10 steps and 4 % at 50 (measured: 13 % and 3.2 % at worst)."""
    m = toy_models
    z_0 = load_encodings(m, toy_references("marsh finch"), 32, 32, "default", TensorCache(None, "x"),
                         "marsh finch").appearance
    embeds = encode_prompt(m, "a photo of a marsh finch")
    z_T = ddim_invert(m, z_0, embeds, steps)
    with torch.no_grad():
        back = rollout(m, z_T, embeds, ddim_schedule(m, steps), 1.0, checkpoint=False)[-1]
    error = (back - z_0).flatten(1).norm(dim=1) / z_0.flatten(1).norm(dim=1)
    assert error.max() < bound, error


# --- NAO centroids -------------------------------------------------------------------------------


def fresh_seeds(n: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(n, 4, 16, 16, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("n, seed, scale", [(3, 0, 1.0), (5, 1, 1.0), (5, 2, 0.35), (8, 3, 1.3)])
def test_nao_centroid_has_the_chi_norm_and_the_mean_direction(n, seed, scale):
    """The Euclidean mean of n seeds has norm about sqrt(d / n), over ten standard deviations of the chi
    distribution below any seed's; NAO's centroid has a norm a seed would have (within 3 of them of the
    mode sqrt(d - 1)) and points where the mean points, whatever the seeds' own norms."""
    seeds = fresh_seeds(n, seed, scale)
    d = seeds[0].numel()
    chi_mean = math.sqrt(2) * math.exp(math.lgamma((d + 1) / 2) - math.lgamma(d / 2))
    chi_std = math.sqrt(d - chi_mean ** 2)  # about 1 / sqrt(2)
    mean = seeds.mean(dim=0)
    assert mean.norm() == pytest.approx(scale * math.sqrt(d / n), rel=0.1)
    assert chi_mode(d) - mean.norm() > 10 * chi_std
    centroid = nao_centroid(seeds)
    assert centroid.shape == seeds.shape[1:] and centroid.dtype == seeds.dtype
    assert abs(centroid.norm() - chi_mode(d)) < 3 * chi_std
    assert F.cosine_similarity(centroid.flatten(), mean.flatten(), dim=0) > 0.999
    rescaled = rescaled_centroid(seeds)
    assert rescaled.norm() == pytest.approx(chi_mode(d), rel=1e-5)
    assert F.cosine_similarity(centroid.flatten(), rescaled.flatten(), dim=0) > 0.999


def test_nao_paths_become_the_euclidean_mean_as_their_length_weighs_more():
    seeds = fresh_seeds(4, 7)
    mean = seeds.mean(dim=0)
    norms = [nao_centroid(seeds, length_weight=w).norm() for w in (0.01, 0.1, 1.0, 100.0)]
    assert norms == sorted(norms, reverse=True)  # ever closer to the mean's low norm
    torch.testing.assert_close(nao_centroid(seeds, length_weight=1e4), mean, rtol=0.02, atol=0.02)


def test_nao_centroid_of_one_seed_moves_it_to_the_chi_shell_and_is_deterministic():
    seeds = fresh_seeds(3, 9, scale=0.35)  # as low as the toy world's inverted seeds (dataset.shots=1)
    one = nao_centroid(seeds[:1])
    assert one.norm() == pytest.approx(chi_mode(one.numel()), rel=0.03)
    assert F.cosine_similarity(one.flatten(), seeds[0].flatten(), dim=0) > 0.999
    assert torch.equal(nao_centroid(seeds), nao_centroid(seeds.clone()))


def test_noise_mix_keeps_a_seed_on_the_chi_shell():
    centre = rescaled_centroid(fresh_seeds(5, 4))
    noise = fresh_seeds(1, 8)[0]
    assert torch.equal(mix(None, noise, 0.3), noise)
    assert torch.equal(mix(centre, noise, 0.0), centre) and torch.equal(mix(centre, noise, 1.0), noise)
    mixed = torch.stack([mix(centre, fresh_seeds(1, 100 + i)[0], 0.3) for i in range(20)])
    assert mixed.flatten(1).norm(dim=1).mean() == pytest.approx(math.sqrt(centre.numel()), rel=0.03)


# --- starting seeds of a run, and the inversion cache -------------------------------------------------


def encodings_of(models, folder: Path) -> ReferenceEncodings:
    return load_encodings(models, sorted(folder.iterdir()), 32, 32, "default", TensorCache(None, "x"), "refs")


@pytest.mark.slow
def test_centres_follow_the_init_method_and_inversions_are_cached(tiny_models, reference_folder, tmp_path,
                                                                    monkeypatch):
    encodings = encodings_of(tiny_models, reference_folder)
    embeds = encode_prompt(tiny_models, "a photo of a blue thing")
    shape = (4, 16, 16)
    assert seed_starts(tiny_models, make_config(), tmp_path).centre(encodings, "p", embeds) is None

    config = make_config(["init=inversion"])
    starts = seed_starts(tiny_models, config, tmp_path)
    inverted = starts.invert(encodings, "a photo of a blue thing", embeds)
    expected = ddim_invert(tiny_models, encodings.appearance, embeds, config.sampler.steps)
    torch.testing.assert_close(inverted, expected, rtol=1e-4, atol=1e-5)  # one at a time or batched
    torch.testing.assert_close(starts.centre(encodings, "a photo of a blue thing", embeds), inverted.mean(dim=0))
    files = sorted((tmp_path / "inversions").rglob("*.safetensors"))
    assert len(files) == len(encodings.paths)
    cached = [load_file(f)["inverted"] for f in files]
    assert all(any(torch.equal(c, row) for row in inverted) for c in cached)

    def no_inversion(*args, **kwargs):
        raise AssertionError("inverted again instead of reading the cache")

    monkeypatch.setattr(initial_seeds, "ddim_invert", no_inversion)
    nao = seed_starts(tiny_models, make_config(["init=nao"]), tmp_path)
    centre = nao.centre(encodings, "a photo of a blue thing", embeds)  # same inversions: from the cache
    torch.testing.assert_close(centre, nao_centroid(inverted))
    with pytest.raises(AssertionError, match="inverted again"):  # another prompt is another inversion
        nao.centre(encodings, "a photo of a red thing", embeds)
    with pytest.raises(AssertionError, match="inverted again"):  # and so are other steps
        seed_starts(tiny_models, make_config(["init=nao", "init.inversion_steps=7"]), tmp_path).centre(
            encodings, "a photo of a blue thing", embeds)

    seeds = seed_starts(tiny_models, make_config(["init=nao", "init.noise=0.3"]), None).seeds(centre, [11, 12])
    for row, s in zip(seeds, (11, 12)):
        torch.testing.assert_close(row, math.sqrt(0.7) * centre + math.sqrt(0.3) * initial_noise(shape, s))


@pytest.mark.slow
def test_optimize_and_bootstrap_start_from_the_nao_centroid(tmp_path, tiny_models):
    config = make_config(["init=nao", "method=paper", "n_images=2", "runtime.batch_size=2", "bootstrap.n_images=2",
                          "bootstrap.global_iterations=2", "bootstrap.iterations=2"])  # paper: one start per image
    run_optimize(config, tmp_path / "opt")
    entries = read_manifest(tmp_path / "opt")
    assert [e["init"] for e in entries] == ["nao", "nao"]
    refs = Path(config.dataset.root)
    encodings = encodings_of(tiny_models, refs)
    prompt = entries[0]["prompt"]
    embeds = encode_prompt(tiny_models, prompt)
    starts = seed_starts(tiny_models, config, None)
    centre = starts.centre(encodings, prompt, embeds)
    for entry in entries:
        initial = load_file(tmp_path / "opt" / entry["seed_file"])["initial"]
        expected = starts.seeds(centre, [init_seed_for(config.seed, "red_disc", entry["index"])])[0]
        torch.testing.assert_close(initial, expected, rtol=1e-5, atol=1e-5)

    # evaluate's baseline is plain sampling from fresh noise, not from the references' centroid
    run_config, finished = read_run(tmp_path / "opt")
    paths = render_baseline(tmp_path / "opt", run_config, finished, EvaluateConfig(run_dir=str(tmp_path / "opt")))
    entry = finished[0]
    noise = initial_noise((4, 16, 16), init_seed_for(config.seed, "red_disc", entry["index"]))
    plain = sample_images(tiny_models, noise[None], embeds, config.sampler.steps, config.sampler.guidance_scale)[0]
    drawn = np.asarray(Image.open(paths[("red_disc", entry["index"])]), dtype=int)  # rendered in a batch: the last
    assert np.abs(drawn - np.asarray(plain, dtype=int)).max() <= 1                  # bit of a pixel may round apart

    run_bootstrap(config, tmp_path / "boot")
    global_seed = load_file(next((tmp_path / "boot" / "bootstrap").iterdir()))["initial"]
    expected = starts.seeds(centre, [init_seed_for(config.seed, "red_disc", "bootstrap")])[0]
    torch.testing.assert_close(global_seed, expected, rtol=1e-5, atol=1e-5)
    assert [e["init"] for e in read_manifest(tmp_path / "boot")] == ["nao", "nao"]
