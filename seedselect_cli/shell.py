"""Command lines the tool prints for a person to paste into a POSIX shell: each argument quoted for the shell and,
where it is an override, for Hydra's grammar too (a folder named `my run's (1)` is two quotings deep)."""

from __future__ import annotations

import functools
import re
import shlex


def for_the_shell(argument: str) -> str:
    """`argument` quoted for a POSIX shell as a person would write it: in single quotes, or in double quotes where
    it holds an apostrophe ("Brewer's Blackbird")."""
    if "'" not in argument:
        return f"'{argument}'"
    return '"' + re.sub(r'([\\"$`])', r"\\\1", argument) + '"'


@functools.cache
def _parser():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


def _reads_back(override: str, value: str) -> bool:
    from hydra.errors import HydraException

    try:
        return _parser().parse_override(override).value() == value
    except HydraException:
        return False


def hydra_quoted(value: str) -> str:
    """`value` in Hydra's double quotes, which read back any string: `"` escaped, and the backslashes before a `"`
    or at the end doubled (Hydra keeps every other backslash as it is)."""
    return '"' + re.sub(r'\\+(?="|$)', lambda run: run[0] * 2, value).replace('"', '\\"') + '"'


def override_arg(key: str, value: str) -> str:
    """`key=value` as one shell word that hands Hydra an override whose value is `value`: `key=` and the value in
    the shell's quotes where Hydra reads it as it is (`run_dir='my run'`), else the value in Hydra's double quotes
    and the whole word in the shell's (`"run_dir=\\"my run's (1)\\""`)."""
    if _reads_back(f"{key}={value}", value):
        return f"{key}={shlex.quote(value)}"
    return for_the_shell(f"{key}={hydra_quoted(value)}")
