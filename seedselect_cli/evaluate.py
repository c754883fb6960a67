"""`seedselect evaluate`: did it work? Metrics of a run's images, beside plain Stable Diffusion.

For each class and overall: zero-shot CLIP accuracy among the run's classes (or a given list),
top-1 and top-k; optionally a judge's accuracy (any `transformers` image classifier); fidelity,
the cosine similarity of each image to its class's reference centroid; diversity, the mean
pairwise CLIP distance among a class's images (and among its references). The baseline is plain
Stable Diffusion from the seeds before optimisation (for `bootstrap` runs, whose starts may hold the
shared z_T^G, and `init=inversion` or `nao` runs, whose starts carry the references, from the noise
`optimize` would have drawn), rendered once and cached in RUN/baseline/.

This module is the command: it reads the run, its references and held-out images, renders the baseline
and the decoder ceiling, and hands every set to `scoring` (the measures) and `report` (what is written).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
from collections import Counter
from pathlib import Path

import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from PIL import Image
from tqdm.auto import tqdm

from seedselect_cli import quality
from seedselect_cli.config import Config, check_config, load_structured
from seedselect_cli.core.encoders import to_pil, vae_decode, vae_encode
from seedselect_cli.core.frozen import FrozenModels
from seedselect_cli.core.prompts import encode_prompt
from seedselect_cli.core.samplers import step_noise
from seedselect_cli.core.sampling import sample_images
from seedselect_cli.devices import resolve_device
from seedselect_cli.errors import UserError, count_of, first_line
from seedselect_cli.files.atomic import atomic_write, slugify
from seedselect_cli.files.datasets import (
    DatasetConfig,
    NameLookup,
    fill_template,
    heldout_images,
    load_classes,
    read_class_list,
)
from seedselect_cli.files.images import UnreadableImage, load_rgb
from seedselect_cli.files.run_directory import CONFIG, RunDirectory, check_run_path
from seedselect_cli.files.seed_files import load_seed_file
from seedselect_cli.generate import models_for_seed
from seedselect_cli.job_dir import others_active
from seedselect_cli.judges import EvalClip, Judge, load_clip
from seedselect_cli.progress import never_improved
from seedselect_cli.report import row_names
from seedselect_cli.report_notes import (
    first_images_note,
    heldout_folder_note,
    heldout_notes,
    one_reference_notes,
    set_notes,
    unfinished_note,
)
from seedselect_cli.scoring import Embedded, embed, image_rows, mean_pairwise_distance, overall, score
from seedselect_cli.shell import override_arg
from seedselect_cli.tool_config import EvaluateConfig, check_evaluate

log = logging.getLogger(__name__)


def read_run(run_dir: Path) -> tuple[Config, list[dict]]:
    """The run's config and finished manifest entries, in manifest order (both read back: checked)."""
    check_run_path(run_dir)
    try:
        config = load_structured(Config, OmegaConf.load(run_dir / CONFIG))
        check_config(config)
    except (UserError, OmegaConfBaseException, yaml.YAMLError, OSError) as exc:
        raise UserError(f"run_dir={run_dir}: its {CONFIG} is damaged ({first_line(exc)}); evaluate a run that "
                        f"seedselect wrote") from None
    entries = sorted((e for e in RunDirectory(run_dir).finished().values() if _usable_entry(e)),
                     key=lambda e: (e["class"], int(e["index"])))
    if not entries:
        raise UserError(f"run_dir={run_dir} holds no finished images yet; run `seedselect optimize` or `bootstrap` "
                        f"in it first (same hydra.run.dir) and evaluate then")
    return config, entries


def first_of_each_class(entries: list[dict], n: int | None) -> list[dict]:
    """The entries of each class's first `n` images by index (`images_per_class`), in their order; None: all."""
    if n is None:
        return entries
    ranked = sorted(entries, key=lambda e: (e["class"], int(e["index"])))
    kept, seen = set(), Counter()
    for entry in ranked:
        if seen[entry["class"]] < n:
            seen[entry["class"]] += 1
            kept.add((entry["class"], int(entry["index"])))
    return [e for e in entries if (e["class"], int(e["index"])) in kept]


def dataset_here(dataset: DatasetConfig, moved_to: str | None) -> DatasetConfig:
    """The run's data set where it is on this machine: at `dataset_root=` if given, else where the run read it."""
    if moved_to is not None:
        if not Path(moved_to).expanduser().is_dir():
            raise UserError(f"dataset_root={moved_to} is not an existing folder; pass the folder that holds the run's "
                            f"data set here")
        return dataclasses.replace(dataset, root=moved_to)
    if dataset.root and not Path(dataset.root).expanduser().is_dir():
        raise UserError(f"the run's dataset.root={dataset.root} is not an existing folder here; evaluate reads the "
                        f"run's references from it: pass dataset_root=DIR for where that data set is now")
    return dataset


def made_by(entries: list[dict]) -> str | None:
    """The command that wrote the run's images (`optimize` or `bootstrap`, from their manifest entries); None
    where entries disagree or an older manifest does not say."""
    commands = {e.get("method") for e in entries}
    return commands.pop() if len(commands) == 1 and None not in commands else None


def _usable_entry(entry: dict) -> bool:
    """What evaluate reads of a manifest entry besides its files: a prompt and a finite loss curve."""
    history = entry.get("loss_history")
    return (isinstance(entry.get("prompt"), str) and isinstance(history, list) and len(history) > 0
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in history))


def check_writable(run_dir: Path) -> None:
    """evaluate writes RUN/report/ and RUN/baseline/: the run directory must take new files."""
    probe = run_dir / f".write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"run_dir={run_dir} is not writable ({exc.strerror}); evaluate writes its report there: "
                        f"copy the run to a writable folder and evaluate the copy") from None


def _usable_image(path: Path, size: tuple[int, int]) -> bool:
    """A cached image that reads whole and has the run's size; anything else is rendered again."""
    if not path.is_file() or path.is_symlink():
        return False
    try:
        image = load_rgb(path)
    except UserError:
        log.warning("%s is damaged; rendering it again", path)
        return False
    if image.size != size:
        log.warning("%s is %dx%d, not the run's %dx%d; rendering it again", path, *image.size, *size)
        return False
    return True


BASELINE = ("plain sampling (no optimisation) from fresh noise drawn from each image's init seed: for an "
            "`optimize` run with init=random, the seed before optimisation; for init=inversion, nao or reference "
            "and for bootstrap, whose starts may carry z_T^G, the noise alone")


def run_models(run_dir: Path, entries: list[dict], cfg: EvaluateConfig) -> FrozenModels:
    """The run's Stable Diffusion, as its first seed file records it (or `cfg.model`), without an image encoder."""
    first = load_seed_file(run_dir / entries[0]["seed_file"]).metadata
    return models_for_seed(first, cfg.model, resolve_device(cfg.runtime.device), cfg.runtime.dtype)


def decoder_ceiling(models: FrozenModels, config: Config, clip: EvalClip, judge: Judge | None,
                    heldout: dict[str, tuple[Path, ...]], heldout_seen: dict[str, Embedded | None],
                    cfg: EvaluateConfig) -> dict[str, dict | None]:
    """Per class, `quality.round_trip_precision` of its held-out images after the run's VAE (the posterior's mean,
    decoded at the run's size) against the held-out images themselves, in the space precision is measured in: the
    precision an image drawn as well as the decoder can draw an unseen real one would score; and beside it, each
    held-out image itself against the others (the precision real images score on this manifold)."""
    out: dict[str, dict | None] = {}
    for name, paths in tqdm(heldout.items(), desc="decoder ceiling", unit="class", disable=not sys.stderr.isatty()):
        images = readable(paths)  # one class at a time, as `embed` reads them
        if heldout_seen[name] is None or len(images) != len(heldout_seen[name].clip):
            out[name] = None
            continue
        latents = vae_encode(models, images, config.sampler.height, config.sampler.width, config.dataset.resize_mode,
                             cfg.batch_size)
        with torch.no_grad():
            trips = [image for chunk in latents.split(cfg.batch_size)
                     for image in to_pil(models, vae_decode(models, chunk))]
        real = heldout_seen[name].features
        trips_seen = embed(clip, judge, trips, cfg.top_k, cfg.batch_size)
        out[name] = {"round_trip_precision": quality.round_trip_precision(real, trips_seen.features),
                     "precision": quality.round_trip_precision(real, real)}  # each real image against the others
    return out


def ceiling_note(ceiling: dict[str, dict | None], heldout_seen: dict[str, Embedded | None], set_means: dict,
                 made_by: str | None) -> dict:
    """The decoder ceiling over the classes (weighted by their held-out images), beside each set's precision."""
    rows = [(v, len(heldout_seen[c].clip)) for c, v in ceiling.items()
            if v is not None and v["round_trip_precision"] is not None]
    if not rows:
        return {"round_trip_precision": None, "precision": None,
                "note": "decoder ceiling: no class has enough held-out images to measure it"}
    mean = {key: sum(v[key] * n for v, n in rows) / sum(n for _, n in rows) for key in ("round_trip_precision", "precision")}
    names = row_names(made_by)
    sets = ", ".join(f"{names[m]} {o['precision']:.3f}" for m, o in set_means.items() if o.get("precision") is not None)
    return {**mean, "note": f"decoder ceiling: the held-out images score precision {mean['precision']:.3f} against "
                            f"the others, {mean['round_trip_precision']:.3f} after the run's VAE (the images: {sets})"}


def render_baseline(run_dir: Path, config: Config, entries: list[dict], cfg: EvaluateConfig) -> dict[tuple, Path]:
    """Plain sampling for every entry (`BASELINE`), `cfg.batch_size` images of one prompt at a time; rendered once
    and kept in RUN/baseline/."""
    from seedselect_cli.core.initial_seeds import init_seed_for, plain_noise

    paths = {(e["class"], e["index"]): run_dir / "baseline" / "images" / slugify(e["class"]) / f"{e['index']:05d}.png"
             for e in entries}
    size = (config.sampler.width, config.sampler.height)
    missing = [e for e in entries if not _usable_image(paths[(e["class"], e["index"])], size)]
    if not missing:
        return paths
    log.info("drawing %s of plain Stable Diffusion from the run's seeds into %s, kept for the next evaluate (%s "
             "already there; images_per_class=N scores N a class, baseline=false none)",
             count_of(len(missing), "image"), run_dir / "baseline", len(entries) - len(missing))
    models = run_models(run_dir, missing, cfg)
    shape = models.latent_shape(config.sampler.height, config.sampler.width)
    by_prompt: dict[str, list[dict]] = {}
    for entry in missing:
        by_prompt.setdefault(entry["prompt"], []).append(entry)
    with tqdm(total=len(missing), desc="plain Stable Diffusion", unit="img", disable=not sys.stderr.isatty()) as bar:
        for prompt, group in by_prompt.items():
            text_embeds = encode_prompt(models, prompt, config.sampler.negative_prompt)
            for batch in (group[i:i + cfg.batch_size] for i in range(0, len(group), cfg.batch_size)):
                # not the seed files' starts: a bootstrap image starts from z_T^G, an init=nao one from a centroid
                z_T = torch.stack([plain_noise(shape, config.seed, e["class"], e["index"]) for e in batch])
                init_seeds = [init_seed_for(config.seed, e["class"], e["index"]) for e in batch]
                noise = step_noise(config.sampler.name, init_seeds, shape, config.sampler.steps)
                images = sample_images(models, z_T, text_embeds, config.sampler.steps, config.sampler.guidance_scale,
                                       config.sampler.name, noise)
                for entry, image in zip(batch, images):
                    path = paths[(entry["class"], entry["index"])]
                    atomic_write(path, lambda tmp, image=image: image.save(tmp, format="PNG"))
                bar.update(len(batch))
    return paths


def damaged_run_image(exc: UnreadableImage, run_dir: Path, entries: list[dict]) -> UserError:
    """A run's own image that no longer reads: its seed file draws it again, pixel for pixel."""
    for entry in entries:
        if run_dir / entry["image"] == exc.path:
            seed_file, out = override_arg("seed_file", str(run_dir / entry["seed_file"])), override_arg("out", str(exc.path))
            return UserError(f"{exc.path}, one of the run's images, is damaged ({exc.reason}); draw it again from its "
                             f"seed: seedselect generate {seed_file} {out}")
    return exc


def readable_references(record) -> list[Image.Image]:
    """A class's reference images; a broken one is skipped with a warning, as `optimize` skipped it."""
    images = []
    for path in record.images:
        try:
            images.append(load_rgb(path))
        except UserError as exc:
            log.warning("skipping reference image %s", str(exc).replace("\n", "\\n"))
    if not images:
        raise UserError(f"class {record.name!r} has no readable reference images any more; restore them under "
                        f"the run's dataset.root")
    return images


def run_evaluate(cfg: EvaluateConfig, tables: bool = True) -> dict:
    """Score the run in `cfg.run_dir` and its baseline; write RUN/report/. Returns metrics.json's content. `tables`:
    print the tables (else only where the report is: a sweep prints one table of its runs)."""
    from seedselect_cli.report import print_report_line, print_table, terminal, write_report

    check_evaluate(cfg)
    run_dir = Path(cfg.run_dir).expanduser()
    # 1. The run: its config, finished images, classes, and each class's references.
    config, every_entry = read_run(run_dir)
    entries = first_of_each_class(every_entry, cfg.images_per_class)
    check_writable(run_dir)
    config.dataset = dataset_here(config.dataset, cfg.dataset_root)
    run_classes = list(dict.fromkeys(e["class"] for e in entries))
    # the run's classes again, without the warnings the run said (fewer references than dataset.shots, ...)
    run_dataset = dataclasses.replace(config.dataset, classes=run_classes, max_images=None)
    records = {r.name: r for r in load_classes(run_dataset, config.seed, quiet=True)}
    if cfg.dataset_classes:
        every = dataclasses.replace(config.dataset, classes=None, shots=1, max_images=None)
        candidates = list(dict.fromkeys([*run_classes, *(r.name for r in load_classes(every, config.seed, quiet=True))]))
    else:
        named = read_class_list(cfg.classes_file, "classes_file") if cfg.classes_file is not None else cfg.classes
        candidates = list(named) if named else run_classes
        # the run's classes as the list spells them ("Black-footed Albatross" for the run's "Black footed Albatross")
        listed = NameLookup(candidates)
        as_listed = {listed.find(c): c for c in run_classes}
        candidates = [as_listed.get(name, name) for name in candidates]
    absent = [c for c in run_classes if c not in candidates]
    if absent:
        raise UserError(f"classes: the run's class {absent[0]!r} is not in the list to classify among; add it")
    template = cfg.prompt_template or config.dataset.prompt_template
    unfinished = unfinished_note(config, every_entry, made_by(every_entry), others_active(run_dir))
    if unfinished:
        log.warning(unfinished)
    heldout_dir = cfg.heldout or config.dataset.heldout
    if heldout_dir and not Path(heldout_dir).expanduser().is_dir():
        raise UserError(f"the run's dataset.heldout={heldout_dir} is not an existing folder here: pass "
                        f"heldout=DIR (DIR/<class>/<image>) for where its real images are")
    folder_note = heldout_folder_note(Path(heldout_dir).expanduser(), run_classes) if heldout_dir else None

    # 2. The judges: the CLIP (zero-shot, fidelity, diversity) and, if asked for, a classifier, whose
    #    features then measure how the images sit among held-out real ones (else CLIP's do).
    device = resolve_device(cfg.runtime.device)
    clip = load_clip(cfg.clip or config.model.image_encoder, device)
    judge = Judge(cfg.judge, candidates, device) if cfg.judge.model else None
    text = clip.texts([fill_template(template, c) for c in candidates])
    class_index = {c: i for i, c in enumerate(candidates)}
    references = {c: readable_references(records[c]) for c in run_classes}
    ref_seen = {c: embed(clip, judge, images, cfg.top_k, cfg.batch_size) for c, images in references.items()}
    centroids = torch.zeros(len(candidates), text.shape[1])
    for c in run_classes:
        centroids[class_index[c]] = ref_seen[c].clip.mean(dim=0)
    heldout_of = {c: heldout_images(config.dataset, config.seed, records[c], heldout_dir) for c in run_classes}
    heldout_seen = {c: embed(clip, judge, readable(h.images), cfg.top_k, cfg.batch_size) if h.images else None
                    for c, h in heldout_of.items()}

    # 3. SeedSelect's images and, beside them, plain Stable Diffusion's from the same seeds.
    names = [e["class"] for e in entries]
    labels = [class_index[n] for n in names]
    sets = {"seedselect": [run_dir / e["image"] for e in entries]}
    out = RunDirectory(run_dir)
    if cfg.baseline:
        with out.writing(run_dir / "baseline"):
            baseline = render_baseline(run_dir, config, entries, cfg)
        sets["plain"] = [baseline[(e["class"], e["index"])] for e in entries]
    try:
        seen = {method: embed(clip, judge, paths, cfg.top_k, cfg.batch_size, f"scoring {method}")
                for method, paths in sets.items()}
    except UnreadableImage as exc:
        raise damaged_run_image(exc, run_dir, entries) from None
    scores = {method: score(seen[method], labels, text, centroids, class_index, names, cfg.top_k, ref_seen,
                             heldout_seen)
              for method in sets}
    per_image = []
    for method, paths in sets.items():
        rows = image_rows(seen[method], names, text, centroids, class_index, candidates, ref_seen, heldout_seen)
        for entry, path, row in zip(entries, paths, rows):
            own = {}
            if method == "seedselect":  # an image that took no step (kept as drawn, selection alone): not unrefined
                own = {"loss": entry.get("loss"), "unrefined": bool(never_improved([entry])),
                       **({"drawn": True} if entry.get("drawn") else {})}
            per_image.append({"set": method, "class": entry["class"], "index": entry["index"],
                              "image": path.relative_to(run_dir).as_posix(), **own, **row})

    ceiling: dict[str, dict | None] = dict.fromkeys(run_classes)
    if cfg.decoder_ceiling:
        ceiling = decoder_ceiling(run_models(run_dir, entries, cfg), config, clip, judge,
                                  {c: h.images for c, h in heldout_of.items()}, heldout_seen, cfg)

    # 4. metrics.json, contact sheets, loss curves, index.html; a table in the terminal.
    real_counts = {c: len(s.clip) if s is not None else 0 for c, s in heldout_seen.items()}
    metrics = {
        "run_dir": str(run_dir), "made_by": made_by(entries), "n_images": len(entries),
        # the weights the images were drawn with: Hub id or folder, and the commits the images record
        "model": config.model.pretrained,
        "model_commits": sorted({e["model_commit"] for e in entries if isinstance(e.get("model_commit"), str)}),
        "clip": cfg.clip or config.model.image_encoder,
        "judge": cfg.judge.model, "classified_among": len(candidates), "top_k": cfg.top_k,
        "baseline": BASELINE if cfg.baseline else None,
        "notes": [*([unfinished] if unfinished else []),
                  *set_notes(len(candidates), cfg.top_k, min(Counter(names).values()), cfg.dataset_classes,
                             made_by(entries), one_concept=config.dataset.name == "folder",
                             capped=len(entries) < len(every_entry), fill_to=config.bootstrap.fill_to),
                  *([folder_note] if folder_note else []),
                  *first_images_note(cfg.images_per_class, len(entries), len(every_entry)),
                  *heldout_notes(real_counts, {c: h.source for c, h in heldout_of.items()}),
                  *one_reference_notes({c: len(references[c]) for c in run_classes})],
        "quality_space": "judge features" if judge is not None else "CLIP image embeddings",
        "overall": {method: overall(per_class) for method, per_class in scores.items()},
        "classes": {c: {"references": {"n_images": len(references[c]),
                                       "diversity": mean_pairwise_distance(ref_seen[c].clip)},
                        "heldout": {"n_images": real_counts[c],
                                    "source": heldout_of[c].source, **(ceiling[c] or {})},
                        **{method: scores[method][c] for method in scores}} for c in run_classes},
    }
    if cfg.decoder_ceiling:
        metrics["decoder_ceiling"] = ceiling_note(ceiling, heldout_seen, metrics["overall"], metrics["made_by"])
        metrics["notes"].append(metrics["decoder_ceiling"]["note"])
    with out.writing(run_dir / "report"):
        write_report(run_dir, metrics, entries, references, sets, per_image)
    if tables:
        print_table(metrics, per_image)
    else:
        print_report_line(metrics, terminal())
    return metrics


def readable(paths: tuple[Path, ...]) -> list[Image.Image]:
    """The images of `paths` that can be read; the others are skipped with a warning."""
    images = []
    for path in paths:
        try:
            images.append(load_rgb(path))
        except UserError as exc:
            log.warning("skipping held-out image %s", str(exc).replace("\n", "\\n"))
    return images
