"""Draw the demo's embedded reference images: a few 64 x 64 pictures of one simple concept.

    python scripts/make_demo_references.py [--out seedselect_cli/assets/demo/red_disc] [--count 4]

Deterministic (fixed seed): re-running gives the same files, which ship inside the package.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def red_disc(rng: np.random.Generator, size: int = 64) -> Image.Image:
    """A red disc of random size and place on a pale background of random tint, slightly blurred."""
    background = tuple(int(v) for v in rng.integers(200, 256, size=3))
    image = Image.new("RGB", (size, size), background)
    radius = rng.uniform(0.22, 0.34) * size
    cx, cy = rng.uniform(radius, size - radius, size=2)
    colour = (int(rng.integers(190, 240)), int(rng.integers(0, 40)), int(rng.integers(0, 40)))
    ImageDraw.Draw(image).ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
    return image.filter(ImageFilter.GaussianBlur(0.6))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("seedselect_cli/assets/demo/red_disc"))
    parser.add_argument("--count", type=int, default=4)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(args.count):
        red_disc(rng).save(args.out / f"red_disc_{i:02d}.png", optimize=True)
    print(f"wrote {args.count} images to {args.out}")


if __name__ == "__main__":
    main()
