"""`seedselect generate`: redraw the image of a saved seed, pixel for pixel on the same device and dtype."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import PngImagePlugin

from seedselect_cli.config import ModelConfig, check_device
from seedselect_cli.core.frozen import FrozenModels, HubCommits
from seedselect_cli.core.prompts import encode_prompt
from seedselect_cli.core.samplers import step_noise
from seedselect_cli.core.sampling import sample_images
from seedselect_cli.devices import check_redraw_dtype, resolve_device, seed_dtype
from seedselect_cli.errors import UserError
from seedselect_cli.files.assets import resolve_location
from seedselect_cli.files.atomic import atomic_write
from seedselect_cli.files.seed_files import library_versions, load_seed_file, png_text
from seedselect_cli.models import load_models, scheduler_from_json

log = logging.getLogger(__name__)

SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


@dataclass
class GenerateRuntime:
    device: str = "auto"
    dtype: str | None = None  # None: the dtype the seed was optimised in


@dataclass
class GenerateConfig:
    seed_file: str = "???"
    out: str = "???"
    tensor: str = "optimized"  # or "initial": plain Stable Diffusion from the seed before optimisation
    model: str | None = None  # None: the model recorded in the seed file; else where its weights are here (a
    # folder or Hub id): a seed file records a local folder's path on the machine it was made on
    runtime: GenerateRuntime = field(default_factory=GenerateRuntime)


def check_output(out_arg: str) -> Path:
    """`out=`: an image file name with a known suffix, in a folder that exists and takes a new file."""
    out = Path(out_arg).expanduser()
    if out.suffix.lower() not in SUFFIXES:
        raise UserError(f"out={out_arg}: name an image file ending in {', '.join(SUFFIXES)}")
    if out.is_dir():
        raise UserError(f"out={out_arg} is a folder; name an image file in it, e.g. out={out / 'image.png'}")
    if not out.parent.is_dir():
        raise UserError(f"out={out_arg}: the folder {out.parent} does not exist; create it or choose another")
    probe = out.parent / f".{out.name}.probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"out={out_arg} cannot be written ({exc.strerror or exc}); choose another place") from None
    return out


def check_generate(cfg: GenerateConfig) -> Path:
    """Every value of `seedselect generate`, before anything is read or loaded; returns the output path."""
    if cfg.tensor not in ("optimized", "initial"):
        raise UserError(f"tensor={cfg.tensor!r} is invalid: choose optimized or initial")
    check_redraw_dtype(cfg.runtime.dtype)
    check_device(cfg.runtime.device)
    return check_output(cfg.out)


def models_for_seed(metadata: dict[str, str], model: str | None, device: torch.device, dtype: str | None
                    ) -> FrozenModels:
    """The frozen models that redraw a seed file's image: the model it records, from the Hub commit it records (or
    `model`, where its weights are here), with its revision, variant and scheduler, in its dtype unless `dtype` says
    otherwise. No image encoder."""
    recorded = metadata.get("model_commit") or None
    model_cfg = ModelConfig(pretrained=model or resolve_location(metadata["model"]),
                            revision=metadata.get("model_revision") or None, variant=metadata.get("model_variant") or None)
    models = load_models(model_cfg, device, seed_dtype(dtype, metadata["dtype"], device), with_image_encoder=False,
                         weights_key="model", commits=HubCommits(model=None if model else recorded))
    if recorded and models.commits.model != recorded:
        here = f"Hub commit {models.commits.model}" if models.commits.model else f"the folder {model_cfg.pretrained}"
        log.warning("the seed was drawn with the weights of Hub commit %s, these are %s's: the image is the seed's "
                    "but perhaps not pixel for pixel the run's", recorded, here)
    models.scheduler = scheduler_from_json(metadata["scheduler_config"])
    return models


def run_generate(cfg: GenerateConfig) -> Path:
    """Load the seed file, rebuild its sampler, draw the image, write it atomically to `cfg.out`."""
    out = check_generate(cfg)
    seed = load_seed_file(cfg.seed_file)
    meta = seed.metadata
    device = resolve_device(cfg.runtime.device)
    models = models_for_seed(meta, cfg.model, device, cfg.runtime.dtype)
    here = f"{str(models.dtype).removeprefix('torch.')} on {device.type}"
    there = f"{meta['dtype']} on {meta.get('device') or device.type}"  # device is optional in a seed file
    if here != there:
        log.warning("drawing in %s; the seed's run drew in %s, so the image is the seed's but not pixel for pixel "
                    "the run's", here, there)
    else:
        others = [f"{name} {ours} here, {meta[key]} in the seed's run" for key, ours in library_versions().items()
                  if meta.get(key, ours) != ours for name in [key.removesuffix("_version")]]
        if others:
            log.warning("drawing with %s: other versions may round differently, so the image is the seed's but "
                        "perhaps not pixel for pixel the run's", "; ".join(others))

    z_T = seed.optimized if cfg.tensor == "optimized" else seed.initial
    expected = models.latent_shape(seed.height, seed.width)
    if tuple(z_T.shape) != expected:
        raise UserError(f"seed_file={cfg.seed_file}: seed shape {tuple(z_T.shape)} does not fit model "
                        f"{models.name} at {seed.width}x{seed.height} (expected {expected})")
    text_embeds = encode_prompt(models, meta["prompt"], meta.get("negative_prompt", ""))
    noise = step_noise(seed.sampler, [int(meta.get("init_seed", "0"))], tuple(z_T.shape), seed.steps)
    image = sample_images(models, z_T[None], text_embeds, seed.steps, seed.guidance_scale, seed.sampler, noise)[0]

    fmt = SUFFIXES[out.suffix.lower()]
    info = PngImagePlugin.PngInfo()
    for key, text in png_text({**meta, "tensor": cfg.tensor}).items():
        info.add_text(key, text)
    save_kwargs = {"pnginfo": info} if fmt == "PNG" else {"quality": 95}
    try:
        atomic_write(out, lambda tmp: image.save(tmp, format=fmt, **save_kwargs))
    except OSError as exc:
        raise UserError(f"out={cfg.out} cannot be written ({exc.strerror or exc}); choose another place") from None
    return out
