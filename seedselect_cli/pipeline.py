"""`seedselect optimize` and `seedselect bootstrap` as plain functions:
config -> models -> references -> seeds -> run directory.

`run_optimize(config, run_dir)` and `run_bootstrap(config, run_dir)` are what the commands run and
what tests call; they differ only in the batches of seeds they optimise. Each image's seed z_T is
drawn from an integer that depends only on (`seed`, class, index), never on batch size, shard or
resumption, and the image is rendered from the best seed exactly as `generate` does.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from seedselect_cli import __version__
from seedselect_cli.config import Config, resolve_shard, resume_terms, to_yaml
from seedselect_cli.core.cuda_graphs import graph_cache, resolve_cuda_graphs
from seedselect_cli.core.engine import ClassTarget, Engine, batch_blocks
from seedselect_cli.core.frozen import FrozenModels, HubCommits
from seedselect_cli.core.initial_seeds import SeedStarts, inversion_fingerprint
from seedselect_cli.core.optimize import SeedResult
from seedselect_cli.core.targets import ReferenceEncodings, encoder_fingerprint
from seedselect_cli.devices import (
    check_tiny_size,
    memory_budget_bytes,
    no_gpu_warning,
    resolve_device,
    resolve_dtype,
)
from seedselect_cli.errors import SAME_COMMAND, Interrupted, UserError, count_of
from seedselect_cli.files.assets import portable
from seedselect_cli.files.atomic import slugify
from seedselect_cli.files.datasets import ClassRecord, load_classes, split_of
from seedselect_cli.files.run_directory import RunDirectory
from seedselect_cli.files.seed_files import load_seed_file, png_text, save_seed_file, seed_metadata
from seedselect_cli.files.tensor_cache import TensorCache, default_cache_dir
from seedselect_cli.interrupt import GracefulStop, catching_signals
from seedselect_cli.limits import is_commit
from seedselect_cli.models import TINY, TINY_SDXL, check_steps, compile_models, load_models, size_warning
from seedselect_cli.progress import NEXT, RunProgress, print_summary, run_progress
from seedselect_cli.references import load_encodings
from seedselect_cli.shell import override_arg

log = logging.getLogger(__name__)


def shard_classes(records: list[ClassRecord], shard: str) -> list[ClassRecord]:
    """This process's classes: every N-th from the I-th, for `runtime.shard=I/N` (or torchrun's rank)."""
    index, count = resolve_shard(shard)
    mine = records[index::count]
    if count > 1 and not mine:
        log.warning("shard %d/%d has no classes: the run has %s, fewer than its %d shards; nothing to do here",
                    index, count, count_of(len(records), "class", "classes"), count)
    elif count > 1:
        log.info("shard %d/%d: %d of the run's %s", index, count, len(mine), count_of(len(records), "class", "classes"))
    return mine


def images_wanted(config: Config, method: str, records: list[ClassRecord]) -> dict[str, int]:
    """How many images the command makes of each class of the run; an error where `bootstrap.fill_to` leaves it none
    to make of any class."""
    wanted = {r.name: config.images_asked(method, r.split_images) for r in records}
    if records and not any(wanted.values()):
        fill_to, shots = config.bootstrap.fill_to, config.dataset.shots
        # a few-shot set's real images are its shots, but fill_to counts the split's, as a long tail's are
        instead = (f", or, to fill each class up to {fill_to} with its dataset.shots={shots} references, "
                   f"bootstrap.n_images={fill_to - shots} (fill_to counts the real images in the split, not the shots)"
                   if shots is not None and shots < fill_to else "")
        raise UserError(f"bootstrap.fill_to={fill_to}: every class of the run already has {fill_to} or more images in "
                        f"{split_of(config.dataset)} (the fewest: {min(r.split_images for r in records)}); raise it"
                        f"{instead}")
    return wanted


def not_yet_full(config: Config, records: list[ClassRecord], wanted: dict[str, int]) -> list[ClassRecord]:
    """The classes with images to make: those `bootstrap.fill_to` leaves full are said once and left out."""
    full = [r.name for r in records if not wanted[r.name]]
    if full:
        which = (repr(full[0]) + " already has" if len(full) == 1 else
                 f"{len(full)} classes ({', '.join(full[:5])}{', ...' if len(full) > 5 else ''}) already have")
        log.info("bootstrap.fill_to=%d: %s %d or more images in %s; none made for %s", config.bootstrap.fill_to,
                 which, config.bootstrap.fill_to, split_of(config.dataset), "it" if len(full) == 1 else "them")
    return [r for r in records if wanted[r.name]]


def metadata_for(models: FrozenModels, config: Config, record: ClassRecord, index: int, init_seed: int) -> dict:
    """The seed file's metadata of image `index` of `record` (-1: the class's z_T^G) in this run."""
    sampler = config.sampler
    return seed_metadata(
        prompt=record.prompt, negative_prompt=sampler.negative_prompt, class_name=record.name, index=index,
        init_seed=init_seed, model=portable(models.name), model_revision=config.model.revision,
        model_commit=models.commits.model, model_variant=config.model.variant, steps=sampler.steps,
        guidance_scale=sampler.guidance_scale, height=sampler.height, width=sampler.width, sampler=sampler.name,
        scheduler_config=models.scheduler_json(), dtype=str(models.dtype).removeprefix("torch."),
        device=models.device.type, version=__version__,
        cpu_threads=torch.get_num_threads() if models.device.type == "cpu" else None)


def seed_starts(models: FrozenModels, config: Config, cache_root: Path | None,
                should_stop: Callable[[str], None] | None = None) -> SeedStarts:
    """Where the run's seeds start (`init`), with the references' inversions kept under `cache_root/inversions`
    (None: not kept)."""
    h, w = config.sampler.height, config.sampler.width
    inversions = None
    if config.init.method != "random" and cache_root is not None:
        inversions = TensorCache(cache_root / "inversions",
                                    inversion_fingerprint(models, h, w, config.dataset.resize_mode))
    return SeedStarts(models, config.init, config.sampler, models.latent_shape(h, w), inversions, should_stop)


def engine_for(models: FrozenModels, config: Config, cache_root: Path | None = None,
               should_stop: Callable[[str], None] | None = None) -> Engine:
    """The method's engine for this config: its specs, its starts with the inversions cached under `cache_root`
    (None: not kept), its memory budget and its CUDA graphs. What the commands, the scripts and the tests run."""
    use_graphs = resolve_cuda_graphs(config.runtime.cuda_graphs, models.device, config.sampler.checkpointing)
    return Engine(models, config.objective(), config.optim_spec(), config.init, config.bootstrap, config.seed,
                  seed_starts(models, config, cache_root, should_stop),
                  memory_budget_bytes(config.runtime.memory_budget, models.device),
                  graph_cache(models.device) if use_graphs else None)


def run_optimize(config: Config, run_dir: Path) -> list[dict]:
    """Optimise `n_images` seeds per class from their starts (`init`). Returns the new manifest entries."""
    return run(config, run_dir, "optimize")


def run_bootstrap(config: Config, run_dir: Path) -> list[dict]:
    """`bootstrap.n_images` images per class (or up to `bootstrap.fill_to` with its real ones), each seed chosen among
    `bootstrap.candidates` starts (its own noise mixed with the class's z_T^G where `bootstrap.noise` < 1) and
    optimised towards its subset of references."""
    if config.init.method != "random" and config.bootstrap.noise >= 1:
        log.warning("init=%s does not change `seedselect bootstrap` with bootstrap.noise=1 (each image starts from "
                    "its own noise); set bootstrap.noise below 1 to start its images from z_T^G", config.init.method)
    return run(config, run_dir, "bootstrap")


def run(config: Config, run_dir: Path, method: str) -> list[dict]:
    """Make the missing images of this process's classes in `run_dir`. Returns the new manifest entries."""
    with catching_signals() as stop:
        return _run(config, run_dir, method, stop)


def _run(config: Config, run_dir: Path, method: str, stop: GracefulStop) -> list[dict]:
    # 1. Device and precision.
    device = resolve_device(config.runtime.device)
    dtype = resolve_dtype(config.runtime.dtype, device)
    if config.model.pretrained in (TINY, TINY_SDXL):
        check_tiny_size(device, config.sampler.height, config.sampler.width, config.model.pretrained)
    log.info("device %s, %s, %s", device, str(dtype).removeprefix("torch."), count_of(torch.get_num_threads(), "CPU thread"))
    if said := no_gpu_warning(config.runtime.device, device, config.sampler.height, config.sampler.width):
        log.warning(said)
    resolve_cuda_graphs(config.runtime.cuda_graphs, device, config.sampler.checkpointing)  # a bad setting fails here

    # 2. The classes of the run with their prompts and reference image paths, and those this process takes.
    all_records = load_classes(config.dataset, config.seed)
    records = shard_classes(all_records, config.runtime.shard)
    slugs = {r.name: slugify(r.name) for r in all_records}
    if len(set(slugs.values())) != len(slugs):
        first, second = next((a, b) for a in slugs for b in slugs if a < b and slugs[a] == slugs[b])
        raise UserError(f"classes {first!r} and {second!r} map to the same folder name ({slugs[first]}); rename one "
                        f"of them")
    contrastive = config.loss.semantic == "contrastive" and config.loss.lam > 0
    if contrastive and len(all_records) < 2:
        raise UserError("loss=contrastive needs at least 2 classes in the run; add some to dataset.classes "
                        "or use loss=default")

    # 3. The run directory: its config, and what an earlier run of it already finished.
    wanted = images_wanted(config, method, all_records)
    out = RunDirectory(run_dir)
    out.start(to_yaml(config), method, labels={r.name: r.label for r in all_records if r.label is not None},
              **resume_terms(method))
    done = out.finished()
    records = not_yet_full(config, records, wanted)
    todo = {r.name: [i for i in range(wanted[r.name]) if (r.name, i) not in done] for r in records}
    if not records:
        return []
    if not any(todo.values()):
        asked = sum(wanted[r.name] for r in records)
        held = sum(1 for name, _ in done if name in todo)  # an earlier command may have asked for more
        log.info("nothing to do: every image is already in %s (%s of %s%s); %s %s", run_dir, count_of(asked, "image"),
                 count_of(len(records), "class", "classes"),
                 f"; it holds {held} of theirs, made by a command that asked for more" if held > asked else "",
                 NEXT, evaluate_command(config, run_dir))
        return []
    kept = sum(wanted[r.name] - len(todo[r.name]) for r in records)
    log.info("%s to make for %s%s", count_of(sum(map(len, todo.values())), "image"),
             count_of(sum(1 for t in todo.values() if t), "class", "classes"),
             f" ({kept} already in {run_dir})" if kept else "")

    # 4. The frozen models (from the Hub: the commits the run's earlier images were drawn with), and the cache of
    #    reference encodings. A signal stops this at once.
    pinned = earlier_commits(done.values())
    try:
        models = load_models(config.model, device, dtype, commits=pinned)
    except UserError as exc:
        if not any(commit and commit in str(exc) for commit in (pinned.model, pinned.image_encoder)):
            raise
        raise UserError(f"{exc} (the commit the run's earlier images were drawn with, which a resumed run loads "
                        f"again; a new run directory takes the branch's)") from None
    check_steps(models.scheduler, config.sampler.steps, "sampler.steps")
    if said := size_warning(models, config.sampler.height, config.sampler.width):
        log.warning(said)
    if config.init.inversion_steps:
        check_steps(models.scheduler, config.init.inversion_steps, "init.inversion_steps")
    if config.runtime.compile:
        compile_models(models)
    h, w, mode = config.sampler.height, config.sampler.width, config.dataset.resize_mode
    cache_dir = (Path(config.runtime.cache_dir).expanduser() if config.runtime.cache_dir else default_cache_dir())
    cache_root = cache_dir if config.runtime.cache else None
    cache = TensorCache(cache_root, encoder_fingerprint(models, h, w, mode))
    engine = engine_for(models, config, cache_root, stop.check)

    def encode(record: ClassRecord) -> ReferenceEncodings:
        return load_encodings(models, record.images, h, w, mode, cache, f"class {record.name!r}",
                              should_stop=lambda: stop.check(f"the encoding of class {record.name!r}'s references"))

    # 5-6. From here a signal stops the work after its current step (a reference's encoding or
    #    inversion, an optimisation step); what is written stays.
    entries: list[dict] = []
    failed: list[str] = []
    busy: list[str] = []
    with stop.steps(), run_progress(len(records), sum(map(len, todo.values())), config.runtime.progress) as progress:
        try:
            # 5. For the contrastive loss: the semantic centroid mu_v of every class of the run.
            class_semantic = (torch.stack([encode(r).centroids().semantic for r in all_records])
                              if contrastive else None)
            class_rows = {r.name: i for i, r in enumerate(all_records)}
            # 6. Each class that no other process is making: its targets and prompt, then its seeds a batch
            #    at a time, each image written when done.
            run = ClassRun(config, method, out, engine, progress, stop)
            for record in records:
                out.check_class(slugs[record.name])
                with out.claim(slugs[record.name]) as claimed:
                    if not claimed:
                        busy.append(record.name)
                        log.warning("class %r is being made by another process in %s; leaving it to that one",
                                    record.name, run_dir)
                        progress.class_done(record.name, [], 0, wanted[record.name], skipped=True)
                        continue
                    finished = out.finished(record.name)  # again: another process may have finished some meanwhile
                    indices = [i for i in todo[record.name] if (record.name, i) not in finished]
                    contrast = None if class_semantic is None else (class_semantic, class_rows[record.name])
                    entries += run.make(record, wanted[record.name], indices, slugs[record.name], encode, contrast,
                                        failed)
                if stop.requested:
                    break
        except Interrupted:
            pass  # a stop between steps before the class's first batch: said below
        except torch.OutOfMemoryError:
            raise UserError(f"out of GPU memory with runtime.batch_size={config.runtime.batch_size} at "
                            f"{config.sampler.width}x{config.sampler.height}: {memory_advice(config, dtype)}; the "
                            f"{count_of(len(out.finished()), 'image')} finished in {run_dir} stay, and {SAME_COMMAND} "
                            f"resumes with the change") from None
    print_summary(entries, run_dir, None if stop.requested or not entries else evaluate_command(config, run_dir))
    if stop.requested:
        name = signal.Signals(stop.signum).name
        raise Interrupted(stop.signum, f"stopped by {name}: {count_of(len(entries), 'new image')} kept in {run_dir}; "
                                       f"run {SAME_COMMAND} again to resume")
    if busy:
        log.warning("%s left to the other process working in %s (%s); run the command again when it has ended to "
                    "check that nothing is missing", count_of(len(busy), "class was", "classes were"), run_dir,
                    ", ".join(busy[:5]))
    if failed:
        raise UserError(f"{count_of(len(failed), 'image')} could not be made ({failed[0]}): their loss was never finite; "
                        f"lower optim.lr or use runtime.dtype=float32")
    return entries


def memory_advice(config: Config, dtype: torch.dtype) -> str:
    """What this run can change to need less device memory, from what it set, the biggest saving first."""
    fixes = []
    budget = str(config.runtime.memory_budget).strip().lower()
    if budget == "auto" or float(budget) > 0:
        fixes.append(f"lower runtime.memory_budget (now {config.runtime.memory_budget}; 0 recomputes every step)")
    if not config.sampler.checkpointing:
        fixes.append("set sampler.checkpointing=true")
    if config.runtime.batch_size > 1:
        fixes.append("lower runtime.batch_size (1 needs least)")
    if dtype == torch.float32:
        fixes.append("use runtime.dtype=float16")
    if not fixes:
        return "every setting that saves memory is on already: use a device with more memory, or smaller images"
    return ", or ".join(fixes)


def one_reference_warning(config: Config, method: str) -> str | None:
    """What the settings that measure against the references' spacing do for a class with one reference (a 1-shot
    set): nothing, which the run says rather than leaving it to be found in the images; None where none is on."""
    said = []
    if method == "bootstrap" and config.bootstrap.keep_drawn:
        said.append("bootstrap.keep_drawn measures a start against the references' spread, which needs two, so each of "
                    "its images is refined as without it")
    if config.optim.stop_near_reference:
        said.append("optim.stop_near_reference stops a seed at the distance between two references, so its seeds "
                    "run every iteration, as without it")
    if method == "optimize" and config.loss.appearance == "assigned" and config.loss.semantic_references > 1:
        said.append(f"loss.semantic_references={config.loss.semantic_references} averages each image's reference with "
                    f"the next ones, of which there are none, so each image's target is that reference alone")
    return "; ".join(said) or None


def evaluate_command(config: Config, run_dir: Path) -> str:
    """The command that scores this run: with the toy world's judge for a toy-world run (its image encoder is the
    world's CLIP), whose classes no public classifier knows, and zero-shot among all of the world's concepts where
    the run read them from the world's folder of every concept (the demo does)."""
    toy_world = portable(config.model.image_encoder) == "asset:toyworld/clip"
    judge = " 'judge.model=${asset:toyworld/judge}'" if toy_world else ""
    among = " dataset_classes=true" if toy_world and config.dataset.name == "imagefolder" else ""
    return f"seedselect evaluate {override_arg('run_dir', str(run_dir))}{judge}{among}"


@dataclass
class ClassRun:
    """Makes the missing images of one class after another with the engine, and writes them."""

    config: Config
    method: str
    out: RunDirectory
    engine: Engine
    progress: RunProgress
    stop: GracefulStop

    def make(self, record: ClassRecord, n_images: int, indices: list[int], slug: str,
             encode: Callable[[ClassRecord], ReferenceEncodings], contrast: tuple[torch.Tensor, int] | None,
             failed: list[str]) -> list[dict]:
        """The class's missing images `indices` of its `n_images`; appends to `failed` those that could not be made."""
        config, engine = self.config, self.engine
        self.progress.start_class(record.name)
        if not indices:
            self.progress.class_done(record.name, [], n_images, n_images)
            return []
        target = engine.class_target(record.name, record.prompt, encode(record), contrast)
        self.out.record_references(slug, target.encodings.paths, target.encodings.hashes, config.dataset.root)
        log.info("class %r: %s, prompt %r, %s to make", record.name, count_of(len(target.encodings.paths), "reference"),
                 record.prompt, count_of(len(indices), "image"))
        if len(target.encodings.paths) < 2 and (unmeasured := one_reference_warning(config, self.method)):
            log.warning("class %r has one reference: %s", record.name, unmeasured)
        blocks = batch_blocks(indices, n_images, config.runtime.batch_size)
        if self.method == "optimize":
            batches = engine.optimize_batches(target, blocks, engine.centre(target))
        else:
            z_global = self.global_seed(record, slug, target) if engine.uses_global_seed else None
            batches = engine.bootstrap_batches(target, blocks, z_global, engine.global_init_seed(target))
        made: list[dict] = []
        for batch in batches:
            if self.stop.requested:
                break
            what = f"{record.name} [{batch.indices[0] + 1}-{batch.indices[-1] + 1}/{n_images}]"
            with self.progress.iterations(batch.iterations, what) as bar:
                results = engine.run_batch(target, batch, progress=bar, should_stop=lambda: self.stop.requested)
            if self.stop.requested:  # the batch did not run all its iterations: the next run redoes it
                break
            written = []
            for i, (index, init_seed, result) in enumerate(zip(batch.indices, batch.init_seeds, results)):
                if index not in indices:  # finished earlier; optimised again only to keep the batch whole
                    continue
                if not result.usable:
                    failed.append(f"{record.name} #{index}")
                    log.error("%s #%d: not written, %s before any finite iterate", record.name, index, result.stopped)
                    continue
                extra = {"method": self.method, "init": config.init.method, "batch": batch.indices,
                         **(batch.extra[i] if batch.extra else {})}
                if result.stopped:
                    extra["stopped"] = result.stopped
                    log.warning("%s #%d: %s; written from its best iterate (%d)", record.name, index,
                                result.stopped, result.best_iteration)
                written.append(self.write_image(record, slug, index, init_seed, result, target, extra))
            if written:
                self.progress.images_done(len(written), sum(e["loss"] for e in written) / len(written))
            made += written
        if not self.stop.requested:  # a class stopped half-way is not done
            self.progress.class_done(record.name, made, n_images - len(indices), n_images)
        return made

    def global_seed(self, record: ClassRecord, slug: str, target: ClassTarget) -> torch.Tensor:
        """The class's z_T^G: read from the run directory, or optimised and saved there."""
        engine, config = self.engine, self.config
        path = self.out.bootstrap_seed_path(slug)
        init_seed = engine.global_init_seed(target)
        if path.is_file():
            shape = engine.models.latent_shape(config.sampler.height, config.sampler.width)
            saved = check_global_seed(path, shape, init_seed)
            if saved is not None:
                return saved
        # Where it starts is found only now: a run that already saved z_T^G needs no inversion.
        centre = engine.centre(target)
        with self.progress.iterations(config.bootstrap.global_iterations, f"{record.name} z_T^G") as bar:
            result = engine.optimize_global_seed(target, centre, progress=bar, should_stop=lambda: self.stop.requested)
        self.stop.check(f"the optimisation of class {record.name!r}'s z_T^G")  # not saved: the next run redoes it
        if not result.usable:
            raise UserError(f"class {record.name!r}: the loss of z_T^G was never finite ({result.stopped}); lower "
                            f"optim.lr or use runtime.dtype=float32")
        metadata = metadata_for(engine.models, config, record, -1, init_seed) | {"bootstrap_loss": repr(result.loss)}
        with self.out.writing(path):
            save_seed_file(path, result.initial, result.optimized, metadata)
        log.info("%s: z_T^G after %d iterations, loss %.4f -> %.4f", record.name, len(result.loss_history),
                 result.loss_history[0], result.loss)
        return result.optimized

    def write_image(self, record: ClassRecord, slug: str, index: int, init_seed: int, result: SeedResult,
                    target: ClassTarget, extra: dict) -> dict:
        """Render the best seed, then write seed file, image, and last the manifest line."""
        out, models = self.out, self.engine.models
        image = self.engine.render(target, init_seed, result.optimized)
        metadata = metadata_for(models, self.config, record, index, init_seed)
        seed_path, image_path = out.seed_path(slug, index), out.image_path(slug, index)
        with out.writing(seed_path):
            save_seed_file(seed_path, result.initial, result.optimized, metadata)
        out.save_image(image_path, image, png_text(metadata, result.loss))
        entry = {
            "class": record.name, "prompt": record.prompt,
            "image": image_path.relative_to(out.root).as_posix(),
            "seed_file": seed_path.relative_to(out.root).as_posix(),
            "index": index, "init_seed": init_seed, "iterations": len(result.loss_history),
            "loss": result.loss, "loss_history": result.loss_history,
            "semantic_loss": result.semantic_loss, "appearance_loss": result.appearance_loss,
            "best_iteration": result.best_iteration, "seconds": round(result.seconds, 4), **extra,
        }
        if record.label is not None:
            entry["dataset_label"] = record.label
        for key, commit in (("model_commit", models.commits.model),
                            ("image_encoder_commit", models.commits.image_encoder)):
            if commit:
                entry[key] = commit
        out.append_manifest(entry)
        return entry


def earlier_commits(entries: Iterable[dict]) -> HubCommits:
    """The Hub commits of the weights a run's finished images were drawn with (the first entry's that says them),
    for a resumed run to load again: a branch that moved since would otherwise mix two models' images in one run."""
    found: dict[str, str] = {}
    for entry in entries:
        for key in ("model_commit", "image_encoder_commit"):
            value = entry.get(key)
            if key not in found and is_commit(value):
                found[key] = value
    return HubCommits(found.get("model_commit"), found.get("image_encoder_commit"))


def check_global_seed(path: Path, shape: tuple[int, ...], init_seed: int) -> torch.Tensor | None:
    """A saved z_T^G, if it is one this run would have made: a seed file of the run's latent shape, finite,
    from the class's own init seed. Anything else is made again, and the log says why."""
    try:
        saved = load_seed_file(path)
    except UserError as exc:
        log.warning("%s is damaged (%s); optimising z_T^G again", path, exc)
        return None
    problem = None
    if tuple(saved.optimized.shape) != tuple(shape):
        problem = f"its shape {tuple(saved.optimized.shape)} is not the run's {tuple(shape)}"
    elif not torch.isfinite(saved.optimized).all():
        problem = "it holds values that are not finite"
    elif saved.metadata.get("init_seed") != str(init_seed):
        problem = "it was drawn from another init seed"
    if problem:
        log.warning("%s does not fit this run (%s); optimising z_T^G again", path, problem)
        return None
    return saved.optimized
