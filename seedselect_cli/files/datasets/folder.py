"""The `folder` layout: one directory of reference images of one concept.

As in the authors' `main.py SeedSelect tiger_cat imgs/tiger_cat`: the class is named by
`dataset.classes=[name]`, or else after the directory (underscores read as spaces in the prompt; a numbered
folder's `094.` dropped and an ImageNet WordNet id read as its name, `folder_class_name`).
"""

from __future__ import annotations

from seedselect_cli.errors import UserError
from seedselect_cli.files.datasets import (
    ClassRecord,
    DatasetConfig,
    class_shots,
    fill_template,
    folder_class_name,
    require_root,
)
from seedselect_cli.files.images import list_images, no_images_hint


def load(cfg: DatasetConfig, seed: int) -> list[ClassRecord]:
    root = require_root(cfg)
    if cfg.classes is not None and len(cfg.classes) != 1:
        raise UserError(f"dataset.classes={list(cfg.classes)}: the folder layout holds one concept; name one")
    name = str(cfg.classes[0]) if cfg.classes else folder_class_name(root.resolve().name)
    paths = list_images(root)
    if not paths:
        raise UserError(f"dataset.root={cfg.root} holds no image files (png, jpg, webp, ...); {no_images_hint(root)}")
    prompt = fill_template(cfg.prompt_template, name.replace("_", " "))
    return [ClassRecord(name=name, prompt=prompt, images=tuple(class_shots(cfg, seed, "folder", name, paths)),
                        split_images=len(paths))]
