"""miniImageNet as split by Ravi & Larochelle: `train.csv`, `val.csv`, `test.csv` (header
`filename,label`, the label a WordNet id) and the images flat in `images/`.

Classes are shown by readable name ("house finch"); `dataset.classes` also takes WordNet ids.
`dataset.split` picks the csv, and with it the classes: `test` holds the few-shot novel classes.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

from seedselect_cli.config import DatasetConfig
from seedselect_cli.datasets import ClassRecord, build_records, require_files, require_root, require_split
from seedselect_cli.datasets.imagenet_names import name_of_wnid
from seedselect_cli.errors import UserError

SPLITS = ("train", "val", "test")


def load(cfg: DatasetConfig, seed: int) -> list[ClassRecord]:
    root = require_root(cfg)
    split = require_split(cfg, SPLITS, "miniImageNet")
    require_files(root, (f"{split}.csv", "images"), "miniImageNet")
    by_wnid: dict[str, list[Path]] = defaultdict(list)
    with open(root / f"{split}.csv", newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if not {"filename", "label"} <= set(reader.fieldnames or ()):
            raise UserError(f"{root / f'{split}.csv'}: expected the header 'filename,label'")
        for row in reader:
            by_wnid[row["label"].strip()].append(root / "images" / row["filename"].strip())
    names = {wnid: name_of_wnid(wnid) for wnid in by_wnid}
    images = {names[wnid]: paths for wnid, paths in by_wnid.items()}
    return build_records(cfg, seed, images, list(names.values()), {w: n for w, n in names.items()}, "miniImageNet")
