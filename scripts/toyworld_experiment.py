"""The toy world's experiment: does selecting the seed fix what a long-tailed model draws wrongly, with
images a person would call right, as varied as real ones, and useful for training?

Runs, as a user would, `seedselect optimize` and `seedselect bootstrap` on the shipped toy world
(`--config-name toyworld`, the tool's defaults unless `--override` says otherwise) for head, middle and
tail concepts, then `seedselect evaluate` with the toy world's judge (a ResNet trained on balanced
renders and on off-model shapes, which it rejects; used only to score) against the world's held-out
real images. Plain sampling is the baseline evaluate draws from the same initial noise. Writes
OUT/results.md (and .json): by frequency bucket and per concept, for plain sampling, SeedSelect and
bootstrap, the judge's top-1 accuracy, precision and recall against held-out real images (in the
judge's features), diversity_ratio and copies; OUT/contact_sheet.png (a row per concept run: its
references, then plain, SeedSelect and bootstrap images); and with `--synthetic N` the downstream
classifier's table (`downstream_classifier.py`) from N images of each tail concept.

    python scripts/toyworld_experiment.py --out toyworld_experiment --synthetic 50   # about 35 min, 2 CPU cores
    python scripts/toyworld_experiment.py --concepts "pine warbler" --n-images 4     # a quick look
    python scripts/toyworld_experiment.py --override method=paper --out paper  # the paper's algorithm
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw

from seedselect_cli.files.assets import asset_path
from seedselect_cli.files.atomic import slugify

METHODS = ("plain", "seedselect", "bootstrap")
BUCKETS = ("head", "middle", "tail")
FIGURES = ("judge_top1", "precision", "recall", "diversity_ratio", "copies")


def world() -> list[dict]:
    return json.loads(Path(asset_path("toyworld/world.json")).read_text())["concepts"]


def default_concepts() -> list[str]:
    """Every tail concept, and the two most frequent of the head and of the middle."""
    concepts = world()
    return [c["name"] for bucket, n in (("head", 2), ("middle", 2), ("tail", 99))
            for c in [c for c in concepts if c["bucket"] == bucket][:n]]


def seedselect(*args: str) -> None:
    """One `seedselect` command, as a user runs it; its output goes to ours."""
    command = [sys.executable, "-m", "seedselect_cli", *args]
    print("$ seedselect " + " ".join(args), flush=True)
    subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def classes(concepts: list[str]) -> str:
    return "dataset.classes=[" + ",".join(concepts) + "]"


def run(out: Path, concepts: list[str], args) -> dict:
    """The two runs and their evaluations; returns {method: {concept: {figure: value}}, "seconds": ...}."""
    common = [f"seed={args.seed}", f"runtime.batch_size={args.batch_size}", "runtime.progress=false", *args.override]
    judge = f"judge.model={asset_path('toyworld/judge')}"
    figures: dict[str, dict] = {m: {} for m in (*METHODS, "ceiling")}
    seconds = {}
    for method, command, count in (("seedselect", "optimize", "n_images"), ("bootstrap", "bootstrap",
                                                                            "bootstrap.n_images")):
        run_dir = out / method
        begin = time.perf_counter()
        seedselect(command, "--config-name", "toyworld", classes(concepts), *common, f"{count}={args.n_images}",
                   f"hydra.run.dir={run_dir}")
        seconds[method] = time.perf_counter() - begin
        first = method == "seedselect"  # the plain baseline and the decoder ceiling once
        seedselect("evaluate", f"run_dir={run_dir}", judge, "dataset_classes=true", "runtime.device=cpu",
                   f"baseline={str(first).lower()}", f"decoder_ceiling={str(first).lower()}")
        metrics = json.loads((run_dir / "report" / "metrics.json").read_text())
        for concept, scores in metrics["classes"].items():
            figures[method][concept] = {k: scores["seedselect"][k] for k in FIGURES}
            if first:
                figures["ceiling"][concept] = scores["heldout"].get("round_trip_precision")
            if "plain" in scores:
                figures["plain"][concept] = {k: scores["plain"][k] for k in FIGURES}
    figures["seconds"] = seconds
    return figures


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def table(figures: dict, concepts: list[str], args) -> str:
    """The markdown tables: by bucket, then per concept."""
    info = {c["name"]: c for c in world()}
    lines = [(f"{args.n_images} images per concept (seed {args.seed})"
              + (f", with {' '.join(args.override)}" if args.override else ", the defaults") + ". Judge top-1, then "
              "precision and recall against 64 held-out real images (judge features), diversity_ratio, copies; "
              "plain / SeedSelect / bootstrap:"), "",
             "| bucket | concepts | " + " | ".join(f"{k}" for k in FIGURES) + " |", "|---|---|" + "---|" * len(FIGURES)]
    for bucket in BUCKETS:
        names = [c for c in concepts if info[c]["bucket"] == bucket]
        if names:
            cells = [" / ".join(_cell(_mean([figures[m][c][k] for c in names])) for m in METHODS) for k in FIGURES]
            lines.append(f"| {bucket} | {len(names)} | " + " | ".join(cells) + " |")
    lines += ["", "| concept | looks | training images | " + " | ".join(FIGURES) + " | precision after the VAE |",
              "|---|---|---|" + "---|" * (len(FIGURES) + 1)]
    for c in concepts:  # the last column: the held-out images' round trip (`evaluate decoder_ceiling=true`)
        cells = [" / ".join(_cell(figures[m][c][k]) for m in METHODS) for k in FIGURES]
        ceiling = _cell(figures.get("ceiling", {}).get(c))
        lines.append(f"| {c} | {info[c]['looks']} | {info[c]['count']} | " + " | ".join(cells) + f" | {ceiling} |")
    seconds = figures["seconds"]
    lines += ["", "Wall time: " + ", ".join(f"{m} {s:.0f} s" for m, s in seconds.items()) + "."]
    return "\n".join(lines) + "\n"


def contact_sheet(out: Path, concepts: list[str], n: int = 8, cell: int = 64) -> Path:
    """One row per concept run: its references | plain | SeedSelect | bootstrap (first n images each)."""
    columns = {
        "references": lambda c: sorted(Path(asset_path(f"toyworld/references/{c}")).glob("*.png"))[:5],
        "plain": lambda c: sorted((out / "seedselect" / "baseline" / "images" / slugify(c)).glob("*.png"))[:n],
        "seedselect": lambda c: sorted((out / "seedselect" / "images" / slugify(c)).glob("*.png"))[:n],
        "bootstrap": lambda c: sorted((out / "bootstrap" / "images" / slugify(c)).glob("*.png"))[:n],
    }
    widths = {"references": 5, "plain": n, "seedselect": n, "bootstrap": n}
    label_w, gap, head = 120, 12, 20
    width = label_w + sum(w * cell + gap for w in widths.values())
    sheet = Image.new("RGB", (width, head + len(concepts) * cell), "white")
    draw = ImageDraw.Draw(sheet)
    x = label_w
    for name, w in widths.items():
        draw.text((x, 4), name, fill="black")
        x += w * cell + gap
    for row, concept in enumerate(concepts):
        y = head + row * cell
        draw.text((4, y + cell // 2 - 6), concept, fill="black")
        x = label_w
        for name, w in widths.items():
            for k, path in enumerate(columns[name](concept)):
                with Image.open(path) as image:
                    sheet.paste(image.convert("RGB").resize((cell, cell), Image.NEAREST), (x + k * cell, y))
            x += w * cell + gap
    path = out / "contact_sheet.png"
    sheet.save(path)
    return path


def downstream(out: Path, concepts: list[str], args) -> str:
    """N images of each tail concept (the runs extended: n_images and dataset.classes may grow on resume),
    then the classifier trained with them (`downstream_classifier.py`)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import downstream_classifier

    info = {c["name"]: c for c in world()}
    tail = [c for c in concepts if info[c]["bucket"] == "tail"]
    common = [f"seed={args.seed}", f"runtime.batch_size={args.batch_size}", "runtime.progress=false", *args.override]
    for method, command, count in (("seedselect", "optimize", "n_images"), ("bootstrap", "bootstrap",
                                                                            "bootstrap.n_images")):
        seedselect(command, "--config-name", "toyworld", classes(tail), *common, f"{count}={args.synthetic}",
                   f"hydra.run.dir={out / method}")
    # the baseline of the extended run (plain images for the classifier); with the judge, so that the run's
    # report stays in the judge's features
    seedselect("evaluate", f"run_dir={out / 'seedselect'}", "runtime.device=cpu", "dataset_classes=true",
               f"judge.model={asset_path('toyworld/judge')}")
    results = downstream_classifier.run({"seedselect": out / "seedselect", "bootstrap": out / "bootstrap"},
                                        args.synthetic, seed=args.seed, tail_real=args.tail_real)
    from seedselect_cli.report import training_table

    (out / "downstream.json").write_text(json.dumps(results, indent=2) + "\n")
    real = "all" if args.tail_real is None else args.tail_real
    return (f"\nDownstream: a small CNN trained on the long-tailed real data ({real} real images of each tail "
            f"concept), alone and with {args.synthetic} synthetic images of each tail concept; accuracy on 100 real "
            f"images of every concept:\n\n"
            + training_table(results))


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("toyworld_experiment"))
    parser.add_argument("--concepts", nargs="+", default=None, help="default: 2 head, 2 middle, every tail concept")
    parser.add_argument("--n-images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--synthetic", type=int, default=0, help="then N images per tail concept for the "
                                                                 "downstream classifier (0: skip it)")
    parser.add_argument("--tail-real", type=lambda v: None if v == "all" else int(v), default=1,
                        help="real images of each tail concept the downstream classifier trains on (default 1; "
                             "'all': the 5 to 10 the world has, with which it already gets the tail right, 0.99)")
    parser.add_argument("--override", nargs="*", default=[], help="more config overrides for both runs, "
                                                                    "e.g. init=random")
    args = parser.parse_args(argv)
    concepts = args.concepts or default_concepts()
    unknown = sorted(set(concepts) - {c["name"] for c in world()})
    if unknown:
        parser.error(f"not a toy-world concept: {unknown[0]!r}")
    args.out.mkdir(parents=True, exist_ok=True)
    figures = run(args.out, concepts, args)
    text = table(figures, concepts, args)
    sheet = contact_sheet(args.out, concepts)
    if args.synthetic:
        text += downstream(args.out, concepts, args)
    (args.out / "results.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(text + f"\ncontact sheet: {sheet}")
    return text


if __name__ == "__main__":
    main()
