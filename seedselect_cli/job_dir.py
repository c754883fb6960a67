"""The run directory around one command: what was there before this process, which processes work
in it now, and, when a command fails or is stopped before making anything, taking back exactly what
it added.

Hydra makes the run directory, `.hydra/` and `<job>.log` before `optimize` or `bootstrap` runs. A
command that then fails must leave the user's folder as it found it:

- a folder that existed before stays, with every file that was in it: only names this process added
  are removed, and only names seedselect or Hydra write (never a file of the user's);
- Hydra's files that were there (`.hydra/*.yaml`, `<job>.log`) get their earlier contents back;
- nothing is removed while another process (a shard, a second copy of the command) works in the
  directory: every working process holds a shared lock on `RUN/.active` for its lifetime;
- nothing is removed once the directory holds work (a manifest line, an image, a seed).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from seedselect_cli.errors import UserError
from seedselect_cli.files.locks import lock

log = logging.getLogger(__name__)

ACTIVE = ".active"
HYDRA = ".hydra"
# What seedselect writes at the top of a run directory, besides Hydra's `.hydra/` and `<job>.log`.
OWN_FILES = ("config.yaml", "manifest.jsonl", ".lock", ACTIVE)
OWN_DIRS = ("images", "seeds", "bootstrap", "references", ".claims", HYDRA)
WORK_DIRS = ("images", "seeds", "bootstrap")
HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")
MAX_BACKUP = 1 << 20  # bytes: Hydra's files are a few kB; a larger file there is not Hydra's


@dataclass
class JobDirSnapshot:
    """A run directory as it was before this process touched it."""

    root: Path  # absolute
    existed: bool
    missing_parents: list[Path] = field(default_factory=list)  # ancestors that did not exist, innermost first
    entries: frozenset[str] = frozenset()  # names at the top of `root`
    hydra_files: dict[str, bytes] = field(default_factory=dict)  # `.hydra/<name>` -> its bytes
    log_sizes: dict[str, int] = field(default_factory=dict)  # `<name>.log` at the top -> its size
    inner: frozenset[str] = frozenset()  # names one level inside the folders seedselect writes ("images/x")
    manifest_size: int = 0  # bytes of RUN/manifest.jsonl: more afterwards means this process finished images


def take_snapshot(root: Path) -> JobDirSnapshot:
    """Record `root` before Hydra or seedselect write into it."""
    root = Path(os.path.abspath(os.path.expanduser(root)))
    if not root.is_dir():
        missing, parent = [], root.parent
        while not parent.exists() and parent != parent.parent:
            missing.append(parent)
            parent = parent.parent
        return JobDirSnapshot(root, existed=False, missing_parents=missing)
    entries = frozenset(os.listdir(root))
    hydra_files = {}
    for name in HYDRA_FILES:
        path = root / HYDRA / name
        with contextlib.suppress(OSError):
            if path.is_file() and not path.is_symlink() and path.stat().st_size <= MAX_BACKUP:
                hydra_files[name] = path.read_bytes()
    log_sizes = {}
    for name in entries:
        path = root / name
        with contextlib.suppress(OSError):
            if name.endswith(".log") and path.is_file() and not path.is_symlink():
                log_sizes[name] = path.stat().st_size
    inner = frozenset(f"{name}/{child}" for name in OWN_DIRS if name in entries and (root / name).is_dir()
                      and not (root / name).is_symlink() for child in _listdir(root / name))
    manifest = root / "manifest.jsonl"
    size = manifest.stat().st_size if manifest.is_file() and not manifest.is_symlink() else 0
    return JobDirSnapshot(root, True, [], entries, hydra_files, log_sizes, inner, size)


def claim_new_folder(root: Path) -> tuple[Path, JobDirSnapshot]:
    """Make a folder of this process's own at `root`, or where another process has just made that one (two commands
    started in the same second, whose default folders are named after it) at `root_2`, `root_3`, ...: made with
    `mkdir`, which one process alone wins. Returns the folder and its snapshot from before it was made, so that a
    failed start takes it back. `OSError` where it cannot be made."""
    root = Path(os.path.abspath(os.path.expanduser(root)))
    for number in range(1, 1000):
        path = root if number == 1 else root.with_name(f"{root.name}_{number}")
        if path.exists() or path.is_symlink():
            continue
        snapshot = take_snapshot(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path, snapshot
    raise FileExistsError(f"{root} and 998 folders beside it named after it exist")


def _listdir(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []


class ActiveMark:
    """A shared lock on `RUN/.active`, held while this process works in the run directory."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self.root: Path | None = None

    def hold(self, root: Path) -> None:
        if self._fd is not None:
            return
        try:
            root.mkdir(parents=True, exist_ok=True)
            fd = os.open(root / ACTIVE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError:
            return  # an unwritable directory is reported by the run itself, with what to do
        try:
            lock(fd, fcntl.LOCK_SH, root / ACTIVE)
        except UserError:  # a file system without locks: the run itself says so, with what to do
            os.close(fd)
            return
        self._fd, self.root = fd, root

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def others_active(root: Path) -> bool:
    """Whether another process holds `RUN/.active` (call after releasing this process's own mark)."""
    try:
        fd = os.open(root / ACTIVE, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError:
        return True  # cannot tell: assume someone is there
    try:
        return not lock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, root / ACTIVE)
    except UserError:  # a file system without locks, where no process holds one
        return False
    finally:
        os.close(fd)


def holds_work(root: Path) -> bool:
    """Whether `root` holds a run's work: a manifest line, or an image or seed file."""
    manifest = root / "manifest.jsonl"
    with contextlib.suppress(OSError):
        if manifest.is_file() and not manifest.is_symlink() and manifest.stat().st_size:
            return True
    for name in WORK_DIRS:
        folder = root / name
        if folder.is_dir() and not folder.is_symlink():
            for path in folder.rglob("*"):  # a planted link is no work, and is not followed
                if path.name != "metadata.jsonl" and path.is_file() and not path.is_symlink():
                    return True
    return False


def undo_failed_start(snapshot: JobDirSnapshot, job_name: str) -> bool:
    """Take back what this process added to the run directory. Returns whether the directory is now as
    it was (or gone, if this process made it)."""
    root = snapshot.root
    if not root.is_dir():
        return True
    _restore_hydra_files(snapshot)
    if others_active(root):
        log.info("another process works in %s: leaving it as it is", root)
        return False
    manifest = root / "manifest.jsonl"
    with contextlib.suppress(OSError):
        if not manifest.is_symlink() and manifest.is_file() and manifest.stat().st_size > snapshot.manifest_size:
            return False  # this process finished images: its run stays whole, log and all, to be resumed
    for name, size in snapshot.log_sizes.items():  # Hydra appended this run's lines to a log that was there
        with contextlib.suppress(OSError):
            if (root / name).is_file() and (root / name).stat().st_size > size:
                os.truncate(root / name, size)
    added = set(os.listdir(root)) - snapshot.entries
    if holds_work(root):  # an earlier run's work: take back only Hydra's files of this attempt
        for name in added:
            path = root / name
            if name == f"{job_name}.log" and path.is_file() and not path.is_symlink():
                path.unlink(missing_ok=True)
            elif name == HYDRA and path.is_dir() and not path.is_symlink():
                _remove_own_tree(path)
        return not (set(os.listdir(root)) - snapshot.entries)
    for name in added:
        path = root / name
        if path.is_symlink():
            continue
        if name in OWN_FILES or name == f"{job_name}.log" or name.startswith(".write-test-"):
            with contextlib.suppress(OSError):
                path.unlink()
        elif name in OWN_DIRS and path.is_dir():
            _remove_own_tree(path)
    for name in OWN_DIRS:  # in a folder of seedselect's that was there: what this process added to it
        folder = root / name
        if name in snapshot.entries and folder.is_dir() and not folder.is_symlink():
            for child in _listdir(folder):
                if f"{name}/{child}" in snapshot.inner:
                    continue
                path = folder / child
                if path.is_dir() and not path.is_symlink():
                    _remove_own_tree(path)
                elif not path.is_symlink():
                    _remove_own_file(path)
    if snapshot.existed:
        return not (set(os.listdir(root)) - snapshot.entries)
    for directory in (root, *snapshot.missing_parents):
        try:
            directory.rmdir()  # only while empty: never takes a file with it
        except OSError:
            return directory != root
    return True


def _restore_hydra_files(snapshot: JobDirSnapshot) -> None:
    from seedselect_cli.files.atomic import atomic_write

    for name, content in snapshot.hydra_files.items():
        path = snapshot.root / HYDRA / name
        with contextlib.suppress(OSError):
            if not path.is_symlink() and (not path.is_file() or path.read_bytes() != content):
                atomic_write(path, lambda tmp, content=content: tmp.write_bytes(content))


def _remove_own_tree(folder: Path) -> None:
    """Remove the files seedselect or Hydra write in `folder` (empty metadata, Hydra's yaml, claim
    locks), then every folder left empty; anything else stays, and with it its folders."""
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_symlink():
            continue
        if path.is_dir():
            with contextlib.suppress(OSError):
                path.rmdir()
        else:
            _remove_own_file(path)
    with contextlib.suppress(OSError):
        folder.rmdir()


def _remove_own_file(path: Path) -> None:
    """Remove `path` if it is a file seedselect or Hydra writes and holds no work (Hydra's yaml, a claim
    lock, a class's list of references, empty metadata)."""
    with contextlib.suppress(OSError):
        if (path.name in HYDRA_FILES and path.parent.name == HYDRA) or (
                path.suffix == ".lock" and path.parent.name == ".claims") or (
                path.suffix == ".sha256" and path.parent.name == "references") or (
                path.name == "metadata.jsonl" and not path.stat().st_size):
            path.unlink()
