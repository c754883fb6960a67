"""The CUB-200-2011 layout: `images.txt`, `classes.txt`, `image_class_labels.txt`,
`train_test_split.txt` and `images/<class dir>/`.

Class names are shown without the `001.` prefix and with spaces for underscores
("Pine Warbler"); `dataset.classes` accepts either form. `dataset.split`: train, test or all.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from seedselect_cli.config import DatasetConfig
from seedselect_cli.datasets import ClassRecord, draw_shots, require_root, select_classes
from seedselect_cli.errors import UserError

FILES = ("images.txt", "classes.txt", "image_class_labels.txt", "train_test_split.txt")
SPLITS = {"train": {"1"}, "test": {"0"}, "all": {"0", "1"}}


def display_name(class_dir: str) -> str:
    """`094.Pine_Warbler` -> `Pine Warbler`."""
    return class_dir.split(".", 1)[-1].replace("_", " ")


def _table(path: Path) -> dict[str, str]:
    rows = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            parts = line.split(maxsplit=1)
            if len(parts) != 2:
                raise UserError(f"{path}:{number}: expected '<id> <value>', got {line!r}")
            rows[parts[0]] = parts[1].strip()
    return rows


def load(cfg: DatasetConfig, seed: int) -> list[ClassRecord]:
    root = require_root(cfg)
    missing = [name for name in FILES if not (root / name).is_file()]
    if missing:
        raise UserError(f"dataset.root={cfg.root} is not a CUB_200_2011 folder: {', '.join(missing)} missing")
    if cfg.split not in SPLITS:
        raise UserError(f"dataset.split={cfg.split!r}: choose one of {', '.join(SPLITS)} for CUB")
    images, classes = _table(root / "images.txt"), _table(root / "classes.txt")
    labels, is_train = _table(root / "image_class_labels.txt"), _table(root / "train_test_split.txt")

    by_class: dict[str, list[Path]] = defaultdict(list)
    for image_id, relative in images.items():
        if is_train.get(image_id) in SPLITS[cfg.split] and labels.get(image_id) in classes:
            by_class[display_name(classes[labels[image_id]])].append(root / "images" / relative)
    names = [display_name(d) for _, d in sorted(classes.items(), key=lambda kv: int(kv[0]))]
    chosen = select_classes(names, cfg.classes, aliases={d: display_name(d) for d in classes.values()})
    records = []
    for name in chosen:
        if not by_class[name]:
            raise UserError(f"CUB class {name!r} has no images in the {cfg.split} split")
        paths = draw_shots(by_class[name], cfg.shots, seed, name)
        records.append(ClassRecord(name=name, prompt=cfg.prompt_template.format(name), images=tuple(paths)))
    return records
