"""`seedselect generate`: redraw the image of a saved seed (or of every seed in a folder, as RUN/seeds), pixel for
pixel on the same device and dtype."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin
from tqdm.auto import tqdm

from seedselect_cli.config import ModelConfig
from seedselect_cli.core.frozen import FrozenModels, HubCommits
from seedselect_cli.core.prompts import encode_prompt
from seedselect_cli.core.samplers import step_noise
from seedselect_cli.core.sampling import sample_images
from seedselect_cli.devices import match_cpu_threads, resolve_device, seed_dtype
from seedselect_cli.errors import UserError, count_of
from seedselect_cli.files.assets import resolve_location
from seedselect_cli.files.atomic import atomic_write
from seedselect_cli.files.images import EXIF_DESCRIPTION, WRITTEN_FORMATS
from seedselect_cli.files.run_directory import run_images_of, seed_folder
from seedselect_cli.files.seed_files import (
    SeedFile,
    library_versions,
    load_seed_file,
    png_text,
    seed_files_in,
)
from seedselect_cli.models import load_models, scheduler_from_json
from seedselect_cli.tool_config import GenerateConfig, check_generate

log = logging.getLogger(__name__)

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
    """Draw the image of `cfg.seed_file` to `cfg.out`, or, where `seed_file` is a folder, every seed file in it to
    the folder `out` (`generate_folder`)."""
    if Path(cfg.seed_file).expanduser().is_dir():
        return generate_folder(cfg)
    out = check_generate(cfg)
    seed = load_seed_file(cfg.seed_file)
    device = resolve_device(cfg.runtime.device)
    models = models_for_seed(seed.metadata, cfg.model, device, cfg.runtime.dtype)
    for warning in redraw_warnings(models, seed.metadata):
        log.warning("%s", warning)
    write_image(draw(models, seed, cfg.tensor, cfg.seed_file), out, seed.metadata, cfg.tensor, f"out={cfg.out}")
    return out


def generate_folder(cfg: GenerateConfig) -> Path:
    """Every seed file under the folder `cfg.seed_file` drawn into the folder `cfg.out`, at the same relative path
    (`seed_file=RUN/seeds`: OUT/<class>/<index>.png, as RUN/images), one at a time as a run draws them, the models
    loaded once; images already in `out` are kept, so the same command goes on after a stop. Where the seeds are a
    run's, says how many images came out pixel for pixel the run's."""
    source, out = seed_folder(Path(cfg.seed_file).expanduser()), check_generate(cfg)
    seeds = seed_files_in(source)
    out.mkdir(exist_ok=True)
    todo = [p for p in seeds if not (out / p.relative_to(source)).with_suffix(".png").exists()]
    if not todo:
        log.info("nothing to draw: every image is already in %s (%d)", out, len(seeds))
        return out
    if len(todo) < len(seeds):
        log.info("%d of the %d images are already in %s; drawing the other %d", len(seeds) - len(todo), len(seeds),
                 out, len(todo))
    else:  # said before the models load: a cluster job's log has no bar
        log.info("drawing %s into %s", count_of(len(todo), "image"), out)
    run_images = run_images_of(source)
    device = resolve_device(cfg.runtime.device)
    loaded: dict[tuple, FrozenModels] = {}
    warned: set[str] = set()
    compared = 0
    differing: list[str] = []
    for path in tqdm(todo, desc="seed files", unit="image", disable=None):
        relative = path.relative_to(source)
        try:
            seed = load_seed_file(path)
        except UserError as exc:
            raise UserError(f"{exc} (the images drawn before it stay in {out}: remove or replace it, and the same "
                            f"command goes on)") from None
        meta = seed.metadata
        key = (meta["model"], meta.get("model_commit"), meta.get("model_revision"), meta.get("model_variant"),
               meta["dtype"])
        if key not in loaded:
            loaded[key] = models_for_seed(meta, cfg.model, device, cfg.runtime.dtype)
        models = loaded[key]
        models.scheduler = scheduler_from_json(meta["scheduler_config"])
        for warning in redraw_warnings(models, meta):
            if warning not in warned:
                log.warning("%s", warning)
                warned.add(warning)
        image = draw(models, seed, cfg.tensor, str(path))
        target = (out / relative).with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        write_image(image, target, meta, cfg.tensor, f"out={cfg.out}")
        original = run_images / relative.with_suffix(".png") if run_images is not None else None
        if cfg.tensor == "optimized" and original is not None and original.is_file():
            compared += 1
            if not identical_pixels(target, original):
                differing.append(relative.with_suffix(".png").as_posix())
    log.info("drew %s into %s%s", count_of(len(todo), "image"), out,
             f"; {compared - len(differing)} of {compared} are pixel for pixel the run's images in {run_images}"
             if compared else "")
    if differing:
        log.warning("not pixel for pixel the run's: %s%s", ", ".join(differing[:5]),
                    f" and {len(differing) - 5} more" if len(differing) > 5 else "")
    return out


def identical_pixels(first: Path, second: Path) -> bool:
    with Image.open(first) as a, Image.open(second) as b:
        return a.size == b.size and np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


def redraw_warnings(models: FrozenModels, meta: dict[str, str]) -> list[str]:
    """Why an image drawn here from a seed file may not be pixel for pixel its run's: another dtype or device, or
    other versions of torch and diffusers, or (on a CPU) other thread counts, which are matched where they can be
    (`match_cpu_threads`)."""
    here = f"{str(models.dtype).removeprefix('torch.')} on {models.device.type}"
    there = f"{meta['dtype']} on {meta.get('device') or models.device.type}"  # device is optional in a seed file
    if here != there:
        return [(f"drawing in {here}; the seed's run drew in {there}, so the image is the seed's but not pixel for "
                "pixel the run's")]
    warnings = []
    others = [f"{name} {ours} here, {meta[key]} in the seed's run" for key, ours in library_versions().items()
              if meta.get(key, ours) != ours for name in [key.removesuffix("_version")]]
    if others:
        warnings.append(f"drawing with {'; '.join(others)}: other versions may round differently, so the image is "
                        "the seed's but perhaps not pixel for pixel the run's")
    if models.device.type == "cpu" and (threads := match_cpu_threads(meta.get("cpu_threads"))):
        warnings.append(threads)
    return warnings


def draw(models: FrozenModels, seed: SeedFile, tensor: str, where: str) -> Image.Image:
    """The image of a seed file's `tensor` (optimized or initial), drawn as its run drew it."""
    meta = seed.metadata
    z_T = seed.optimized if tensor == "optimized" else seed.initial
    expected = models.latent_shape(seed.height, seed.width)
    if tuple(z_T.shape) != expected:
        raise UserError(f"seed_file={where}: seed shape {tuple(z_T.shape)} does not fit model "
                        f"{models.name} at {seed.width}x{seed.height} (expected {expected})")
    text_embeds = encode_prompt(models, meta["prompt"], meta.get("negative_prompt", ""))
    noise = step_noise(seed.sampler, [int(meta.get("init_seed", "0"))], tuple(z_T.shape), seed.steps)
    return sample_images(models, z_T[None], text_embeds, seed.steps, seed.guidance_scale, seed.sampler, noise)[0]


def write_image(image: Image.Image, out: Path, meta: dict[str, str], tensor: str, key: str) -> None:
    """`image` to `out` atomically, with the seed file's metadata (a PNG's text chunks, a JPEG's or WebP's EXIF
    ImageDescription); `key` names `out` in an error."""
    fmt = WRITTEN_FORMATS[out.suffix.lower()]
    text = png_text({**meta, "tensor": tensor})
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        for name, value in text.items():
            info.add_text(name, value)
        save_kwargs = {"pnginfo": info}
    else:  # JPEG, WebP: the seed's metadata in EXIF ImageDescription, by which generate knows its own images again
        exif = Image.Exif()
        exif[EXIF_DESCRIPTION] = text["seedselect"]
        save_kwargs = {"quality": 95, "exif": exif.tobytes()}
    try:
        atomic_write(out, lambda tmp: image.save(tmp, format=fmt, **save_kwargs))
    except OSError as exc:
        raise UserError(f"{key} cannot be written ({exc.strerror or exc}); choose another place") from None
