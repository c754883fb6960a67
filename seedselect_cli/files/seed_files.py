"""The seed file: z_T before and after optimisation, and everything `generate` needs to redraw it.

A safetensors file with float32 tensors `initial` and `optimized`, each (C, H/f, W/f), and string
metadata: prompt, model, steps, guidance scale, size, scheduler (with its full config), dtype.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError, safe_open

if TYPE_CHECKING:  # torch where tensors are read or written: the paths' checks answer a bad value without it
    import torch

from seedselect_cli.errors import UserError, first_line
from seedselect_cli.files.atomic import atomic_write
from seedselect_cli.files.images import IMAGE_SUFFIXES
from seedselect_cli.limits import DTYPE_NAMES, MAX_SIDE, MAX_STEPS, SAMPLER_NAMES, is_commit

# a sampler's diffusers class (recorded, as tools that read the file expect) and its name in PNG `parameters`
SAMPLER_CLASSES = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler",
                   "lcm": "LCMScheduler"}
SAMPLER_LABELS = {"ddim": "DDIM", "euler": "Euler", "dpmpp_2m": "DPM++ 2M", "lcm": "LCM"}

FORMAT = "seedselect-seed/1"
REQUIRED = ("prompt", "model", "steps", "guidance_scale", "height", "width", "scheduler_config", "dtype")
# the libraries whose kernels and schedulers make the pixels: recorded, so that `generate` can say when it redraws
# with others (the same seed, but not necessarily the same pixels)
LIBRARIES = ("torch", "diffusers")


def library_versions() -> dict[str, str]:
    """{"torch_version": ..., "diffusers_version": ...} of this process."""
    return {f"{name}_version": installed_version(name) for name in LIBRARIES}


def seed_metadata(*, prompt: str, negative_prompt: str, class_name: str, index: int, init_seed: int, model: str,
                  model_revision: str | None, model_commit: str | None, model_variant: str | None, steps: int,
                  guidance_scale: float, height: int, width: int, sampler: str, scheduler_config: str, dtype: str,
                  device: str, version: str, cpu_threads: int | None = None) -> dict[str, str]:
    """What a seed file records so that `generate` can redraw its image without the run's config: every
    value a string, as safetensors metadata holds them (`index` -1 is a class's bootstrap seed z_T^G).
    `scheduler_config` is the model's own scheduler config, from which `sampler` (a `sampler.name`) is built;
    `model_commit` the Hub commit its weights came from (None: a folder); `cpu_threads` the threads it was drawn
    with on a CPU (None: on a GPU). The versions of torch and diffusers that drew it are added
    (`library_versions`)."""
    return {
        "prompt": prompt, "negative_prompt": negative_prompt, "class": class_name, "index": str(index),
        "init_seed": str(init_seed), "model": model, "model_revision": model_revision or "",
        "model_commit": model_commit or "",
        "model_variant": model_variant or "", "steps": str(steps), "guidance_scale": repr(float(guidance_scale)),
        "height": str(height), "width": str(width), "sampler": sampler, "scheduler": SAMPLER_CLASSES[sampler],
        "scheduler_config": scheduler_config,
        "dtype": dtype, "device": device, "seedselect_version": version, **library_versions(),
        **({"cpu_threads": str(cpu_threads)} if cpu_threads else {}),
    }


def png_text(metadata: dict[str, str], loss: float | None = None) -> dict[str, str]:
    """An image's PNG text chunks: `parameters` in the form other Stable Diffusion tools write, and the
    seed file's metadata (`loss`: the seed's, where it is known)."""
    parameters = (
        f"{metadata['prompt']}\nNegative prompt: {metadata['negative_prompt']}\n"
        f"Steps: {metadata['steps']}, Sampler: {SAMPLER_LABELS[metadata.get('sampler', 'ddim')]}, "
        f"CFG scale: {metadata['guidance_scale']}, "
        f"Seed: {metadata['init_seed']}, Size: {metadata['width']}x{metadata['height']}, "
        f"Model: {metadata['model']}" + (f", SeedSelect loss: {loss:.6g}" if loss is not None else "")
    )
    return {"parameters": parameters, "seedselect": json.dumps(metadata, sort_keys=True)}


@dataclass
class SeedFile:
    initial: torch.Tensor
    optimized: torch.Tensor
    metadata: dict[str, str]

    @property
    def steps(self) -> int:
        return int(self.metadata["steps"])

    @property
    def guidance_scale(self) -> float:
        return float(self.metadata["guidance_scale"])

    @property
    def sampler(self) -> str:
        return self.metadata.get("sampler", "ddim")  # files written before there was a choice: DDIM

    @property
    def height(self) -> int:
        return int(self.metadata["height"])

    @property
    def width(self) -> int:
        return int(self.metadata["width"])

    @property
    def scheduler_config(self) -> dict:
        return json.loads(self.metadata["scheduler_config"])


def save_seed_file(path: Path, initial: torch.Tensor, optimized: torch.Tensor, metadata: dict) -> None:
    """Write a seed file atomically (it appears whole or not at all)."""
    from safetensors.torch import save_file

    tensors = {"initial": initial.detach().float().cpu().contiguous(),
               "optimized": optimized.detach().float().cpu().contiguous()}
    meta = {"format": FORMAT, **{k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def check_seed_path(path: Path) -> None:
    """`seed_file=` names a file that may be a seed file, before it is read: `UserError` for a folder, a missing
    file or an image (naming its seed file where there is one)."""
    if path.is_dir():  # a run directory, its seeds/ or a class's folder there
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("seeds/*/*.safetensors")) or \
            sorted(path.glob("*/*.safetensors"))
        example = files[0] if files else "RUN/seeds/<class>/<index>.safetensors"
        raise UserError(f"seed_file={path} is a folder; pass one seed file, e.g. seed_file={example}")
    if not path.is_file():
        raise UserError(f"seed_file={path} does not exist; pass RUN/seeds/<class>/<index>.safetensors")
    if path.suffix.lower() in IMAGE_SUFFIXES:  # e.g. RUN/images/<class>/<index>.png
        seed = path.parent.parent.parent / "seeds" / path.parent.name / f"{path.stem}.safetensors"
        raise UserError(f"seed_file={path} is an image; its seed file is {seed}" if seed.is_file() else
                        f"seed_file={path} is an image; pass its seed file, RUN/seeds/<class>/<index>.safetensors")


def seed_files_in(folder: Path) -> list[Path]:
    """The seed files under `folder` (at any depth, hidden ones passed over), sorted."""
    return [p for p in sorted(folder.rglob("*.safetensors"))
            if not any(part.startswith(".") for part in p.relative_to(folder).parts)]


def load_seed_file(path: str | Path) -> SeedFile:
    """Read and check a seed file; `UserError` if it is missing, not safetensors, or malformed: tensors
    of another dtype or shape or with values that are not finite, metadata out of range."""
    import torch
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    check_seed_path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"seed_file={path} is not a safetensors seed file ({first_line(exc)}); pass a seed file "
                        f"that seedselect wrote") from None
    missing = [k for k in ("initial", "optimized") if k not in tensors] + [k for k in REQUIRED if k not in metadata]
    if missing:
        raise UserError(f"seed_file={path} is not a seedselect seed file: {', '.join(missing)} missing")
    initial, optimized = tensors["initial"], tensors["optimized"]
    for name, tensor in (("initial", initial), ("optimized", optimized)):
        if tensor.dtype != torch.float32:
            raise UserError(f"seed_file={path}: {name} is {str(tensor.dtype).removeprefix('torch.')}, not float32; "
                            f"the file is damaged")
        if not torch.isfinite(tensor).all():
            raise UserError(f"seed_file={path}: {name} holds values that are not finite; the file is damaged")
    if initial.ndim != 3 or initial.shape != optimized.shape:
        raise UserError(f"seed_file={path}: seeds must be two tensors of one shape (C, H, W), "
                        f"got {tuple(initial.shape)} and {tuple(optimized.shape)}")
    problem = metadata_problem(metadata)
    if problem:
        raise UserError(f"seed_file={path}: its metadata {problem}; the file is damaged or not seedselect's")
    return SeedFile(initial=initial, optimized=optimized, metadata=metadata)


def metadata_problem(metadata: dict[str, str]) -> str | None:
    """What is wrong with a seed file's metadata (read back from disk: untrusted), or None."""
    def integer(key: str, low: int, high: int) -> str | None:
        text = metadata[key]
        if not text.strip().isdigit() or not low <= int(text) <= high:
            return f"{key}={text!r} is not a whole number between {low} and {high}"
        return None

    for key, low, high in (("steps", 1, MAX_STEPS), ("height", 8, MAX_SIDE), ("width", 8, MAX_SIDE)):
        if problem := integer(key, low, high):
            return problem
    try:
        guidance = float(metadata["guidance_scale"])
    except ValueError:
        guidance = math.nan
    if not (math.isfinite(guidance) and 0 <= guidance <= 100):
        return f"guidance_scale={metadata['guidance_scale']!r} is not a number between 0 and 100"
    if metadata["dtype"] not in DTYPE_NAMES:
        return f"dtype={metadata['dtype']!r} is not one of {', '.join(DTYPE_NAMES)}"
    if not metadata.get("init_seed", "0").strip().isdigit():
        return f"init_seed={metadata['init_seed']!r} is not a whole number"
    if metadata.get("sampler", "ddim") not in SAMPLER_NAMES:
        return f"sampler={metadata['sampler']!r} is not one of {', '.join(SAMPLER_NAMES)}"
    if not metadata["model"].strip():
        return "names no model"
    if metadata.get("model_commit") and not is_commit(metadata["model_commit"]):
        return f"model_commit={metadata['model_commit']!r} is not a Hub commit id (40 hexadecimal digits)"
    try:
        scheduler = json.loads(metadata["scheduler_config"])
    except (json.JSONDecodeError, RecursionError):
        return "scheduler_config is not JSON"
    if not isinstance(scheduler, dict):
        return "scheduler_config is not a JSON object"
    train_steps = scheduler.get("num_train_timesteps", 1000)
    if type(train_steps) is not int or not int(metadata["steps"]) <= train_steps <= 100_000:
        return (f"scheduler_config's num_train_timesteps={train_steps!r} is not a whole number from "
                f"steps={metadata['steps']} to 100000")
    return None
