"""The `seedselect` console script's entry (and `python -m seedselect_cli`'s): help, the version and an unknown
command are answered here at once, without importing torch, diffusers or Hydra (which take 2 s and more); every
command is handed to `cli.main`."""

from __future__ import annotations

import sys

from seedselect_cli import __version__

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


def answer_at_once(argv: list[str]) -> int | None:
    """The exit code of what needs no command run (no arguments, `--help`, `--version`, a command that does not
    exist), having said it; None for a command."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"seedselect {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(argv[0].lower(), COMMANDS, n=1)  # `optimise`, as the docs spell the word
        print(f"error: unknown command {argv[0]!r}: {f'did you mean {close[0]}? ' if close else ''}choose one of "
              f"{', '.join(COMMANDS)} (see `seedselect --help`)", file=sys.stderr)
        return 2
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if (code := answer_at_once(argv)) is not None:
        return code
    from seedselect_cli.cli import main as run_command

    return run_command(argv)
