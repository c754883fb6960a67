"""The CUB-200-2011 layout: `images.txt`, `classes.txt`, `image_class_labels.txt`,
`train_test_split.txt` and `images/<class dir>/`.

Class names are shown without the `001.` prefix and with spaces for underscores
("Pine Warbler"); `dataset.classes` accepts either form. `dataset.split`: train, test or all.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from seedselect_cli.files.datasets import (
    ClassRecord,
    DatasetConfig,
    build_records,
    inside_root,
    read_table,
    require_files,
    require_root,
    require_split,
)

FILES = ("images.txt", "classes.txt", "image_class_labels.txt", "train_test_split.txt")
SPLITS = {"train": {"1"}, "test": {"0"}, "all": {"0", "1"}}


def display_name(class_dir: str) -> str:
    """`094.Pine_Warbler` -> `Pine Warbler`."""
    return class_dir.split(".", 1)[-1].replace("_", " ")


def load(cfg: DatasetConfig, seed: int) -> list[ClassRecord]:
    root = require_root(cfg)
    if not (root / "images.txt").exists() and (root / "CUB_200_2011" / "images.txt").exists():
        root = root / "CUB_200_2011"  # the folder the archive unpacks into, given one level up
    require_files(root, FILES, "CUB_200_2011")
    wanted = SPLITS[require_split(cfg, list(SPLITS), "CUB")]
    images = dict(read_table(root / "images.txt", numeric=[0]))
    classes = dict(read_table(root / "classes.txt", numeric=[0]))
    labels = dict(read_table(root / "image_class_labels.txt", numeric=[0, 1]))
    is_train = dict(read_table(root / "train_test_split.txt", numeric=[0, 1]))

    by_class: dict[str, list[Path]] = defaultdict(list)
    for image_id, relative in images.items():
        if is_train.get(image_id) in wanted and labels.get(image_id) in classes:
            path = inside_root(root / "images", relative, root / "images.txt")
            by_class[display_name(classes[labels[image_id]])].append(path)
    names = [display_name(d) for _, d in sorted(classes.items(), key=lambda kv: int(kv[0]))]
    labels = {display_name(d): int(i) - 1 for i, d in classes.items()}  # ImageFolder(CUB_200_2011/images)'s too
    return build_records(cfg, seed, by_class, names, {d: display_name(d) for d in classes.values()}, "CUB", labels)
