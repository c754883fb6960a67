"""How fast the demo runs on an idle and on a busy CPU, by thread count and OpenMP wait policy.

Runs `seedselect optimize` (the demo, as a user runs it, in a fresh run directory and cache each time)
under each setting, idle and beside `--busy N` processes that each keep one core busy, and prints one
table: wall seconds per run (">LIMIT" where a run was stopped at the time limit). The settings are
environment variables, as a user would set them:

- `default`: what the tool does by itself;
- `threads=K`: OMP_NUM_THREADS=K;
- `threads=K passive`: OMP_NUM_THREADS=K and OMP_WAIT_POLICY=PASSIVE (threads sleep instead of
  spinning while they wait).

    python scripts/thread_policy.py                        # 12 to 15 min on 2 cores
    python scripts/thread_policy.py --settings default "threads=1" --limit 120
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = ("default", "threads=1", "threads=2", "threads=2 passive", "threads=2 active")


def environment(setting: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env["HF_HUB_OFFLINE"] = "1"
    for word in setting.split():
        if word.startswith("threads="):
            env["OMP_NUM_THREADS"] = word.split("=", 1)[1]
        elif word in ("passive", "active"):
            env["OMP_WAIT_POLICY"] = word.upper()
    return env


def demo_seconds(setting: str, limit: float, extra: list[str]) -> float | None:
    """Wall seconds of one demo run from a fresh folder and cache; None past `limit`."""
    with tempfile.TemporaryDirectory() as folder:
        env = {**environment(setting), "SEEDSELECT_CACHE_DIR": str(Path(folder) / "cache")}
        command = [sys.executable, "-m", "seedselect_cli", "optimize", f"hydra.run.dir={folder}/run",
                   "runtime.progress=false", *extra]
        begin = time.perf_counter()
        try:
            subprocess.run(command, env=env, check=True, timeout=limit, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return None
        return time.perf_counter() - begin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS))
    parser.add_argument("--busy", type=int, default=1, help="competing processes, one busy core each")
    parser.add_argument("--limit", type=float, default=300.0, help="seconds before a run is stopped")
    parser.add_argument("--override", nargs="*", default=[], help="more key=value overrides of the demo")
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs; the demo: seedselect optimize {' '.join(args.override)}", flush=True)
    rows = []
    for setting in args.settings:
        row = [setting]
        for busy in (0, args.busy):
            load = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
            try:
                seconds = demo_seconds(setting, args.limit, args.override)
            finally:
                for process in load:
                    process.kill()
                    process.wait()
            row.append(f">{args.limit:.0f}" if seconds is None else f"{seconds:.1f}")
            print(f"  {setting:<20} {busy} busy: {row[-1]} s", flush=True)
        rows.append(row)
    print(f"\n| setting | idle (s) | {args.busy} busy core{'s' if args.busy > 1 else ''} (s) |")
    print("|---|---:|---:|")
    for row in rows:
        print(f"| {row[0]} | {row[1]} | {row[2]} |")


if __name__ == "__main__":
    main()
