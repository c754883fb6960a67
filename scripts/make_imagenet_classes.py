"""Write `seedselect_cli/assets/imagenet_classes.tsv`: ImageNet-1k index, WordNet id, readable name.

The readable names are OpenAI CLIP's curated ImageNet class names as shipped in open_clip
(`open_clip/zero_shot_metadata.py`, MIT licence); the WordNet ids, in the standard sorted order, come
from timm (`timm/data/_info/imagenet_synsets.txt`, Apache-2.0). Two names occur twice in the curated
list; the second of each takes its WordNet lemma instead, so every class has its own folder.

    pip download --no-deps open_clip_torch timm && unzip -q '*.whl' -d wheels
    python scripts/make_imagenet_classes.py wheels
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

RENAMED = {"n04008634": "projectile", "n04355933": "sunglass"}  # "missile" and "sunglasses" twice


def main(wheels: Path) -> None:
    source = (wheels / "open_clip" / "zero_shot_metadata.py").read_text()
    names = list(ast.literal_eval(re.search(r"IMAGENET_CLASSNAMES = (\(.*?\n\))", source, re.DOTALL).group(1)))
    wnids = (wheels / "timm" / "data" / "_info" / "imagenet_synsets.txt").read_text().split()
    assert len(names) == len(wnids) == 1000 and wnids == sorted(wnids)
    names = [RENAMED.get(w, n) for w, n in zip(wnids, names)]
    assert len(set(names)) == 1000, "class names must be unique"
    out = Path(__file__).resolve().parents[1] / "seedselect_cli" / "assets" / "imagenet_classes.tsv"
    lines = [f"{i}\t{w}\t{n}\n" for i, (w, n) in enumerate(zip(wnids, names))]
    out.write_text("".join(lines))
    print(f"wrote {out} ({len(lines)} classes)")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
