"""ImageNet-LT (Liu et al.): the list `ImageNet_LT_<split>.txt` in `dataset.root`, lines
`<path relative to the root> <label>`, the label an ImageNet-1k index.

Classes are shown by readable name ("house finch"); `dataset.classes` also takes WordNet ids.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from seedselect_cli.errors import UserError
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
from seedselect_cli.files.datasets.imagenet_names import imagenet_classes

SPLITS = ("train", "val", "test")


def load(cfg: DatasetConfig, seed: int) -> list[ClassRecord]:
    root = require_root(cfg)
    list_file = root / f"ImageNet_LT_{require_split(cfg, SPLITS, 'ImageNet-LT')}.txt"
    require_files(root, (list_file.name,), "ImageNet-LT")
    classes = imagenet_classes()
    by_label: dict[int, list[Path]] = defaultdict(list)
    for relative, label in read_table(list_file):
        if not label.isdigit() or int(label) >= len(classes):
            raise UserError(f"{list_file}: label {label!r} of {relative} is not an ImageNet-1k index (0-999)")
        by_label[int(label)].append(inside_root(root, relative, list_file))
    labels = sorted(by_label)
    images = {classes[i][1]: by_label[i] for i in labels}
    aliases = {classes[i][0]: classes[i][1] for i in labels}
    return build_records(cfg, seed, images, [classes[i][1] for i in labels], aliases, "ImageNet-LT",
                         {classes[i][1]: i for i in labels})
