"""The `seedselect` command: subcommands, each a thin `@hydra.main` around a plain `run_*` function.

    seedselect optimize  [--config-name NAME] [key=value ...]
    seedselect bootstrap [--config-name NAME] [key=value ...]
    seedselect generate  seed_file=PATH out=IMAGE.png
    seedselect evaluate  run_dir=PATH

A `UserError` (bad input or environment) ends the command with exit code 2 and one `error:` line on
stderr. Hydra's own composition errors (unknown config name or key, bad override) are caught the
same way by composing the config once before Hydra runs the job (`preflight.py`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from seedselect_cli.config import (
    Config,
    load_config,
    load_structured,
    register_resolvers,
)
from seedselect_cli.entry import COMMANDS, answer_at_once
from seedselect_cli.errors import SAME_COMMAND, Interrupted, UserError
from seedselect_cli.files.run_directory import sweep_runs
from seedselect_cli.interrupt import StopNow, catching_signals, raise_the_stop_again
from seedselect_cli.job_dir import (
    ActiveMark,
    JobDirSnapshot,
    claim_new_folder,
    take_snapshot,
    undo_failed_start,
)
from seedselect_cli.preflight import names_start_time, preflight
from seedselect_cli.requirements import check_requirements
from seedselect_cli.shell import override_arg
from seedselect_cli.tool_config import EvaluateConfig, GenerateConfig
from seedselect_cli.unread_keys import unread_keys

log = logging.getLogger(__name__)

@contextlib.contextmanager
def user_errors():
    """Turn a `UserError` into one `error:` line on stderr and exit code 2, and a stop on Ctrl-C or
    SIGTERM into a line saying what was kept and exit code 128 + the signal's number, also where a library made an
    error of its own of the stop (`raise_the_stop_again`)."""
    try:
        yield
    except UserError as exc:
        raise_the_stop_again()  # the error may be a library's of the stop itself
        print(f"error: {resumable(one_line(exc))}", file=sys.stderr)
        raise SystemExit(2) from None
    except Interrupted as exc:
        print(f"seedselect: {resumable(one_line(exc))}", file=sys.stderr)
        raise SystemExit(128 + exc.signum) from None
    except Exception:
        raise_the_stop_again()
        raise


# What "the same command" needs to resume this command's run where the user left its directory to Hydra's default
# (`outputs/<config>/<time>`, `multirun/<config>/<time>`: a new folder at each start): its directory, as an override
_resume_with: str | None = None


def resumable(message: str) -> str:
    """`message` with the run's directory added where it asks to run the same command again and that command alone
    would start a new run directory."""
    return message.replace(SAME_COMMAND, f"{SAME_COMMAND} with {_resume_with}") if _resume_with else message


def one_line(exc: BaseException) -> str:
    """The message on one line, whatever it quotes (a file name may hold a newline)."""
    return str(exc).replace("\r", "\\r").replace("\n", "\\n")


# The run directory of this command as it was before Hydra made or wrote into it (None in a multirun,
# where Hydra picks each job's directory itself), and this process's mark of working in it.
_before: JobDirSnapshot | None = None
_active = ActiveMark()


def run_in_job_dir(run: Callable[[Config, Path], object], cfg: DictConfig) -> None:
    """Run `optimize` or `bootstrap` in Hydra's job directory, marked as worked in by this process."""
    global _resume_with
    hydra_config = HydraConfig.get()
    _active.hold(Path(hydra_config.runtime.output_dir))
    given = [o.split("=", 1)[1] for o in OmegaConf.to_container(hydra_config.overrides.hydra, resolve=False)
             if o.startswith("hydra.sweep.dir=")]  # as typed: reading them would resolve a `${now:...}` in them
    if hydra_config.mode == RunMode.MULTIRUN and (not given or names_start_time(given[-1])):
        sweep_dir = Path(hydra_config.runtime.output_dir)  # SWEEP_DIR/SUBDIR
        for _ in Path(str(hydra_config.sweep.subdir)).parts:
            sweep_dir = sweep_dir.parent
        _resume_with = override_arg("hydra.sweep.dir", str(sweep_dir))
    with user_errors():
        config = load_config(cfg, start_dir=hydra_config.runtime.cwd)  # where the command was started
        for said in unread_keys(hydra_config.job.name, list(hydra_config.overrides.task), config):
            log.warning(said)
        try:
            run(config, Path(hydra_config.runtime.output_dir))
        except Interrupted as exc:  # said by `main` once it knows whether anything was kept
            stop = StopNow(exc.signum)
            stop.message = str(exc)
            raise stop from None


def take_back(job_name: str) -> bool:
    """After a failed or stopped `optimize` or `bootstrap`: what this process added to the run directory
    goes again, and only that (`job_dir.py`). Returns whether the directory is as it was."""
    _active.release()
    return _before is not None and undo_failed_start(_before, job_name)


@hydra.main(version_base="1.3", config_path="configs", config_name="demo")
def optimize_main(cfg: DictConfig) -> None:
    from seedselect_cli.pipeline import run_optimize

    run_in_job_dir(run_optimize, cfg)


@hydra.main(version_base="1.3", config_path="configs", config_name="demo")
def bootstrap_main(cfg: DictConfig) -> None:
    from seedselect_cli.pipeline import run_bootstrap

    run_in_job_dir(run_bootstrap, cfg)


# generate and evaluate have their own config folder: without the run configs' groups there, `model=PATH` is
# their key, not a group option
@hydra.main(version_base="1.3", config_path="tool_configs", config_name="generate")
def generate_main(cfg: DictConfig) -> None:
    from seedselect_cli.generate import run_generate

    with user_errors():
        out = run_generate(load_structured(GenerateConfig, cfg))
        if out.is_file():  # a folder's images are counted in the log
            print(f"wrote {out}")


@hydra.main(version_base="1.3", config_path="tool_configs", config_name="evaluate")
def evaluate_main(cfg: DictConfig) -> None:
    from seedselect_cli.evaluate import run_evaluate
    from seedselect_cli.evaluate_sweep import evaluate_sweep

    with user_errors():
        config = load_structured(EvaluateConfig, cfg)
        runs = sweep_runs(Path(config.run_dir).expanduser())
        if len(runs) > 1:  # a sweep's folder: its runs side by side
            evaluate_sweep(config, runs)
        else:  # a run, or a sweep's one run (of shards alone, which share one run directory)
            run_evaluate(dataclasses.replace(config, run_dir=str(runs[0])) if runs else config)


MAINS = {"optimize": optimize_main, "bootstrap": bootstrap_main, "generate": generate_main,
         "evaluate": evaluate_main}


def pin_run_dir(args: list[str], run_dir: Path) -> list[str] | None:
    """`args` with `hydra.run.dir` set to the directory preflight resolved, so that Hydra uses the very
    directory whose state was recorded (a `${now:...}` in it would otherwise be read again); None where it cannot
    be said as an override."""
    text = str(run_dir)
    if "\\" in text or "${" in text:  # beyond what a quoted override can say plainly: leave Hydra's own
        return None
    quoted = "'" + text.replace("'", "\\'") + "'"
    return add_override([a for a in args if not a.startswith("hydra.run.dir=")], f"hydra.run.dir={quoted}")


def add_override(args: list[str], override: str) -> list[str]:
    """`args` with one more override, beside the user's: Hydra's parser takes them as one group, before
    or after its options. Without overrides of the user's it goes first: after `--info`, whose value is optional,
    it would be read as that value."""
    overrides = [i for i, a in enumerate(args) if "=" in a and not a.startswith("-")]
    at = overrides[0] + 1 if overrides else 0
    return [*args[:at], override, *args[at:]]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if (code := answer_at_once(argv)) is not None:  # help, version, an unknown command
        return code
    command, args = argv[0], argv[1:]
    # A log line written to a reader that has gone (`seedselect optimize --info | head`: Hydra's --info is logged) is
    # dropped, as a print's BrokenPipeError below is, not said with a traceback of its own for each line
    logging.raiseExceptions = False
    with catching_signals():  # from here on a signal ends the command with one line, never a traceback
        try:
            return _main(command, args)
        except BrokenPipeError:  # `seedselect ... --help | head`: the reader has gone, and that is fine
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        except StopNow as stop:
            name = signal.Signals(stop.signum).name
            kept = getattr(stop, "nothing_kept", True)  # unset: stopped before the command's job started
            if command == "generate":  # every image is written whole or not at all; a folder's are skipped next time
                said = "; the images drawn are kept: run the same command again to go on"
            elif command == "evaluate":  # plain images are drawn into RUN/baseline, each whole, and kept for the next
                said = "; the plain images drawn are kept for the next evaluate: run the same command again to go on"
            elif command not in ("optimize", "bootstrap"):
                said = ""
            elif kept:
                said = "; nothing was written"
            else:
                said = f"; finished images are kept: run {SAME_COMMAND} again to resume"
            message = getattr(stop, "message", None) if not kept else None
            print(f"seedselect: {resumable(one_line(message) if message else f'stopped by {name}{said}')}",
                  file=sys.stderr)
            return 128 + stop.signum


def _main(command: str, args: list[str]) -> int:
    global _before, _resume_with
    register_resolvers()
    try:
        check_requirements()  # an environment changed since `pip install` may load weights wrong without a word
        job_dir = preflight(command, args, COMMANDS[command][1])
    except UserError as exc:
        raise_the_stop_again()  # preflight reads the references and an earlier run's files
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    _before = _resume_with = None
    if job_dir is not None:
        run_dir = job_dir.path
        pinned = pin_run_dir(args, run_dir)
        if pinned is not None and job_dir.new_each_start:  # Hydra's `outputs/<config>/<time>`: a folder of this
            # command's own, even beside another command started in the same second (a Slurm array's jobs)
            try:
                run_dir, _before = claim_new_folder(run_dir)
            except OSError as exc:
                print(f"error: run directory {run_dir} cannot be made ({exc.strerror or exc}); choose another with "
                      f"hydra.run.dir=DIR", file=sys.stderr)
                return 2
            pinned = pin_run_dir(args, run_dir)
        if job_dir.new_each_start or not any(a.startswith("hydra.run.dir=") for a in args):
            _resume_with = override_arg("hydra.run.dir", str(run_dir))
        args = pinned or args
        if any(a.startswith("hydra.run.dir=") and str(run_dir) in a for a in args):
            _before = _before or take_snapshot(run_dir)
            _active.hold(run_dir)
    if not any(a.startswith("hydra.job.name=") for a in args):
        args = add_override(args, f"hydra.job.name={command}")
    job_name = next((a.split("=", 1)[1] for a in args if a.startswith("hydra.job.name=")), command)
    saved = sys.argv
    sys.argv = [f"seedselect {command}", *args]
    code = 0
    try:
        MAINS[command]()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except StopNow as stop:
        stop.nothing_kept = take_back(job_name)
        raise
    finally:
        sys.argv = saved
    if code:
        take_back(job_name)
    _active.release()
    return code


if __name__ == "__main__":
    raise SystemExit(main())
