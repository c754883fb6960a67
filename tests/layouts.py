"""Tiny copies of each dataset layout, built on disk with random images."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.conftest import random_image


def _image(rng: np.random.Generator, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    random_image(rng, (24 + int(rng.integers(0, 16)), 24 + int(rng.integers(0, 16)))).save(path)


def make_cub(root: Path, classes=("001.Black_footed_Albatross", "094.Pine_Warbler"), per_class=4) -> Path:
    """CUB_200_2011: image `per_class - 1` of each class is in the test split."""
    rng = np.random.default_rng(0)
    images, labels, split = [], [], []
    image_id = 0
    for class_id, class_dir in enumerate(classes, 1):
        for i in range(per_class):
            image_id += 1
            relative = f"{class_dir}/{class_dir.split('.')[1]}_{i}.jpg"
            _image(rng, root / "images" / relative)
            images.append(f"{image_id} {relative}")
            labels.append(f"{image_id} {class_id}")
            split.append(f"{image_id} {int(i < per_class - 1)}")
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "classes.txt").write_text("\n".join(f"{i} {c}" for i, c in enumerate(classes, 1)) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(split) + "\n")
    return root


MINI_SPLITS = {"train": ["n01532829", "n01558993"], "val": ["n01855672"], "test": ["n01930112", "n01981276"]}


def make_mini_imagenet(root: Path, per_class=3) -> Path:
    """miniImageNet: csv splits with header filename,label; images flat in images/."""
    rng = np.random.default_rng(1)
    for split, wnids in MINI_SPLITS.items():
        rows = ["filename,label"]
        for wnid in wnids:
            for i in range(per_class):
                name = f"{wnid}{i + 1:08d}.jpg"
                _image(rng, root / "images" / name)
                rows.append(f"{name},{wnid}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return root


CIFAR_SPLITS = {"train": ["apple", "aquarium_fish"], "val": ["bear"], "test": ["cloud", "sweet_pepper"]}


def make_cifar_fs(root: Path, per_class=3) -> Path:
    """CIFAR-FS: data/<class>/*.png and splits/bertinetto/<split>.txt."""
    rng = np.random.default_rng(2)
    (root / "splits" / "bertinetto").mkdir(parents=True)
    for split, classes in CIFAR_SPLITS.items():
        for name in classes:
            for i in range(per_class):
                _image(rng, root / "data" / name / f"{name}_s_{i:06d}.png")
        (root / "splits" / "bertinetto" / f"{split}.txt").write_text("\n".join(classes) + "\n")
    return root


def make_imagenet_lt(root: Path, counts=None) -> Path:
    """ImageNet-LT: ImageNet_LT_train.txt with lines '<relative path> <label>', a long tail of counts."""
    counts = counts or {0: 5, 12: 2, 999: 1}  # tench, house finch, toilet tissue
    rng = np.random.default_rng(3)
    from seedselect_cli.files.datasets.imagenet_names import imagenet_classes

    lines = []
    for label, count in counts.items():
        wnid = imagenet_classes()[label][0]
        for i in range(count):
            relative = f"train/{wnid}/{wnid}_{i}.JPEG"
            _image(rng, root / relative)
            lines.append(f"{relative} {label}")
    (root / "ImageNet_LT_train.txt").write_text("\n".join(lines) + "\n")
    return root


def make_imagefolder(root: Path, classes=("red_fox", "snow leopard"), per_class=3) -> Path:
    rng = np.random.default_rng(4)
    for name in classes:
        for i in range(per_class):
            _image(rng, root / name / f"{i}.png")
    return root
