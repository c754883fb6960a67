"""Can the toy world's model draw a concept at all? Plain sampling from fresh seeds, judged.

SeedSelect selects among what the model can draw: it finds the seeds from which the model draws a
rare concept, as Stable Diffusion draws a Pine Warbler from some seeds. This measures that premise
for a toy world (the shipped one, or one `scripts/train_toyworld.py --out` wrote): for each concept,
N fresh seeds drawn through diffusers' own `StableDiffusionPipeline` (DDIM, steps and CFG as the
toyworld sampler preset's), each image judged by the world's strict judge. Prints per concept the share judged right,
the share rejected as off-model and what it is mistaken for most; writes a contact sheet.

It also measures the ceiling the decoder sets: N fresh real renders of the concept (the world's own
generator, `train_toyworld.render`), encoded and decoded by the world's VAE, judged and scored for
precision against the held-out real images in the judge's features (`seedselect evaluate`'s space).
No seed can draw what the decoder cannot reconstruct: where the round trip's precision is low, so is
any method's.

And it measures the model's own samples with `seedselect evaluate`'s instruments: precision and recall
against the held-out images (judge features), precision of the samples judged right alone, and
diversity_ratio (CLIP, over the references'). On the head concepts, which the model knows well, these are
what the model at its best scores: the ceiling a seed-selection method works under.

    python scripts/toyworld_drawable.py                                  # the 6 tail concepts, 64 seeds: ~1 min
    python scripts/toyworld_drawable.py --world /tmp/tw --all --n 32     # every concept of another world
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_toyworld as generator

from seedselect_cli.config import compose_config
from seedselect_cli.files.assets import asset_path
from seedselect_cli.files.images import load_rgb
from seedselect_cli.judges import Judge, JudgeConfig, load_clip
from seedselect_cli.quality import diversity, precision_recall

SEED_BASE = 10_000_000  # far from the seeds the experiments and their tuning use (0, 1, 10^6 + k)


def contact_sheet(rows: dict[str, list[Image.Image]], per_row: int, path: Path) -> None:
    size, label = 32, 110
    sheet = Image.new("RGB", (label + per_row * (size + 2), len(rows) * (size + 2)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (name, images) in enumerate(rows.items()):
        draw.text((2, r * (size + 2) + 10), name, fill="black")
        for c, image in enumerate(images[:per_row]):
            sheet.paste(image.resize((size, size)), (label + c * (size + 2), r * (size + 2)))
    sheet.save(path)


def round_trip(vae, images: list[Image.Image]) -> list[Image.Image]:
    """Images encoded (the posterior's mean) and decoded by `vae`."""
    decoded = vae.decode(vae.encode(generator.to_tensor(images)).latent_dist.mean).sample.clamp(-1, 1)
    return [Image.fromarray(((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)) for x in decoded]


def figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


@torch.no_grad()  # not torch.set_grad_enabled(False): a test calls main in its process, and so may a user
def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", default=None, help="a toy-world folder (default: the shipped one)")
    parser.add_argument("--concepts", nargs="+", default=None, help="default: the tail concepts")
    parser.add_argument("--all", action="store_true", help="every concept of the world")
    parser.add_argument("--n", type=int, default=64, help="seeds per concept")
    parser.add_argument("--steps", type=int, default=None, help="default: the toyworld sampler preset's (10)")
    parser.add_argument("--guidance", type=float, default=None, help="default: the toyworld sampler preset's (2)")
    parser.add_argument("--seed-base", type=int, default=SEED_BASE)
    parser.add_argument("--sheet", default="toyworld_drawable.png", help="contact sheet: 16 images per concept")
    args = parser.parse_args(argv)
    preset = compose_config("toyworld").sampler
    args.steps = args.steps or preset.steps
    args.guidance = args.guidance if args.guidance is not None else preset.guidance_scale

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    world = Path(args.world or asset_path("toyworld"))
    info = json.loads((world / "world.json").read_text())
    looks = {c["name"]: c["looks"] for c in info["concepts"]}
    concepts = (list(looks) if args.all else args.concepts
                or [c["name"] for c in info["concepts"] if c["bucket"] == "tail"])
    pipe = StableDiffusionPipeline.from_pretrained(world, dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    judge = Judge(JudgeConfig(model=str(world / "judge")), list(looks), torch.device("cpu"))
    rows, sheet = [], {}
    rng = np.random.default_rng(args.seed_base)
    clip = load_clip(str(world / "clip"), torch.device("cpu"))
    print("| concept | looks | right | off-model | mistaken most for | precision, of the right, recall | "
          "diversity_ratio | decoder round trip: right, precision |\n|---|---|---|---|---|---|---|---|")
    for concept in concepts:
        generators = [torch.Generator().manual_seed(args.seed_base + k) for k in range(args.n)]
        images = pipe(info["template"].format(concept), num_inference_steps=args.steps,
                      guidance_scale=args.guidance, generator=generators, num_images_per_prompt=args.n,
                      height=info["image_size"], width=info["image_size"]).images
        verdicts = [v[0] for v in judge.classify(images, k=1)[0]]
        counts = Counter(v or "off-model" for v in verdicts)
        wrong = [(v, n) for v, n in counts.most_common() if v not in (concept, "off-model")]
        row = {"concept": concept, "looks": looks[concept], "right": counts[concept] / args.n,
               "off_model": counts["off-model"] / args.n, "mistaken": wrong[0][0] if wrong else ""}
        heldout = [load_rgb(p) for p in sorted((world / "heldout" / concept).glob("*.png"))]
        references = [load_rgb(p) for p in sorted((world / "references" / concept).glob("*.png"))]
        trip = round_trip(pipe.vae, [generator.render(concept, rng) for _ in range(args.n)])
        (trip_verdicts, trip_features), (_, heldout_features) = judge.classify(trip, k=1), judge.classify(heldout, k=1)
        features = judge.classify(images, k=1)[1]
        right = torch.tensor([v == concept for v in verdicts])
        row["precision"], row["recall"] = precision_recall(heldout_features, features)
        row["precision_of_right"] = precision_recall(heldout_features, features[right])[0] if right.any() else None
        variety = diversity(clip.images(references))
        row["diversity_ratio"] = diversity(clip.images(images)) / variety
        row["round_trip_right"] = sum(v[0] == concept for v in trip_verdicts) / args.n
        row["round_trip_precision"] = precision_recall(heldout_features, trip_features)[0]
        rows.append(row)
        sheet[f"{concept}"] = images
        mistaken = f"{row['mistaken']} ({looks[row['mistaken']]})" if row["mistaken"] else "-"
        print(f"| {concept} | {row['looks']} | {row['right']:.3f} | {row['off_model']:.3f} | {mistaken} | "
              f"{figure(row['precision'])}, {figure(row['precision_of_right'])}, {figure(row['recall'])} | "
              f"{row['diversity_ratio']:.2f} | {row['round_trip_right']:.2f}, {figure(row['round_trip_precision'])} |",
              flush=True)
    mean = sum(r["right"] for r in rows) / len(rows)
    print(f"\nmean right {mean:.3f} over {len(rows)} concepts, {args.n} seeds each from {args.seed_base}")
    if args.sheet:
        contact_sheet(sheet, 16, Path(args.sheet))
        print(f"contact sheet: {args.sheet}")
    return rows


if __name__ == "__main__":
    main()
