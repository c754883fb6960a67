"""Writing files so that a reader never sees half of one, and file-system-safe names.

`atomic_write` writes beside the target and renames it into place: a killed writer leaves an
abandoned temporary file (`abandoned` tells which), never a torn file. `slugify` turns a class name
into a folder name that stays distinct for distinct names.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import unicodedata
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, fsync it, then rename it onto `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{HOST}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:60] or "host"
STALE_SECONDS = 3600  # no single file takes an hour to write: an older temporary file is abandoned


def abandoned(tmp: Path, now: float) -> bool:
    """A temporary file of `atomic_write` that no live process will rename: its writer was killed."""
    parts = tmp.name.rsplit(".", 3)  # .<name>.<host>.<pid>.tmp
    try:
        if len(parts) == 4 and parts[1] == HOST and parts[2].isdigit():
            os.kill(int(parts[2]), 0)  # raises if no such process on this host
            return False
        return now - tmp.stat().st_mtime > STALE_SECONDS
    except ProcessLookupError:
        return True
    except OSError:
        return False


def slugify(name: str) -> str:
    """A file-system-safe folder name for a class: ASCII letters, digits, `-`, `_`, `.`; never `..`; at most 120
    characters, distinct names distinct (a hash of the name where it was changed or cut)."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", ascii_name).strip("._")
    if not slug:
        slug = "class"
    if slug != name.replace(" ", "_") or len(slug) > 120:  # something dropped, replaced or cut: keep names distinct
        slug = f"{slug[:111]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return slug
