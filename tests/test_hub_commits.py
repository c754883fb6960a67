"""A model loaded by its Hub id, offline from the Hugging Face cache, as on a cluster node: the run records the
Hub commit its weights came from, a resumed run and `generate` load that commit again after the branch has moved
(one run's images from one set of weights, a seed's image pixel for pixel), and a commit not in the cache is one
line that says how to get it. The cache is built here from the toy world's files (models--org--name/snapshots/)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from seedselect_cli.files.assets import asset_path
from seedselect_cli.files.seed_files import load_seed_file
from tests.runs import read_manifest, seedselect

MODEL, ENCODER = "seedselect/toyworld", "seedselect/toyworld-clip"
FIRST, SECOND, ENCODER_COMMIT = "1" * 40, "2" * 40, "c" * 40
PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "model_index.json")


def snapshot(cache: Path, repo: str, commit: str, files: Path, parts: tuple[str, ...]) -> Path:
    """`files`' `parts` as the cached snapshot `commit` of Hub repository `repo`."""
    folder = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / commit
    folder.mkdir(parents=True)
    for part in parts:
        source = files / part
        (shutil.copytree if source.is_dir() else shutil.copy)(source, folder / part)
    return folder


def point_main(cache: Path, repo: str, commit: str) -> None:
    refs = cache / f"models--{repo.replace('/', '--')}" / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    (refs / "main").write_text(commit)


def build_cache(cache: Path) -> None:
    """The toy world at FIRST and, its UNet's output bias moved, at SECOND; its CLIP at ENCODER_COMMIT; main: FIRST."""
    world = Path(asset_path("toyworld"))
    snapshot(cache, MODEL, FIRST, world, PARTS)
    second = snapshot(cache, MODEL, SECOND, world, PARTS)
    weights = second / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    generator = torch.Generator().manual_seed(31)
    bias = tensors["conv_out.bias"]
    tensors["conv_out.bias"] = (bias.float() + 0.3 * torch.randn(bias.shape, generator=generator)).to(bias.dtype)
    save_file(tensors, weights, metadata={"format": "pt"})
    encoder = world / "clip"
    snapshot(cache, ENCODER, ENCODER_COMMIT, encoder, tuple(p.name for p in encoder.iterdir()))
    point_main(cache, MODEL, FIRST)
    point_main(cache, ENCODER, ENCODER_COMMIT)


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.mark.slow  # seven commands, each loading the models: 35 s
def test_a_run_keeps_the_hub_commit_it_began_with_and_generate_redraws_from_it(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    from seedselect_cli.cli import main

    cache = tmp_path / "hub"
    build_cache(cache)
    run = ["optimize", f"model.pretrained={MODEL}", f"model.image_encoder={ENCODER}", "optim.iterations=2",
           "init.candidates=2", "runtime.batch_size=1", "runtime.progress=false", "hydra.run.dir=run"]
    first = seedselect(*run, "n_images=1", cwd=tmp_path, env={"HF_HUB_CACHE": str(cache)})  # as a user starts it
    assert first.returncode == 0, first.stderr
    assert f"{MODEL}: Hub commit {FIRST}" in first.stdout + first.stderr
    [entry] = read_manifest(tmp_path / "run")
    assert (entry["model_commit"], entry["image_encoder_commit"]) == (FIRST, ENCODER_COMMIT)
    seed_file = tmp_path / "run" / entry["seed_file"]
    assert load_seed_file(seed_file).metadata["model_commit"] == FIRST

    # the rest in this process (`main`), its Hub cache where HF_HUB_CACHE put the first command's: a process's
    # imports cost 5 s a command
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)

    def said() -> str:
        out = capsys.readouterr()
        return out.out + out.err

    point_main(cache, MODEL, SECOND)  # the repository moved on: new UNet weights on main
    assert main(["generate", f"seed_file={seed_file}", "out=again.png"]) == 0, said()
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(tmp_path / "run" / entry["image"]))
    assert main(["generate", f"seed_file={seed_file}", "out=moved.png", f"model={MODEL}"]) == 0
    assert f"Hub commit {FIRST}, these are Hub commit {SECOND}'s" in said()
    assert not np.array_equal(pixels(tmp_path / "moved.png"), pixels(tmp_path / "again.png"))  # SECOND is another model

    said()
    assert main([*run, "n_images=2"]) == 0
    assert f"{MODEL}: Hub commit {FIRST}, as the run's earlier images" in said()
    assert [e["model_commit"] for e in read_manifest(tmp_path / "run")] == [FIRST, FIRST]
    assert main(["evaluate", "run_dir=run", "baseline=false"]) == 0, said()
    metrics = json.loads((tmp_path / "run" / "report" / "metrics.json").read_text())
    assert (metrics["model"], metrics["model_commits"]) == (MODEL, [FIRST])

    assert main([*run, "n_images=1", "hydra.run.dir=fresh"]) == 0, said()
    assert [e["model_commit"] for e in read_manifest(tmp_path / "fresh")] == [SECOND]
    # the first commit gone from the cache: the resume says which commit it wants, and why
    shutil.rmtree(cache / "models--seedselect--toyworld" / "snapshots" / FIRST)
    said()
    assert main([*run, "n_images=3"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert f"`hf download {MODEL} --revision {FIRST} --include '*.json' " in line
    assert line.endswith("(the commit the run's earlier images were drawn with, which a resumed run loads again; a "
                         "new run directory takes the branch's)")
    assert len(read_manifest(tmp_path / "run")) == 2  # nothing written


def test_a_recorded_commit_missing_from_the_cache_says_how_to_download_it(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    from seedselect_cli.cli import main

    cache = tmp_path / "hub"
    build_cache(cache)
    seed = {"initial": torch.randn(4, 8, 8), "optimized": torch.randn(4, 8, 8)}
    metadata = load_seed_file_metadata_for(FIRST)
    save_file(seed, tmp_path / "seed.safetensors", metadata=metadata)
    shutil.rmtree(cache / "models--seedselect--toyworld" / "snapshots" / FIRST)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # as HF_HUB_CACHE sets it
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "seed_file=seed.safetensors", "out=x.png"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: the Stable Diffusion model '{MODEL}' at revision {FIRST} is not (wholly) in the "
                           f"Hugging Face cache")
    assert f"`hf download {MODEL} --revision {FIRST} --include '*.json' " in line


def load_seed_file_metadata_for(commit: str) -> dict[str, str]:
    """A seed file's metadata for the toy world `MODEL` at `commit` (as a run on the Hub id writes it)."""
    scheduler = json.loads((Path(asset_path("toyworld")) / "scheduler" / "scheduler_config.json").read_text())
    return {"prompt": "a photo of a marsh finch", "negative_prompt": "", "model": MODEL, "model_revision": "",
            "model_commit": commit, "steps": "10", "guidance_scale": "2.0", "height": "32", "width": "32",
            "sampler": "ddim", "scheduler_config": json.dumps(scheduler), "dtype": "float32", "device": "cpu",
            "init_seed": "5"}


def local_dir_download(folder: Path, commit: str) -> None:
    """The records `hf download --local-dir` leaves beside the files (commit, etag and time of each download),
    written by huggingface_hub's own function."""
    from huggingface_hub._local_folder import write_download_metadata

    for path in [folder / "model_index.json", *folder.rglob("*.safetensors")]:
        write_download_metadata(folder, path.relative_to(folder).as_posix(), commit, "etag")


def test_a_folder_says_its_commit_when_it_is_a_snapshot_or_a_download_none_changed_since(tmp_path):
    from seedselect_cli.hub import folder_commit

    build_cache(tmp_path / "hub")
    assert folder_commit(tmp_path / "hub" / "models--seedselect--toyworld" / "snapshots" / SECOND,
                         "model_index.json") == SECOND
    folder = tmp_path / "sd"
    snapshot(tmp_path, "x/y", FIRST, Path(asset_path("toyworld")), PARTS).rename(folder)
    assert folder_commit(folder, "model_index.json") is None  # saved by hand: nothing says
    local_dir_download(folder, FIRST)
    assert folder_commit(folder, "model_index.json") == FIRST
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    before, later = weights.stat().st_mtime, time.time() + 60
    os.utime(weights, (later, later))  # written again after its download
    assert folder_commit(folder, "model_index.json") is None
    os.utime(weights, (before, before))
    assert folder_commit(folder, "model_index.json") == FIRST
    (folder / ".cache" / "huggingface" / "download" / "vae" / "diffusion_pytorch_model.safetensors.metadata"
     ).write_text(f"{SECOND}\n\"etag\"\n{later + 60}\n")  # two commits mixed in one folder
    assert folder_commit(folder, "model_index.json") is None


def test_a_resumed_run_whose_folder_holds_other_weights_is_warned(tmp_path, caplog):
    from seedselect_cli.config import ModelConfig
    from seedselect_cli.core.frozen import HubCommits
    from seedselect_cli.models import load_models

    folder = snapshot(tmp_path, "x/y", FIRST, Path(asset_path("toyworld")), PARTS)
    folder = folder.rename(tmp_path / "sd")
    local_dir_download(folder, SECOND)
    config = ModelConfig(pretrained=str(folder), image_encoder="tiny")
    models = load_models(config, torch.device("cpu"), torch.float32, commits=HubCommits(model=SECOND))
    assert models.commits.model == SECOND and "earlier images were drawn" not in caplog.text
    models = load_models(config, torch.device("cpu"), torch.float32, commits=HubCommits(model=FIRST))
    assert models.commits.model == SECOND
    assert f"the run's earlier images were drawn with the weights of Hub commit {FIRST}, and these are commit " \
           f"{SECOND}'s" in caplog.text
