"""The package's own files (`assets/`), and how a run or seed file names them so that another install
finds them: `asset:<path>` rather than this install's absolute path."""

from __future__ import annotations

import os
from importlib.resources import files


def asset_path(relative: str) -> str:
    """Absolute path of a file shipped in the package's `assets/` folder."""
    return str(files("seedselect_cli") / "assets" / relative)


ASSET = "asset:"  # how seed files and run configs name the package's own assets, on any install


def portable(location: str) -> str:
    """A model or folder location as it is recorded: one inside the package's assets as `asset:<path>`,
    so that a run or seed file made on one install resolves on another; anything else as it is."""
    root = os.path.realpath(asset_path(""))
    real = os.path.realpath(os.path.expanduser(location)) if location else location
    if real and (real == root or real.startswith(root + os.sep)):
        return ASSET + os.path.relpath(real, root).replace(os.sep, "/")
    return location


def resolve_location(location: str) -> str:
    """The inverse of `portable`: `asset:<path>` is the path in this install's assets."""
    return asset_path(location.removeprefix(ASSET)) if location.startswith(ASSET) else location
