"""The README's Python: its "From Python" block runs as written and gives the images the command writes."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"


def python_block(after: str) -> str:
    """The first ```python block of the README after the line that holds `after`."""
    text = README.read_text(encoding="utf-8")
    found = re.search(r"```python\n(.*?)```", text[text.index(after):], re.DOTALL)
    assert found, f"no python block after {after!r} in README.md"
    return found.group(1)


@pytest.mark.slow
def test_the_from_python_block_draws_the_images_that_optimize_writes(tmp_path, monkeypatch):
    """The block as written, its config shortened to 3 iterations from 3 candidate starts (the block's
    `compose_config` is the module's, patched), against `seedselect optimize`'s run of the same config."""
    from seedselect_cli import config as config_module
    from seedselect_cli.pipeline import run_optimize

    composed = config_module.compose_config
    monkeypatch.setattr(config_module, "compose_config", lambda name, overrides=(): composed(
        name, [*overrides, "optim.iterations=3", "init.candidates=3"]))
    namespace: dict = {}
    exec(compile(python_block("**From Python**"), "README.md", "exec"), namespace)  # noqa: S102 (our own README)
    config = namespace["config"]
    assert (config.optim.iterations, config.init.candidates) == (3, 3)
    run_optimize(config_module.compose_config("demo", ["n_images=2", "runtime.batch_size=2"]), tmp_path / "run")
    written = sorted((tmp_path / "run" / "images").rglob("*.png"))
    assert config.n_images == 2 and len(namespace["images"]) == len(written) == 2
    for image, path in zip(namespace["images"], written):
        assert np.array_equal(np.asarray(image), np.asarray(Image.open(path).convert("RGB"))), path


@pytest.mark.slow
def test_the_imagenet_lt_list_block_writes_the_runs_images_with_their_imagenet_labels(tmp_path, monkeypatch):
    """The block after "training list": on an ImageNet-LT run (the tiny components, its few-shot classes as
    `dataset.max_images` picks them), one line per image, `<path> <label>`, the path a file, the label its class's."""
    from seedselect_cli.config import compose_config
    from seedselect_cli.pipeline import run_bootstrap
    from tests.layouts import make_imagenet_lt

    root = make_imagenet_lt(tmp_path / "imagenet", counts={0: 30, 12: 6, 999: 8})
    monkeypatch.chdir(tmp_path)
    config = compose_config("imagenet_lt", ["model=tiny", "sampler=tiny", f"dataset.root={root}",
                                            "dataset.max_images=19", "bootstrap.n_images=2", "runtime.device=cpu",
                                            "runtime.progress=false", "bootstrap.iterations=1", "sampler.steps=3",
                                            "bootstrap.candidates=2"])  # the list is tested, not the images
    run_bootstrap(config, Path("runs/imagenet_lt_few"))
    exec(compile(python_block("training list"), "README.md", "exec"), {})  # noqa: S102 (our own README)
    lines = [line.split() for line in Path("synthetic_train.txt").read_text().splitlines()]
    assert sorted(label for _, label in lines) == ["12", "12", "999", "999"]  # house finch, toilet paper
    assert all(Path(path).is_file() for path, _ in lines)
