"""The keys a command line set that the run does not read, said in the job's log: the other command's
(`seedselect bootstrap n_images=100`), and those another key's value leaves unread (`loss.temperature` with the
centroid loss), which a sweep over them would repeat at every value."""

from __future__ import annotations

from seedselect_cli.config import Config


def unread_keys(command: str, overrides: list[str], config: Config) -> list[str]:
    """What `command` (`optimize` or `bootstrap`) does not read of `overrides` (as Hydra records them), one line each."""
    return [*other_commands_keys(command, overrides, config), *keys_not_read(overrides, config)]


def keys_and_values(overrides: list[str]) -> list[tuple[str, str]]:
    """Each override's key and value as typed (`+key=value` and `~key` name `key`)."""
    return [override.lstrip("+~").partition("=")[::2] for override in overrides]


def other_commands_keys(command: str, overrides: list[str], config: Config) -> list[str]:
    """What the command line set that the other of `optimize` and `bootstrap` reads and this one does not (each
    says what this command reads instead): `seedselect bootstrap n_images=100` makes bootstrap.n_images."""
    said = []
    for key, value in keys_and_values(overrides):
        if command == "bootstrap" and key == "n_images":
            said.append(f"n_images={value} is `seedselect optimize`'s: bootstrap makes bootstrap.n_images="
                        f"{config.bootstrap.n_images} images per class; pass bootstrap.n_images={value}")
        elif command == "bootstrap" and key == "bootstrap.n_images" and config.bootstrap.fill_to is not None:
            said.append(f"bootstrap.n_images={value} is not read with bootstrap.fill_to={config.bootstrap.fill_to}: "
                        f"each class gets the images that fill it up to {config.bootstrap.fill_to}")
        elif command == "bootstrap" and key == "optim.iterations":
            said.append(f"optim.iterations={value} is `seedselect optimize`'s: bootstrap refines each image "
                        f"bootstrap.iterations={config.bootstrap.iterations} times")
        elif command == "bootstrap" and key == "optim.backtrack":
            share = "null (never)" if config.bootstrap.backtrack is None else config.bootstrap.backtrack
            said.append(f"optim.backtrack={value} is `seedselect optimize`'s: bootstrap backtracks by "
                        f"bootstrap.backtrack={share}; pass bootstrap.backtrack={value}")
        elif command == "optimize" and key.startswith("bootstrap."):
            said.append(f"{key}={value} is `seedselect bootstrap`'s: optimize makes n_images={config.n_images} "
                        f"images per class, each refined optim.iterations={config.optim.iterations} times")
    return said


def keys_not_read(overrides: list[str], config: Config) -> list[str]:
    """What the command line set that this config does not read, given the value of the key it waits on (a sweep over
    it would make the same images at every value); each says what reads it."""
    init, method = config.init, config.init.method
    inverted = "for the starts from inverted references (init=inversion, nao or reference)"
    waits = {  # key: (not read now, the value that makes it so, what reads it)
        "loss.temperature": (config.loss.semantic != "contrastive", f"loss.semantic={config.loss.semantic}",
                             "the contrastive loss's tau (loss=contrastive)"),
        "init.noise": (method == "random", "init=random", inverted),
        "init.inversion_steps": (method == "random", "init=random", inverted),
        "init.inversion_guidance": (method == "random", "init=random", inverted),
        "init.nao_paths": (method != "nao", f"init={method}", "for NAO's start (init=nao)"),
        **{f"init.{key}": (method != "nao" or not init.nao_paths,
                           f"init={method}" if method != "nao" else "init.nao_paths=false",
                           "for NAO's paths (init=nao with init.nao_paths=true)")
           for key in ("nao_points", "nao_length_weight", "nao_iterations")},
    }
    said = []
    for key, value in keys_and_values(overrides):
        unread, because, reader = waits.get(key, (False, "", ""))
        if unread:
            said.append(f"{key}={value} is not read with {because}: it is {reader}")
    return said
