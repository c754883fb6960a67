"""The toy world's experiment: does selecting the seed fix what a long-tailed model draws wrongly?

Runs, as a user would, `seedselect optimize` and `seedselect bootstrap` on the shipped toy world
(`--config-name toyworld`, seeds from fresh noise as in the paper: `init=random` unless
`--override init=...` says otherwise) for head, middle and tail concepts, then `seedselect evaluate` with the
toy world's judge (a ResNet trained on balanced data, used only to score). Plain sampling is the
baseline evaluate draws from the same initial seeds. Prints and writes (to OUT/results.md) the
judge's top-1 accuracy by frequency bucket for plain sampling, SeedSelect and bootstrap, and per
concept; and OUT/contact_sheet.png: for each tail concept its references, then plain, SeedSelect
and bootstrap images.

    python scripts/toyworld_experiment.py --out toyworld_experiment          # about 14 min on 2 CPU cores
    python scripts/toyworld_experiment.py --concepts "pine warbler" --n-images 4 --iterations 5   # a quick look
    python scripts/toyworld_experiment.py --override init=nao --out toyworld_nao   # seeds start from NAO's centroid
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

from seedselect_cli.config import asset_path
from seedselect_cli.writer import slugify

METHODS = ("plain", "seedselect", "bootstrap")
BUCKETS = ("head", "middle", "tail")


def world() -> list[dict]:
    return json.loads(Path(asset_path("toyworld/world.json")).read_text())["concepts"]


def default_concepts() -> list[str]:
    """The five most frequent tail concepts, and the two most frequent of the head and of the middle."""
    concepts = world()
    return [c["name"] for bucket, n in (("head", 2), ("middle", 2), ("tail", 5))
            for c in [c for c in concepts if c["bucket"] == bucket][:n]]


def seedselect(*args: str) -> None:
    """One `seedselect` command, as a user runs it; its output goes to ours."""
    command = [sys.executable, "-m", "seedselect_cli", *args]
    print("$ seedselect " + " ".join(args), flush=True)
    subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def run(out: Path, concepts: list[str], args) -> dict[str, dict]:
    """The two runs and their evaluations; returns {method: {concept: judge top-1}}."""
    classes = "dataset.classes=[" + ",".join(concepts) + "]"
    # The paper's SeedSelect starts from fresh noise (init=random) unless an override says otherwise.
    init = [] if any(o.startswith("init=") for o in args.override) else ["init=random"]
    common = [classes, f"seed={args.seed}", f"runtime.batch_size={args.batch_size}", "runtime.progress=false",
              *init, *args.override]
    judge = f"judge.model={asset_path('toyworld/judge')}"
    accuracy: dict[str, dict] = {m: {} for m in METHODS}
    seconds = {}
    for method, command, extra in (("seedselect", "optimize", [f"n_images={args.n_images}",
                                                                f"optim.iterations={args.iterations}"]),
                                   ("bootstrap", "bootstrap", [f"bootstrap.n_images={args.n_images}"])):
        run_dir = out / method
        begin = time.perf_counter()
        seedselect(command, "--config-name", "toyworld", *common, *extra, f"hydra.run.dir={run_dir}")
        seconds[method] = time.perf_counter() - begin
        seedselect("evaluate", f"run_dir={run_dir}", judge, "dataset_classes=true", "runtime.device=cpu",
                   f"baseline={str(method == 'seedselect').lower()}")
        metrics = json.loads((run_dir / "report" / "metrics.json").read_text())
        for concept, scores in metrics["classes"].items():
            accuracy[method][concept] = scores["seedselect"]["judge_top1"]
            if "plain" in scores:
                accuracy["plain"][concept] = scores["plain"]["judge_top1"]
    accuracy["seconds"] = seconds
    return accuracy


def table(accuracy: dict[str, dict], concepts: list[str], args) -> str:
    """The markdown tables: by bucket, then per concept."""
    info = {c["name"]: c for c in world()}
    lines = [(f"Judge top-1 accuracy, {args.n_images} images per concept (seed {args.seed}), "
              f"SeedSelect {args.iterations} iterations"
              + (f", with {' '.join(args.override)}" if args.override else "") + ":"), "",
             "| bucket | concepts | " + " | ".join(METHODS) + " |", "|---|---|" + "---|" * len(METHODS)]
    for bucket in BUCKETS:
        names = [c for c in concepts if info[c]["bucket"] == bucket]
        if names:
            means = [sum(accuracy[m][c] for c in names) / len(names) for m in METHODS]
            lines.append(f"| {bucket} | {len(names)} | " + " | ".join(f"{v:.2f}" for v in means) + " |")
    lines += ["", "| concept | looks | training images | bucket | " + " | ".join(METHODS) + " |",
              "|---|---|---|---|" + "---|" * len(METHODS)]
    for c in concepts:
        lines.append(f"| {c} | {info[c]['looks']} | {info[c]['count']} | {info[c]['bucket']} | "
                     + " | ".join(f"{accuracy[m][c]:.2f}" for m in METHODS) + " |")
    seconds = accuracy["seconds"]
    lines += ["", "Wall time: " + ", ".join(f"{m} {s:.0f} s" for m, s in seconds.items()) + "."]
    return "\n".join(lines) + "\n"


def contact_sheet(out: Path, concepts: list[str], n: int = 8, cell: int = 64) -> Path:
    """One row per tail concept: its references | plain | SeedSelect | bootstrap (first n images each)."""
    info = {c["name"]: c for c in world()}
    tail = [c for c in concepts if info[c]["bucket"] == "tail"]
    columns = {
        "references": lambda c: sorted(Path(asset_path(f"toyworld/references/{c}")).glob("*.png"))[:5],
        "plain": lambda c: sorted((out / "seedselect" / "baseline" / "images" / slugify(c)).glob("*.png"))[:n],
        "seedselect": lambda c: sorted((out / "seedselect" / "images" / slugify(c)).glob("*.png"))[:n],
        "bootstrap": lambda c: sorted((out / "bootstrap" / "images" / slugify(c)).glob("*.png"))[:n],
    }
    widths = {"references": 5, "plain": n, "seedselect": n, "bootstrap": n}
    label_w, gap, head = 120, 12, 20
    width = label_w + sum(w * cell + gap for w in widths.values())
    sheet = Image.new("RGB", (width, head + len(tail) * cell), "white")
    draw = ImageDraw.Draw(sheet)
    x = label_w
    for name, w in widths.items():
        draw.text((x, 4), name, fill="black")
        x += w * cell + gap
    for row, concept in enumerate(tail):
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


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("toyworld_experiment"))
    parser.add_argument("--concepts", nargs="+", default=None, help="default: 2 head, 2 middle, 5 tail concepts")
    parser.add_argument("--n-images", type=int, default=20)
    parser.add_argument("--iterations", type=int, default=30, help="SeedSelect's (bootstrap keeps its own)")
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--override", nargs="*", default=[], help="more config overrides for both runs, "
                                                                    "e.g. init=nao")
    args = parser.parse_args(argv)
    concepts = args.concepts or default_concepts()
    unknown = sorted(set(concepts) - {c["name"] for c in world()})
    if unknown:
        parser.error(f"not a toy-world concept: {unknown[0]!r}")
    args.out.mkdir(parents=True, exist_ok=True)
    accuracy = run(args.out, concepts, args)
    text = table(accuracy, concepts, args)
    (args.out / "results.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps(accuracy, indent=2) + "\n")
    sheet = contact_sheet(args.out, concepts)
    print(text + f"\ncontact sheet: {sheet}")
    return text


if __name__ == "__main__":
    main()
