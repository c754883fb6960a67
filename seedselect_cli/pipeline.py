"""`seedselect optimize` as a plain function: config -> models -> references -> seeds -> run directory.

`run_optimize(config, run_dir)` is what the command runs and what tests call. Each image's seed
z_T is drawn from an integer that depends only on (`seed`, class, index), never on batch size,
shard or resumption, and the image is rendered from the best seed exactly as `generate` does.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

from seedselect_cli import __version__
from seedselect_cli.config import Config, parse_shard, to_yaml
from seedselect_cli.datasets import ClassRecord, load_classes
from seedselect_cli.errors import UserError
from seedselect_cli.images import load_references
from seedselect_cli.models import FrozenModels, load_models, resolve_device, resolve_dtype
from seedselect_cli.optimize import SeedResult, optimize_seeds
from seedselect_cli.references import encode_references
from seedselect_cli.sampling import encode_prompt, sample_images
from seedselect_cli.seed_files import save_seed_file
from seedselect_cli.writer import RunDirectory, slugify

log = logging.getLogger(__name__)


def init_seed_for(seed: int, class_name: str, index: int) -> int:
    """The integer that draws z_T for image `index` of `class_name` (63 bits of a SHA-256)."""
    digest = hashlib.sha256(f"{seed}/{class_name}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def initial_noise(models: FrozenModels, shape: tuple[int, ...], init_seed: int) -> torch.Tensor:
    """z_T ~ N(0, I) * init_noise_sigma, drawn on the CPU so every device gets the same seed."""
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(init_seed), dtype=torch.float32)
    return noise * models.scheduler.init_noise_sigma


def shard_classes(records: list[ClassRecord], shard: str) -> list[ClassRecord]:
    index, count = parse_shard(shard)
    return records[index::count]


def seed_metadata(models: FrozenModels, config: Config, record: ClassRecord, index: int, init_seed: int) -> dict:
    """What a seed file records so that `generate` can redraw its image without the config."""
    return {
        "prompt": record.prompt, "negative_prompt": config.sampler.negative_prompt, "class": record.name,
        "index": str(index), "init_seed": str(init_seed), "model": models.name,
        "model_revision": config.model.revision or "", "model_variant": config.model.variant or "",
        "steps": str(config.sampler.steps), "guidance_scale": repr(float(config.sampler.guidance_scale)),
        "height": str(config.sampler.height), "width": str(config.sampler.width),
        "scheduler": type(models.scheduler).__name__, "scheduler_config": models.scheduler_json(),
        "dtype": str(models.dtype).removeprefix("torch."), "device": models.device.type,
        "seedselect_version": __version__,
    }


def png_text(metadata: dict, result: SeedResult) -> dict[str, str]:
    """PNG text chunks: `parameters` in the form other Stable Diffusion tools write, and our metadata."""
    parameters = (
        f"{metadata['prompt']}\nNegative prompt: {metadata['negative_prompt']}\n"
        f"Steps: {metadata['steps']}, Sampler: DDIM, CFG scale: {metadata['guidance_scale']}, "
        f"Seed: {metadata['init_seed']}, Size: {metadata['width']}x{metadata['height']}, "
        f"Model: {metadata['model']}, SeedSelect loss: {result.loss:.6g}"
    )
    return {"parameters": parameters, "seedselect": json.dumps(metadata, sort_keys=True)}


def run_optimize(config: Config, run_dir: Path) -> list[dict]:
    """Optimise `n_images` seeds per class and write them to `run_dir`. Returns the new manifest entries."""
    # 1. Device and precision.
    device = resolve_device(config.runtime.device)
    dtype = resolve_dtype(config.runtime.dtype, device)

    # 2. The classes this process takes, with their prompts and reference image paths.
    records = shard_classes(load_classes(config.dataset, config.seed), config.runtime.shard)
    slugs = {r.name: slugify(r.name) for r in records}
    if len(set(slugs.values())) != len(slugs):
        raise UserError("two classes map to the same folder name; rename one of them")

    # 3. The run directory: its config, and what an earlier run of it already finished.
    out = RunDirectory(run_dir)
    out.start(to_yaml(config))
    done = out.finished()
    todo = {r.name: [i for i in range(config.n_images) if (r.name, i) not in done] for r in records}
    if not any(todo.values()):
        log.info("nothing to do: all %d images of %d classes are in %s", config.n_images * len(records),
                 len(records), run_dir)
        return []

    # 4. The frozen models.
    models = load_models(config.model, device, dtype)
    shape = models.latent_shape(config.sampler.height, config.sampler.width)

    entries: list[dict] = []
    for record in records:
        indices = todo[record.name]
        if not indices:
            continue
        # 5. This class's targets: reference centroids mu_v and mu_z, and the prompt embeddings.
        images, used = load_references(list(record.images), f"class {record.name!r}")
        centroids = encode_references(models, images, config.sampler.height, config.sampler.width,
                                      config.dataset.resize_mode)
        text_embeds = encode_prompt(models, record.prompt, config.sampler.negative_prompt)
        log.info("class %r: %d references, prompt %r, %d images to make", record.name, len(used),
                 record.prompt, len(indices))

        # 6. Optimise the seeds, a batch at a time, and write each image as soon as it is done.
        for start in range(0, len(indices), config.runtime.batch_size):
            batch = indices[start:start + config.runtime.batch_size]
            init_seeds = [init_seed_for(config.seed, record.name, i) for i in batch]
            z_init = torch.stack([initial_noise(models, shape, s) for s in init_seeds])
            with tqdm(total=config.optim.iterations, disable=not config.runtime.progress, leave=False,
                      desc=f"{record.name} [{batch[0] + 1}-{batch[-1] + 1}/{config.n_images}]") as bar:
                results = optimize_seeds(models, z_init, centroids, text_embeds, config, progress=bar)
            for index, init_seed, result in zip(batch, init_seeds, results):
                entries.append(_write_image(out, models, config, record, slugs[record.name], index, init_seed,
                                            result, text_embeds))
    _print_summary(entries, run_dir)
    return entries


def _write_image(out: RunDirectory, models: FrozenModels, config: Config, record: ClassRecord, slug: str,
                 index: int, init_seed: int, result: SeedResult, text_embeds: torch.Tensor) -> dict:
    """Render the best seed, then write seed file, image, and last the manifest line."""
    image = sample_images(models, result.optimized[None], text_embeds, config.sampler.steps,
                          config.sampler.guidance_scale)[0]
    metadata = seed_metadata(models, config, record, index, init_seed)
    seed_path, image_path = out.seed_path(slug, index), out.image_path(slug, index)
    save_seed_file(seed_path, result.initial, result.optimized, metadata)
    out.save_image(image_path, image, png_text(metadata, result))
    entry = {
        "class": record.name, "prompt": record.prompt,
        "image": image_path.relative_to(out.root).as_posix(),
        "seed_file": seed_path.relative_to(out.root).as_posix(),
        "index": index, "init_seed": init_seed, "iterations": len(result.loss_history),
        "loss": result.loss, "loss_history": result.loss_history,
        "semantic_loss": result.semantic_loss, "appearance_loss": result.appearance_loss,
        "best_iteration": result.best_iteration, "seconds": round(result.seconds, 4),
    }
    out.append_manifest(entry)
    return entry


def _print_summary(entries: list[dict], run_dir: Path) -> None:
    table = Table(title=f"seedselect: {len(entries)} new images in {run_dir}")
    for column in ("class", "images", "first loss", "best loss", "s / image"):
        table.add_column(column, justify="left" if column == "class" else "right")
    by_class: dict[str, list[dict]] = {}
    for entry in entries:
        by_class.setdefault(entry["class"], []).append(entry)
    for name, rows in by_class.items():
        first = sum(r["loss_history"][0] for r in rows) / len(rows)
        best = sum(r["loss"] for r in rows) / len(rows)
        seconds = sum(r["seconds"] for r in rows) / len(rows)
        table.add_row(name, str(len(rows)), f"{first:.4f}", f"{best:.4f}", f"{seconds:.2f}")
    Console().print(table)
