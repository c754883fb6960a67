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
import os
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from seedselect_cli import __version__
from seedselect_cli.config import Config, load_config, load_structured, register_resolvers
from seedselect_cli.errors import Interrupted, UserError
from seedselect_cli.writer import is_fresh_run_dir, remove_fresh_run_dir

COMMANDS = {
    "optimize": ("SeedSelect: n_images fully optimised seeds per class", "demo"),
    "bootstrap": ("bulk image sets: bootstrap.n_images per class, seconds per image", "demo"),
    "generate": ("redraw the image of a saved seed file, pixel for pixel", "generate"),
    "evaluate": ("metrics of a run beside plain Stable Diffusion, and a report in RUN/report", "evaluate"),
}

USAGE = f"""usage: seedselect COMMAND [--config-name NAME] [key=value ...] [hydra options]

seedselect {__version__}: make Stable Diffusion draw rare concepts by optimising the starting noise
(SeedSelect, Samuel et al., AAAI 2024).

commands:
""" + "".join(f"  {name:<10} {text}\n" for name, (text, _) in COMMANDS.items()) + """
examples:
  seedselect optimize                                   the demo: tiny model, CPU, offline, seconds
  seedselect optimize --config-name folder dataset.root=imgs/tiger_cat
  seedselect optimize --config-name cub_tail dataset.root=CUB_200_2011 dataset.classes="[Pine Warbler]"
  seedselect bootstrap --config-name cub_tail dataset.root=CUB_200_2011 bootstrap.n_images=100
  seedselect generate seed_file=outputs/.../seeds/red_disc/00000.safetensors out=red_disc.png
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
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except Interrupted as exc:
        print(f"seedselect: {exc}", file=sys.stderr)
        raise SystemExit(128 + exc.signum) from None


def run_in_job_dir(run: Callable[[Config, Path], object], cfg: DictConfig) -> None:
    """Run `optimize` or `bootstrap` in Hydra's job directory. If it fails before writing an image into
    a directory that held nothing but Hydra's own files, that directory goes again: a bad input
    leaves nothing behind."""
    out = Path(HydraConfig.get().runtime.output_dir)
    fresh = is_fresh_run_dir(out)
    try:
        with user_errors():
            run(load_config(cfg), out)
    except SystemExit as exc:
        if exc.code == 2 and fresh:
            remove_fresh_run_dir(out)
        raise


@hydra.main(version_base="1.3", config_path="configs", config_name="demo")
def optimize_main(cfg: DictConfig) -> None:
    from seedselect_cli.pipeline import run_optimize

    run_in_job_dir(run_optimize, cfg)


@hydra.main(version_base="1.3", config_path="configs", config_name="demo")
def bootstrap_main(cfg: DictConfig) -> None:
    from seedselect_cli.pipeline import run_bootstrap

    run_in_job_dir(run_bootstrap, cfg)


@hydra.main(version_base="1.3", config_path="configs", config_name="generate")
def generate_main(cfg: DictConfig) -> None:
    from seedselect_cli.generate import GenerateConfig, run_generate

    with user_errors():
        out = run_generate(load_structured(GenerateConfig, cfg))
        print(f"wrote {out}")


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
def evaluate_main(cfg: DictConfig) -> None:
    from seedselect_cli.evaluate import EvaluateConfig, run_evaluate

    with user_errors():
        run_evaluate(load_structured(EvaluateConfig, cfg))


MAINS = {"optimize": optimize_main, "bootstrap": bootstrap_main, "generate": generate_main,
         "evaluate": evaluate_main}


def preflight(command: str, args: list[str]) -> None:
    """Compose and validate the config as Hydra will, so that composition errors follow the error
    contract. Skipped where Hydra does something else than run one job (help, multirun, --cfg, ...)."""
    from hydra import compose, initialize_config_module
    from hydra._internal.utils import get_args_parser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    parsed = get_args_parser().parse_args(args)
    if (parsed.help or parsed.hydra_help or parsed.multirun or parsed.cfg or parsed.info
            or parsed.shell_completion or parsed.config_path or parsed.config_dir or parsed.experimental_rerun):
        return
    config_name = parsed.config_name or COMMANDS[command][1]
    try:
        with initialize_config_module("seedselect_cli.configs", version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=parsed.overrides, return_hydra_config=True)
            run_dir = str(cfg.hydra.run.dir)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        message = " ".join(str(exc).split("\n")[0].split())
        raise UserError(f"{message} (see `seedselect {command} --help`)") from None
    with open_dict(cfg):
        del cfg["hydra"]
    if command == "generate":
        from seedselect_cli.generate import GenerateConfig

        load_structured(GenerateConfig, cfg)
    elif command == "evaluate":
        from seedselect_cli.evaluate import EvaluateConfig

        load_structured(EvaluateConfig, cfg)
    else:
        load_config(cfg)
        check_run_dir(Path(run_dir))


def check_run_dir(run_dir: Path) -> None:
    """The run directory can be made and written to (Hydra makes it before the job runs)."""
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
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
    register_resolvers()
    try:
        preflight(command, args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not any(a.startswith("hydra.job.name=") for a in args):
        # Beside the user's overrides: Hydra's parser takes them as one group, before or after its options.
        overrides = [i for i, a in enumerate(args) if "=" in a and not a.startswith("-")]
        args.insert(overrides[0] + 1 if overrides else len(args), f"hydra.job.name={command}")
    saved = sys.argv
    sys.argv = [f"seedselect {command}", *args]
    try:
        MAINS[command]()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
