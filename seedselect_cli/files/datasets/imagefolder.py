"""The ImageFolder layout: `dataset.root/<class>/<image>`, one sub-folder of images per class.

Classes are the sub-folders, shown with spaces for underscores, a numbered folder's `094.` dropped and an
ImageNet WordNet id as its name (`folder_class_name`); `dataset.classes` takes either form.
Point `dataset.root` at the split you want (e.g. `.../train`).
"""

from __future__ import annotations

from seedselect_cli.errors import UserError
from seedselect_cli.files.datasets import (
    ClassRecord,
    DatasetConfig,
    build_records,
    folder_class_name,
    require_root,
)
from seedselect_cli.files.images import list_images


def load(cfg: DatasetConfig, seed: int) -> list[ClassRecord]:
    root = require_root(cfg)
    # hidden folders and the like of __MACOSX (a zip's resource forks) are no classes, as in HF `imagefolder`
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "__")))
    if not folders:
        raise UserError(f"dataset.root={cfg.root} has no class sub-folders (expected ROOT/<class>/<image>); for one "
                        f"folder of images of one concept use --config-name folder")
    names = {f.name: folder_class_name(f.name).replace("_", " ") for f in folders}
    seen: dict[str, str] = {}
    for folder, name in names.items():
        if name in seen:
            raise UserError(f"dataset.root={cfg.root}: the folders {seen[name]!r} and {folder!r} are both class "
                            f"{name!r} (underscores read as spaces, numbers and WordNet ids as names); merge them or "
                            f"rename one")
        seen[name] = folder
    images = {names[f.name]: list_images(f) for f in folders}
    labels = {names[f.name]: i for i, f in enumerate(folders)}  # as torchvision's ImageFolder numbers them
    return build_records(cfg, seed, images, list(names.values()), names, "imagefolder", labels)
