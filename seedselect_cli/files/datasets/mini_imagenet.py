"""miniImageNet as split by Ravi & Larochelle: `train.csv`, `val.csv`, `test.csv` (header
`filename,label`, the label a WordNet id) and the images flat in `images/`.

Classes are shown by readable name ("house finch"); `dataset.classes` also takes WordNet ids.
`dataset.split` picks the csv, and with it the classes: `test` holds the few-shot novel classes.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

from seedselect_cli.errors import UserError
from seedselect_cli.files.datasets import (
    ClassRecord,
    DatasetConfig,
    build_records,
    inside_root,
    read_lines,
    require_files,
    require_root,
    require_split,
)
from seedselect_cli.files.datasets.imagenet_names import imagenet_classes, name_of_wnid

SPLITS = ("train", "val", "test")


def load(cfg: DatasetConfig, seed: int) -> list[ClassRecord]:
    root = require_root(cfg)
    split = require_split(cfg, SPLITS, "miniImageNet")
    require_files(root, (f"{split}.csv", "images"), "miniImageNet")
    by_wnid: dict[str, list[Path]] = defaultdict(list)
    csv_path = root / f"{split}.csv"
    reader = csv.DictReader(read_lines(csv_path))
    if not {"filename", "label"} <= set(reader.fieldnames or ()):
        raise UserError(f"{csv_path}: expected the header 'filename,label'; restore the file from the data set's split")
    for row in reader:
        if row["filename"] is None or row["label"] is None:
            raise UserError(f"{csv_path}:{reader.line_num}: expected 'filename,label'; fix the line")
        by_wnid[row["label"].strip()].append(inside_root(root / "images", row["filename"].strip(), csv_path,
                                                         reader.line_num))
    names = {wnid: name_of_wnid(wnid) for wnid in by_wnid}
    images = {names[wnid]: paths for wnid, paths in by_wnid.items()}
    index = {wnid: i for i, (wnid, _) in enumerate(imagenet_classes())}
    labels = {names[wnid]: index[wnid] for wnid in by_wnid if wnid in index}  # the ImageNet-1k label
    return build_records(cfg, seed, images, list(names.values()), {w: n for w, n in names.items()}, "miniImageNet",
                         labels)
