"""The `seedselect` command: subcommands, each a thin `@hydra.main` around a plain `run_*` function.

    seedselect optimize  [--config-name NAME] [key=value ...]
    seedselect bootstrap [--config-name NAME] [key=value ...]
    seedselect generate  seed_file=PATH out=IMAGE.png
    seedselect evaluate  run_dir=PATH

A `UserError` (bad input or environment) ends the command with exit code 2 and one `error:` line on
stderr. Hydra's own composition errors (unknown config name or key, bad override) are caught the
same way by composing the config once before Hydra runs the job.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from seedselect_cli import __version__
from seedselect_cli.config import (
    Config,
    EvaluateConfig,
    GenerateConfig,
    check_config,
    check_evaluate,
    check_generate,
    check_resume,
    check_weights,
    flat_keys,
    load_config,
    load_structured,
    other_commands_keys,
    register_resolvers,
)
from seedselect_cli.errors import SAME_COMMAND, Interrupted, UserError
from seedselect_cli.interrupt import StopNow, catching_signals
from seedselect_cli.job_dir import ActiveMark, JobDirSnapshot, take_snapshot, undo_failed_start
from seedselect_cli.requirements import check_requirements

log = logging.getLogger(__name__)

COMMANDS = {
    "optimize": ("SeedSelect: n_images fully optimised seeds per class", "demo"),
    "bootstrap": ("bulk image sets, seconds an image: bootstrap.n_images a class, or up to bootstrap.fill_to", "demo"),
    "generate": ("redraw the image of a saved seed file, pixel for pixel", "generate"),
    "evaluate": ("metrics of a run beside plain Stable Diffusion, and a report in RUN/report", "evaluate"),
}

USAGE = f"""usage: seedselect COMMAND [--config-name NAME] [key=value ...] [hydra options]

seedselect {__version__}: make Stable Diffusion draw rare concepts by optimising the starting noise
(SeedSelect, Samuel et al., AAAI 2024).

commands:
""" + "".join(f"  {name:<10} {text}\n" for name, (text, _) in COMMANDS.items()) + """
examples:
  seedselect optimize                                   the demo: the toy world, CPU, offline, under a minute
  seedselect optimize --config-name folder dataset.root=imgs/tiger_cat
  seedselect optimize --config-name cub_tail dataset.root=CUB_200_2011 dataset.classes="[Pine Warbler]"
  seedselect bootstrap --config-name cub_tail dataset.root=CUB_200_2011 bootstrap.n_images=100
  seedselect bootstrap --config-name imagenet_lt dataset.root=imagenet dataset.max_images=19 bootstrap.fill_to=100
  seedselect generate seed_file=outputs/demo/<time>/seeds/marsh_finch/00000.safetensors out=finch.png
  seedselect evaluate run_dir=outputs/demo/<time>

`seedselect COMMAND --help` lists a command's config groups and keys; Hydra's options
(-m/--multirun, hydra.run.dir=DIR, --cfg job, --hydra-help) work after the command.
"""


@contextlib.contextmanager
def user_errors():
    """Turn a `UserError` into one `error:` line on stderr and exit code 2, and a stop on Ctrl-C or
    SIGTERM into a line saying what was kept and exit code 128 + the signal's number."""
    try:
        yield
    except UserError as exc:
        print(f"error: {resumable(one_line(exc))}", file=sys.stderr)
        raise SystemExit(2) from None
    except Interrupted as exc:
        print(f"seedselect: {resumable(one_line(exc))}", file=sys.stderr)
        raise SystemExit(128 + exc.signum) from None


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
    if hydra_config.mode == RunMode.MULTIRUN and not any(o.startswith("hydra.sweep.dir=")
                                                        for o in hydra_config.overrides.hydra):
        sweep_dir = Path(hydra_config.runtime.output_dir)  # SWEEP_DIR/SUBDIR
        for _ in Path(str(hydra_config.sweep.subdir)).parts:
            sweep_dir = sweep_dir.parent
        _resume_with = f"hydra.sweep.dir={shlex.quote(str(sweep_dir))}"
    with user_errors():
        config = load_config(cfg, start_dir=hydra_config.runtime.cwd)  # where the command was started
        for said in other_commands_keys(hydra_config.job.name, list(hydra_config.overrides.task), config):
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

    with user_errors():
        run_evaluate(load_structured(EvaluateConfig, cfg))


MAINS = {"optimize": optimize_main, "bootstrap": bootstrap_main, "generate": generate_main,
         "evaluate": evaluate_main}


def preflight(command: str, args: list[str]) -> Path | None:
    """Compose and validate the config as Hydra will, so that composition errors follow the error
    contract: of the job, or of each job of a sweep (-m). Skipped where Hydra does something else than run
    jobs (help, --cfg, ...). Returns the run directory of `optimize` and `bootstrap` (absolute), else None."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()

    def usage_error(message: str):
        raise UserError(f"{message}: put Hydra's options (--config-name, --cfg, -m, ...) before or after all "
                        f"key=value overrides, not between them (see `seedselect {command} --help`)")

    parser.error = usage_error
    parsed = parser.parse_args(args)
    check_override_syntax(parsed.overrides)
    check_launcher(parsed.overrides)
    if (parsed.help or parsed.hydra_help or parsed.cfg or parsed.info or parsed.shell_completion
            or parsed.config_path or parsed.config_dir or parsed.experimental_rerun):
        return None
    from hydra import initialize_config_module

    config_name = parsed.config_name or COMMANDS[command][1]
    with initialize_config_module(config_module(command), version_base="1.3"):
        if not parsed.multirun:
            return check_job(command, config_name, parsed.overrides, set())
        # the jobs' configs, as the jobs will check them: a slip in the last value of a sweep (or in any job of a
        # Slurm array) is the exit-2 line now, not after the jobs before it ran
        jobs, every = sweep_jobs(parsed.overrides)
        if len(jobs) > 20:  # about 0.1 s a job
            print(f"seedselect: checking the sweep's values in {len(jobs)} of its {every} jobs", file=sys.stderr)
        seen: set = set()
        for job in jobs:
            check_job(command, config_name, job, seen, in_sweep=True)
    return None


# Hydra's launchers whose jobs run on this machine, where the files a job reads can be checked before it starts.
LOCAL_LAUNCHERS = ("hydra._internal.core_plugins.basic_launcher.BasicLauncher",
                   "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher",
                   "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher")


def sweep_jobs(overrides: list[str]) -> tuple[list[list[str]], int]:
    """The overrides of the jobs of a sweep that hold each swept value at least once, in the order Hydra's basic
    sweeper makes them (`-m seed=0,1,2 loss.lam=0.5,0.9`: 3 + 2 - 1 = 4 of its 6 jobs; 200 classes on 4 shards: 203
    of 800, so that a large sweep is checked in seconds), and how many jobs it has; none where another sweeper is
    chosen (it makes its own)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    if any(o.key_or_group.lstrip("+~") == "hydra/sweeper" for o in parsed):
        return [], 0
    every = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    covered: set[str] = set()
    jobs = []
    for job in every:
        if not covered.issuperset(job):
            jobs.append(job)
            covered.update(job)
    return jobs, len(every)


def check_job(command: str, config_name: str, overrides: list[str], seen: set, in_sweep: bool = False
              ) -> Path | None:
    """Compose and check one job's config as Hydra and the job will: every bad value is the exit-2 line before
    anything loads. Returns the run directory of `optimize` and `bootstrap` (absolute), else None; a sweep's
    job (`in_sweep`) has Hydra's sweep directory instead, not checked here, and where its launcher runs it on
    another machine, only its values are. `seen`: the data sets already listed by this preflight (a sweep lists
    each once)."""
    from hydra import compose
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:  # in preflight's initialize_config_module
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
        run_dir = str(cfg.hydra.run.dir)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        message = " ".join(str(exc).split("\n")[0].split()).replace(" Check that it's in your config search path.", "")
        raise UserError(f"{message.rstrip('.')}{suggestion(message, command, config_name)} (see `seedselect "
                        f"{command} --help`)") from None
    launcher = cfg.hydra.launcher.get("_target_")
    with open_dict(cfg):
        del cfg["hydra"]
    if in_sweep and launcher not in LOCAL_LAUNCHERS:  # jobs on other machines (a Slurm array), whose files this one
        # may not see (a data set or weights on the nodes' scratch): their values alone
        schema = {"generate": GenerateConfig, "evaluate": EvaluateConfig}.get(command)
        if schema is None:
            check_config(load_structured(Config, cfg))
        else:
            load_structured(schema, cfg)
        return None
    # One check per command, the one its job runs too.
    if command == "generate":
        check_generate(load_structured(GenerateConfig, cfg))
        return None
    if command == "evaluate":
        check_evaluate(load_structured(EvaluateConfig, cfg))
        return None
    config = load_config(cfg)  # optimize and bootstrap: config.check_config
    check_weights(config.model)
    path = Path(os.path.abspath(os.path.expanduser(run_dir)))
    if not in_sweep:
        check_run_dir(path)
        check_resume(path, config, command)
    from seedselect_cli.files.datasets import load_classes

    # The references exist and the classes are known: before any model loads. Its warnings are said
    # once, by the job, which loads the classes again with its log set up.
    if (key := (repr(config.dataset), config.seed)) not in seen:
        load_classes(config.dataset, config.seed, quiet=True)
        seen.add(key)
    return path


def config_module(command: str) -> str:
    """The package folder of a command's configs."""
    return "seedselect_cli.tool_configs" if command in ("generate", "evaluate") else "seedselect_cli.configs"


def suggestion(message: str, command: str, config_name: str) -> str:
    """What the user may have meant by the key, group option or config name Hydra could not find."""
    import difflib
    import re
    from importlib.resources import files

    configs = files("seedselect_cli") / config_module(command).rsplit(".", 1)[1]
    if found := re.search(r"Cannot find primary config '([^']+)'", message):
        names = sorted(p.name.removesuffix(".yaml") for p in configs.iterdir() if p.name.endswith(".yaml")
                       and not p.name.startswith("_") and p.name not in ("evaluate.yaml", "generate.yaml"))
        close = difflib.get_close_matches(found[1], names, n=1, cutoff=0.5)
        return (f"; did you mean --config-name {close[0]}?" if close else "") + f" (named configs: {', '.join(names)})"
    if found := re.search(r"Could not find '([^'/]+)/([^']+)'", message):
        group = configs / found[1]
        options = sorted(p.name.removesuffix(".yaml") for p in group.iterdir() if p.name.endswith(".yaml")) \
            if group.is_dir() else []
        return f"; {found[1]} options: {', '.join(options)}" if options else ""
    if found := re.search(r"Could not override '([^']+)'|Key '([^']+)' (?:is )?not in", message):
        from hydra import compose

        key = found[1] or found[2]
        known = flat_keys(compose(config_name=config_name))  # in preflight's initialize_config_module
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        if close:
            return f"; did you mean {close[0]}?"
        if command == "generate":  # a handful of keys; the rest of what draws the image is in the seed file
            return f"; generate takes {', '.join(known)}, and draws with the sampler, steps and size the seed file records"
        if command == "evaluate":
            return f"; evaluate takes {', '.join(known)}"
        return ""
    return ""


def check_override_syntax(overrides: list[str]) -> None:
    """Each override parses in Hydra's grammar; if not, say how to write it (quoting is the usual fix, and where the
    shell split a value at its spaces, the words it made are named)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for i, override in enumerate(overrides):
        try:
            parser.parse_override(override)
        except HydraException:
            start, end = split_by_the_shell(overrides, i)
            key, _, value = " ".join(overrides[start:end]).partition("=")
            if value.startswith("[") and value.endswith("]"):
                items = ",".join('"' + v.strip().strip("'\"").replace('"', '\\"') + '"'
                                 for v in value[1:-1].split(","))
                quoted = f"{key}=[{items}]"
            else:
                quoted = key + '="' + value.replace('"', '\\"') + '"'
            if end - start > 1:
                raise UserError(f"cannot read the overrides {' '.join(map(repr, overrides[start:end]))}: the shell split "
                                f"{key}={value} at its spaces into {end - start} words; quote it, e.g. "
                                f"{for_the_shell(quoted)} (the outer quotes for the shell)") from None
            raise UserError(f"cannot read the override {override!r}: values with spaces, non-ASCII letters, ~ or "
                            f"other special characters must be quoted, e.g. {for_the_shell(quoted)} (the outer "
                            f"quotes for the shell)") from None


def split_by_the_shell(overrides: list[str], i: int) -> tuple[int, int]:
    """The overrides [start, end) around the unreadable `overrides[i]` that are the words of one `key=value` the shell
    split at its spaces (`dataset.classes=[sea gull]` typed unquoted: `dataset.classes=[sea` and `gull]`): from the
    last override with a key up to the next one, or on while a `[` is open; (i, i + 1) where it was no split."""
    start = i
    while start > 0 and "=" not in overrides[start]:
        start -= 1
    if "=" not in overrides[start] or overrides[start].startswith("-"):
        return i, i + 1
    end = i + 1
    while end < len(overrides) and not overrides[end].startswith("-") and (
            "=" not in overrides[end] or " ".join(overrides[start:end]).count("[") > " ".join(
                overrides[start:end]).count("]")):
        end += 1
    return start, end


# hydra/launcher options that run through hydra-submitit-launcher: ours (configs/hydra/launcher/) and its own
SUBMITIT_LAUNCHERS = ("slurm", "local", "submitit_slurm", "submitit_local")


def submitit_launcher_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None


def check_launcher(overrides: list[str]) -> None:
    """A sweep on `hydra/launcher=slurm` or `local` needs hydra-submitit-launcher (the `cluster` extra), which the
    plain install leaves out: without it Hydra ends in a page of its config search path."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(overrides):
        launcher = override.value() if override.key_or_group.lstrip("+~") == "hydra/launcher" else None
        if launcher in SUBMITIT_LAUNCHERS and not submitit_launcher_installed():
            raise UserError(f"hydra/launcher={launcher} runs through Hydra's submitit launcher, which is not installed "
                            f"here: pip install hydra-submitit-launcher (seedselect's cluster extra)")


def for_the_shell(argument: str) -> str:
    """`argument` quoted for a POSIX shell as a person would write it: in single quotes, or in double quotes where
    it holds an apostrophe ("Brewer's Blackbird")."""
    if "'" not in argument:
        return f"'{argument}'"
    return '"' + re.sub(r'([\\"$`])', r"\\\1", argument) + '"'


def pin_run_dir(args: list[str], run_dir: Path) -> list[str]:
    """`args` with `hydra.run.dir` set to the directory preflight resolved, so that Hydra uses the very
    directory whose state was recorded (a `${now:...}` in it would otherwise be read again)."""
    text = str(run_dir)
    if "\\" in text or "${" in text:  # beyond what a quoted override can say plainly: leave Hydra's own
        return args
    quoted = "'" + text.replace("'", "\\'") + "'"
    return add_override([a for a in args if not a.startswith("hydra.run.dir=")], f"hydra.run.dir={quoted}")


def add_override(args: list[str], override: str) -> list[str]:
    """`args` with one more override, beside the user's: Hydra's parser takes them as one group, before
    or after its options."""
    overrides = [i for i, a in enumerate(args) if "=" in a and not a.startswith("-")]
    at = overrides[0] + 1 if overrides else len(args)
    return [*args[:at], override, *args[at:]]


def check_run_dir(run_dir: Path) -> None:
    """The run directory can be made and written to (Hydra makes it before the job runs)."""
    for part in run_dir.parts:
        if len(part.encode()) > 255:
            raise UserError(f"hydra.run.dir={run_dir}: the folder name {part[:40]}... is {len(part.encode())} bytes "
                            f"long, over the 255 a file system allows; choose a shorter one")
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():
            raise UserError(f"hydra.run.dir={run_dir}: {existing} is a symbolic link to {os.readlink(existing)}, which "
                            f"does not exist; create its target or choose another directory")
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"hydra.run.dir={run_dir} cannot be made: {existing} is a file; choose another directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"hydra.run.dir={run_dir} is not writable ({existing}); choose another with "
                        f"hydra.run.dir=DIR")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"seedselect {__version__}")
        return 0
    command, args = argv[0], argv[1:]
    if command not in MAINS:
        print(f"error: unknown command {command!r}: choose one of {', '.join(MAINS)} "
              f"(see `seedselect --help`)", file=sys.stderr)
        return 2
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
            elif command not in ("optimize", "bootstrap"):
                said = ""
            elif kept:
                said = "; nothing was written"
            else:
                said = "; finished images are kept: run the same command again to resume"
            message = getattr(stop, "message", None) if not kept else None
            print(f"seedselect: {resumable(one_line(message)) if message else f'stopped by {name}{said}'}",
                  file=sys.stderr)
            return 128 + stop.signum


def _main(command: str, args: list[str]) -> int:
    global _before, _resume_with
    register_resolvers()
    try:
        check_requirements()  # an environment changed since `pip install` may load weights wrong without a word
        run_dir = preflight(command, args)
    except UserError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    _before = _resume_with = None
    if run_dir is not None:
        if not any(a.startswith("hydra.run.dir=") for a in args):
            _resume_with = f"hydra.run.dir={shlex.quote(str(run_dir))}"
        args = pin_run_dir(args, run_dir)
        if any(a.startswith("hydra.run.dir=") and str(run_dir) in a for a in args):
            _before = take_snapshot(run_dir)
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
