"""`seedselect generate`: redraw the image of a saved seed, pixel for pixel on the same device and dtype."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import PngImagePlugin

from seedselect_cli.config import ModelConfig
from seedselect_cli.errors import UserError
from seedselect_cli.models import DTYPES, load_models, resolve_device, scheduler_from_json
from seedselect_cli.sampling import encode_prompt, sample_images
from seedselect_cli.seed_files import load_seed_file
from seedselect_cli.writer import atomic_write

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
    model: str | None = None  # None: the model recorded in the seed file (a local copy of it may be given)
    runtime: GenerateRuntime = field(default_factory=GenerateRuntime)


def run_generate(cfg: GenerateConfig) -> Path:
    """Load the seed file, rebuild its sampler, draw the image, write it atomically to `cfg.out`."""
    if cfg.tensor not in ("optimized", "initial"):
        raise UserError(f"tensor={cfg.tensor!r} is invalid: choose optimized or initial")
    out = Path(cfg.out).expanduser()
    if out.suffix.lower() not in SUFFIXES:
        raise UserError(f"out={cfg.out}: name an image file ending in {', '.join(SUFFIXES)}")
    seed = load_seed_file(cfg.seed_file)
    meta = seed.metadata
    dtype_name = cfg.runtime.dtype or meta["dtype"]
    if dtype_name not in DTYPES:
        raise UserError(f"runtime.dtype={dtype_name!r} is invalid: choose one of {', '.join(DTYPES)}")
    device = resolve_device(cfg.runtime.device)
    model_cfg = ModelConfig(pretrained=cfg.model or meta["model"], revision=meta.get("model_revision") or None,
                            variant=meta.get("model_variant") or None)
    models = load_models(model_cfg, device, DTYPES[dtype_name], with_image_encoder=False)
    models.scheduler = scheduler_from_json(meta["scheduler_config"])

    z_T = seed.optimized if cfg.tensor == "optimized" else seed.initial
    expected = models.latent_shape(int(meta["height"]), int(meta["width"]))
    if tuple(z_T.shape) != expected:
        raise UserError(f"seed_file={cfg.seed_file}: seed shape {tuple(z_T.shape)} does not fit model "
                        f"{model_cfg.pretrained} at {meta['width']}x{meta['height']} (expected {expected})")
    text_embeds = encode_prompt(models, meta["prompt"], meta.get("negative_prompt", ""))
    image = sample_images(models, z_T[None], text_embeds, seed.steps, seed.guidance_scale)[0]

    fmt = SUFFIXES[out.suffix.lower()]
    info = PngImagePlugin.PngInfo()
    info.add_text("seedselect", json.dumps({**meta, "tensor": cfg.tensor}, sort_keys=True))
    save_kwargs = {"pnginfo": info} if fmt == "PNG" else {"quality": 95}
    atomic_write(out, lambda tmp: image.save(tmp, format=fmt, **save_kwargs))
    return out
