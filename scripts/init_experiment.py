"""Where should a seed start? Each `init` option, with and without the seed-norm prior, on the toy world.

For each tail concept of the shipped toy world (the six it saw 10 times or fewer) it optimises
N seeds per setting and, after n iterations for each n of --checkpoints, renders the image of each
seed's best iterate so far (what `optim.iterations=n` would write) and asks the toy world's judge
(a ResNet trained on balanced data, used only to score) what it shows. Settings: init=random,
inversion and nao, each with loss.norm_weight=0 and with the prior; and, without it, nao with the
rescaled mean instead of paths and nao with less and more noise. Prints, and writes to
OUT/init_results.md and .json, the judge's top-1 accuracy over the tail concepts after n
iterations, the first n at which it reaches --target, and the images' diversity after the last
checkpoint (mean pairwise cosine distance of the toy world's CLIP image embeddings, averaged over
the concepts).

    python scripts/init_experiment.py --out init_experiment        # about 12 min on 2 CPU cores
    python scripts/init_experiment.py --concepts "marsh finch" --n-images 4 --checkpoints 1 5   # a quick look
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from seedselect_cli.config import compose_config
from seedselect_cli.core.encoders import clip_embed_pil
from seedselect_cli.core.sampling import sample_images
from seedselect_cli.files.assets import asset_path
from seedselect_cli.files.tensor_cache import TensorCache
from seedselect_cli.judges import Judge, JudgeConfig
from seedselect_cli.models import load_models
from seedselect_cli.pipeline import engine_for
from seedselect_cli.references import load_encodings

SETTINGS = {  # name: overrides of the toyworld config; init.noise is the default 0.5 unless said
    "random": ["init=random"],
    "inversion": ["init=inversion"],
    "nao": ["init=nao"],
}
VARIANTS = {  # without the prior only
    "nao, rescaled mean": ["init=nao", "init.nao_paths=false"],
    "nao, noise 0.2": ["init=nao", "init.noise=0.2"],
    "nao, noise 0.8": ["init=nao", "init.noise=0.8"],
}


def world() -> dict:
    return json.loads(Path(asset_path("toyworld/world.json")).read_text())


def run_setting(models, judge, config, concepts, n_images: int, checkpoints: list[int]) -> dict:
    """{concept: {n: correct images after n iterations}} for one setting."""
    engine = engine_for(models, config)
    h, w = config.sampler.height, config.sampler.width
    out = {}
    for concept in concepts:
        refs = sorted(Path(asset_path(f"toyworld/references/{concept}")).iterdir())
        encodings = load_encodings(models, refs, h, w, config.dataset.resize_mode, TensorCache(None, ""), concept)
        target = engine.class_target(concept, config.dataset.prompt_template.format(concept), encodings)
        text_embeds = target.text_embeds
        [batch] = engine.optimize_batches(target, [list(range(n_images))], engine.centre(target))
        seen: dict = {}

        def look(it: int, best: torch.Tensor, concept=concept, text_embeds=text_embeds, seen=seen) -> None:
            if it + 1 in checkpoints:  # the best of iterates 0..it: what optim.iterations=it+1 writes
                images = sample_images(models, best, text_embeds, config.sampler.steps, config.sampler.guidance_scale)
                seen[it + 1] = sum(top[0] == concept for top in judge.classify(images, 1)[0])
                if it + 1 == max(checkpoints):  # diversity: mean pairwise cosine distance of CLIP embeddings
                    embeds = clip_embed_pil(models, images)
                    n = len(images)
                    seen["diversity"] = float((1 - embeds @ embeds.T).sum() / (n * (n - 1)))

        batch.iterations = max(checkpoints)
        engine.run_batch(target, batch, on_iteration=look)
        out[concept] = seen
        print(f"  {concept}: " + ", ".join(f"{n} it {seen[n]}/{n_images}" for n in checkpoints)
              + f", diversity {seen['diversity']:.3f}", flush=True)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("init_experiment"))
    parser.add_argument("--concepts", nargs="*", default=None, help="default: the tail concepts")
    parser.add_argument("--n-images", type=int, default=8)
    parser.add_argument("--checkpoints", type=int, nargs="*", default=[1, 2, 3, 5, 10])
    parser.add_argument("--norm-weight", type=float, default=0.1, help="loss.norm_weight of the runs with the prior")
    parser.add_argument("--target", type=float, default=0.5, help="the tail accuracy to reach")
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS) + list(VARIANTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every setting, e.g. --set init.candidates=4 (repeatable)")
    args = parser.parse_args(argv)
    concepts = args.concepts or [c["name"] for c in world()["concepts"] if c["bucket"] == "tail"]
    checkpoints = sorted(set(args.checkpoints))
    base = compose_config("toyworld", [f"seed={args.seed}", "runtime.progress=false", f"runtime.batch_size={args.n_images}"])
    models = load_models(base.model, torch.device("cpu"), torch.float32)
    judge = Judge(JudgeConfig(model=asset_path("toyworld/judge")), concepts, torch.device("cpu"))
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.settings:
        for weight in (0.0, args.norm_weight) if name in SETTINGS else (0.0,):
            overrides = {**SETTINGS, **VARIANTS}[name] + [f"loss.norm_weight={weight}", f"seed={args.seed}",
                                                          *args.overrides]
            print(f"{name}, norm prior {weight}: " + " ".join(overrides), flush=True)
            start = time.perf_counter()
            counts = run_setting(models, judge, compose_config("toyworld", overrides), concepts, args.n_images, checkpoints)
            accuracy = {n: sum(c[n] for c in counts.values()) / (args.n_images * len(concepts)) for n in checkpoints}
            reached = next((n for n in checkpoints if accuracy[n] >= args.target), None)
            diversity = sum(c["diversity"] for c in counts.values()) / len(counts)
            rows.append({"init": name, "norm_weight": weight, "accuracy": accuracy, "reached": reached,
                         "diversity": diversity,
                         "per_concept": counts, "seconds": round(time.perf_counter() - start, 1)})
            print("  tail accuracy: " + ", ".join(f"{n} it {a:.2f}" for n, a in accuracy.items()), flush=True)
    (args.out / "init_results.json").write_text(json.dumps(
        {"concepts": concepts, "n_images": args.n_images, "checkpoints": checkpoints, "target": args.target,
         "rows": rows}, indent=1))
    head = ("| init | norm prior | " + " | ".join(f"{n} it" for n in checkpoints)
            + f" | iterations to {args.target:.2f} | diversity |")
    lines = [head, "|" + "---|" * (len(checkpoints) + 4)]
    for r in rows:
        reached = str(r["reached"]) if r["reached"] else f"> {checkpoints[-1]}"
        lines.append(f"| {r['init']} | {r['norm_weight']:g} | "
                     + " | ".join(f"{r['accuracy'][n]:.2f}" for n in checkpoints) + f" | {reached} | "
                     f"{r['diversity']:.3f} |")
    table = "\n".join(lines)
    (args.out / "init_results.md").write_text(
        f"Judge top-1 accuracy over {len(concepts)} tail concepts x {args.n_images} images, after n iterations\n\n"
        f"{table}\n")
    print(table)
    return rows


if __name__ == "__main__":
    main()
