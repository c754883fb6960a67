"""The frozen components: load them from a Hub id or a local folder, or build tiny random ones.

Every component is frozen (`requires_grad_(False)`, eval mode); the seed is the only tensor the
optimiser ever sees. `model.pretrained=tiny` selects the small random components of `tiny.py`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Iterator
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
from seedselect_cli.hub import (
    DIFFUSERS,
    IMAGE_ENCODER,
    LOAD_ERRORS,
    SD_MODEL,
    TRANSFORMERS,
    conversion,
    hub_commit,
    offline_for,
    weights_not_available,
    why_offline,
)

log = logging.getLogger(__name__)

TINY = "tiny"
TINY_SDXL = "tiny_sdxl"  # the same, in SDXL's shape: two text encoders, pooled embedding, added time ids



def compile_models(models: FrozenModels, mode: str | None = None) -> FrozenModels:
    """`torch.compile` the networks the optimisation runs through, in place (their types and configs
    stay; the first call of each new batch shape compiles). `mode` is torch.compile's. The UNet and
    the VAE go to channels-last memory, the layout this was measured with (BENCHMARKS.md). Inductor
    keeps what it compiled in `$TORCHINDUCTOR_CACHE_DIR` for later processes to reuse."""
    log.info("torch.compile: the networks compile on their first calls (%s); Inductor's kernel cache: %s "
             "(TORCHINDUCTOR_CACHE_DIR)",
             "minutes on a GPU without cached kernels" if models.device.type != "cpu" else
             "on a CPU longer than a short run saves: one demo image took 95 s against 12 s uncompiled",
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
    offline = offline_for(source, SD_MODEL, key, DIFFUSERS, cfg.local_files_only, revision,
                          cfg.variant)
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
    except LOAD_ERRORS as exc:
        raise weights_not_available(SD_MODEL, key, cfg.pretrained, exc,
                                    why_offline(offline, cfg.local_files_only), revision=commit or revision,
                                    variant=cfg.variant, single_file=conversion(source, key)) from None


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
              "local_files_only": offline_for(source, IMAGE_ENCODER, "model.image_encoder", TRANSFORMERS,
                                              cfg.local_files_only, revision)}
    try:
        with quiet_libraries():  # a two-tower checkpoint's text weights go unused: no report
            encoder = whole(CLIPVisionModelWithProjection.from_pretrained(
                source, dtype=dtype, use_safetensors=True, output_loading_info=True, **kwargs),
                "image encoder", "model.image_encoder", cfg.image_encoder)
            processor = AutoImageProcessor.from_pretrained(source, backend="pil", **kwargs)
    except LOAD_ERRORS as exc:
        raise weights_not_available(IMAGE_ENCODER, "model.image_encoder", cfg.image_encoder, exc,
                                    why_offline(kwargs["local_files_only"], cfg.local_files_only),
                                    TRANSFORMERS, revision) from None
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


def size_warning(models: FrozenModels, height: int, width: int) -> str | None:
    """What to say where the sampler's size is far from the one the model's UNet is made for (its `sample_size` in
    pixels, diffusers' pipelines' default size): under half or over twice it on a side, where Stable Diffusion
    draws noise or repeated parts (`--config-name toyworld model.pretrained=/models/sd15` keeps the toy world's
    32 px: a folder given as the key brings no sampler, as `model=sd15` does). Half is no slip: SDXL-Turbo draws
    512 px with SDXL's UNet of 1024."""
    native = models.unet.config.sample_size * models.vae_scale_factor
    if all(native / 2 <= side <= native * 2 for side in (height, width)):
        return None
    return (f"sampler.height={height} and sampler.width={width} are far from the {native}x{native} px the model's "
            f"UNet is made for (its sample_size): its images at this size are noise or repeated parts; set them "
            f"near {native}, or choose the model's own sampler option (sampler=NAME)")


def check_steps(scheduler: DDIMScheduler, steps: int, key: str) -> None:
    """`steps` sampling steps fit the scheduler's training timesteps."""
    trained = scheduler.config.num_train_timesteps
    if steps > trained:
        raise UserError(f"{key}={steps} is invalid: the model's scheduler was trained with {trained} timesteps; "
                        f"use at most {trained}")
