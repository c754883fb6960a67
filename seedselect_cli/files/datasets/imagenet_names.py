"""Readable names of the ImageNet-1k classes, by WordNet id and by label index.

From `assets/imagenet_classes.tsv` (made by `scripts/make_imagenet_classes.py`): OpenAI CLIP's
curated class names, which read well in a prompt ("house finch", not "house finch, linnet,
Carpodacus mexicanus"), in the standard label order (sorted WordNet ids).
"""

from __future__ import annotations

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
