"""The command line checked before Hydra runs it, so that a slip is one `error:` line (exit code 2) in about two
seconds, before any model loads and before anything is written: the overrides' syntax (with how to quote them),
the launcher's plugin, and each job's config as Hydra will compose it and the job will check it (every job of a
sweep that holds a value of it), with the data set, weights and run directory it names."""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf, open_dict

from seedselect_cli.config import (
    Config,
    UnsetVariable,
    check_config,
    check_resume,
    check_weights,
    flat_keys,
    interpolation_error,
    load_config,
    load_structured,
    resolve_shard,
)
from seedselect_cli.errors import UserError
from seedselect_cli.shell import for_the_shell, hydra_quoted
from seedselect_cli.tool_config import EvaluateConfig, GenerateConfig, check_evaluate, check_generate


@dataclass(frozen=True)
class JobDir:
    """The run directory of one `optimize` or `bootstrap` job, absolute. `new_each_start`: its name says when the
    command started, to the second (Hydra's default, `outputs/<config>/<time>`), so each start is meant to have a
    folder of its own, and one that exists already is another command's, started in the same second."""

    path: Path
    new_each_start: bool


def names_start_time(template: str) -> bool:
    """Whether a `hydra.run.dir` as written (`outputs/${now:%Y-%m-%d_%H-%M-%S}`) names the start time to the second
    or finer; a folder a day (`${now:%Y-%m-%d}`) is meant to be shared by that day's runs."""
    return any(re.search(r"%[STsf]", fmt) for fmt in re.findall(r"\$\{now:([^}]*)\}", template))


def preflight(command: str, args: list[str], default_config: str) -> JobDir | None:
    """Compose and validate the config as Hydra will, so that composition errors follow the error
    contract: of the job, or of each job of a sweep (-m). Skipped where Hydra does something else than run
    jobs (help, --cfg, ...). Returns the run directory of `optimize` and `bootstrap`, else None."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()

    def usage_error(message: str):
        raise UserError(f"{message}: put Hydra's options (--config-name, --cfg, -m, ...) before or after all "
                        f"key=value overrides, not between them (see `seedselect {command} --help`)")

    parser.error = usage_error
    parsed = parser.parse_args(args)
    check_override_syntax(parsed.overrides)
    check_launcher(parsed.overrides, parsed.multirun)
    if parsed.config_path is not None and not os.path.isabs(parsed.config_path):
        raise UserError(f"--config-path {parsed.config_path} is read inside seedselect's package, not from here "
                        f"(Hydra's rule for a relative --config-path); for a folder of your own configs pass "
                        f"--config-dir {parsed.config_path} (a config there may build on a named one: `defaults: "
                        f"[cub_tail, _self_]`)")
    if parsed.shell_completion:  # Hydra's script completes `seedselect` and `optimize` as two programs, asking
        # `seedselect -sc query=bash`, which is no command; without `install=...` Hydra ends in a traceback
        raise UserError(f"shell completion (--shell-completion, -sc) is not available for seedselect's commands: "
                        f"Hydra's completes a program of one command; every key, group and option is in "
                        f"`seedselect {command} --help`")
    if parsed.experimental_rerun:  # Hydra unpickles the file it names: code from a file, which seedselect never runs
        raise UserError(f"--experimental-rerun is not available: it unpickles {parsed.experimental_rerun}, and "
                        f"seedselect reads no pickles; to go on with a run, run its command again with its "
                        f"hydra.run.dir (its config is in RUN/config.yaml)")
    if parsed.help or parsed.hydra_help or parsed.cfg or parsed.info or parsed.config_path:
        return None
    config_dir = None  # --config-dir: the user's folder of configs, searched before the package's, as Hydra's run does
    if parsed.config_dir is not None:
        config_dir = os.path.abspath(os.path.expanduser(parsed.config_dir))
        if not os.path.isdir(config_dir):
            raise UserError(f"--config-dir {parsed.config_dir} is not an existing folder; pass the folder that holds "
                            f"your config files")
    config_name = parsed.config_name or default_config
    with configs_of(command, config_dir):
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


@contextlib.contextmanager
def configs_of(command: str, config_dir: str | None) -> Iterator[None]:
    """Hydra initialised with the command's config search path, as its run will have it: the package's configs,
    and `--config-dir`'s folder (absolute) before them where given (`hydra.initialize_config_module` has no place
    for it)."""
    from hydra import version
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_automatic_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    backup = get_gh_backup()
    version.setbase("1.3")  # as @hydra.main(version_base="1.3")
    search_path = create_automatic_config_search_path(None, f"{config_module(command)}.app", None)
    if config_dir is not None:
        search_path.prepend(provider="command-line", path=f"file://{config_dir}",
                            anchor=SearchPathQuery(provider="schema"))
    Hydra.create_main_hydra2(task_name="app", config_search_path=search_path)
    try:
        yield
    finally:
        restore_gh_from_backup(backup)


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
              ) -> JobDir | None:
    """Compose and check one job's config as Hydra and the job will: every bad value is the exit-2 line before
    anything loads. Returns the run directory of `optimize` and `bootstrap`, else None; a sweep's
    job (`in_sweep`) has Hydra's sweep directory instead, not checked here, and where its launcher runs it on
    another machine, only its values are. `seen`: the data sets already listed by this preflight (a sweep lists
    each once)."""
    from hydra import compose
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:  # in preflight's configs_of
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
        run_dir = str(cfg.hydra.run.dir)
        new_each_start = names_start_time(str(OmegaConf.to_container(cfg.hydra.run, resolve=False)["dir"]))
        where = ("hydra.sweep.dir", str(cfg.hydra.sweep.dir)) if in_sweep else ("hydra.run.dir", run_dir)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        if error := interpolation_error(getattr(exc, "full_key", None), exc):
            raise error from None
        message = " ".join(str(exc).split("\n")[0].split()).replace(" Check that it's in your config search path.", "")
        if found := re.fullmatch(r"Ambiguous value for argument '([^=']+)=(.*)'", message):  # a comma, without -m
            key, value = found[1], found[2]
            raise UserError(f"{key}={value} is several values (a comma separates them): to run a job for each, add -m; "
                            f"for one value that holds a comma, quote it, {for_the_shell(f'{key}={hydra_quoted(value)}')}; "
                            f"for a list, write {key}=[{value}]") from None
        raise UserError(f"{message.rstrip('.')}{suggestion(message, command, config_name)} (see `seedselect "
                        f"{command} --help`)") from None
    if command in ("optimize", "bootstrap") and "${" in where[1]:  # Hydra reads the path again, in its log file's name
        raise UserError(f"{where[0]}={where[1]}: Hydra cannot run a job in a folder whose name holds '${{' (it reads "
                        f"the name of the job's log file there as an interpolation): choose a folder without it")
    launcher = cfg.hydra.launcher.get("_target_")
    with open_dict(cfg):
        del cfg["hydra"]
    if in_sweep and launcher not in LOCAL_LAUNCHERS:  # jobs on other machines (a Slurm array), whose files this one
        # may not see (a data set or weights on the nodes' scratch): their values alone, where they do not read the
        # nodes' environment (`${oc.env:SLURM_TMPDIR}`, set in a job alone)
        schema = {"generate": GenerateConfig, "evaluate": EvaluateConfig}.get(command)
        with contextlib.suppress(UnsetVariable):
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
    check_kept_classes(config_name, overrides, config)
    check_weights(config.model)
    path = Path(os.path.abspath(os.path.expanduser(run_dir)))
    if not in_sweep:
        check_run_dir(path)
        if not new_each_start:  # there, a folder that exists is another command's: this one takes a new one
            check_resume(path, config, command)
        elif (shards := resolve_shard(config.runtime.shard)[1]) > 1:
            given = (f"runtime.shard={config.runtime.shard}" if config.runtime.shard.strip() != "0/1"
                     else f"torchrun (WORLD_SIZE={shards})")
            raise UserError(f"{given} splits the run among {shards} processes, which write one run directory "
                            f"together: pass each the same hydra.run.dir=DIR (the default, {path.parent}/<time>, "
                            f"is a new folder for each process)")
    from seedselect_cli.files.datasets import load_classes

    # The references exist and the classes are known: before any model loads. Its warnings are said
    # once, by the job, which loads the classes again with its log set up.
    if (key := (repr(config.dataset), config.seed)) not in seen:
        load_classes(config.dataset, config.seed, quiet=True)
        seen.add(key)
    return JobDir(path, new_each_start)


def check_kept_classes(config_name: str, overrides: list[str], config: Config) -> None:
    """`dataset=folder` on a named config of another layout (the default, the demo) keeps that config's
    `dataset.classes`: the folder's images would be drawn and named as the demo's marsh finch, and scored against its
    held-out images, in silence. Refused unless the command line names the classes itself."""
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o]
    if (config.dataset.name != "folder" or not config.dataset.classes or not {"dataset", "dataset.name"} & set(keys)
            or any(k.startswith("dataset.classes") for k in keys)):
        return
    classes = ",".join(config.dataset.classes)
    raise UserError(f"dataset=folder keeps the {config_name} config's dataset.classes=[{classes}]: the images of "
                    f"{config.dataset.root} would be drawn and named as {config.dataset.classes[0]!r}; for a folder of "
                    f"one concept use --config-name folder dataset.root={config.dataset.root} (its class named after "
                    f"the folder), or name the class: dataset.classes=[NAME]")


def config_module(command: str) -> str:
    """The package folder of a command's configs."""
    return "seedselect_cli.tool_configs" if command in ("generate", "evaluate") else "seedselect_cli.configs"


def suggestion(message: str, command: str, config_name: str) -> str:
    """What the user may have meant by the key, group option or config name Hydra could not find, among the
    configs on the search path (the package's, and `--config-dir`'s)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.object_type import ObjectType

    loader = GlobalHydra.instance().config_loader()  # in preflight's configs_of
    if found := re.search(r"Cannot find primary config '([^']+)'", message):
        names = [n for n in loader.get_group_options("", results_filter=ObjectType.CONFIG)
                 if not n.startswith("_") and n not in ("evaluate", "generate")]
        close = difflib.get_close_matches(found[1], names, n=1, cutoff=0.5)
        return (f"; did you mean --config-name {close[0]}?" if close else "") + (
            f" (named configs: {', '.join(names)})" if names else "")
    if found := re.search(r"Could not find '([^'/]+)/([^']+)'", message):
        options = loader.get_group_options(found[1], results_filter=ObjectType.CONFIG)
        return f"; {found[1]} options: {', '.join(options)}" if options else ""
    if found := re.search(r"Could not override '([^']+)'|Key '([^']+)' (?:is )?not in", message):
        from hydra import compose

        key = found[1] or found[2]
        known = flat_keys(compose(config_name=config_name))  # in preflight's configs_of
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
                items = ",".join(hydra_quoted(v.strip().strip("'\"")) for v in value[1:-1].split(","))
                quoted = f"{key}=[{items}]"
            else:
                quoted = f"{key}={hydra_quoted(value)}"
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


def check_launcher(overrides: list[str], multirun: bool) -> None:
    """A sweep on `hydra/launcher=slurm` or `local` needs hydra-submitit-launcher (the `cluster` extra), which the
    plain install leaves out: without it Hydra ends in a page of its config search path. A Slurm sweep (`-m`) is
    submitted with Slurm's `sbatch`: without it, submitit's traceback."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(overrides):
        launcher = override.value() if override.key_or_group.lstrip("+~") == "hydra/launcher" else None
        if launcher in SUBMITIT_LAUNCHERS and not submitit_launcher_installed():
            raise UserError(f"hydra/launcher={launcher} runs through Hydra's submitit launcher, which is not installed "
                            f"here: pip install hydra-submitit-launcher (seedselect's cluster extra)")
        if multirun and launcher in ("slurm", "submitit_slurm") and shutil.which("sbatch") is None:
            raise UserError(f"hydra/launcher={launcher} submits the sweep's jobs with Slurm's sbatch, which is not on "
                            f"this machine's PATH: run the command on the cluster's login node, or use "
                            f"hydra/launcher=local to run the jobs here")


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
