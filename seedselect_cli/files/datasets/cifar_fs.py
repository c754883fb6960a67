"""CIFAR-FS (Bertinetto et al.): one folder of images per CIFAR-100 class, in `data/` or in the root,
and the class splits `splits/bertinetto/{train,val,test}.txt` (one class folder name per line).

Classes are shown with spaces for underscores ("aquarium fish"). `dataset.split` picks the classes:
`test` holds the few-shot novel classes.
"""

from __future__ import annotations

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
from seedselect_cli.files.images import list_images

SPLITS = ("train", "val", "test")


def load(cfg: DatasetConfig, seed: int) -> list[ClassRecord]:
    root = require_root(cfg)
    split = require_split(cfg, SPLITS, "CIFAR-FS")
    split_file = f"splits/bertinetto/{split}.txt"
    require_files(root, (split_file,), "CIFAR-FS")
    data = root / "data" if (root / "data").is_dir() else root
    folders = [line.strip() for line in read_lines(root / split_file) if line.strip()]
    for number, folder in enumerate(folders, 1):
        inside_root(data, folder, root / split_file, number)
    names = {folder: folder.replace("_", " ") for folder in folders}
    images = {names[f]: list_images(data / f) if (data / f).is_dir() else [] for f in folders}
    # the label ImageFolder(data) gives, which is CIFAR-100's fine label (its classes in alphabetical order)
    every = sorted(p.name for p in data.iterdir() if p.is_dir() and not p.name.startswith((".", "__")))
    label_of = {folder: i for i, folder in enumerate(every)}
    labels = {names[f]: label_of[f] for f in folders if f in label_of}
    return build_records(cfg, seed, images, list(names.values()), names, "CIFAR-FS", labels)
