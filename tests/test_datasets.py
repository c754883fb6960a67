"""Dataset adapters on small layouts built on disk."""

from __future__ import annotations

import numpy as np
import pytest

from seedselect_cli.config import DatasetConfig
from seedselect_cli.datasets import load_classes
from seedselect_cli.errors import UserError
from tests.conftest import random_image


def test_folder_is_named_after_the_directory_or_the_given_class(reference_folder):
    [record] = load_classes(DatasetConfig(name="folder", root=str(reference_folder)), seed=0)
    assert record.name == "blue_thing" and record.prompt == "a photo of a blue thing" and len(record.images) == 4
    [named] = load_classes(DatasetConfig(name="folder", root=str(reference_folder), classes=["tiger cat"]), 0)
    assert named.name == "tiger cat" and named.prompt == "a photo of a tiger cat"


def test_shots_are_drawn_reproducibly(reference_folder):
    cfg = DatasetConfig(name="folder", root=str(reference_folder), shots=2)
    first = load_classes(cfg, seed=0)[0].images
    assert len(first) == 2 and load_classes(cfg, seed=0)[0].images == first
    assert len({load_classes(cfg, seed=s)[0].images for s in range(8)}) > 1


def test_folder_errors(tmp_path):
    with pytest.raises(UserError, match="not an existing folder"):
        load_classes(DatasetConfig(name="folder", root=str(tmp_path / "nope")), 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no image files"):
        load_classes(DatasetConfig(name="folder", root=str(tmp_path / "empty")), 0)


def make_cub(root, classes=("001.Black_footed_Albatross", "094.Pine_Warbler"), per_class=4):
    rng = np.random.default_rng(0)
    images, labels, split = [], [], []
    image_id = 0
    for class_id, class_dir in enumerate(classes, 1):
        (root / "images" / class_dir).mkdir(parents=True)
        for i in range(per_class):
            image_id += 1
            relative = f"{class_dir}/{class_dir.split('.')[1]}_{i}.jpg"
            random_image(rng).save(root / "images" / relative)
            images.append(f"{image_id} {relative}")
            labels.append(f"{image_id} {class_id}")
            split.append(f"{image_id} {int(i < per_class - 1)}")
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "classes.txt").write_text("\n".join(f"{i} {c}" for i, c in enumerate(classes, 1)) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(split) + "\n")
    return root


def test_cub_layout(tmp_path):
    root = make_cub(tmp_path / "CUB_200_2011")
    cfg = DatasetConfig(name="cub", root=str(root), shots=2, prompt_template="a photo of a {}, a type of bird.")
    records = load_classes(cfg, seed=0)
    assert [r.name for r in records] == ["Black footed Albatross", "Pine Warbler"]
    assert records[1].prompt == "a photo of a Pine Warbler, a type of bird."
    assert all(len(r.images) == 2 and all(p.is_file() and "_3.jpg" not in p.name for p in r.images)
               for r in records)  # image 3 of each class is in the test split
    [warbler] = load_classes(DatasetConfig(name="cub", root=str(root), classes=["094.Pine_Warbler"]), 0)
    assert warbler.name == "Pine Warbler" and len(warbler.images) == 3
    with pytest.raises(UserError, match="no class named 'Pine Warblr'"):
        load_classes(DatasetConfig(name="cub", root=str(root), classes=["Pine Warblr"]), 0)
    (root / "classes.txt").unlink()
    with pytest.raises(UserError, match="classes.txt missing"):
        load_classes(DatasetConfig(name="cub", root=str(root)), 0)
