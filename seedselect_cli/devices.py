"""Where the work runs: the device (`runtime.device`), the dtype (`runtime.dtype`, and the seeds' own when
`generate` and `evaluate` redraw them), how many CPU threads, and how much memory the kept denoising steps may
take (`runtime.memory_budget`)."""

from __future__ import annotations

import contextlib
import logging
import os
import time

import torch

from seedselect_cli.config import check_device, torch_without_cuda
from seedselect_cli.errors import UserError, count_of
from seedselect_cli.limits import DTYPE_NAMES
from seedselect_cli.tool_config import check_redraw_dtype

log = logging.getLogger(__name__)

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}  # the names, as torch dtypes


def resolve_device(name: str) -> torch.device:
    """`runtime.device`: auto picks CUDA when present, else the CPU. Under `torchrun` (LOCAL_RANK set)
    each process takes its own GPU."""
    fit_cpu_threads()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    check_device(name)
    if name == "cuda" and os.environ.get("LOCAL_RANK", "").isdigit():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    return torch.device(name)


# Images from this many pixels up are Stable Diffusion's own sizes (256 px and more): on a CPU each network pass takes
# seconds (SD 2.1-base's UNet at 512 px and guidance: 10 s on 2 cores), an optimised seed hours
LARGE_IMAGE_PIXELS = 256 * 256


def no_gpu_warning(requested: str, device: torch.device, height: int, width: int) -> str | None:
    """What to say where `runtime.device=auto` found no GPU for images of Stable Diffusion's size: a cluster job
    that was not given one would otherwise run for days. None where the CPU was asked for, or the images are small
    (the toy world, the tiny components)."""
    if requested != "auto" or device.type != "cpu" or height * width < LARGE_IMAGE_PIXELS:
        return None
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        where = "this Mac's GPU is runtime.device=mps"
    elif cpu_build := torch_without_cuda():
        where = f"{cpu_build}: with a GPU, install a CUDA build of torch"
    else:
        where = "on a cluster, ask the job for a GPU (Slurm: --gpus=1)"
    return (f"no GPU found (runtime.device=auto), so the {width}x{height} images are made on the CPU: minutes to "
            f"hours an image; {where}; runtime.device=cpu says the CPU is meant")


def check_tiny_size(device: torch.device, height: int, width: int, pretrained: str) -> None:
    """The tiny random components are for dry runs at their own 32 px (`model=tiny` brings `sampler=tiny`). At Stable
    Diffusion's size on a CPU (`model.pretrained=tiny` on a real config's sampler, a dry run's slip) their attention
    over every latent pixel makes one 20-step sample at 512 px take about 10 minutes on 2 cores, and an image of the
    default method most of a day, for images that mean nothing: `UserError`. On a GPU they run. `pretrained`: which
    of them (`tiny`, `tiny_sdxl`)."""
    if device.type == "cpu" and height * width >= LARGE_IMAGE_PIXELS:
        raise UserError(f"model.pretrained={pretrained} draws {width}x{height} images here (the sampler's size): the "
                        f"tiny random components at that size take hours an image on a CPU, for images that mean "
                        f"nothing; for a dry run take model=tiny, which brings its sampler (sampler=tiny: 32x32, 10 "
                        f"steps)")


_threads_fitted: list[bool] = []


def fit_cpu_threads() -> None:
    """Use no more CPU threads than there are cores free for this process. A job given 1 core (Slurm,
    submitit, taskset) that starts one OpenMP thread per core of the machine runs many times slower, and so
    does one that shares its cores with other busy processes: each parallel region waits for its slowest
    thread, which waits for a core (README, "On a busy CPU"). Decided once per process, at its first
    command; OMP_NUM_THREADS, where the user set it, is kept."""
    if os.environ.get("OMP_NUM_THREADS", "").strip() or _threads_fitted:
        return
    _threads_fitted.append(True)
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    free = max(1, len(cores) - round(busy_cores(cores)))
    if torch.get_num_threads() != free:
        torch.set_num_threads(free)


_threads_said: set[int] = set()


def match_cpu_threads(recorded: str | None) -> str | None:
    """Redraw a seed on the CPU with the threads its run drew with (`recorded`, from the seed file): another count
    sums in another order, and a pixel can differ by one. Not where the user set OMP_NUM_THREADS (kept), nor beyond
    the cores this process may use. Returns why the count is another, or None."""
    if not (recorded or "").isdigit() or int(recorded) < 1:
        return None
    wanted = int(recorded)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        why = "OMP_NUM_THREADS"
    elif wanted > cores:
        why = f"{cores} cores here"
    else:
        torch.set_num_threads(wanted)
        if wanted not in _threads_said:
            _threads_said.add(wanted)
            log.info("drawing with %s, as the seed's run did (the same sums in the same order)",
                     count_of(wanted, "CPU thread"))
        return None
    if torch.get_num_threads() == wanted:
        return None
    return (f"drawing with {count_of(torch.get_num_threads(), 'CPU thread')} ({why}); the seed's run drew with "
            f"{wanted}, so the image is the seed's but perhaps not pixel for pixel the run's")


def busy_cores(cores: list[int], seconds: float = 0.2) -> float:
    """How many of `cores` other processes keep busy now: the non-idle share of each core in /proc/stat
    over `seconds` (while this process sleeps), summed. 0 where /proc/stat cannot be read."""

    def sample() -> dict[int, tuple[int, int]]:
        times = {}
        with open("/proc/stat") as stat:
            for line in stat:
                name, *fields = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cores:
                    numbers = [int(x) for x in fields[:8]]
                    times[int(name[3:])] = (sum(numbers), numbers[3] + numbers[4])  # all, idle + iowait
        return times

    try:
        before = sample()
        time.sleep(seconds)
        after = sample()
    except (OSError, ValueError, IndexError):
        return 0.0
    busy = 0.0
    for core, (total, idle) in after.items():
        spent = total - before.get(core, (total, idle))[0]
        if spent > 0:
            busy += 1.0 - (idle - before[core][1]) / spent
    return busy


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`runtime.dtype`: auto is float32 on the CPU and float16 on an accelerator. Not bfloat16: its 8-bit
    significand loses the seed's gradient near the optimum, where the loss's terms pull against each other
    (gradient cosine to float32's 0.88 on the toy world, float16's 0.9996; BENCHMARKS.md)."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    return DTYPES[name]


def seed_dtype(name: str | None, recorded: str, device: torch.device) -> torch.dtype:
    """`runtime.dtype` of generate and evaluate: null for the seed file's own, auto as for a run."""
    if name is None:
        name = recorded
    if name == "auto":
        return resolve_dtype("auto", device)
    check_redraw_dtype(name)
    return DTYPES[name]


def memory_budget_bytes(setting: str, device: torch.device) -> float:
    """`runtime.memory_budget` in bytes: GB as given, or for auto half of what the device has free now (the
    models loaded): CUDA's free memory, else the machine's available memory."""
    setting = str(setting).strip().lower()
    if setting != "auto":
        return float(setting) * 2**30
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = 0
        with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/meminfo") as meminfo:
            free = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    return free / 2
