"""What the semantic loss's image encoder tells apart in the toy world, beside what the judge does.

SeedSelect chooses and refines seeds by the CLIP distance of their images to the references (L_sem). It can
prefer a crisp drawing of a concept to a lumpy or blurred one only where that distance does. For each concept
(default: the tail concepts) this draws, with the world's own generator (`train_toyworld.render`,
`render_off_model`), fresh real images and, in the concept's colour, the off-model drawings the judge
rejects (blobs, notched blobs, stars, stretched shapes, the concept blurred, two shapes), the concept with a hole
punched in it (a defect of SeedSelect's images that the judge was never shown), and the other concepts of that
colour. It prints each set's median CLIP distance to the references' centroid (as L_sem
measures it, through the checkpoint's own image processor), the AUC with which that distance puts the real
images nearer than the set's (1: always; 0.5: it cannot tell them apart), and the share the judge calls the
concept.

    python scripts/toyworld_encoder_check.py                        # the 6 tail concepts, 64 images a set: 20 s
    python scripts/toyworld_encoder_check.py --concepts "marsh finch" --n 256
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_toyworld as generator
from toyworld_selection import auc, world_concepts

from seedselect_cli.config import compose_config
from seedselect_cli.core.encoders import clip_embed_pil
from seedselect_cli.files.assets import asset_path
from seedselect_cli.files.images import load_rgb
from seedselect_cli.judges import Judge, JudgeConfig
from seedselect_cli.models import load_models

OFF_KINDS = ("blob", "notched", "star", "stretched", "blurred", "two shapes")


def in_colour(concept: str, kind: str, n: int, rng: np.random.Generator) -> list:
    """`n` off-model drawings of `kind` in the concept's colour ("blurred": the concept itself, blurred)."""
    colour = generator.COLOURS[generator.LOOKS[concept].split()[0]]
    colours, concepts = generator.COLOURS, generator.CONCEPTS
    generator.COLOURS = {name: colour for name in colours}  # render_off_model picks one of these
    generator.CONCEPTS = [concept]  # ... and "blurred" one of these
    try:
        return [generator.render_off_model(rng, kind) for _ in range(n)]
    finally:
        generator.COLOURS, generator.CONCEPTS = colours, concepts


def check(models, judge: Judge, concept: str, n: int, rng: np.random.Generator) -> list[dict]:
    """Per set of drawings: its median CLIP distance to the references' centroid, the AUC of real against it,
    and the judge's share right."""
    references = [load_rgb(p) for p in sorted(Path(asset_path(f"toyworld/references/{concept}")).glob("*.png"))]
    centroid = torch.nn.functional.normalize(clip_embed_pil(models, references).mean(dim=0), dim=0)
    colour = generator.LOOKS[concept].split()[0]
    sets = {"real": [generator.render(concept, rng) for _ in range(n)]}
    sets.update({kind: in_colour(concept, kind, n, rng) for kind in OFF_KINDS})
    # from a generator of its own: the other sets (and RESULTS.md's figures of them) stay as they were drawn
    sets["holed"] = in_colour(concept, "holed", n, np.random.default_rng([7, *map(ord, concept)]))
    sets.update({f"{other} ({looks})": [generator.render(other, rng) for _ in range(n)]
                 for other, looks in generator.LOOKS.items() if looks.split()[0] == colour and other != concept})
    distance = {name: (1 - clip_embed_pil(models, images) @ centroid).numpy() for name, images in sets.items()}
    rows = []
    for name, images in sets.items():
        right = float(np.mean([v[0] == concept for v in judge.classify(images, k=1)[0]]))
        separation = (float("nan") if name == "real" else
                      auc(np.concatenate([distance["real"], distance[name]]),
                          np.r_[np.ones(n, dtype=bool), np.zeros(n, dtype=bool)]))
        rows.append({"set": name, "distance": float(np.median(distance[name])), "auc": separation,
                     "judge_right": right})
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concepts", nargs="+", default=None, help="default: the tail concepts")
    parser.add_argument("--n", type=int, default=64, help="drawings per set")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    names, concepts = world_concepts(parser, args.concepts)
    models = load_models(compose_config("toyworld").model, torch.device("cpu"), torch.float32)
    judge = Judge(JudgeConfig(model=asset_path("toyworld/judge")), names, torch.device("cpu"))
    rng = np.random.default_rng(args.seed)
    figures = {}
    for concept in concepts:
        figures[concept] = check(models, judge, concept, args.n, rng)
        print(f"\n{concept} ({generator.LOOKS[concept]}): CLIP distance to the references' centroid\n\n"
              "| drawings | median distance | AUC, real nearer | judge: right |\n|---|---|---|---|")
        for row in figures[concept]:
            print(f"| {row['set']} | {row['distance']:.3f} | "
                  f"{'-' if np.isnan(row['auc']) else format(row['auc'], '.2f')} | {row['judge_right']:.2f} |")
    mean = {kind: float(np.mean([r["auc"] for c in concepts for r in figures[c] if r["set"] == kind]))
            for kind in (*OFF_KINDS, "holed")}
    print("\nAUC, real nearer, over the concepts: " + ", ".join(f"{k} {v:.2f}" for k, v in mean.items()))
    return figures


if __name__ == "__main__":
    main()
