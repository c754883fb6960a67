"""What can choosing among seeds reach? How well the score `init.candidates` chooses by finds the seeds the judge
calls right, on the shipped toy world.

For each concept (default: the six tail concepts) it draws N plain samples from fresh seeds (10 DDIM steps, the
toyworld config), asks the world's strict judge (used only to score) which show the concept, and scores every
seed, from one forward pass without gradients, as `init.candidate_score=semantic` does: L_sem, the k-step CLIP
distance to the references' centroid; from the same pass, L_app to the nearest reference (the mean squared
distance of the final latent to the closest reference's latent); from a second pass, the contrastive L_sem
(`loss=contrastive`) against the reference centroids of all 20 concepts; and the world's CLIP zero-shot over the
20 names (-log p of the concept's prompt; its text tower, which the tool does not use to choose). It reports per concept: the
share the model draws right (the base rate), each score's AUC for the judge's verdict (1: every right seed scores
better than every wrong one; 0.5: chance), how often the best-scored of k candidates is right (the average over random k-subsets of the N seeds: what
`init.candidates=k` would keep), and how often a perfect chooser would (one right seed among the k). And a contact
sheet of each concept's 8 seeds best scored by L_sem with the judge's verdicts: what the score prefers, as a person sees it.

    python scripts/toyworld_selection.py --n 128 --out selection        # 2.5 min on 2 CPU cores
    python scripts/toyworld_selection.py --label manifold --n 64 --k 16  # right: on the real manifold (precision's)
    python scripts/toyworld_selection.py --demo-sheet demo_candidates.png  # what the demo chose among: 15 s

`--demo-sheet` draws, instead, what the demo (`seedselect optimize`, seed 0) chooses among: for each of its
images, its reference, then its 16 candidate starts' images from the lowest L_sem to its own reference (the score
`method=select` keeps the lowest of) to the highest, each with that L_sem and the judge's verdict (R: right).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from seedselect_cli import quality
from seedselect_cli.config import compose_config
from seedselect_cli.core.encoders import to_pil, vae_decode
from seedselect_cli.core.initial_seeds import candidate_seed, init_seed_for, initial_noise, own_references
from seedselect_cli.core.optimize import RolledOut, loss_terms, roll_out
from seedselect_cli.core.prompts import encode_prompt
from seedselect_cli.core.samplers import ddim_schedule, make_schedule
from seedselect_cli.core.targets import Centroids
from seedselect_cli.files.assets import asset_path
from seedselect_cli.files.datasets import fill_template, load_classes
from seedselect_cli.files.images import load_rgb
from seedselect_cli.files.tensor_cache import TensorCache
from seedselect_cli.judges import EvalClip, Judge, JudgeConfig, load_clip
from seedselect_cli.models import load_models
from seedselect_cli.references import load_encodings

SEED_BASE = 4_000_000  # far from the seeds the tool and the experiments draw


def auc(score: np.ndarray, right: np.ndarray) -> float:
    """P(a right seed scores lower than a wrong one), ties half: the ranking's quality; NaN without both kinds."""
    pos, neg = score[right], score[~right]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    return float((pos[:, None] < neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())


def best_of(score: np.ndarray, right: np.ndarray, k: int, trials: int = 2000, seed: int = 0) -> float:
    """How often the lowest-scored of k seeds drawn at random (without repeats) from these is right."""
    rng = np.random.default_rng(seed)
    picks = [rng.choice(len(score), k, replace=False) for _ in range(trials)]
    return float(np.mean([right[idx[score[idx].argmin()]] for idx in picks]))


def world_concepts(parser: argparse.ArgumentParser, requested: list[str] | None) -> tuple[list[str], list[str]]:
    """The world's 20 concept names, and those asked for (default: the tail concepts); a usage error for a name
    the world does not have."""
    world = json.loads(Path(asset_path("toyworld/world.json")).read_text())
    names = [c["name"] for c in world["concepts"]]
    concepts = requested or [c["name"] for c in world["concepts"] if c["bucket"] == "tail"]
    unknown = sorted(set(concepts) - set(names))
    if unknown:
        parser.error(f"not a toy-world concept: {unknown[0]!r}")
    return names, concepts


def centroids_of(models, concept: str, config) -> Centroids:
    """The concept's centroids from its references, with their latents (for L_app to the nearest)."""
    paths = sorted(Path(asset_path(f"toyworld/references/{concept}")).glob("*.png"))
    return load_encodings(models, paths, config.sampler.height, config.sampler.width, config.dataset.resize_mode,
                          TensorCache(None, "none"), concept).centroids(appearance="nearest")


@torch.no_grad()
def score_concept(models, judge: Judge, clip: EvalClip, names: list[str], classes: torch.Tensor, concept: str,
                  n: int, seed_base: int, config, contrastive) -> dict:
    """N plain samples of `concept`: each score of them (lower: more likely the concept), verdicts and images.
    `classes`: every concept's mu_v (the contrastive loss's), in the order of `names`; `contrastive`: the config
    with `loss=contrastive`."""
    centroids = centroids_of(models, concept, config)
    against_all = dataclasses.replace(centroids, classes=classes, class_index=names.index(concept))
    text = encode_prompt(models, fill_template(config.dataset.prompt_template, concept))
    schedule = ddim_schedule(models, config.sampler.steps)
    h, w = config.sampler.height, config.sampler.width
    seeds = torch.randn((n, *models.latent_shape(h, w)), generator=torch.Generator().manual_seed(seed_base))
    objective, against_objective = config.objective(), contrastive.objective()
    assert (against_objective.sampler, against_objective.kstep) == (objective.sampler, objective.kstep)
    scores, images = {"L_sem": [], "L_app nearest": [], "contrastive L_sem": []}, []
    for start in range(0, n, 16):
        z = seeds[start:start + 16]
        rolled = roll_out(models, z, text, schedule, objective)  # one pass of the sampler: every score, and the image
        terms = loss_terms(rolled, z, centroids, objective)
        scores["L_sem"].append(terms.semantic.float())
        scores["L_app nearest"].append(terms.appearance.float())
        scores["contrastive L_sem"].append(loss_terms(rolled, z, against_all, against_objective).semantic.float())
        images += drawn_images(models, rolled)
    prompts = clip.texts([fill_template(config.dataset.prompt_template, name) for name in names])
    logits = clip.images(images) @ prompts.T * clip.model.logit_scale.exp().item()
    verdicts, features = judge.classify(images, k=1)
    return {"scores": {**{k: torch.cat(v).numpy() for k, v in scores.items()},
                       "CLIP zero-shot": -torch.log_softmax(logits, dim=1)[:, names.index(concept)].numpy()},
            "verdicts": [v[0] for v in verdicts], "features": features, "images": images}


def drawn_images(models, rolled: RolledOut) -> list[Image.Image]:
    """The images of the seeds the sampler rolled out for their scores: what `sample_images` draws from them, pixel
    for pixel (the same pass of the sampler), without running it again."""
    return to_pil(models, vae_decode(models, rolled.latents[-1]))


def on_real_manifold(judge: Judge, concept: str, features: torch.Tensor) -> np.ndarray:
    """`--label manifold`: whether each image lies on the concept's real manifold, as `precision` counts it
    (the judge's features, against the world's 64 held-out real images of the concept)."""
    heldout = [load_rgb(p) for p in sorted(Path(asset_path(f"toyworld/heldout/{concept}")).glob("*.png"))]
    return quality.on_manifold(judge.classify(heldout, k=1)[1], features).numpy()


def sheet(rows: list[tuple[str, list[Image.Image], list[str | None]]], path: Path, cell: int = 64) -> None:
    """Each concept's best-scored images, left to right, with the judge's verdict under each."""
    label_w, text_h = 120, 14
    image = Image.new("RGB", (label_w + 8 * cell, len(rows) * (cell + text_h)), "white")
    draw = ImageDraw.Draw(image)
    for r, (concept, images, verdicts) in enumerate(rows):
        y = r * (cell + text_h)
        draw.text((4, y + cell // 2 - 6), concept, fill="black")
        for k, (im, verdict) in enumerate(zip(images, verdicts)):
            image.paste(im.convert("RGB").resize((cell, cell), Image.NEAREST), (label_w + k * cell, y))
            right = verdict == concept
            draw.text((label_w + k * cell + 2, y + cell + 1), "right" if right else (verdict or "off-model")[:10],
                      fill=(0, 130, 0) if right else (200, 0, 0))
    image.save(path)


@torch.no_grad()
def demo_sheet(models, judge: Judge, path: Path, cell: int = 64) -> None:
    """The demo's images, a row each: the image's own reference, then its candidate starts' images by L_sem to
    that reference, lowest first (the one the demo refines), with the L_sem and the judge's verdict under each."""
    config = compose_config("demo", ["runtime.progress=false"])
    [record] = load_classes(config.dataset, config.seed)
    concept, paths, candidates = record.name, list(record.images), config.init.candidates
    encodings = load_encodings(models, paths, config.sampler.height, config.sampler.width,
                               config.dataset.resize_mode, TensorCache(None, "none"), concept)
    text = encode_prompt(models, fill_template(config.dataset.prompt_template, concept))
    schedule = make_schedule(models, config.sampler.steps, config.sampler.name)
    shape = (1, *models.latent_shape(config.sampler.height, config.sampler.width))
    objective = config.objective()
    image = Image.new("RGB", (cell * (candidates + 1), (cell + 14) * config.n_images), "white")
    draw = ImageDraw.Draw(image)
    for i in range(config.n_images):
        reference = own_references(config.seed, concept, i, len(paths), 1)[0]
        init_seed = init_seed_for(config.seed, concept, i)
        z = torch.cat([initial_noise(shape, candidate_seed(init_seed, k)) for k in range(candidates)])
        with torch.no_grad():
            rolled = roll_out(models, z, text, schedule, objective)
            semantic = loss_terms(rolled, z, encodings.centroids([reference], appearance="nearest"),
                                  objective).semantic.float()
            drawn = drawn_images(models, rolled)
        verdicts = [v[0] for v in judge.classify(drawn, k=1)[0]]
        y = i * (cell + 14)
        image.paste(load_rgb(paths[reference]).resize((cell, cell), Image.NEAREST), (0, y))
        for j, k in enumerate(semantic.argsort().tolist()):
            image.paste(drawn[k].convert("RGB").resize((cell, cell), Image.NEAREST), ((j + 1) * cell, y))
            draw.text(((j + 1) * cell + 2, y + cell), f"{semantic[k]:.3f} {'R' if verdicts[k] == concept else 'x'}",
                      fill=(0, 130, 0) if verdicts[k] == concept else (200, 0, 0))
    image.save(path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("toyworld_selection"))
    parser.add_argument("--concepts", nargs="+", default=None, help="default: the tail concepts")
    parser.add_argument("--n", type=int, default=128, help="plain samples per concept")
    parser.add_argument("--k", type=int, nargs="+", default=[16, 64], help="candidates per image")
    parser.add_argument("--seed-base", type=int, default=SEED_BASE)
    parser.add_argument("--label", choices=("judge", "manifold"), default="judge",
                        help="what counts as right: the judge's verdict, or lying on the real manifold (precision's)")
    parser.add_argument("--demo-sheet", type=Path, default=None,
                        help="instead: draw what the demo's images chose among, by L_sem, into this PNG")
    args = parser.parse_args(argv)
    names, concepts = world_concepts(parser, args.concepts)
    ks = [k for k in args.k if k <= args.n]
    config = compose_config("toyworld", ["sampler.steps=10", "runtime.progress=false"])
    contrastive = compose_config("toyworld", ["sampler.steps=10", "runtime.progress=false", "loss=contrastive"])
    models = load_models(config.model, torch.device("cpu"), torch.float32)
    judge = Judge(JudgeConfig(model=asset_path("toyworld/judge")), names, torch.device("cpu"))
    if args.demo_sheet is not None:
        demo_sheet(models, judge, args.demo_sheet)
        print(f"the demo's candidate starts: {args.demo_sheet}")
        return {}
    clip = load_clip(asset_path("toyworld/clip"), torch.device("cpu"))
    classes = torch.stack([centroids_of(models, name, config).semantic for name in names])
    args.out.mkdir(parents=True, exist_ok=True)
    figures, rows = {}, []
    for concept in concepts:
        seen = score_concept(models, judge, clip, names, classes, concept, args.n, args.seed_base, config,
                             contrastive)
        right = (np.array([v == concept for v in seen["verdicts"]]) if args.label == "judge"
                 else on_real_manifold(judge, concept, seen["features"]))
        figures[concept] = {"rate": float(right.mean()),
                            **{f"auc {name}": auc(score, right) for name, score in seen["scores"].items()},
                            **{f"best of {k} by {name}": best_of(score, right, k)
                               for name, score in seen["scores"].items() for k in ks},
                            **{f"perfect of {k}": best_of((~right).astype(float), right, k) for k in ks}}
        order = np.argsort(seen["scores"]["L_sem"], kind="stable")[:8]
        rows.append((concept, [seen["images"][i] for i in order], [seen["verdicts"][i] for i in order]))
        print(f"{concept}: " + ", ".join(f"{key} {value:.2f}" for key, value in figures[concept].items()), flush=True)
    keys = list(next(iter(figures.values())))
    figures["mean"] = {key: float(np.nanmean([figures[c][key] for c in concepts])) for key in keys}
    sheet(rows, args.out / "best_scored.png")  # by L_sem
    lines = ["| concept | " + " | ".join(keys) + " |", "|" + "---|" * (1 + len(keys))]
    for name, f in figures.items():
        lines.append(f"| {name} | " + " | ".join(f"{f[key]:.2f}" for key in keys) + " |")
    judged = ("judged by the toy world's judge" if args.label == "judge" else
              "right: on the real manifold as precision counts it (judge features, 64 held-out images)")
    text = (f"{args.n} plain samples per concept (seeds from {args.seed_base}), {judged}; "
            f"rate: the share drawn right; AUC and the best of k by each score (L_sem: as "
            f"init.candidate_score=semantic scores); perfect: a chooser that knows the verdicts\n\n"
            + "\n".join(lines) + "\n")
    (args.out / "selection.md").write_text(text)
    (args.out / "selection.json").write_text(json.dumps(figures, indent=1) + "\n")
    print(text + f"\nbest-scored seeds: {args.out / 'best_scored.png'}")
    return figures


if __name__ == "__main__":
    main()
