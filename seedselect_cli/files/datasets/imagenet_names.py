"""Readable names of the ImageNet-1k classes, by WordNet id and by label index.

From `assets/imagenet_classes.tsv` (made by `scripts/make_imagenet_classes.py`): OpenAI CLIP's
curated class names, which read well in a prompt ("house finch", not "house finch, linnet,
Carpodacus mexicanus"), in the standard label order (sorted WordNet ids).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache

from seedselect_cli.files.assets import asset_path


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[tuple[str, str], ...]:
    """(WordNet id, readable name) of the 1000 classes, index = ImageNet label."""
    with open(asset_path("imagenet_classes.tsv"), encoding="utf-8") as handle:
        rows = [line.rstrip("\n").split("\t") for line in handle if line.strip()]
    return tuple((wnid, name) for _, wnid, name in rows)


def name_of_wnid(wnid: str) -> str:
    """`n01532829` -> `house finch`; an id outside ImageNet-1k is its own name."""
    return dict(imagenet_classes()).get(wnid, wnid)


def imagenet_label_names(id2label: Mapping[int, str]) -> dict[int, str]:
    """The readable name of each label of a classifier's `id2label`, where it knows one: every label of an ImageNet-1k
    classifier (1000 labels in the standard order, as transformers' ImageNet models name them, 0 'tench, Tinca tinca'
    to 999 'toilet tissue, toilet paper, bathroom tissue': by index, since their synonym lists do not name one class
    alone), and any label that is a WordNet id of ImageNet-1k ('n01532829': 'house finch')."""
    classes = imagenet_classes()
    labels = {int(index): str(label) for index, label in id2label.items()}

    def first(label: str | None) -> str:
        return (label or "").split(",")[0].strip().lower()

    if len(labels) == len(classes) and first(labels.get(0)) == "tench" and first(labels.get(999)) == "toilet tissue":
        return {index: classes[index][1] for index in labels}
    wnids = dict(classes)
    return {index: wnids[label] for index, label in labels.items() if label in wnids}
