"""Every sampler against diffusers' own StableDiffusionPipeline (and StableDiffusionXLPipeline) with that scheduler,
from the same latents, on the tiny random components (SD and SDXL shapes) and on the trained toy world; and a seed
file of each redraws its image."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from seedselect_cli.config import ModelConfig
from seedselect_cli.core.prompts import encode_prompt
from seedselect_cli.core.samplers import SAMPLERS, make_schedule, scheduler_for
from seedselect_cli.core.sampling import rollout
from seedselect_cli.files.assets import asset_path
from seedselect_cli.limits import SAMPLER_NAMES
from seedselect_cli.models import load_models, vae_dtype


def pipeline_latents(models, scheduler, z_T, prompt: str, steps: int, guidance: float, generator=None) -> torch.Tensor:
    """What diffusers' pipeline draws from the unit seed z_T (it scales it by init_noise_sigma itself; LCM draws its
    noise between steps from `generator`)."""
    pipe = StableDiffusionPipeline(vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer,
                                   unet=models.unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   image_encoder=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe([prompt] * len(z_T), latents=z_T.clone(), num_inference_steps=steps, guidance_scale=guidance,
                output_type="latent", generator=generator).images


def lcm_draws(seed: int, z_T: torch.Tensor, steps: int) -> torch.Tensor:
    """The noise diffusers' LCM step draws between steps from a generator seeded with `seed`, in its order."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randn(z_T.shape, generator=g) for _ in range(steps - 1)]) if steps > 1 else None


def ours(models, name, z_T, prompt, steps, guidance, prediction_type=None, noise=None):
    schedule = make_schedule(models, steps, name)
    if prediction_type is not None:  # the same arithmetic read as another kind of network's output
        scheduler = scheduler_for(name, {**dict(models.scheduler.config), "prediction_type": prediction_type})
        scheduler.set_timesteps(steps)
        schedule = type(schedule)(name, scheduler, scheduler.timesteps)
    with torch.no_grad():
        return (rollout(models, z_T, encode_prompt(models, prompt), schedule, guidance, checkpoint=False, noise=noise)[-1],
                schedule)


def test_the_sampler_names_are_one_list():
    assert tuple(SAMPLERS) == SAMPLER_NAMES


@pytest.mark.parametrize("name", SAMPLER_NAMES)
@pytest.mark.parametrize("steps, guidance", [(1, 1.0), (2, 0.0), (4, 7.5), (7, 3.0)])
def test_each_sampler_draws_what_diffusers_draws_from_the_same_latents(tiny_models, name, steps, guidance):
    z_T = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(11 * steps + len(name)))
    mine, _ = ours(tiny_models, name, z_T, "a small red bird", steps, guidance, noise=lcm_draws(99, z_T, steps))
    with torch.no_grad():
        theirs = pipeline_latents(tiny_models, scheduler_for(name, tiny_models.scheduler.config), z_T,
                                  "a small red bird", steps, guidance, torch.Generator().manual_seed(99))
    assert mine.abs().max() > 0.1 and torch.isfinite(mine).all()
    # float32 throughout; ours computes the step's constants in double on the host: 1e-5 of the scale
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_v_prediction_is_read_as_diffusers_reads_it(tiny_models, name):
    z_T = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    mine, schedule = ours(tiny_models, name, z_T, "a hand", 3, 4.0, prediction_type="v_prediction",
                          noise=lcm_draws(3, z_T, 3))
    with torch.no_grad():
        theirs = pipeline_latents(tiny_models, schedule.scheduler.__class__.from_config(schedule.scheduler.config),
                                  z_T, "a hand", 3, 4.0, torch.Generator().manual_seed(3))
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())


@pytest.fixture(scope="module")
def tiny_sdxl():
    return load_models(ModelConfig(pretrained="tiny_sdxl", image_encoder="tiny"), torch.device("cpu"), torch.float32,
                       with_image_encoder=False)


def sdxl_pipeline(models, scheduler) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline(vae=models.vae, text_encoder=models.text_encoder,
                                     text_encoder_2=models.text_encoder_2, tokenizer=models.tokenizer,
                                     tokenizer_2=models.tokenizer_2, unet=models.unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=models.force_zeros_for_empty_prompt,
                                     add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("name", SAMPLER_NAMES)
@pytest.mark.parametrize("steps, guidance, negative", [(1, 1.0, ""), (2, 0.0, ""), (4, 7.5, ""),
                                                       (3, 5.0, "a blurry photo")])
def test_each_sampler_draws_what_diffusers_sdxl_pipeline_draws(tiny_sdxl, name, steps, guidance, negative):
    """SDXL: both text encoders' penultimate states, the pooled embedding, the added time ids of the image size,
    and zeros for an empty negative prompt (the pipeline's, given none), through every sampler."""
    z_T = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(7 * steps + len(name)))
    schedule = make_schedule(tiny_sdxl, steps, name)
    with torch.no_grad():
        mine = rollout(tiny_sdxl, z_T, encode_prompt(tiny_sdxl, "a small red bird", negative), schedule, guidance,
                       checkpoint=False, noise=lcm_draws(5, z_T, steps))[-1]
        theirs = sdxl_pipeline(tiny_sdxl, scheduler_for(name, tiny_sdxl.scheduler.config))(
            ["a small red bird"] * 2, negative_prompt=[negative] * 2 if negative else None, latents=z_T.clone(),
            num_inference_steps=steps, guidance_scale=guidance, height=32, width=32, output_type="latent",
            generator=torch.Generator().manual_seed(5)).images
    assert mine.abs().max() > 0.01 and torch.isfinite(mine).all()
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())


def test_sdxl_conditioning_matters_pooled_and_time_ids_too(tiny_sdxl):
    """The pooled embedding and the image size reach the UNet: change either and the image changes."""
    import dataclasses

    from seedselect_cli.core.prompts import PromptEmbeds, guided_embeddings

    z_T = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    embeds = encode_prompt(tiny_sdxl, "a hand")
    assert embeds.hidden.shape == (2, 16, 64) and embeds.pooled.shape == (2, 32)
    assert embeds.hidden[0].abs().max() == 0 and embeds.pooled[0].abs().max() == 0  # empty negative prompt: zeros
    other = PromptEmbeds(embeds.hidden, torch.randn_like(embeds.pooled))
    schedule = make_schedule(tiny_sdxl, 2, "euler")
    with torch.no_grad():
        base, swapped = (rollout(tiny_sdxl, z_T, e, schedule, 0.0)[-1] for e in (embeds, other))
    assert (base - swapped).abs().max() > 1e-3
    cond = guided_embeddings(embeds, 1, 0.0, (32, 48))
    assert cond[2].tolist() == [[32, 48, 0, 0, 32, 48]]
    with pytest.raises(ValueError, match="image size"):
        guided_embeddings(dataclasses.replace(embeds), 1, 0.0)


def test_sdxl_loads_from_a_saved_pipeline_folder_with_its_vae_in_float32_under_float16(tmp_path, tiny_sdxl):
    """A folder `StableDiffusionXLPipeline.save_pretrained` wrote (model_index.json names text_encoder_2) loads as
    SDXL: the same embeddings. SDXL's VAE says force_upcast: it stays float32 when the networks are float16."""
    sdxl_pipeline(tiny_sdxl, tiny_sdxl.scheduler).save_pretrained(tmp_path / "sdxl")
    loaded = load_models(ModelConfig(pretrained=str(tmp_path / "sdxl"), image_encoder="tiny"), torch.device("cpu"),
                         torch.float32, with_image_encoder=False)
    assert loaded.is_xl and loaded.text_encoder_2 is not None and loaded.force_zeros_for_empty_prompt
    for a, b in zip(vars(encode_prompt(loaded, "a pine warbler", "x")).values(),
                    vars(encode_prompt(tiny_sdxl, "a pine warbler", "x")).values()):
        torch.testing.assert_close(a, b)
    parts = {"unet": tiny_sdxl.unet, "vae": tiny_sdxl.vae}
    assert tiny_sdxl.vae.config.force_upcast
    assert vae_dtype(parts, torch.float16) == torch.float32 and vae_dtype(parts, torch.bfloat16) == torch.bfloat16
    half = load_models(ModelConfig(pretrained=str(tmp_path / "sdxl"), image_encoder="tiny"), torch.device("cpu"),
                       torch.float16, with_image_encoder=False)
    assert half.unet.dtype == torch.float16 and half.vae.dtype == torch.float32
    assert vae_dtype({"unet": half.unet, "vae": half.vae}, torch.float16) == torch.float32


@pytest.fixture(scope="module")
def toyworld():
    return load_models(ModelConfig(pretrained=asset_path("toyworld"), image_encoder=asset_path("toyworld/clip")),
                       torch.device("cpu"), torch.float32, with_image_encoder=False)


@pytest.mark.parametrize("name, steps", [("ddim", 10), ("euler", 1), ("euler", 4), ("dpmpp_2m", 10), ("lcm", 4)])
def test_on_the_trained_toy_world_too(toyworld, name, steps):
    z_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(steps))
    mine, _ = ours(toyworld, name, z_T, "a photo of a marsh finch", steps, 4.0, noise=lcm_draws(8, z_T, steps))
    with torch.no_grad():
        theirs = pipeline_latents(toyworld, scheduler_for(name, toyworld.scheduler.config), z_T,
                                  "a photo of a marsh finch", steps, 4.0, torch.Generator().manual_seed(8))
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_gradients_flow_through_the_checkpointed_steps_as_through_the_plain_ones(tiny_models, name):
    """Per-step checkpoints change memory, not the gradient (DPM-Solver++ carries its previous z_0 along)."""
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    embeds = encode_prompt(tiny_models, "a blue square")
    schedule = make_schedule(tiny_models, 4, name)
    grads = []
    for checkpoint in (False, True):
        seed = z.clone().requires_grad_(True)
        latents = rollout(tiny_models, seed, embeds, schedule, 5.0, keep_last=2, checkpoint=checkpoint,
                          noise=lcm_draws(4, z, 4))
        (latents[-1].square().mean() + latents[0].mean()).backward()
        grads.append(seed.grad)
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("name, steps, model", [("euler", 2, "tiny"), ("dpmpp_2m", 4, "tiny"), ("lcm", 3, "tiny"),
                                                ("ddim", 3, "tiny_sdxl"), ("euler", 1, "tiny_sdxl")])
def test_a_run_with_another_sampler_records_it_and_generate_redraws_its_images(name, steps, model, tmp_path,
                                                                             monkeypatch, capsys):
    import json

    import numpy as np
    from PIL import Image
    from safetensors import safe_open

    from seedselect_cli.cli import main
    from tests.runs import read_manifest

    monkeypatch.chdir(tmp_path)
    assert main(["optimize", "--config-name=tiny", f"model.pretrained={model}", f"sampler.name={name}",
                 f"sampler.steps={steps}", "kstep=last",
                 "n_images=1", "optim.iterations=2", "runtime.progress=false", "hydra.run.dir=run"]) == 0
    [entry] = read_manifest(tmp_path / "run")
    with safe_open(str(tmp_path / "run" / entry["seed_file"]), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["sampler"] == name and meta["scheduler"] == SAMPLERS[name][0].__name__
    assert meta["model"] == model
    label = {"ddim": "Sampler: DDIM", "euler": "Sampler: Euler", "dpmpp_2m": "Sampler: DPM++ 2M", "lcm": "Sampler: LCM"}[name]
    assert label in Image.open(tmp_path / "run" / entry["image"]).text["parameters"]
    assert json.loads(Image.open(tmp_path / "run" / entry["image"]).text["seedselect"])["sampler"] == name
    assert main(["generate", f"seed_file=run/{entry['seed_file']}", "out=again.png"]) == 0
    assert np.array_equal(np.asarray(Image.open("again.png")), np.asarray(Image.open(tmp_path / "run" / entry["image"])))


def test_lcm_noise_is_each_images_own_and_required():
    from seedselect_cli.core.samplers import lcm_noise

    together = lcm_noise([7, 8], (4, 2, 2), 3)
    assert together.shape == (2, 2, 4, 2, 2)
    torch.testing.assert_close(together[:, 1:], lcm_noise([8], (4, 2, 2), 3))  # not its batch's
    assert not torch.equal(together[:, 0], together[:, 1])


def test_lcm_without_its_noise_is_refused(tiny_models):
    with pytest.raises(ValueError, match="needs its noise"):
        rollout(tiny_models, torch.randn(1, 4, 16, 16), encode_prompt(tiny_models, "x"), make_schedule(tiny_models, 2, "lcm"),
                1.0)


def test_the_text_encoders_run_in_float32_in_every_dtype():
    """`models.component_dtype`: the text encoders encode each prompt once, so float32 costs nothing to speak of,
    and in float16 they moved the seed the optimisation finds (BENCHMARKS.md); their output is in the UNet's dtype."""
    from seedselect_cli.models import component_dtype

    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert component_dtype("text_encoder", {}, dtype) == component_dtype("text_encoder_2", {}, dtype) == torch.float32
        assert component_dtype("unet", {}, dtype) == component_dtype("image_encoder", {}, dtype) == dtype
    models = load_models(ModelConfig(pretrained="tiny", image_encoder="tiny"), torch.device("cpu"), torch.bfloat16)
    assert models.text_encoder.dtype == torch.float32 and models.unet.dtype == torch.bfloat16
    assert encode_prompt(models, "a red disc").hidden.dtype == torch.bfloat16
