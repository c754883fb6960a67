"""Are the libraries seedselect needs installed at the versions it declares (`pyproject.toml`)?

pip resolves them on `pip install`, but an environment can drift afterwards: `pip install --no-deps -e .` into a conda
environment, a later `pip install transformers==5.0` for another project. Older versions do not always fail loudly:
transformers 5.0 reads the toy world's text encoder (saved by a later 5.x, its keys without `text_model.`) as random
weights, and the demo ends at a loss of 0.36 instead of 0.13 without a word; 5.4 to 5.17 need torchvision for the
CLIP image processor. So each command first compares what is installed with what the installed
package's metadata asks for, and names what to upgrade in one line. A source tree run without installing has no
metadata and is not checked.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Iterable

from packaging.requirements import InvalidRequirement, Requirement

from seedselect_cli.errors import UserError

DISTRIBUTION = "seedselect"


def installed_version(name: str) -> str | None:
    """The installed version of distribution `name`, None if it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def unmet_requirements(requires: Iterable[str], version_of: Callable[[str], str | None]
                       ) -> list[tuple[Requirement, str | None]]:
    """The requirements among `requires` (lines as in a distribution's metadata; those of extras are skipped) that
    `version_of` (distribution name -> installed version or None) does not meet, each with the version found.
    Pre-releases and local builds (`2.13.0+cpu`) meet a bound as their release would."""
    unmet = []
    for line in requires:
        try:
            requirement = Requirement(line)
        except InvalidRequirement:
            continue
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        found = version_of(requirement.name)
        if found is None or not requirement.specifier.contains(found, prereleases=True):
            unmet.append((requirement, found))
    return unmet


def check_requirements(version_of: Callable[[str], str | None] | None = None) -> None:
    """Raise a one-line UserError naming every library installed at a version seedselect does not declare it works
    with, and the pip command that fixes it. `version_of`: `installed_version` unless given."""
    try:
        requires = importlib.metadata.requires(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        return
    unmet = unmet_requirements(requires, version_of or installed_version)
    if not unmet:
        return
    said = ", ".join(f"{r.name}{r.specifier} ({'not installed' if found is None else f'found {found}'})"
                     for r, found in unmet)
    wanted = " ".join(f"'{r.name}{r.specifier}'" for r, _ in unmet)
    raise UserError(f"seedselect needs {said}: pip install {wanted}")
