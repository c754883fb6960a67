"""Dataset adapters: each reads one on-disk layout and returns the same record per class.

A record is a class name, its prompt, and the paths of its reference images (`dataset.shots` of
them, drawn reproducibly from the chosen split). `load_classes` picks the adapter by `dataset.name`;
each adapter only finds its classes' images and hands them to `build_records`, which picks the classes
(`dataset.classes`, found however they are spelled: `NameLookup`; `dataset.max_images`) and draws their shots.
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from seedselect_cli.derive import derived_int
from seedselect_cli.errors import UserError, count_of

log = logging.getLogger(__name__)
DATASETS = ("folder", "imagefolder", "cub", "mini_imagenet", "cifar_fs", "imagenet_lt")  # one module each, here
# What people type for "every class" in `dataset.classes`, which is null (the default of every layout; the demo names one)
EVERY_CLASS_WORDS = ("all", "*", "every", "everything")
EVERY_CLASS_HINT = "for every class of the data set's split, pass dataset.classes=null"


@dataclass
class DatasetConfig:
    """`dataset`: where the references are and how to read them (the config schema's section)."""

    name: str = "folder"  # the adapter: one of DATASETS
    root: str | None = None
    classes: list[str] | None = None  # None: every class the adapter finds
    # a text file of class names, one a line: read into `classes` when the config is loaded (`load_config`)
    classes_file: str | None = None
    shots: int | None = None  # references per class; None: all of them
    # only the classes with at most this many images in the split (ImageNet-LT's few-shot classes: 19); None: any
    max_images: int | None = None
    split: str = "train"
    prompt_template: str = "a photo of a {}"
    resize_mode: str = "default"  # how references meet the sampler's size (diffusers' VaeImageProcessor)
    # held-out real images for `seedselect evaluate`, as `<heldout>/<class>/<image>`; null: the data set's
    # other split, or the class's images not drawn as references
    heldout: str | None = None


@dataclass(frozen=True)
class ClassRecord:
    name: str
    prompt: str
    images: tuple[Path, ...]  # its references: `dataset.shots` of its images in the split
    split_images: int  # how many images it has in `dataset.split` (what `bootstrap.fill_to` fills up)
    # its label as the data set numbers its classes, for training on real and generated images together: CUB's class
    # id - 1, the ImageNet-1k index, an ImageFolder's (its sorted class folders); None where it has none
    label: int | None = None


def split_of(cfg: DatasetConfig) -> str:
    """Where a class's images are, as a message names it: `dataset.split=train`, or `dataset.root` for the layouts
    that have no splits (`folder`, `imagefolder`: the root is the split)."""
    return "dataset.root" if cfg.name in ("folder", "imagefolder") else f"dataset.split={cfg.split}"


def fill_template(template: str, name: str) -> str:
    """The prompt of a class: `template` with the name in it, "a {}" read as "an" before a vowel
    ("a photo of an apple")."""
    if name[:1].lower() in "aeiou" and "a {}" in template:
        template = re.sub(r"\ba \{\}", "an {}", template)
    return template.format(name)


def draw_shots(paths: list[Path], shots: int | None, seed: int, class_name: str) -> list[Path]:
    """`shots` of `paths`, the same for the same seed and class whatever else changes (all if None)."""
    paths = sorted(paths)
    if shots is None or shots >= len(paths):
        return paths
    key = derived_int(seed, class_name)
    return sorted(random.Random(key).sample(paths, shots))


def name_key(name: str) -> str:
    """A class name as spelled loosely, to match a class folder or a name the user typed: in any case, with `_`, `-`
    or spaces between its words, without a CUB-style number and without apostrophes and possessive s
    (`094.Pine_Warbler`, `pine-warbler` and `Pine Warbler` are one class; CUB's `Brewer_Blackbird` and the field
    guides' `Brewer's Blackbird` too)."""
    name = re.sub("['\u2019]s\\b", "", re.sub(r"^\d+\.", "", name.strip()).lower())  # straight or typographic
    return " ".join(re.split(r"[\s_-]+", re.sub("['\u2019]", "", name))).strip()


def folder_class_name(folder: str) -> str:
    """A class folder's name read as the class's: a numbered folder's `094.` dropped (CUB's `images/094.Pine_Warbler`)
    and an ImageNet-1k WordNet id read as its name (ImageNet's `train/n01532829`: `house finch`), which is what a
    prompt and the zero-shot CLIP of `evaluate` need; `_` left to the layout. Any other name is itself."""
    from seedselect_cli.files.datasets.imagenet_names import name_of_wnid

    if re.fullmatch(r"n\d{8}", folder):
        return name_of_wnid(folder)
    return re.sub(r"^\d+\.(?=[^\W\d])", "", folder)  # 094.Pine_Warbler, not 3.5_inch_floppy


class NameLookup:
    """Class names found as typed: exactly in any case (an alias too), else spelled loosely (`name_key`) where that
    spelling names one class."""

    def __init__(self, names: Iterable[str], aliases: Mapping[str, str] | None = None):
        self.exact = {name.lower(): name for name in names}
        self.exact.update({alias.lower(): name for alias, name in (aliases or {}).items()})
        loose: dict[str, set[str]] = {}
        for spelled, name in self.exact.items():
            loose.setdefault(name_key(spelled), set()).add(name)
        self.loose = {key: next(iter(found)) for key, found in loose.items() if len(found) == 1}

    def find(self, name: str) -> str | None:
        return self.exact.get(str(name).lower()) or self.loose.get(name_key(str(name)))


def select_classes(available: list[str], wanted: list[str] | None, aliases: dict[str, str] | None = None
                   ) -> list[str]:
    """The classes named by `dataset.classes` (as `NameLookup` finds them), or all of them."""
    if wanted is None:
        return available
    lookup = NameLookup(available, aliases)
    chosen = []
    for name in wanted:
        found = lookup.find(name)
        if found is None:
            import difflib

            if str(name).strip().lower() in EVERY_CLASS_WORDS:
                hint = f" ({EVERY_CLASS_HINT})."
            else:
                close = list(dict.fromkeys([a for a in available if str(name).lower() in a.lower()]
                                           + difflib.get_close_matches(str(name), available, n=3, cutoff=0.6)))[:3]
                hint = f"; did you mean {', '.join(close)}?" if close else "."
            shown = ", ".join(available[:8]) + (f", ... ({len(available)} in all)" if len(available) > 8 else "")
            raise UserError(f"dataset.classes: no class named {name!r} in this dataset{hint} Its classes: {shown}")
        chosen.append(found)
    return list(dict.fromkeys(chosen))


def require_root(cfg: DatasetConfig) -> Path:
    if not cfg.root:
        raise UserError(f"dataset.root is not set: pass dataset.root=/path/to/{cfg.name}")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise UserError(f"dataset.root={cfg.root} is not an existing folder")
    return root


def require_split(cfg: DatasetConfig, splits: Sequence[str], dataset: str) -> str:
    if cfg.split not in splits:
        raise UserError(f"dataset.split={cfg.split!r}: choose one of {', '.join(splits)} for {dataset}")
    return cfg.split


def require_files(root: Path, names: Sequence[str], dataset: str) -> None:
    """`root` holds the data set's index files `names`. Where it is a folder inside such a folder (CUB's `images/`
    or a class folder in it, given for the data set's root), the error names the folder to pass."""
    missing = [name for name in names if not (root / name).exists()]
    if missing:
        above = next((p for p in list(root.resolve().parents)[:2] if all((p / name).exists() for name in names)), None)
        hint = f"; it lies inside one: pass dataset.root={above}" if above else ""
        raise UserError(f"dataset.root={root} is not a {dataset} folder: {', '.join(missing)} missing{hint}")


def class_shots(cfg: DatasetConfig, seed: int, dataset: str, name: str, paths: Sequence[Path]) -> list[Path]:
    """The class's references, `dataset.shots` of its `paths` (`draw_shots`); a class with fewer is said, as its
    set is then a smaller-shot one than asked for."""
    if cfg.shots is not None and cfg.shots > len(paths):
        log.warning("%s class %r has %s, fewer than dataset.shots=%d: using all of them", dataset, name,
                    count_of(len(paths), "image"), cfg.shots)
    return draw_shots(list(paths), cfg.shots, seed, name)


def build_records(cfg: DatasetConfig, seed: int, images: Mapping[str, Sequence[Path]], names: Sequence[str],
                  aliases: Mapping[str, str] | None = None, dataset: str = "dataset",
                  labels: Mapping[str, int] | None = None) -> list[ClassRecord]:
    """Records of the classes `dataset.classes` picks from `names` (all by default), in that order, those with at
    most `dataset.max_images` images, each with its prompt, `dataset.shots` of its `images` and its `labels`."""
    records = []
    chosen = select_classes(list(names), cfg.classes, aliases)
    if cfg.max_images is not None:
        chosen = rare_classes(cfg, chosen, images, dataset)
    for name in chosen:
        if not images.get(name):
            if cfg.classes is None:  # every class by default: pass over an empty one, say so
                log.warning("%s class %r has no images (%s); skipping it", dataset, name, split_of(cfg))
                continue
            raise UserError(f"{dataset} class {name!r} has no images ({split_of(cfg)})")
        paths = class_shots(cfg, seed, dataset, name, images[name])
        records.append(ClassRecord(name=name, prompt=fill_template(cfg.prompt_template, name), images=tuple(paths),
                                   split_images=len(images[name]), label=(labels or {}).get(name)))
    return records


def rare_classes(cfg: DatasetConfig, chosen: list[str], images: Mapping[str, Sequence[Path]], dataset: str
                 ) -> list[str]:
    """Those of the `chosen` classes with at most `dataset.max_images` images in the split; a class named in
    `dataset.classes` that has more is left out with a warning, and none left is an error."""
    rare = [name for name in chosen if len(images.get(name, ())) <= cfg.max_images]
    if cfg.classes is not None:
        for name in chosen:
            if name not in rare:
                log.warning("%s class %r has %s in %s, more than dataset.max_images=%d: leaving it "
                            "out", dataset, name, count_of(len(images[name]), "image"), split_of(cfg), cfg.max_images)
    if not rare:
        fewest = min((len(images.get(name, ())) for name in chosen), default=0)
        raise UserError(f"dataset.max_images={cfg.max_images}: no {dataset} class of {split_of(cfg)} "
                        f"{'named in dataset.classes ' if cfg.classes is not None else ''}has so few images (the "
                        f"fewest: {fewest}); raise it or set it to null")
    return rare


def read_class_list(path: str, key: str = "dataset.classes_file") -> list[str]:
    """The class names of `dataset.classes_file` (or evaluate's `classes_file`: `key`), one a line; blank lines and
    lines that begin with `#` are passed over. `UserError` where the file cannot be read or names none."""
    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{key}={path} is not UTF-8 text; save it as UTF-8") from None
    except OSError as exc:
        raise UserError(f"{key}={path} cannot be read ({exc.strerror or exc}); write the class "
                        f"names there, one a line") from None
    names = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not names:
        raise UserError(f"{key}={path} names no class: write one name a line (# begins a comment)")
    return names


def read_lines(path: Path) -> list[str]:
    """The lines of a data set's UTF-8 index file; `UserError` naming the file and line that is not text."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror}); check the data set's files") from None
    lines = []
    for number, raw in enumerate(data.splitlines(), 1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise UserError(f"{path}:{number}: not UTF-8 text ({raw[:40]!r}); re-save the file as UTF-8 or restore "
                            f"it from the data set's archive") from None
    return lines


def read_table(path: Path, columns: int = 2, numeric: Sequence[int] = ()) -> list[list[str]]:
    """Rows of a whitespace-separated text file (the last column may hold spaces); blank lines skipped.
    The columns in `numeric` must be whole numbers."""
    rows = []
    for number, line in enumerate(read_lines(path), 1):
        if line.strip():
            parts = line.split(maxsplit=columns - 1)
            if len(parts) != columns:
                raise UserError(f"{path}:{number}: expected {columns} columns, got {line!r}; fix the line or restore "
                                f"the file from the data set's archive")
            for column in numeric:
                if not parts[column].strip().isdigit():
                    raise UserError(f"{path}:{number}: {parts[column]!r} is not a whole number (column {column + 1}); "
                                    f"fix the line or restore the file from the data set's archive")
            rows.append([part.strip() for part in parts])
    return rows


def inside_root(root: Path, relative: str, source: Path, number: int | None = None) -> Path:
    """An image path an index file names, relative to the data set's root; `UserError` if it climbs out."""
    path = Path(relative)
    if path.is_absolute() or ".." in path.parts:
        where = f"{source}:{number}" if number else str(source)
        raise UserError(f"{where}: the image path {relative!r} leads outside dataset.root; index files name images "
                        f"relative to the root")
    return root / path


# The split whose images are held out from a run on another: where it has one, evaluate takes a class's
# real images from there.
OTHER_SPLIT = {"cub": {"train": "test", "test": "train"},
               "imagenet_lt": {"train": "val", "val": "test", "test": "val"}}
MAX_HELDOUT = 256  # real images per class that evaluate compares against, drawn reproducibly


@dataclass(frozen=True)
class HeldOut:
    """A class's real images that are not its references, and where they come from (said in the report)."""

    images: tuple[Path, ...]
    source: str


def class_folder(root: Path, name: str) -> Path | None:
    """The sub-folder of `root` that holds class `name`'s images: named as the class (`name_key`), as its run
    directory slug, or by its WordNet id where it is an ImageNet class (ImageNet's own `val/n01440764/` layout)."""
    from seedselect_cli.files.atomic import slugify
    from seedselect_cli.files.datasets.imagenet_names import imagenet_classes

    for candidate in (name, name.replace(" ", "_"), slugify(name)):
        if "/" not in candidate and candidate not in (".", "..") and (root / candidate).is_dir():
            return root / candidate
    wnids = {wnid for wnid, readable in imagenet_classes() if readable == name}
    key = name_key(name)
    return next((child for child in subfolders(root) if name_key(child.name) == key or child.name in wnids), None)


def subfolders(root: Path) -> list[Path]:
    """The folders in `root`, sorted; `UserError` where it cannot be listed."""
    try:
        return sorted(child for child in root.iterdir() if child.is_dir())
    except OSError as exc:
        raise UserError(f"{root} cannot be read ({exc.strerror or exc}); check its permissions") from None


def heldout_images(cfg: DatasetConfig, seed: int, record: ClassRecord, folder: str | None) -> HeldOut:
    """A class's held-out real images: from `folder/<class>` (`dataset.heldout`, or evaluate's `heldout=`)
    if given, else the data set's other split where it has one, else the images of the class's split
    that were not drawn as references."""
    if folder:
        root = Path(folder).expanduser()
        found = class_folder(root, record.name)
        if found is None:
            return HeldOut((), f"{root}/<class> (none for this class)")
        from seedselect_cli.files.images import list_images

        return HeldOut(tuple(draw_shots(list_images(found), MAX_HELDOUT, seed, record.name)), f"{root}/<class>")
    other = OTHER_SPLIT.get(cfg.name, {}).get(cfg.split)
    if other:
        with contextlib.suppress(UserError):
            [found] = load_classes(replace(cfg, split=other, classes=[record.name], shots=None, max_images=None), seed)
            return HeldOut(tuple(draw_shots(list(found.images), MAX_HELDOUT, seed, record.name)),
                           f"dataset.split={other}")
    [found] = load_classes(replace(cfg, classes=[record.name], shots=None, max_images=None), seed)
    rest = [p for p in found.images if p not in set(record.images)]
    return HeldOut(tuple(draw_shots(rest, MAX_HELDOUT, seed, record.name)),
                   f"{split_of(cfg)}, the images not drawn as references")


def load_classes(cfg: DatasetConfig, seed: int, quiet: bool = False) -> list[ClassRecord]:
    """The classes of the configured dataset, each with its prompt and reference image paths. `quiet`: without
    the warnings (empty classes skipped, fewer images than `dataset.shots`), for a second reading of a data set
    whose first reading said them (the job after the preflight check, evaluate after the run)."""
    from seedselect_cli.files.datasets import cifar_fs, cub, folder, imagefolder, imagenet_lt, mini_imagenet

    adapters = {"folder": folder, "imagefolder": imagefolder, "cub": cub, "mini_imagenet": mini_imagenet,
                "cifar_fs": cifar_fs, "imagenet_lt": imagenet_lt}
    assert tuple(adapters) == DATASETS
    if cfg.name not in adapters:
        raise UserError(f"dataset.name={cfg.name!r} is unknown: choose one of {', '.join(DATASETS)}")
    if not quiet:
        return adapters[cfg.name].load(cfg, seed)
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        return adapters[cfg.name].load(cfg, seed)
    finally:
        logging.disable(previous)
