"""How many images `evaluate`'s `copies` counts where nothing was copied: the floor of the measure on the toy world.

For a toy-world run that `evaluate` has scored (its plain-sampling baseline is in RUN/baseline), per bucket of
concepts (head, middle, tail): the share of the run's images, of plain sampling's, and of the held-out real images
(each left out of the threshold in turn) that `quality.copied` counts as copies, with images compared at each of
`--sides` pixels. Head concepts' plain samples cannot have copied their 5 references (5 of 560 to 2,400 training
images), so their share is the floor for a generator whose images are smoother than the real ones.

    python scripts/copies_floor.py RUN [--sides 32 16 8]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image

from seedselect_cli.files.assets import asset_path
from seedselect_cli.files.atomic import slugify
from seedselect_cli.files.images import list_images
from seedselect_cli.quality import COPY_SIDE, copied, pixel_features


def read(folder: Path) -> list[Image.Image]:
    return [Image.open(path).convert("RGB") for path in list_images(folder)] if folder.is_dir() else []


def held_out_shares(references: torch.Tensor, real: torch.Tensor) -> float:
    """Share of the real images counted as copies against a threshold from the others alone."""
    flags = [bool(copied(references, real[i:i + 1], torch.cat([real[:i], real[i + 1:]]))[0]) for i in range(len(real))]
    return sum(flags) / len(flags)


def floor_table(run_dir: Path, sides: list[int]) -> dict[tuple[int, str, str], float]:
    """{(side, bucket, set): mean share of copies over the bucket's concepts present in the run}."""
    world = Path(asset_path("toyworld"))
    buckets = {c["name"]: c["bucket"] for c in json.loads((world / "world.json").read_text())["concepts"]}
    shares: dict[tuple[int, str, str], list[float]] = defaultdict(list)
    for concept, bucket in buckets.items():
        sets = {"run": read(run_dir / "images" / slugify(concept)),
                "plain": read(run_dir / "baseline" / "images" / slugify(concept))}
        if not sets["run"]:
            continue
        references, real = read(world / "references" / concept), read(world / "heldout" / concept)
        for side in sides:
            ref_pixels, real_pixels = pixel_features(references, side), pixel_features(real, side)
            for name, images in sets.items():
                if images:
                    flags = copied(ref_pixels, pixel_features(images, side), real_pixels)
                    shares[side, bucket, name].append(float(flags.float().mean()))
            shares[side, bucket, "held-out real"].append(held_out_shares(ref_pixels, real_pixels))
    return {key: sum(values) / len(values) for key, values in shares.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--sides", type=int, nargs="+", default=[COPY_SIDE])
    args = parser.parse_args()
    table = floor_table(args.run_dir, args.sides)
    print("| side | bucket | run | plain | held-out real |\n|---:|---|---:|---:|---:|")
    for side in args.sides:
        for bucket in ("head", "middle", "tail"):
            cells = [table.get((side, bucket, name)) for name in ("run", "plain", "held-out real")]
            if cells[0] is not None:
                print(f"| {side} | {bucket} | " + " | ".join("-" if c is None else f"{c:.3f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
