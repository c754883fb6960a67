"""The run directory: every file appears by atomic rename, and a re-run resumes.

    RUN/config.yaml                          the resolved config
    RUN/manifest.jsonl                       one JSON object per finished image, written last
    RUN/images/<class>/<index:05d>.png       an ImageFolder: training code reads RUN/images directly
    RUN/images/metadata.jsonl                the same images for Hugging Face `imagefolder` (file_name, label, ...)
    RUN/seeds/<class>/<index:05d>.safetensors
    RUN/bootstrap/<class>.safetensors        `seedselect bootstrap`: the class's seed z_T^G
    RUN/references/<class>.sha256            the class's references, as `sha256sum -c` reads them in dataset.root

An image counts as finished when its manifest line is there and its files exist; anything else is
redone by the next run of the same command in the same directory. Several processes (shards) may
write to one run directory: manifest and metadata lines are appended under a file lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shlex
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from PIL import Image, PngImagePlugin
from safetensors import SafetensorError

from seedselect_cli.errors import SAME_COMMAND, UserError, first_line
from seedselect_cli.files.atomic import abandoned, atomic_write, slugify
from seedselect_cli.files.locks import lock
from seedselect_cli.shell import override_arg

log = logging.getLogger(__name__)
MANIFEST = "manifest.jsonl"
METADATA = "images/metadata.jsonl"
CONFIG = "config.yaml"
LOCK = ".lock"
CLAIMS = ".claims"
# May change between a run and its resumption: how it runs (the runtime, and whether the steps are recomputed in the
# backward pass: the same numbers), how many images, which classes (a loop over classes may fill one run directory),
# and what evaluate compares against.
RESUMABLE_KEYS = ("runtime", "sampler.checkpointing", "n_images", "bootstrap.n_images", "bootstrap.fill_to",
                  "dataset.classes", "dataset.max_images", "dataset.heldout")


# the folders of a run directory that its commands write and read back: another writer there corrupts the run
RUN_FOLDERS = ("images", "seeds", "bootstrap", "references", "baseline", "report")


def run_folder_holding(path: Path) -> Path | None:
    """The folder of a run directory's own files (`RUN_FOLDERS`) that `path` is or lies in, or None: a run
    directory is a folder holding its config and manifest."""
    path = Path(path).expanduser().absolute()
    for folder in (path, *path.parents):
        if folder.name in RUN_FOLDERS and (folder.parent / CONFIG).is_file() and (folder.parent / MANIFEST).is_file():
            return folder
    return None


class RunDirectory:
    """Writes one run's images, seeds and manifest; knows what a previous run already finished.

    Everything it writes stays inside the run directory (a symbolic link planted on the way is
    refused), and everything it reads back is checked: a manifest line counts only if its paths are
    the ones this class and index are written to and both files are there."""

    def __init__(self, root: Path):
        self.root = Path(root)
        # What this object has read of the manifest, which only grows (appends under the lock) until a repair
        # replaces it: (device, inode, bytes read, the bytes just before that point, the entries read). A later read
        # parses only what was appended: a run of hundreds of classes reads the manifest before each class.
        self._manifest_seen: tuple[int, int, int, bytes, list[dict]] | None = None

    def inside(self, path: Path) -> Path:
        """`path`, if writing it stays inside the run directory; else `UserError` (a symbolic link
        leads out)."""
        root, target = self.root.resolve(), Path(path).resolve()
        if target != root and root not in target.parents:
            raise UserError(f"{path} leads outside the run directory (to {target}) through a symbolic link; "
                            f"remove the link, or pass a new hydra.run.dir")
        return Path(path)

    @contextlib.contextmanager
    def writing(self, path: Path) -> Iterator[Path]:
        """Write `path` inside the run directory; a failed write (disk full, read-only) is a `UserError`
        that says how to go on."""
        self.inside(path)
        try:
            yield path
        except (OSError, SafetensorError) as exc:
            if isinstance(exc, SafetensorError):  # safetensors reports its writes' I/O errors as its own
                exc = OSError(str(exc).rsplit("I/O error: ", 1)[-1].split(" (os error")[0])
            raise UserError(f"cannot write {path} ({exc.strerror or exc}); what is finished is kept: free space "
                            f"or make the folder writable, then run {SAME_COMMAND} again to resume") from None

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the run directory's lock: one process at a time edits the manifest and metadata."""
        path = self.inside(self.root / LOCK)
        try:
            handle = open(path, "a")  # noqa: SIM115 (closed by the `with` below; opening is what may fail)
        except OSError as exc:
            raise UserError(f"cannot open the run directory's lock {path} ({exc.strerror}); remove it if it is "
                            f"not a file, or pass a new hydra.run.dir") from None
        with handle:
            lock(handle.fileno(), fcntl.LOCK_EX, path)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    @contextlib.contextmanager
    def claim(self, slug: str) -> Iterator[bool]:
        """Claim a class for this process while inside: True, or False if another process (a second copy
        of the command, an overlapping shard) is making it now."""
        path = self.inside(self.root / CLAIMS / f"{slug}.lock")
        with self.writing(path):
            path.parent.mkdir(exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            yield lock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, path)
        finally:
            os.close(fd)

    def start(self, config_yaml: str, method: str = "optimize", ignored: Sequence[str] = (),
              defaults_yaml: str | None = None, check_config: Callable[[str], object] | None = None,
              labels: Mapping[str, int] | None = None) -> None:
        """Create the directory, check it is writable and holds no run of another config (`check_resumable`) or
        method, save the config. `labels`: each class's `dataset_label`, for the metadata of images made before
        entries carried it."""
        self.check_writable()
        old = self.root / CONFIG
        self.check_resumable(config_yaml, ignored, defaults_yaml, check_config)
        with self.locked():
            others = {e.get("method", "optimize") for e in self._read_manifest()} - {method}
            if others:
                raise UserError(f"{self.root} holds images of `seedselect {others.pop()}`; "
                                f"`seedselect {method}` needs a new hydra.run.dir")
            with self.writing(old):
                atomic_write(old, lambda tmp: tmp.write_text(config_yaml))
                self._repair_manifest(labels or {})
            self._remove_abandoned_temporaries()

    def check_resumable(self, config_yaml: str, ignored: Sequence[str] = (), defaults_yaml: str | None = None,
                        check_config: Callable[[str], object] | None = None) -> None:
        """The directory holds no earlier run, or one of this config: keys in `ignored` (besides the resumable ones)
        may differ from the earlier run's; a key the earlier run's config lacks (made by an older version) counts as
        its `defaults_yaml` value. `check_config(text)` checks the earlier run's config (read back: untrusted) and
        raises if it is bad. Reads only: `start` calls it, and the commands' checks before anything loads."""
        old = self.root / CONFIG
        if not old.exists():
            return
        skip = (*RESUMABLE_KEYS, *ignored)
        text = self._read_config(old)
        if check_config is not None:
            try:
                check_config(text)
            except UserError as exc:
                raise UserError(f"{old} is damaged ({exc}); restore it or pass a new hydra.run.dir") from None
        before, after = _comparable(text, skip), _comparable(config_yaml, skip)
        if defaults_yaml is not None:
            before = _comparable(defaults_yaml, skip) | before
        if before != after:
            keys = [k for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
            differ = "; ".join(f"{k}: {_value_in(before, k)} there, {_value_in(after, k)} now" for k in keys[:3])
            more = f"; {len(keys) - 3} more" if len(keys) > 3 else ""
            same = " ".join(_resume_override(k, before, after) for k in keys) if len(keys) <= MAX_RESUME_KEYS else ""
            raise UserError(
                f"{self.root} holds a run made with another config ({differ}{more}); resume with the same "
                f"settings{f' ({same})' if same else ''} or pass a new hydra.run.dir"
            )

    def check_writable(self) -> None:
        """Before any work: the directory, its folders and its append-only files take writes."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"run directory {self.root} cannot be made ({exc.strerror}); choose another with "
                            f"hydra.run.dir=DIR") from None
        for name in ("images", "seeds", "bootstrap", "references", ".claims"):  # where a run writes later
            folder = self.inside(self.root / name)
            if folder.exists() and not folder.is_dir():
                raise UserError(f"{folder} is not a folder; move it away or pass a new hydra.run.dir")
        for folder in (self.root, *(self.root / n for n in ("images", "seeds", "bootstrap")
                                    if (self.root / n).is_dir())):
            probe = folder / f".write-test-{os.getpid()}"
            try:
                probe.write_text("")
                probe.unlink()
            except OSError as exc:
                raise UserError(f"run directory {self.root} is not writable ({folder}: {exc.strerror}); make it "
                                f"writable or choose another with hydra.run.dir=DIR") from None
        for name in (MANIFEST, METADATA, CONFIG):
            path = self.inside(self.root / name)
            if path.is_dir() or (path.exists() and not path.is_file()):
                raise UserError(f"{path} is not a file; move it away or pass a new hydra.run.dir")
            if path.is_file():
                try:
                    with open(path, "a"):
                        pass
                except OSError as exc:
                    raise UserError(f"{path} cannot be written ({exc.strerror}); make it writable (chattr -i, "
                                    f"chmod) or pass a new hydra.run.dir") from None

    def _read_config(self, path: Path) -> str:
        try:
            text = path.read_text(encoding="utf-8")
            if not isinstance(OmegaConf.to_container(OmegaConf.create(text)), dict):
                raise TypeError("not a mapping")
        except (OSError, ValueError, TypeError, OmegaConfBaseException, yaml.YAMLError) as exc:
            raise UserError(f"{path} is not a seedselect run config ({first_line(exc)}); this folder holds "
                            f"something else: pass a new hydra.run.dir") from None
        return text

    def check_class(self, slug: str) -> None:
        """Before a class's work: its folders and z_T^G file lead nowhere outside the run directory."""
        for path in (self.image_path(slug, 0).parent, self.seed_path(slug, 0).parent, self.bootstrap_seed_path(slug),
                     self.references_path(slug)):
            self.inside(path)

    def image_path(self, slug: str, index: int) -> Path:
        return self.root / "images" / slug / f"{index:05d}.png"

    def seed_path(self, slug: str, index: int) -> Path:
        return self.root / "seeds" / slug / f"{index:05d}.safetensors"

    def bootstrap_seed_path(self, slug: str) -> Path:
        return self.root / "bootstrap" / f"{slug}.safetensors"

    def references_path(self, slug: str) -> Path:
        return self.root / "references" / f"{slug}.sha256"

    def record_references(self, slug: str, paths: Sequence[Path], hashes: Sequence[str], dataset_root: str | None,
                          ) -> None:
        """List the references a class's images were made from, with their SHA-256, in `sha256sum`'s format and
        relative to `dataset_root` (`cd ROOT && sha256sum -c RUN/references/<class>.sha256` checks them): a
        few-shot evaluation leaves them out of its queries or takes them as its support set."""
        lines = "".join(_checksum_line(digest, _relative(Path(p), dataset_root)) for p, digest in zip(paths, hashes))
        path = self.references_path(slug)
        with self.writing(path):
            path.parent.mkdir(exist_ok=True)
            if path.is_file() and not path.is_symlink() and path.read_text(encoding="utf-8", errors="replace") != lines:
                log.warning("%s listed other references (the class's files changed since its earlier images were "
                            "made): it now lists those of the images made from here on", path)
            atomic_write(path, lambda tmp: tmp.write_text(lines, encoding="utf-8"))

    def finished(self, class_name: str | None = None) -> dict[tuple[str, int], dict]:
        """Manifest entries whose image and seed file both exist, keyed by (class, index); with `class_name`, that
        class's alone (the files of the others are not looked at: what a check before each class needs)."""
        return {(e["class"], int(e["index"])): e for e in self._read_manifest()
                if (class_name is None or e["class"] == class_name) and self._complete(e)}

    def save_image(self, path: Path, image: Image.Image, text: dict[str, str]) -> None:
        info = PngImagePlugin.PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
        with self.writing(path):
            atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))

    def append_manifest(self, entry: dict) -> None:
        """Add one finished image to the manifest, and to the metadata: written last, after its files."""
        with self.locked(), self.writing(self.root / MANIFEST):
            self.inside(self.root / METADATA)
            _append_line(self.root / MANIFEST, entry)
            _append_line(self.root / METADATA, metadata_row(entry))

    def _complete(self, entry: dict) -> bool:
        """The entry names this class's and index's own files, inside the run directory, and both are there."""
        slug = slugify(entry["class"])
        expected = {"image": self.image_path(slug, entry["index"]), "seed_file": self.seed_path(slug, entry["index"])}
        for key, path in expected.items():
            if entry[key] != path.relative_to(self.root).as_posix() or path.is_symlink() or not path.is_file():
                return False
        return True

    def _read_manifest(self) -> list[dict]:
        """The manifest's well-formed entries (`_manifest_entries`), in file order, parsing only what was appended
        since this object last read it."""
        path = self.inside(self.root / MANIFEST)
        if not path.exists():
            return []
        try:
            with open(path, "rb") as handle:
                status = os.fstat(handle.fileno())
                start, last, entries = self._manifest_read_before(handle, status)
                data = handle.read()
        except OSError as exc:
            raise UserError(f"cannot read {path} ({exc.strerror}); make it readable or pass a new "
                            f"hydra.run.dir") from None
        whole = data.rfind(b"\n") + 1  # the complete lines; one being appended is read again next time
        entries = entries + _manifest_entries(data[:whole])
        self._manifest_seen = (status.st_dev, status.st_ino, start + whole, (last + data[:whole])[-256:], entries)
        return entries + _manifest_entries(data[whole:])

    def _manifest_read_before(self, handle, status: os.stat_result) -> tuple[int, bytes, list[dict]]:
        """Where to go on reading the open manifest, the bytes just before, and the entries read up to there: where
        this object stopped last time if the file is the same one, grown (its bytes before that point unchanged),
        else from its start. `handle` is left there."""
        seen = self._manifest_seen
        if seen is not None and seen[:2] == (status.st_dev, status.st_ino) and status.st_size >= seen[2]:
            _, _, offset, last, entries = seen
            handle.seek(offset - len(last))
            if handle.read(len(last)) == last:
                return offset, last, entries  # not changed in place: the next read makes a new list
        handle.seek(0)
        return 0, b"", []

    def _remove_abandoned_temporaries(self) -> None:
        """Delete the temporary files of writers that were killed (never of a live shard's writer)."""
        now = time.time()
        for tmp in self.root.rglob(".*.tmp"):
            if abandoned(tmp, now) and not tmp.is_symlink():
                tmp.unlink(missing_ok=True)

    def _repair_manifest(self, labels: Mapping[str, int]) -> None:
        """Drop lines a killed run left half-written, whose files are gone, or repeated, so appends stay
        clean; rewrite the metadata from the manifest. Call with the lock held."""
        path = self.root / MANIFEST
        text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
        good = list({(e["class"], int(e["index"])): e for e in self._read_manifest() if self._complete(e)}.values())
        lines = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in good)
        if lines != text:
            log.warning("manifest: dropping %d incomplete entries left by an interrupted run",
                        sum(1 for line in text.split("\n") if line.strip()) - len(good))
            atomic_write(path, lambda tmp: tmp.write_text(lines, encoding="utf-8"))
        metadata = "".join(json.dumps(metadata_row(e, labels), ensure_ascii=False) + "\n" for e in good)
        atomic_write(self.inside(self.root / METADATA), lambda tmp: tmp.write_text(metadata, encoding="utf-8"))


def _well_formed(entry: object) -> bool:
    """A manifest entry this version can trust the shape of (its paths are checked against the files)."""
    return (isinstance(entry, dict) and isinstance(entry.get("class"), str) and entry["class"] != ""
            and type(entry.get("index")) is int and 0 <= entry["index"] < 10**9
            and isinstance(entry.get("image"), str) and isinstance(entry.get("seed_file"), str))


def _relative(path: Path, root: str | None) -> str:
    """`path` relative to `root` where it lies inside it (links not followed: a data set's images may be links to
    files elsewhere), else absolute."""
    path = Path(os.path.abspath(path))
    if root:
        with contextlib.suppress(ValueError):
            return path.relative_to(os.path.abspath(root)).as_posix()
    return path.as_posix()


def _checksum_line(digest: str, name: str) -> str:
    """One line of `sha256sum` output; a name with a backslash or a line break escaped as GNU coreutils does."""
    if any(c in name for c in "\\\n\r"):
        return f"\\{digest}  " + name.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r") + "\n"
    return f"{digest}  {name}\n"


def metadata_row(entry: dict, labels: Mapping[str, int] | None = None) -> dict:
    """A manifest entry as a line of Hugging Face `imagefolder` metadata (paths relative to RUN/images); `labels`:
    the `dataset_label` of an entry's class where the entry has none (made by an older version)."""
    row = {"file_name": Path(entry["image"]).relative_to("images").as_posix(), "label": entry["class"]}
    label = entry.get("dataset_label", (labels or {}).get(entry["class"]))
    if label is not None:
        row["dataset_label"] = label
    row.update({k: entry[k] for k in ("prompt", "index", "init_seed", "loss", "method") if k in entry})
    row["seed_file"] = f"../{entry['seed_file']}"
    return row


def _manifest_entries(data: bytes) -> list[dict]:
    """The well-formed entries of manifest lines: a class name, an index >= 0, and both paths as strings; a line
    cut short or edited into something else is passed over. Lines end at newlines only (a name may hold U+2028)."""
    entries = []
    for line in data.split(b"\n"):
        try:
            entry = json.loads(line.decode("utf-8", errors="replace"))
        except (json.JSONDecodeError, RecursionError):
            continue
        if _well_formed(entry):
            entries.append(entry)
    return entries


def _append_line(path: Path, entry: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _value_in(config: dict, key: str) -> str:
    """A flattened config's value of `key` as typed, or "not set" where it has none."""
    return _as_typed(config[key]) if key in config else "not set"


MAX_RESUME_KEYS = 8  # the overrides that would resume a run of another config, said up to this many


def _resume_override(key: str, before: dict, after: dict) -> str:
    """The shell word that sets `key` back to its value in the earlier run's config (`before`), in Hydra's syntax:
    `+key=value` adds a key this command's config (`after`) lacks, `~key` removes one the earlier run did not have."""
    if key not in before:
        return f"~{key}"
    name = key if key in after else f"+{key}"
    if isinstance(before[key], str):
        return override_arg(name, before[key])
    return shlex.quote(f"{name}={_as_typed(before[key])}")  # 'kstep.weights=[0.05, 0.25, 0.7]': one word


def _as_typed(value) -> str:
    """A config value as it is typed on the command line: null, true, 0.5, 'a name'."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return repr(value) if isinstance(value, str) else str(value)


def _comparable(config_yaml: str, skip: Sequence[str]) -> dict:
    """Flattened config without the keys (or sections) in `skip`, its `${asset:...}` resolved (so that a run
    written before assets were recorded that way compares equal)."""
    try:
        data = OmegaConf.to_container(OmegaConf.create(config_yaml), resolve=True) or {}
    except OmegaConfBaseException:  # an interpolation this version cannot resolve: compare it as written
        data = OmegaConf.to_container(OmegaConf.create(config_yaml)) or {}
    flat: dict = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}{key}.", value)
        else:
            flat[prefix[:-1]] = node

    walk("", data)
    return {k: v for k, v in flat.items() if not any(k == s or k.startswith(f"{s}.") for s in skip)}


def seed_folder(path: Path) -> Path:
    """`seed_file` as given, but RUN/seeds for a run directory: its images' seeds (not its bootstrap z_T^G)."""
    return path / "seeds" if (path / CONFIG).is_file() and (path / "seeds").is_dir() else path


def run_images_of(path: Path) -> Path | None:
    """Where a run keeps the image of the seed file `path` (RUN/images/<class>/<index>.png), or the images of a folder
    of its seeds (RUN/seeds or a class's folder in it); None for seeds outside a run."""
    folder = path if path.is_dir() else path.parent
    for seeds in (folder, folder.parent):
        if seeds.name == "seeds" and (seeds.parent / "images").is_dir():
            images = seeds.parent / "images" / folder.relative_to(seeds)
            return images if path.is_dir() else images / f"{path.stem}.png"
    return None


SWEEP_MARK = "multirun.yaml"  # Hydra writes it at the top of a sweep's folder (`-m`)


def sweep_runs(folder: Path) -> list[Path]:
    """The run directories of a sweep's folder (`-m`: one per swept value, `folder/<overrides>/config.yaml`) in the
    order Hydra launched them (`loss.lam=0.5,1,2,10`, not 10 before 2 as by name); [] where `folder` is not a
    sweep's."""
    if not (folder / SWEEP_MARK).is_file() or (folder / CONFIG).exists():
        return []
    runs = [p.parent for p in folder.glob(f"*/{CONFIG}") if p.is_file()]
    return sorted(runs, key=lambda run: (_job_number(run), run.name))


def _job_number(run: Path) -> float:
    """Hydra's number of the sweep's job that made `run` (`.hydra/hydra.yaml`: hydra.job.num); unknown: last."""
    with contextlib.suppress(OSError, yaml.YAMLError, AttributeError, TypeError, KeyError):
        number = yaml.safe_load((run / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]["num"]
        if isinstance(number, int):
            return number
    return float("inf")


def check_run_path(run_dir: Path) -> None:
    """`run_dir=` names a run directory (the folder holding its config.yaml): else one line saying what it names
    (a file, a folder inside a run, a sweep's folder of runs) and what to pass instead."""
    if run_dir.is_file():
        raise UserError(f"run_dir={run_dir} is a file; pass the run's folder (the one holding {CONFIG} and images/)")
    if not (run_dir / CONFIG).is_file():
        if (run_dir.parent / CONFIG).is_file():  # RUN/images, RUN/seeds, RUN/report
            raise UserError(f"run_dir={run_dir} is a folder inside a run; pass the run directory, "
                            f"{override_arg('run_dir', str(run_dir.parent))}")
        # a sweep's folder (-m), one run directory per job; or Hydra's outputs/ (outputs/<config>/<time>)
        runs = next((found for pattern in (f"*/{CONFIG}", f"*/*/{CONFIG}")
                     if (found := sorted(p.parent.relative_to(run_dir).as_posix() for p in run_dir.glob(pattern)))),
                    []) if run_dir.is_dir() else []
        if runs:
            shown = ", ".join(runs[:3]) + (f", ... ({len(runs)} in all)" if len(runs) > 3 else "")
            raise UserError(f"run_dir={run_dir} holds run directories, not a run ({shown}): evaluate each, e.g. "
                            f"{override_arg('run_dir', str(run_dir / runs[0]))}")
        raise UserError(f"run_dir={run_dir} is not a seedselect run directory (no {CONFIG}); pass the folder a "
                        f"`seedselect optimize` or `bootstrap` run wrote")
