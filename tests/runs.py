"""Shared by the tests that run commands in a process of their own: starting them, the tiny bootstrap
command line, and reading a run's manifest."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

OFFLINE = {"HF_HUB_OFFLINE": "1"}
# A command line's settings for time, where the images themselves are not what is tested: 3 steps, 2 iterations and
# 2 candidate starts an image (the default method scores 16, each a pass of the sampler), no progress bars
QUICK = ["sampler.steps=3", "optim.iterations=2", "init.candidates=2", "runtime.progress=false"]


def seedselect(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`seedselect ARGS` run to its end, offline, its output captured."""
    return subprocess.run([sys.executable, "-m", "seedselect_cli", *args], cwd=cwd,
                          env={**os.environ, **OFFLINE, **(env or {})}, check=False, capture_output=True, text=True,
                          timeout=300)


def in_process(args: list[str], cwd: Path, monkeypatch, capsys=None) -> tuple[int, str, str]:
    """A command line of `start` or `bootstrap_command` (`python -m seedselect_cli ...`) through `main` in the
    test's own process, from `cwd`, on one thread as `start` runs its commands (another count can round a pixel
    otherwise): for the commands around the one a test kills or runs side by side, which need no process of their
    own. Its exit code, and its stdout and stderr where `capsys` captures them."""
    import torch

    from seedselect_cli.cli import main

    monkeypatch.chdir(cwd)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    if capsys is not None:
        capsys.readouterr()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(args[args.index("seedselect_cli") + 1:])
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr() if capsys is not None else ("", "")
    return code, out, err


def forked(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`seedselect ARGS` run to its end in a process of its own forked from the test's (`Forked`), offline, its output
    captured: where the process's own output and files are tested, not a new Python's start."""
    process = start([sys.executable, "-m", "seedselect_cli", *args], cwd)
    out, err = process.communicate(timeout=300)
    return subprocess.CompletedProcess(list(args), process.returncode, out, err)


def start(args: list[str], cwd: Path, **env: str) -> Forked:
    """A command line (`python -m seedselect_cli ...`) started in the background as a process of its own, offline,
    on one thread (several run side by side), with `env` set beside: forked from the test's process, see `Forked`."""
    return Forked(args[args.index("seedselect_cli") + 1:], cwd, {**OFFLINE, "OMP_NUM_THREADS": "1", **env})


class Forked:
    """`python -m seedselect_cli ARGV` run by a child of the test's process: a process of its own, with its own
    signals, exit code, stdout and stderr, through the console script's entry (`entry.main`), but without the 10 s
    of imports a new Python spends (torch, diffusers and transformers are the test process's already): those were a
    sixth of the suite's time. Its output is piped and decoded as written (a carriage return stays one, where
    Popen's text mode makes it a newline). The Popen methods the tests use: `poll`, `wait`, `send_signal`,
    `communicate`, `returncode`, `pid`. The commands whose process must start from nothing (the console script
    itself, the environment read at import) run through `seedselect`."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str]):
        import threading

        self.returncode: int | None = None
        self._output: dict[int, bytearray] = {}
        pipes = [os.pipe(), os.pipe()]  # stdout, stderr
        sys.stdout.flush()
        sys.stderr.flush()
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns into pytest
            self._child(argv, cwd, env, [write for _, write in pipes])
        self._readers = []
        for read, write in pipes:
            os.close(write)
            self._output[read] = bytearray()
            reader = threading.Thread(target=self._drain, args=(read,), daemon=True)
            reader.start()
            self._readers.append(reader)

    @staticmethod
    def _child(argv: list[str], cwd: Path, env: dict[str, str], writes: list[int]) -> None:
        import io
        import logging
        import signal
        import traceback

        code = 1
        try:
            os.dup2(writes[0], 1)
            os.dup2(writes[1], 2)
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", line_buffering=True)
            sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                                          errors="backslashreplace", line_buffering=True)
            signal.signal(signal.SIGINT, signal.default_int_handler)  # as a new Python has them
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            logging.root.handlers.clear()  # not the test's, nor an earlier command's log file (Hydra sets its own)
            logging.root.setLevel(logging.WARNING)
            os.chdir(cwd)
            os.environ.update(env)
            import torch

            torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
            from seedselect_cli.entry import main

            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:  # noqa: BLE001 (whatever it is, the child ends here and never runs pytest on)
            traceback.print_exc()
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(OSError, ValueError):
                    stream.flush()
            os._exit(code)

    def _drain(self, fd: int) -> None:
        while chunk := os.read(fd, 65536):
            self._output[fd] += chunk
        os.close(fd)

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"seedselect (pid {self.pid})", timeout)
            time.sleep(0.01)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        import signal

        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        for reader in self._readers:
            reader.join(timeout)
        return tuple(bytes(out).decode("utf-8", "replace") for out in self._output.values())  # as written: "\r" too

    def __del__(self):  # a test that failed before its process ended: the process goes with it
        if self.returncode is None:
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                self.kill()
                self.wait(10)


def bootstrap_command(root: Path, run_dir: Path | str, n_images: int, iterations: int = 2) -> list[str]:
    """`seedselect bootstrap` on a CUB layout with the tiny components, fast settings (2 starts an image, not 8),
    batch 2."""
    return [sys.executable, "-m", "seedselect_cli", "bootstrap", "--config-name", "cub_tail", "model=tiny",
            "sampler=tiny", "runtime.device=cpu", f"dataset.root={root}", f"bootstrap.n_images={n_images}",
            "sampler.steps=3", "bootstrap.global_iterations=2", f"bootstrap.iterations={iterations}",
            "bootstrap.candidates=2", "runtime.batch_size=2", "runtime.progress=false", f"hydra.run.dir={run_dir}"]


def read_manifest(run_dir: Path) -> list[dict]:
    """The manifest's entries; none if it is not there, and a line cut by SIGKILL skipped (a resume drops it)."""
    path = Path(run_dir) / "manifest.jsonl"
    entries = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return entries
