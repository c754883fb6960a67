"""Where the work runs: the device, the dtype of a redrawn seed, and the CPU threads a command takes."""

from __future__ import annotations

import re

import pytest
import torch

from seedselect_cli import devices
from seedselect_cli.devices import busy_cores, resolve_device, seed_dtype
from seedselect_cli.errors import UserError
from seedselect_cli.tool_config import check_redraw_dtype


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda_is_a_user_error(monkeypatch):
    """Why there is none: a torch built without CUDA (pip's default on some indexes, on a GPU node too) is named."""
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(UserError, match=rf"^runtime.device=cuda but this torch \({re.escape(torch.__version__)}\) is "
                                        r"built without CUDA: install a CUDA build of torch .*, or use runtime.device=cpu$"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    with pytest.raises(UserError, match=r"^runtime.device=cuda but no CUDA device is available; use runtime.device=cpu$"):
        resolve_device("cuda")


def test_a_redrawn_seed_takes_its_own_dtype_unless_told():
    cpu = torch.device("cpu")
    assert seed_dtype(None, "float16", cpu) == torch.float16  # unset: the dtype the seed was made in
    assert seed_dtype("auto", "float16", cpu) == torch.float32  # auto: as a run on this device
    assert seed_dtype("bfloat16", "float32", cpu) == torch.bfloat16
    for value in (None, "auto", "float32"):
        check_redraw_dtype(value)
    with pytest.raises(UserError, match=r"^runtime.dtype='half' is invalid: choose one of auto, float32, float16, "):
        check_redraw_dtype("half")
    with pytest.raises(UserError, match="runtime.dtype='fp8' is invalid"):
        seed_dtype(None, "fp8", cpu)  # a seed file's own dtype is checked too


def test_busy_cores_sees_processes_that_keep_the_cores_busy():
    import os
    import subprocess
    import sys

    cores = sorted(os.sched_getaffinity(0))
    idle = busy_cores(cores, seconds=0.5)  # other tests may run beside this one (pytest -n): one core's worth each
    if idle > len(cores) - 0.6:
        pytest.skip(f"{idle:.1f} of {len(cores)} cores are busy already: more busy processes cannot show")
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in cores]  # every core busy
    try:
        import time

        time.sleep(0.3)  # started and spinning
        busy = busy_cores(cores, seconds=0.5)
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    assert busy >= max(idle + 0.5, len(cores) - 0.4), (idle, busy)


def test_threads_fit_the_free_cores_unless_the_user_set_them(monkeypatch):
    threads = torch.get_num_threads()
    try:
        monkeypatch.setattr(devices, "_threads_fitted", [])
        monkeypatch.setattr(devices, "busy_cores", lambda cores: len(cores) - 0.6)  # all but one core busy
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        devices.fit_cpu_threads()
        assert torch.get_num_threads() == 1
        devices.fit_cpu_threads()  # decided once per process
        assert devices._threads_fitted == [True]
        monkeypatch.setattr(devices, "_threads_fitted", [])
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        torch.set_num_threads(2)
        devices.fit_cpu_threads()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_a_run_of_stable_diffusions_size_left_to_the_cpu_by_auto_says_so(tmp_path, monkeypatch, caplog):
    """A cluster job not given a GPU runs on the CPU for days: where `auto` found none for 256 px or more, the run's
    log says how to get one. Not where the CPU was asked for, nor for the toy world's and tiny components' sizes."""
    import logging

    from seedselect_cli.pipeline import run_optimize
    from tests.conftest import make_config

    cpu = torch.device("cpu")
    said = devices.no_gpu_warning("auto", cpu, 512, 512)
    assert said.startswith("no GPU found (runtime.device=auto), so the 512x512 images are made on the CPU")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU build of torch, as pip may give on a GPU node
    assert f"this torch ({torch.__version__}) is built without CUDA: with a GPU, install a CUDA build of torch" in \
        devices.no_gpu_warning("auto", cpu, 512, 512)
    monkeypatch.setattr(torch.version, "cuda", "12.8")  # a CUDA build on a node without a GPU for this job
    assert devices.no_gpu_warning("auto", cpu, 512, 512).endswith(
        "hours an image; on a cluster, ask the job for a GPU (Slurm: --gpus=1); runtime.device=cpu says the CPU is meant")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert "this Mac's GPU is runtime.device=mps" in devices.no_gpu_warning("auto", cpu, 1024, 1024)
    assert devices.no_gpu_warning("cpu", cpu, 512, 512) is None
    assert devices.no_gpu_warning("auto", cpu, 64, 64) is None
    assert devices.no_gpu_warning("auto", torch.device("cuda"), 512, 512) is None
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "LARGE_IMAGE_PIXELS", 32 * 32)  # the toy world's images count as large (the tiny
    # components' would be refused at such a size: test_the_tiny_components_are_refused_...)
    quick = ["n_images=1", "dataset.classes=[marsh finch]", "init.candidates=1", "optim.iterations=1"]
    with caplog.at_level(logging.WARNING):
        run_optimize(make_config(["runtime.device=auto", *quick], name="toyworld"), tmp_path / "auto")
        assert "no GPU found (runtime.device=auto), so the 32x32 images are made on the CPU" in caplog.text
        caplog.clear()
        run_optimize(make_config(["runtime.device=cpu", *quick], name="toyworld"), tmp_path / "cpu")
        assert "no GPU found" not in caplog.text


def test_the_tiny_components_are_refused_at_stable_diffusions_size_on_a_cpu_only():
    """`model.pretrained=tiny` (not `model=tiny`, which brings `sampler=tiny`) keeps the config's 512 px: one
    20-step sample takes 10 minutes on 2 cores (their attention over 4096 latent pixels), an image hours. Refused on
    a CPU from 256 px; their own 32 px and 128 px run, and on a GPU any size does."""
    cpu = torch.device("cpu")
    for side in (32, 128):
        devices.check_tiny_size(cpu, side, side, "tiny")
    devices.check_tiny_size(torch.device("cuda"), 512, 512, "tiny")
    with pytest.raises(UserError, match=r"^model.pretrained=tiny draws 256x256 images here .*take model=tiny, "
                                        r"which brings its sampler"):
        devices.check_tiny_size(cpu, 256, 256, "tiny")
    with pytest.raises(UserError, match=r"^model.pretrained=tiny_sdxl draws 1024x1024 images"):  # SDXL's shape, as given
        devices.check_tiny_size(cpu, 1024, 1024, "tiny_sdxl")
