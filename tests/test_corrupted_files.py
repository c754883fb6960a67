"""Everything read back from disk is untrusted: a property-style check over every kind of file the tool
reads back and every kind of damage.

For each (file, damage) the command run again must either refuse with the one `error:` line and exit
code 2, or warn and compute the damaged part again, ending with exactly the images and seeds of an
undamaged run (which are deterministic). What it may never do is use the damaged file silently.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from seedselect_cli.cli import main
from tests.layouts import make_cub

pytestmark = pytest.mark.slow  # minutes together: the quick loop (`pytest -m "not slow"`) leaves it out

# the paper's bootstrap (`method=paper`) with NAO starts: a run that writes z_T^G and fills both caches
COMMAND = ["bootstrap", "--config-name=cub_tail", "method=paper", "model=tiny", "sampler=tiny", "sampler.steps=3",
           "runtime.device=cpu", "bootstrap.n_images=2", "bootstrap.global_iterations=2", "bootstrap.iterations=2",
           "runtime.batch_size=2", "runtime.progress=false", "dataset.classes=[Pine Warbler]"]


# --- the kinds of damage ----------------------------------------------------------------------------


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garbage(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 8)


def _rewrite_tensors(path: Path, change: Callable[[torch.Tensor], torch.Tensor]) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    save_file({k: change(v).contiguous() for k, v in load_file(path).items()}, path, metadata=metadata)


def wrong_shape(path: Path) -> None:
    _rewrite_tensors(path, lambda t: torch.randn(*(s + 1 for s in t.shape)))


def wrong_dtype(path: Path) -> None:
    _rewrite_tensors(path, lambda t: t.half())


def nan(path: Path) -> None:
    _rewrite_tensors(path, lambda t: torch.full_like(t, float("nan")))


def infinite(path: Path) -> None:
    _rewrite_tensors(path, lambda t: torch.full_like(t, float("inf")))


def manifest_lines_of_another_shape(path: Path) -> None:
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    bad = [{**entries[0], "index": "0"}, {**entries[0], "class": 7}, {**entries[1], "image": "../../../etc/passwd"},
           {**entries[1], "seed_file": "/etc/passwd"}, [1, 2], "text", {"index": float("nan")}]
    path.write_text("".join(json.dumps(e) + "\n" for e in bad))


def manifest_path_that_climbs_out(path: Path) -> None:
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({**e, "image": f"../../outside/{i}.png"}) + "\n" for i, e in enumerate(entries)))


def config_of_another_type(path: Path) -> None:
    path.write_text(path.read_text().replace("n_images: 1", "n_images: many"))


TENSOR_DAMAGE = [truncate, garbage, wrong_shape, wrong_dtype, nan, infinite]


# --- the files, and where each lies --------------------------------------------------------------


def _cache_entries(folder: str) -> Callable[[Path], list[Path]]:
    def find(work: Path) -> list[Path]:
        return [p for p in (work / "cache").rglob("*.safetensors") if (folder in p.parts) == (folder == "inversions")]
    return find


REDO, REFUSE = "made again", "refused"
FILES: dict[str, tuple[Callable[[Path], list[Path]], list[Callable[[Path], None]], str]] = {
    # name: (the files in a finished work folder, the damage done to them, what the next run must do)
    "z_T^G": (lambda w: list((w / "run" / "bootstrap").glob("*.safetensors")), TENSOR_DAMAGE, REDO),
    "reference cache entries": (_cache_entries("references"), TENSOR_DAMAGE, REDO),
    "inversion cache entries": (_cache_entries("inversions"), TENSOR_DAMAGE, REDO),
    "manifest": (lambda w: [w / "run" / "manifest.jsonl"],
                 [truncate, garbage, manifest_lines_of_another_shape, manifest_path_that_climbs_out], REDO),
    "run config": (lambda w: [w / "run" / "config.yaml"], [truncate, garbage, config_of_another_type], REFUSE),
    "CUB index file": (lambda w: [w / "CUB_200_2011" / "images.txt"], [garbage], REFUSE),
}


def fingerprint(run: Path) -> dict[str, str]:
    """The run's images and seeds, by content (a safetensors header's key order is not fixed)."""
    from safetensors import safe_open

    out = {p.relative_to(run).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
           for p in sorted(run.glob("images/*/*.png"))}
    for path in sorted(run.glob("seeds/*/*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            parts = [json.dumps(handle.metadata(), sort_keys=True).encode()]
            parts += [handle.get_tensor(k).numpy().tobytes() for k in sorted(handle.keys())]
        out[path.relative_to(run).as_posix()] = hashlib.sha256(b"".join(parts)).hexdigest()
    return out


def copy_work(clean: Path, work: Path) -> Path:
    """A copy of the clean work folder whose run config names the copy's data set."""
    shutil.copytree(clean, work, symlinks=True)
    config = work / "run" / "config.yaml"
    config.write_text(config.read_text().replace(str(clean), str(work)))
    return work


def run_command(work: Path, monkeypatch) -> int:
    monkeypatch.chdir(work)
    monkeypatch.setenv("SEEDSELECT_CACHE_DIR", str(work / "cache"))
    return main([*COMMAND, f"dataset.root={work / 'CUB_200_2011'}", "init=nao", "hydra.run.dir=run"])


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("clean")
    make_cub(work / "CUB_200_2011")
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert run_command(work, monkeypatch) == 0
    assert list((work / "cache").rglob("*.safetensors")), "the run filled its cache"
    return work


CASES = [(name, damage) for name, (_, damages, _) in FILES.items() for damage in damages]


@pytest.mark.parametrize(("name", "damage"), CASES, ids=[f"{n}-{d.__name__}" for n, d in CASES])
def test_damaged_files_are_refused_or_made_again_never_used(name, damage, clean, tmp_path, monkeypatch, capsys):
    work = copy_work(clean, tmp_path / "work")
    find, _, outcome = FILES[name]
    targets = find(work)
    assert targets, f"no {name} in a finished run"
    if outcome == REDO and name != "manifest":  # the run needs the damaged file again
        for folder in ("images", "seeds", *(["bootstrap"] if "cache" in name else [])):
            shutil.rmtree(work / "run" / folder)
        (work / "run" / "manifest.jsonl").unlink()
    for path in targets:
        damage(path)
    capsys.readouterr()
    code = run_command(work, monkeypatch)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if outcome == REFUSE:
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
        return
    assert code == 0, err
    assert fingerprint(work / "run") == fingerprint(clean / "run"), "a damaged file changed the images"
    log = (work / "run" / "bootstrap.log").read_text()
    if name != "manifest":  # a damaged manifest line is an unfinished image: made again
        assert "again" in log, f"the damage to the {name} went unsaid"
    entries = [json.loads(line) for line in (work / "run" / "manifest.jsonl").read_text().splitlines()]
    assert sorted((e["class"], e["index"]) for e in entries) == [("Pine Warbler", 0), ("Pine Warbler", 1)]
    assert not (tmp_path / "outside").exists()


def test_a_damaged_seed_file_is_refused_by_generate(clean, tmp_path, monkeypatch, capsys):
    for damage in TENSOR_DAMAGE:
        seed = tmp_path / f"{damage.__name__}.safetensors"
        shutil.copy(next((clean / "run" / "seeds").rglob("*.safetensors")), seed)
        damage(seed)
        monkeypatch.chdir(tmp_path)
        capsys.readouterr()
        assert main(["generate", f"seed_file={seed}", "out=x.png"]) == 2, damage.__name__
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: seed_file="), (damage.__name__, lines)
        assert not (tmp_path / "x.png").exists()


def test_a_damaged_baseline_image_is_rendered_again(clean, tmp_path, monkeypatch):
    work = copy_work(clean, tmp_path / "work")
    assert main(["evaluate", f"run_dir={work / 'run'}"]) == 0
    baseline = sorted((work / "run" / "baseline").rglob("*.png"))
    first = {p: p.read_bytes() for p in baseline}
    truncate(baseline[0])
    garbage(baseline[1])
    assert main(["evaluate", f"run_dir={work / 'run'}"]) == 0
    assert {p: p.read_bytes() for p in baseline} == first



def test_a_damaged_run_image_stops_evaluate_with_the_command_that_draws_it_again(clean, tmp_path, capsys):
    import shlex

    import numpy as np
    from PIL import Image

    work = copy_work(clean, tmp_path / "work")
    image = sorted((work / "run" / "images").rglob("*.png"))[1]
    pixels = np.asarray(Image.open(image))
    truncate(image)
    capsys.readouterr()
    assert main(["evaluate", f"run_dir={work / 'run'}", "baseline=false"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {image}, one of the run's images, is damaged"), lines
    command = shlex.split(lines[0].split("draw it again from its seed: ")[1])
    assert command[:2] == ["seedselect", "generate"]
    assert main(command[1:]) == 0
    assert np.array_equal(np.asarray(Image.open(image)), pixels)
    assert main(["evaluate", f"run_dir={work / 'run'}", "baseline=false"]) == 0
