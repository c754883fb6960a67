"""Shared fixtures: tiny components (built once), composed configs, reference images on disk."""

from __future__ import annotations

import atexit
import copy
import functools
import gc
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from PIL import Image

from seedselect_cli.config import Config, ModelConfig, load_config, register_resolvers

if TYPE_CHECKING:
    from seedselect_cli.core.frozen import FrozenModels

# torch and the models (9 s of imports) are imported by the test processes, not here at the top: pytest-xdist's
# controller, which runs no test, loads this file too, and every second it spends importing comes before any
# worker starts.

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never touch the network
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # one of several test processes (`-n`, pyproject.toml): the cores
    # shared out between them, as on a busy CPU (README, "On a busy CPU"), for the commands they start too
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
# Reference encodings are cached here, not in the user's ~/.cache (subprocesses inherit it); removed at exit.
os.environ["SEEDSELECT_CACHE_DIR"] = tempfile.mkdtemp(prefix="seedselect-test-cache-")
atexit.register(shutil.rmtree, os.environ["SEEDSELECT_CACHE_DIR"], ignore_errors=True)


def pytest_collection_finish(session):
    """The libraries the tests imported (torch, diffusers, transformers: millions of objects) are moved out of the
    garbage collector's sight: its full collections walked them all, about 6 % of a test process's time."""
    gc.freeze()


@pytest.fixture(autouse=True)
def gradients_left_on():
    """A test, or a script's main it calls, that turns autograd off for the process breaks every later test of
    that process that optimises (it did: under `-n`, the hostile cases ran after the drawable script's main)."""
    import torch

    yield
    if not torch.is_grad_enabled():
        torch.set_grad_enabled(True)
        pytest.fail("autograd was left off for the whole process (torch.set_grad_enabled(False) without undoing it)")


def compose_raw(name: str = "tiny", overrides: list[str] | None = None):
    register_resolvers()
    module = "seedselect_cli.tool_configs" if name in ("generate", "evaluate") else "seedselect_cli.configs"
    with initialize_config_module(module, version_base="1.3"):
        return compose(config_name=name, overrides=overrides or [])


def make_config(overrides: list[str] | None = None, name: str = "tiny") -> Config:
    """A checked config; by default the tiny model with few steps, iterations and candidate starts, for speed
    (the default method's 16 starts would cost five times the 3 iterations; bootstrap's 8, twice its 2; its 10
    iterations of z_T^G, three quarters of a bootstrap test's time). A test that names a `method` gets that
    method's starts."""
    overrides = list(overrides or [])
    fast = ["sampler.steps=4", "optim.iterations=3", "bootstrap.global_iterations=2", "bootstrap.iterations=2",
            "runtime.progress=false"]
    if not any(o.startswith("method=") for o in overrides):
        fast += ["init.candidates=2", "bootstrap.candidates=2"]
    return load_config(copy.deepcopy(composed(name, tuple(fast + overrides))))  # checked each time, from here


@functools.cache
def composed(name: str, overrides: tuple[str, ...]):
    """Hydra's composition of a config, once per name and overrides in a test process (a third of a second each;
    unresolved: `load_config` resolves and checks it where and when a test asks)."""
    return compose_raw(name, list(overrides))


def load_tiny_models(dtype: str) -> FrozenModels:
    """The tiny random components on the CPU, their networks in `dtype` ("float32", "float64")."""
    import torch

    from seedselect_cli.models import load_models

    return load_models(ModelConfig(pretrained="tiny", image_encoder="tiny"), torch.device("cpu"), getattr(torch, dtype))


@pytest.fixture(scope="session")
def tiny_models() -> FrozenModels:
    return load_tiny_models("float32")


@pytest.fixture(scope="session")
def tiny_models64() -> FrozenModels:
    return load_tiny_models("float64")


def random_image(rng: np.random.Generator, size=(40, 48), mode="RGB") -> Image.Image:
    array = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(array).convert(mode)


@pytest.fixture
def reference_folder(tmp_path: Path) -> Path:
    """Four random RGB reference images of odd sizes in `tmp_path/refs/blue_thing`."""
    folder = tmp_path / "refs" / "blue_thing"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1234)
    for i, size in enumerate([(40, 48), (33, 31), (64, 64), (50, 20)]):
        random_image(rng, size).save(folder / f"ref_{i}.png")
    return folder
