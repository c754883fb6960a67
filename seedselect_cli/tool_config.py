"""The config schema of `seedselect generate` and `seedselect evaluate` (the YAML in `tool_configs/`) and their
checks: every value checked before anything is read or loaded, as `config.check_config` checks optimize's and
bootstrap's, each bad one a `UserError` naming the key."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from seedselect_cli.config import DTYPES, check_device, check_template
from seedselect_cli.errors import UserError
from seedselect_cli.files.images import IMAGE_SUFFIXES, WRITTEN_FORMATS, seedselect_metadata
from seedselect_cli.files.run_directory import (
    check_run_path,
    run_folder_holding,
    run_images_of,
    seed_folder,
    sweep_runs,
)
from seedselect_cli.files.seed_files import check_seed_path, seed_files_in
from seedselect_cli.hub import DIFFUSERS, JUDGE, SD_MODEL, TRANSFORMERS, TWO_TOWER_CLIP, check_location
from seedselect_cli.limits import DTYPE_NAMES


def check_redraw_dtype(name: str | None) -> None:
    """`runtime.dtype` of generate and evaluate: a dtype's name, auto, or null (unset) for the seeds' own."""
    if name is not None and name not in DTYPES:
        raise UserError(f"runtime.dtype={name!r} is invalid: choose one of auto, {', '.join(DTYPE_NAMES)} (or leave it "
                        f"unset for the dtype the seeds were made in)")


@dataclass
class JudgeConfig:
    model: str | None = None  # a transformers image-classification model: Hub id or folder
    label_map: dict[str, str] | None = None  # judge label -> run class; else a label names its class (`NameLookup`)


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


def not_a_runs_own(cfg: GenerateConfig, out: Path) -> None:
    """`out` is not among a run directory's own files, unless it is the run's own image of `seed_file` (or its
    images, of a folder of its seeds) drawn as the run drew them: the repair `evaluate` prints for a damaged image.
    Anything else there (`tensor=initial`, another dtype or model) would stand in for the run's image, which its
    manifest describes."""
    folder = run_folder_holding(out)
    if folder is None:
        return
    if runs_own(cfg, out) and cfg.tensor == "optimized" and cfg.runtime.dtype is None and cfg.model is None:
        return
    raise UserError(f"out={cfg.out} is in {folder}, which holds the run's own files and is written by its commands "
                    f"alone (and by generate only as the run drew them, at their own places): choose a place outside "
                    f"it, e.g. out={folder.parent / 'redrawn'}")


def runs_own(cfg: GenerateConfig, out: Path) -> bool:
    """Whether `out` is where the run keeps the image of `seed_file` (or the images of a folder of its seeds)."""
    own = run_images_of(seed_folder(Path(cfg.seed_file).expanduser()))
    return own is not None and out.absolute() == own.absolute()


def check_output(cfg: GenerateConfig) -> Path:
    """`out=`: an image file name with a known suffix, in a folder that exists and takes a new file, not among a
    run's own files (`not_a_runs_own`), and not a file that is not an image seedselect drew (a reference, a photo):
    generate replaces its own images only (and a run's damaged image, redrawn as its run drew it)."""
    out_arg = cfg.out
    out = Path(out_arg).expanduser()
    not_a_runs_own(cfg, out)
    if out.suffix.lower() not in WRITTEN_FORMATS:
        raise UserError(f"out={out_arg}: name an image file ending in {', '.join(WRITTEN_FORMATS)}")
    if out.is_dir():
        raise UserError(f"out={out_arg} is a folder; name an image file in it, e.g. out={out / 'image.png'}")
    if (out.exists() or out.is_symlink()) and not runs_own(cfg, out) and seedselect_metadata(out) is None:
        raise UserError(f"out={out_arg} exists and is not an image seedselect drew; generate replaces only its own: "
                        f"choose another name, or move the file away")
    takes_new_files(out_arg, out.parent)
    return out


def takes_new_files(out_arg: str, folder: Path) -> None:
    """`folder`, where `out=` writes, exists and takes a new file (a probe is written and removed): else one line."""
    if not folder.is_dir():
        raise UserError(f"out={out_arg}: the folder {folder} does not exist; create it or choose another")
    probe = folder / f".probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"out={out_arg} cannot be written ({exc.strerror or exc}); choose another place") from None


def check_generate(cfg: GenerateConfig) -> Path:
    """Every value of `seedselect generate`, before anything is read or loaded; returns the output path (a folder
    where `seed_file` is one)."""
    if cfg.tensor not in ("optimized", "initial"):
        raise UserError(f"tensor={cfg.tensor!r} is invalid: choose optimized or initial")
    check_redraw_dtype(cfg.runtime.dtype)
    check_device(cfg.runtime.device)
    check_location(SD_MODEL, "model", cfg.model, DIFFUSERS, convertible=True)
    if Path(cfg.seed_file).expanduser().is_dir():
        if not seed_files_in(seed_folder(Path(cfg.seed_file).expanduser())):
            raise UserError(f"seed_file={cfg.seed_file} is a folder without seed files (.safetensors); pass a run's "
                            f"seeds folder (RUN/seeds) or one seed file")
        return check_output_folder(cfg)
    check_seed_path(Path(cfg.seed_file).expanduser())
    return check_output(cfg)


def check_output_folder(cfg: GenerateConfig) -> Path:
    """`out=` for a folder of seed files: a folder that takes new files, or a new one in a folder that exists, not
    among a run's own files (`not_a_runs_own`)."""
    out_arg = cfg.out
    out = Path(out_arg).expanduser()
    not_a_runs_own(cfg, out)
    if out.suffix.lower() in IMAGE_SUFFIXES | WRITTEN_FORMATS.keys() or out.is_file():
        raise UserError(f"out={out_arg} names a file, but seed_file={cfg.seed_file} is a folder: name a folder for its "
                        f"images (e.g. out={out.with_suffix('')}), or pass one seed file")
    takes_new_files(out_arg, out if out.is_dir() else out.parent)
    return out


@dataclass
class EvaluateRuntime:
    device: str = "auto"
    dtype: str | None = None  # for rendering the baseline; None: the dtype the run's seeds were made in


@dataclass
class EvaluateConfig:
    run_dir: str = "???"
    classes: list[str] | None = None  # zero-shot among these class names; None: the run's classes
    classes_file: str | None = None  # the same, one name a line (blank lines and # comments passed over)
    dataset_classes: bool = False  # zero-shot among every class of the run's data set (e.g. all 200 of CUB)
    prompt_template: str | None = None  # None: the run's dataset.prompt_template
    heldout: str | None = None  # real images as <heldout>/<class>/<image>; None: the run's dataset.heldout
    dataset_root: str | None = None  # where the run's data set is here; None: the run's dataset.root
    model: str | None = None  # the Stable Diffusion weights for the baseline (folder or Hub id); None: the run's
    clip: str | None = None  # the two-tower CLIP that judges; None: the run's model.image_encoder
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    baseline: bool = True  # render plain Stable Diffusion from the seeds before optimisation
    # score the first N images of each class (of both sets, which stay comparable); None: every image. Of a bulk set
    # of 500 images a class, 50 cost a tenth of the rendering, CLIP and judge calls
    images_per_class: int | None = None
    decoder_ceiling: bool = False  # score the held-out images' VAE round trips: the precision the decoder allows
    top_k: int = 5
    batch_size: int = 16  # images per CLIP, judge, VAE and baseline batch
    runtime: EvaluateRuntime = field(default_factory=EvaluateRuntime)


def check_evaluate(cfg: EvaluateConfig) -> None:
    """Every value of `seedselect evaluate`, before anything is read or loaded; `run_dir` names a run directory."""
    if cfg.top_k < 1:
        raise UserError(f"top_k={cfg.top_k} is invalid: must be at least 1")
    if cfg.images_per_class is not None and cfg.images_per_class < 1:
        raise UserError(f"images_per_class={cfg.images_per_class} is invalid: must be at least 1 (null: every image)")
    if not 1 <= cfg.batch_size <= 1024:
        raise UserError(f"batch_size={cfg.batch_size} is invalid: must be between 1 and 1024")
    if cfg.classes and cfg.classes_file is not None:
        raise UserError("classes and classes_file both name the classes to classify among: pass one of them")
    if cfg.prompt_template is not None:
        check_template("prompt_template", cfg.prompt_template)
    check_redraw_dtype(cfg.runtime.dtype)
    check_device(cfg.runtime.device)
    if not sweep_runs(Path(cfg.run_dir).expanduser()):  # a sweep's folder: each of its runs, checked as it comes
        check_run_path(Path(cfg.run_dir).expanduser())
    check_location(SD_MODEL, "model", cfg.model, DIFFUSERS, convertible=True)
    check_location(TWO_TOWER_CLIP, "clip", cfg.clip, TRANSFORMERS)
    check_location(JUDGE, "judge.model", cfg.judge.model, TRANSFORMERS)
    if cfg.judge.label_map and cfg.judge.model is None:  # else the map is dropped, and no judge scores anything
        raise UserError("judge.label_map maps a judge's labels to classes, but judge.model names no judge: pass "
                        "judge.model=HUB_ID_OR_FOLDER (any transformers image classifier) too, or leave the map out")
    if cfg.heldout is not None and not Path(cfg.heldout).expanduser().is_dir():
        raise UserError(f"heldout={cfg.heldout} is not an existing folder: pass a folder of DIR/<class>/<image>, "
                        f"or leave heldout out for the data set's own held-out images")
