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
def test_the_from_python_block_draws_the_images_that_optimize_writes(tmp_path):
    from seedselect_cli.config import compose_config
    from seedselect_cli.pipeline import run_optimize

    namespace: dict = {}
    exec(compile(python_block("**From Python**"), "README.md", "exec"), namespace)  # noqa: S102 (our own README)
    config = namespace["config"]
    run_optimize(compose_config("demo", ["n_images=2", "runtime.batch_size=2"]), tmp_path / "run")
    written = sorted((tmp_path / "run" / "images").rglob("*.png"))
    assert config.n_images == 2 and len(namespace["images"]) == len(written) == 2
    for image, path in zip(namespace["images"], written):
        assert np.array_equal(np.asarray(image), np.asarray(Image.open(path).convert("RGB"))), path
