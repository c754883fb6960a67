"""A hostile round, kept: each case as a user or an attacker tried it, one row of a table.

Every row asserts the exit code, the one stderr line, and what is on disk before and after: the
folder the case prepared (the user's files, a planted link's target) is byte for byte as it was.
Cases that need a finished run share one, copied per case; cases that need processes running side
by side or signals live in test_concurrency.py.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from seedselect_cli.cli import main
from seedselect_cli.files.assets import asset_path
from tests.conftest import random_image
from tests.layouts import make_cub
from tests.runs import QUICK

pytestmark = pytest.mark.slow  # minutes together: the quick loop (`pytest -m "not slow"`) leaves it out

TINY = ["--config-name=tiny", *QUICK, "n_images=1"]
SEED_META = {"prompt": "x", "model": "tiny", "steps": "2", "guidance_scale": "7.5", "height": "32", "width": "32",
             "scheduler_config": "{}", "dtype": "float32", "format": "seedselect-seed/1"}


def tree(root: Path) -> dict[str, str]:
    """Every file, folder and link under `root` (hidden ones too) with its content's hash or link target."""
    out = {}
    for path in sorted(root.rglob("*")):
        key = path.relative_to(root).as_posix()
        if path.is_symlink():
            out[key] = f"-> {os.readlink(path)}"
        elif path.is_dir():
            out[key] = "dir"
        elif path.stat().st_size > 2**26:  # the sparse 2 GiB image: its size and time stand for its content
            out[key] = f"{path.stat().st_size} bytes, modified {path.stat().st_mtime_ns}"
        else:
            out[key] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return out


@dataclass
class Case:
    args: list[str]  # after `seedselect`; {tmp}, {inputs} and {run} are filled in
    line: str  # what the one stderr line says
    prepare: Callable[[Path, Path], None] | None = None  # (tmp, inputs): the user's files, planted links
    code: int = 2
    env: dict[str, str] = field(default_factory=dict)
    needs_run: bool = False  # {run}: a copy of a finished tiny run, inside tmp


def _files(files: dict[str, str | bytes]) -> Callable[[Path, Path], None]:
    def prepare(tmp: Path, _inputs: Path) -> None:
        for name, content in files.items():
            path = tmp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return prepare


def _seed(name: str, **meta: str) -> Callable[[Path, Path], None]:
    def prepare(tmp: Path, _inputs: Path) -> None:
        save_file({"initial": torch.randn(4, 4, 4), "optimized": torch.randn(4, 4, 4)}, tmp / name,
                  metadata={**SEED_META, **meta})
    return prepare


def _link(name: str, target: str, directory: bool) -> Callable[[Path, Path], None]:
    def prepare(tmp: Path, _inputs: Path) -> None:
        (tmp / "outside").mkdir(exist_ok=True)
        if directory:
            (tmp / target).mkdir(parents=True, exist_ok=True)
        else:
            (tmp / target).write_text("the user's file\n")
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).symlink_to(os.path.relpath(tmp / target, (tmp / name).parent))
    return prepare


def _cub(edit: Callable[[Path], None]) -> Callable[[Path, Path], None]:
    def prepare(tmp: Path, _inputs: Path) -> None:
        edit(make_cub(tmp / "cub"))
    return prepare


def _write(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda root: (root / name).write_bytes(data)


def _refs(files: dict[str, bytes | str | None]) -> Callable[[Path, Path], None]:
    """A reference folder `tmp/refs` with these files (None: a random good PNG; "->": a link to a text file;
    "sparse": a 2 GiB file that stores nothing)."""
    def prepare(tmp: Path, _inputs: Path) -> None:
        refs = tmp / "refs"
        refs.mkdir()
        for name, content in files.items():
            if content is None:
                random_image(np.random.default_rng(len(name)), (40, 40)).save(refs / name, format="PNG")
            elif isinstance(content, str) and content.startswith("->"):
                (tmp / "notes.txt").write_text("not an image")
                (refs / name).symlink_to(tmp / "notes.txt")
            elif content == "sparse":
                with open(refs / name, "wb") as handle:
                    handle.truncate(2 * 2**30)  # 2 GiB, sparse: nothing is really stored
            else:
                (refs / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return prepare


CASES = {
    # --- data loss: a failed command leaves the user's folder as it was ---
    "existing run dir with the user's notes": Case(
        ["optimize", *TINY, "dataset.root=/no/such/folder", "hydra.run.dir=DIR"], "is not an existing folder",
        _files({"DIR/notes.log": "my notes\n"})),
    "hydra.run.dir=. with build.log and .hydra": Case(
        ["optimize", *TINY, "dataset.root=/no/such/folder", "hydra.run.dir=."], "is not an existing folder",
        _files({"build.log": "make: ok\n", ".hydra/config.yaml": "mine: 1\n", "optimize.log": "old lines\n"})),
    "a new nested run dir goes again": Case(
        ["optimize", *TINY, "dataset.root=/no/such/folder", "hydra.run.dir=new/nested/run"],
        "is not an existing folder"),
    "planted link images/<class> to outside": Case(
        ["optimize", *TINY, "hydra.run.dir=run"], "leads outside the run directory",
        _link("run/images/red_disc", "outside/images", directory=True)),
    "planted link references/<class>.sha256 to outside": Case(
        ["optimize", *TINY, "hydra.run.dir=run"], "leads outside the run directory",
        _link("run/references/red_disc.sha256", "outside/sums", directory=False)),
    "planted link manifest.jsonl to outside": Case(
        ["optimize", *TINY, "hydra.run.dir=run"], "leads outside the run directory",
        _link("run/manifest.jsonl", "outside/manifest.jsonl", directory=False)),
    ".lock is a directory": Case(["optimize", *TINY, "hydra.run.dir=run"], "lock", _files({"run/.lock/x": ""})),
    "run dir below a dangling link": Case(
        ["optimize", *TINY, "hydra.run.dir=dangling/run"], "does not exist; create its target",
        lambda tmp, _: (tmp / "dangling").symlink_to(tmp / "nowhere")),
    "a 300-character folder name": Case(["optimize", *TINY, "hydra.run.dir=" + "r" * 300], "over the 255"),
    "run dir holding something else's config.yaml": Case(
        ["optimize", *TINY, "hydra.run.dir=run"], "is not a seedselect run config",
        _files({"run/config.yaml": "- a list\n- not a config\n"})),
    "a refused resume (another loss.lam) leaves .hydra and the log as they were": Case(
        ["optimize", *TINY, "loss.lam=0.5", "hydra.run.dir={run}"], "holds a run made with another config (loss.lam",
        needs_run=True),
    "a refused bootstrap in an optimize run leaves no bootstrap.log": Case(
        ["bootstrap", *TINY, "hydra.run.dir={run}"], "holds images of `seedselect optimize`", needs_run=True),
    # --- sizes ---
    "n_images=10**12": Case(["optimize", *TINY, "n_images=1000000000000"], "n_images=1000000000000 is invalid"),
    "bootstrap.n_images=10**12": Case(["bootstrap", *TINY, "bootstrap.n_images=1000000000000"],
                                      "bootstrap.n_images=1000000000000 is invalid"),
    "sampler.height=65536": Case(["optimize", *TINY, "sampler.height=65536"], "sampler.height=65536 is invalid"),
    "model.pretrained=tiny at the folder config's 512 px on the CPU (a dry run without model=tiny's sampler)": Case(
        ["optimize", "--config-name=folder", "dataset.root={tmp}/refs", "model.pretrained=tiny"],
        "model.pretrained=tiny draws 512x512 images here (the sampler's size): the tiny random components at that "
        "size take hours an image on a CPU", _refs({"a.png": None})),
    "bootstrap of the same": Case(["bootstrap", "--config-name=folder", "dataset.root={tmp}/refs",
                                   "model.pretrained=tiny"], "take model=tiny, which brings its sampler",
                                  _refs({"a.png": None})),
    # --- a group switched under a named config's values ---
    "dataset=folder on the default config, whose classes are the demo's [marsh finch]": Case(
        ["optimize", "dataset=folder", "dataset.root={tmp}/refs"], "dataset=folder keeps the demo config's "
        "dataset.classes=[marsh finch]: the images of", _refs({"a.png": None})),
    "dataset.name=folder on the same, in bootstrap": Case(
        ["bootstrap", "dataset.name=folder", "dataset.root={tmp}/refs"], "use --config-name folder dataset.root=",
        _refs({"a.png": None})),
    "a sparse 2 GiB big.png as the only reference": Case(
        ["optimize", *TINY, "dataset.root={tmp}/refs"], "over the 1 GiB", _refs({"big.png": "sparse"})),
    # --- data-set index files ---
    "CUB classes.txt with a non-numeric id": Case(
        ["optimize", *TINY, "dataset.name=cub", "dataset.root={tmp}/cub"], "classes.txt:2: 'two' is not a whole number",
        _cub(_write("classes.txt", b"1 001.Black_footed_Albatross\ntwo 094.Pine_Warbler\n"))),
    "CUB images.txt that is not UTF-8": Case(
        ["optimize", *TINY, "dataset.name=cub", "dataset.root={tmp}/cub"], "images.txt:1: not UTF-8",
        _cub(_write("images.txt", b"1 caf\xe9/x.jpg\n"))),
    "CUB images.txt naming a path that climbs out": Case(
        ["optimize", *TINY, "dataset.name=cub", "dataset.root={tmp}/cub"], "leads outside dataset.root",
        _cub(_write("images.txt", b"1 ../../../etc/passwd\n"))),
    # --- references ---
    "the only reference is broken and its name holds a newline": Case(
        ["optimize", *TINY, "dataset.root={tmp}/refs"], "bad\\nname.png", _refs({"bad\nname.png": b"garbage"})),
    "a folder of links to non-images": Case(
        ["optimize", *TINY, "dataset.root={tmp}/refs"], "remove it or convert it to PNG", _refs({"a.png": "->", "b.jpg": "->"})),
    "a folder holding an SVG": Case(
        ["optimize", *TINY, "dataset.root={tmp}/refs"], "render vector images", _refs({"shape.svg": "<svg/>"})),
    "a folder of a phone's HEIC photos": Case(
        ["optimize", *TINY, "dataset.root={tmp}/refs"], "convert its photos (IMG_0001.HEIC, IMG_0002.heic) to JPEG or",
        _refs({"IMG_0001.HEIC": b"\0\0\0\x18ftypheic", "IMG_0002.heic": b"\0\0\0\x18ftypheic"})),
    "an imagefolder without class folders": Case(
        ["optimize", *TINY, "dataset.name=imagefolder", "dataset.root={tmp}/refs"], "use --config-name folder",
        _refs({"a.png": None})),
    "images too small": Case(
        ["optimize", *TINY, "dataset.root={tmp}/refs"], "use a larger reference",
        lambda tmp, _: ((tmp / "refs").mkdir(), Image.new("RGB", (4, 4)).save(tmp / "refs" / "dot.png"))),
    # --- generate ---
    "generate: steps='5000'": Case(["generate", "seed_file=s.safetensors", "out=o.png"], "steps='5000'",
                                   _seed("s.safetensors", steps="5000")),
    "generate: steps='0'": Case(["generate", "seed_file=s.safetensors", "out=o.png"], "steps='0'",
                                _seed("s.safetensors", steps="0")),
    "generate: height='abc'": Case(["generate", "seed_file=s.safetensors", "out=o.png"], "height='abc'",
                                   _seed("s.safetensors", height="abc")),
    "generate: num_train_timesteps=0": Case(
        ["generate", "seed_file=s.safetensors", "out=o.png"], "num_train_timesteps=0",
        _seed("s.safetensors", scheduler_config='{"num_train_timesteps": 0}')),
    "generate: out= an existing directory": Case(
        ["generate", "seed_file=s.safetensors", "out=pics.png"], "is a folder; name an image file in it",
        lambda tmp, inputs: (_seed("s.safetensors")(tmp, inputs), (tmp / "pics.png").mkdir())),
    "generate: out= an unwritable place": Case(["generate", "seed_file=s.safetensors", "out=/proc/x.png"],
                                               "cannot be written", _seed("s.safetensors")),
    "generate: a model folder of pickled weights": Case(
        ["generate", "seed_file=s.safetensors", "out=o.png"], "holds pickled weights",
        lambda tmp, inputs: (_seed("s.safetensors", model=str(inputs / "pickled"))(tmp, inputs))),
    "generate: a seed of NaN": Case(
        ["generate", "seed_file=s.safetensors", "out=o.png"], "not finite",
        lambda tmp, _: save_file({"initial": torch.full((4, 4, 4), float("nan")), "optimized": torch.randn(4, 4, 4)},
                                 tmp / "s.safetensors", metadata=SEED_META)),
    "generate: seeds of another dtype": Case(
        ["generate", "seed_file=s.safetensors", "out=o.png"], "is float16, not float32",
        lambda tmp, _: save_file({"initial": torch.randn(4, 4, 4).half(), "optimized": torch.randn(4, 4, 4).half()},
                                 tmp / "s.safetensors", metadata=SEED_META)),
    # --- evaluate ---
    "evaluate: batch_size=0": Case(["evaluate", "run_dir={run}", "batch_size=0"], "batch_size=0 is invalid",
                                   needs_run=True),
    "evaluate: batch_size=-1": Case(["evaluate", "run_dir={run}", "batch_size=-1"], "batch_size=-1 is invalid",
                                    needs_run=True),
    "evaluate: runtime.dtype=float64": Case(["evaluate", "run_dir={run}", "runtime.dtype=float64"],
                                            "runtime.dtype='float64' is invalid", needs_run=True),
    "evaluate: prompt_template='{} {}'": Case(["evaluate", "run_dir={run}", "prompt_template='{} {}'"],
                                              "write {} once", needs_run=True),
    "evaluate: a label_map onto no class of the run": Case(
        ["evaluate", "run_dir={run}", "baseline=false", f"judge.model={asset_path('toyworld/judge')}",
         "+judge.label_map={sea finch: nobody}"], "judge.label_map maps the labels", needs_run=True),
    "evaluate: a label_map without a judge": Case(
        ["evaluate", "run_dir={run}", "+judge.label_map={sea finch: red_disc}"], "but judge.model names no judge",
        needs_run=True),
    "evaluate: a file": Case(["evaluate", "run_dir={tmp}/f.txt"], "is a file; pass the run's folder",
                             _files({"f.txt": "x"})),
    "evaluate: an empty run": Case(["evaluate", "run_dir={tmp}/empty"], "holds no finished images yet; run",
                                   _files({"empty/config.yaml": "seed: 0\n"})),
    # --- environment and shell ---
    "torchrun's RANK=5 of WORLD_SIZE=2": Case(["optimize", *TINY], "RANK='5' and WORLD_SIZE='2'",
                                              env={"RANK": "5", "WORLD_SIZE": "2"}),
    "an unquoted non-ASCII class under --cfg job": Case(
        ["optimize", *TINY, "dataset.classes=[Café]", "--cfg", "job"], "'dataset.classes=[\"Café\"]'"),
    "Hydra's shell completion, which completes programs of one command": Case(
        ["optimize", "--shell-completion", "install=bash"], "shell completion (--shell-completion, -sc) is not "
        "available for seedselect's commands"),
    "-sc without its subcommand (a traceback in Hydra)": Case(["bootstrap", "-sc"], "seedselect bootstrap --help"),
    "Hydra's --experimental-rerun, which unpickles a file": Case(
        ["optimize", "--experimental-rerun", "{tmp}/config.pickle"], "--experimental-rerun is not available: it "
        "unpickles", _files({"config.pickle": "not read"})),
    "Hydra's options between the overrides": Case(
        ["optimize", "n_images=1", "--config-name=tiny", "sampler.steps=3"], "not between them"),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """What cases point at: a folder of pickled weights in the diffusers layout, and a finished tiny run."""
    root = tmp_path_factory.mktemp("hostile-inputs")
    from seedselect_cli.tiny import build_tiny_models

    parts = build_tiny_models()
    for name in ("vae", "unet", "text_encoder"):
        parts[name].save_pretrained(root / "pickled" / name, safe_serialization=False)
    parts["tokenizer"].save_pretrained(root / "pickled" / "tokenizer")
    parts["scheduler"].save_pretrained(root / "pickled" / "scheduler")
    old = Path.cwd()
    os.chdir(root)
    try:
        assert main(["optimize", *TINY, "hydra.run.dir=run"]) == 0
    finally:
        os.chdir(old)
    return root


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_case(name, inputs, tmp_path, monkeypatch, capsys):
    case = CASES[name]
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    if case.prepare:
        case.prepare(tmp_path, inputs)
    if case.needs_run:
        shutil.copytree(inputs / "run", tmp_path / "run", symlinks=True)
    before = tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    fill = {"{tmp}": str(tmp_path), "{inputs}": str(inputs), "{run}": str(tmp_path / "run")}
    args = [functools.reduce(lambda a, kv: a.replace(*kv), fill.items(), arg) for arg in case.args]
    capsys.readouterr()
    assert main(args) == case.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert case.line in lines[0] and "Traceback" not in err
    assert tree(tmp_path) == before, "the command changed what was on disk"


def _mount_tmpfs(path: Path, size: str = "4m") -> None:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=False, capture_output=True)
    if done.returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")


def _remount_read_only(path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)


@pytest.fixture
def mount(tmp_path):
    mounted: list[Path] = []

    def make(name: str) -> Path:
        _mount_tmpfs(tmp_path / name)
        mounted.append(tmp_path / name)
        return tmp_path / name
    yield make
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def test_images_on_a_read_only_mount_are_refused_before_optimising(tmp_path, monkeypatch, capsys, mount):
    run = tmp_path / "run"
    run.mkdir()
    images = mount("run/images")
    _remount_read_only(images)
    monkeypatch.chdir(tmp_path)
    assert main(["optimize", *TINY, "hydra.run.dir=run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not writable" in err[0] and "Read-only file system" in err[0], err
    assert not (run / "seeds").exists() and not (run / "manifest.jsonl").exists()


def test_evaluate_on_a_read_only_mount_says_to_copy_the_run(inputs, tmp_path, monkeypatch, capsys, mount):
    ro = mount("ro")
    shutil.copytree(inputs / "run", ro / "run", symlinks=True)
    _remount_read_only(ro)
    assert main(["evaluate", f"run_dir={ro / 'run'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not writable" in err[0] and "copy the run" in err[0], err


def test_an_immutable_manifest_is_refused_before_optimising(inputs, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    shutil.copytree(inputs / "run", run, symlinks=True)
    if subprocess.run(["chattr", "+i", str(run / "manifest.jsonl")], check=False,
                      capture_output=True).returncode:
        pytest.skip("chattr +i is not available here")
    try:
        before = tree(run)
        monkeypatch.chdir(tmp_path)
        assert main(["optimize", *TINY, "n_images=2", "hydra.run.dir=run"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "manifest.jsonl cannot be written" in err[0] and "chattr -i" in err[0], err
        assert tree(run) == before
    finally:
        subprocess.run(["chattr", "-i", str(run / "manifest.jsonl")], check=True)


@pytest.mark.parametrize("sweep_dir", [None, "sweeps/${now:%Y-%m-%d_%H-%M-%S}"])
def test_a_sweep_stopped_by_a_full_disk_is_told_the_sweep_directory_its_resume_needs(sweep_dir, tmp_path, monkeypatch,
                                                                                    capsys):
    """A sweep left to Hydra's `multirun/<config>/<time>`, or given a folder named after its start: the same command
    alone would start a new sweep folder, so the line names the one to go on in, and the command with it finishes the
    sweep there."""
    import errno

    from seedselect_cli import pipeline

    real = pipeline.save_seed_file

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pipeline, "save_seed_file", no_space)
    sweep = ["optimize", "-m", *TINY, "seed=0,1", *([f"hydra.sweep.dir={sweep_dir}"] if sweep_dir else [])]
    parent = tmp_path / ("sweeps" if sweep_dir else "multirun/tiny")
    assert main(sweep) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    [sweep_dir] = parent.iterdir()
    assert "No space left on device" in line and \
        f"run the same command with hydra.sweep.dir={sweep_dir} again to resume" in line, line
    monkeypatch.setattr(pipeline, "save_seed_file", real)
    assert main([*sweep, f"hydra.sweep.dir={sweep_dir}"]) == 0
    assert len(list(sweep_dir.glob("*/images/red_disc/00000.png"))) == 2
    assert list(parent.iterdir()) == [sweep_dir]


def test_a_disk_that_fills_up_mid_run_ends_in_one_line_and_the_resume_works(tmp_path, monkeypatch, capsys, mount):
    disk = mount("disk")
    monkeypatch.chdir(disk)
    filler = disk / "filler"
    written = []

    from seedselect_cli import pipeline

    real = pipeline.save_seed_file

    def fill_the_disk_after_the_first(path, *args, **kwargs):
        if written:  # the second image: the disk is full now
            with open(filler, "wb") as handle, pytest.raises(OSError):
                while True:
                    handle.write(b"\0" * 65536)
                    handle.flush()
        written.append(path)
        real(path, *args, **kwargs)

    monkeypatch.setattr(pipeline, "save_seed_file", fill_the_disk_after_the_first)
    args = ["optimize", *TINY, "n_images=3", "runtime.batch_size=1"]  # into Hydra's outputs/tiny/<time>
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    [run_dir] = (disk / "outputs" / "tiny").iterdir()
    # the same command alone would start a new folder: the line names the one to resume
    assert len(err) == 1 and "No space left on device" in err[0], err
    assert f"run the same command with hydra.run.dir={run_dir} again to resume" in err[0], err
    filler.unlink()  # space freed
    monkeypatch.setattr(pipeline, "save_seed_file", real)
    assert main([*args, f"hydra.run.dir={run_dir}"]) == 0
    assert sorted(p.name for p in (run_dir / "images" / "red_disc").glob("*.png")) == [
        "00000.png", "00001.png", "00002.png"]
    assert written[0].parent.parent.parent == run_dir and len(list((disk / "outputs" / "tiny").iterdir())) == 1


def test_evaluate_skips_a_broken_reference_that_optimize_skipped(tmp_path, monkeypatch, capsys):
    refs = tmp_path / "refs"
    refs.mkdir()
    random_image(np.random.default_rng(3), (40, 40)).save(refs / "good.png")
    (refs / "broken.png").write_bytes(b"not an image")
    monkeypatch.chdir(tmp_path)
    assert main(["optimize", *TINY, f"dataset.root={refs}", "hydra.run.dir=run"]) == 0
    assert main(["evaluate", "run_dir=run", "baseline=false"]) == 0
    assert "broken.png" in (tmp_path / "run" / "optimize.log").read_text()


def test_evaluate_takes_dtype_auto(inputs, tmp_path, monkeypatch):
    shutil.copytree(inputs / "run", tmp_path / "run", symlinks=True)
    assert main(["evaluate", f"run_dir={tmp_path / 'run'}", "runtime.dtype=auto"]) == 0
    assert (tmp_path / "run" / "report" / "metrics.json").is_file()


def test_a_first_start_that_makes_no_image_takes_back_its_list_of_references(tmp_path, monkeypatch, capsys):
    """RUN/references/<class>.sha256 is written once the class's references are encoded, before its first image:
    a command that then makes none (here every start is not finite) leaves no run directory behind."""
    from seedselect_cli.core import initial_seeds

    real = initial_seeds.initial_noise

    def not_finite(shape, init_seed):
        noise = real(shape, init_seed)
        noise[0, 0, 0] = float("nan")
        return noise

    monkeypatch.setattr(initial_seeds, "initial_noise", not_finite)
    monkeypatch.chdir(tmp_path)
    assert main(["optimize", *TINY, "method=paper", "hydra.run.dir=run"]) == 2
    assert "could not be made" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr(initial_seeds, "initial_noise", real)  # and a run that makes its image keeps the list
    assert main(["optimize", *TINY, "method=paper", "hydra.run.dir=run"]) == 0
    [listed] = (tmp_path / "run" / "references").iterdir()
    assert listed.name == "red_disc.sha256" and len(listed.read_text().splitlines()) >= 1


def test_a_file_system_without_locks_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    """Lustre mounted without `-o flock` (or NFS without its lock service) answers flock with ENOSYS: before, the
    command ended in a traceback; a class's claim would have failed as if another process made it."""
    import errno
    import fcntl

    real = fcntl.flock
    lustre = tmp_path / "lustre"

    def no_locks_on_lustre(fd, operation):
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(lustre)):
            raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
        return real(fd, operation)

    monkeypatch.setattr(fcntl, "flock", no_locks_on_lustre)
    monkeypatch.chdir(tmp_path)
    lustre.mkdir()
    assert main(["optimize", *TINY, f"hydra.run.dir={lustre / 'run'}"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line == (f"error: cannot lock {lustre / 'run' / '.lock'} (Function not implemented): its file system gives "
                    f"no file locks, by which processes share a run directory; pass a hydra.run.dir on a local disk "
                    f"or on a file system mounted with locks (Lustre: -o flock)"), line
    assert list(lustre.iterdir()) == []  # what the command made, taken back
    assert main(["optimize", *TINY, "hydra.run.dir=local"]) == 0  # and on a disk with locks it runs
