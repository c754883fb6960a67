"""The paper's experiment, in small: does a synthetic set help a classifier trained on long-tailed data?

On the toy world, whose generator (`train_toyworld.render`) draws unlimited real images:

    real only      the diffusion model's own long-tailed training set (2,400 images of the head concept
                   down to 5 of the last, 7,797 in all); with `--tail-real N`, only the first N of each
                   tail concept's (N=1: one-shot tail, where a classifier of these easy shapes still fails)
    + plain        that, plus the synthetic images of a run's tail concepts drawn by plain sampling
    + seedselect   ... by SeedSelect (`seedselect optimize`)
    + bootstrap    ... by `seedselect bootstrap`
    oracle         balanced real data: 400 images of every concept (8,000 in all)

A small CNN is trained on each (same architecture, steps and seed) and scored on a balanced real test
set (100 fresh renders per concept): accuracy on the head, middle and tail concepts and overall. The
Classification Accuracy Score (Ravuri and Vinyals 2019) trains on the synthetic tail images alone and
tests on real images of the same concepts.

    python scripts/downstream_classifier.py --seedselect RUN --bootstrap RUN   # RUN/baseline holds plain
    python scripts/toyworld_experiment.py --synthetic 50                       # makes the runs, then this
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_toyworld as world

from seedselect_cli.files.images import load_rgb
from seedselect_cli.files.run_directory import RunDirectory
from seedselect_cli.report import training_table

TEST_PER_CONCEPT = 100
ORACLE_PER_CONCEPT = 400
BUCKET_OF = {name: world.bucket(count) for name, count, _ in world.RANKED}


def classifier(n_classes: int) -> torch.nn.Module:
    """A small CNN for 32 px images."""
    def block(cin: int, cout: int) -> list[torch.nn.Module]:
        return [torch.nn.Conv2d(cin, cout, 3, padding=1), torch.nn.BatchNorm2d(cout), torch.nn.ReLU(),
                torch.nn.MaxPool2d(2)]
    return torch.nn.Sequential(*block(3, 32), *block(32, 64), *block(64, 96), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(96, n_classes))


def train(x: torch.Tensor, y: torch.Tensor, n_classes: int, steps: int, seed: int = 0) -> torch.nn.Module:
    """Adam, random crops of 2 px and flips; instance-balanced batches (the long tail stays long)."""
    torch.manual_seed(seed)
    net = classifier(n_classes)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(steps):
        pick = torch.randint(len(x), (128,), generator=g)
        batch = F.pad(x[pick], (2, 2, 2, 2), mode="replicate")
        dx, dy = torch.randint(0, 5, (2,), generator=g).tolist()
        batch = batch[..., dy:dy + 32, dx:dx + 32]
        if torch.rand((), generator=g) < 0.5:
            batch = batch.flip(-1)
        loss = F.cross_entropy(net(batch), y[pick])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return net.eval()


@torch.no_grad()
def accuracy_by_bucket(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str]) -> dict[str, float]:
    predicted = torch.cat([net(chunk).argmax(dim=1) for chunk in x.split(500)])
    right = predicted == y
    out = {"all": float(right.float().mean())}
    for bucket in ("head", "middle", "tail"):
        rows = torch.tensor([BUCKET_OF[names[label]] == bucket for label in y.tolist()])
        out[bucket] = float(right[rows].float().mean())
    return out


def rendered(per_concept: dict[str, int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for index, name in enumerate(world.CONCEPTS):
        images += [world.render(name, rng) for _ in range(per_concept.get(name, 0))]
        labels += [index] * per_concept.get(name, 0)
    return world.to_tensor(images), torch.tensor(labels)


def synthetic(run: Path, source: str, per_concept: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to `per_concept` images of each concept of a run: its own (`images`) or its plain baseline."""
    entries = sorted(RunDirectory(run).finished().values(), key=lambda e: (e["class"], e["index"]))
    index = {name: i for i, name in enumerate(world.CONCEPTS)}
    taken: dict[str, int] = {}
    images, labels = [], []
    for entry in entries:
        if taken.get(entry["class"], 0) >= per_concept:
            continue
        path = run / entry["image"] if source == "images" else run / "baseline" / entry["image"]
        images.append(load_rgb(path))
        labels.append(index[entry["class"]])
        taken[entry["class"]] = taken.get(entry["class"], 0) + 1
    return world.to_tensor(images), torch.tensor(labels)


def long_tailed_real(tail_real: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The diffusion model's own training set; with `tail_real`, only the first that many of each tail concept."""
    images, labels = world.long_tailed_set(0)
    if tail_real is not None:
        seen: dict[int, int] = {}
        keep = []
        for i, label in enumerate(labels.tolist()):
            seen[label] = seen.get(label, 0) + 1
            if BUCKET_OF[world.CONCEPTS[label]] != "tail" or seen[label] <= tail_real:
                keep.append(i)
        images, labels = [images[i] for i in keep], labels[keep]
    return world.to_tensor(images), labels


def run(sets: dict[str, Path | None], per_concept: int = 50, steps: int = 1500, seed: int = 0,
        tail_real: int | None = None) -> dict:
    """Train and score every training set; returns {set: {bucket: accuracy, "train_images": n}, "cas": ...}."""
    begin = time.perf_counter()
    real_x, real_y = long_tailed_real(tail_real)
    test_x, test_y = rendered(dict.fromkeys(world.CONCEPTS, TEST_PER_CONCEPT), seed + 1000)
    oracle_x, oracle_y = rendered(dict.fromkeys(world.CONCEPTS, ORACLE_PER_CONCEPT), seed + 2000)
    n = len(world.CONCEPTS)
    training = {"real only": (real_x, real_y)}
    generated = {}
    for name, (run_dir, source) in {"plain": (sets.get("seedselect"), "baseline"),
                                    "seedselect": (sets.get("seedselect"), "images"),
                                    "bootstrap": (sets.get("bootstrap"), "images")}.items():
        if run_dir is not None and (source != "baseline" or (run_dir / "baseline").is_dir()):
            generated[name] = synthetic(run_dir, source, per_concept)
            training[f"real + {name}"] = (torch.cat([real_x, generated[name][0]]),
                                          torch.cat([real_y, generated[name][1]]))
    training["oracle (balanced real)"] = (oracle_x, oracle_y)
    results: dict = {"rows": {}, "cas": {}}
    for name, (x, y) in training.items():
        net = train(x, y, n, steps, seed)
        results["rows"][name] = {**accuracy_by_bucket(net, test_x, test_y, world.CONCEPTS), "train_images": len(y)}
        print(f"{name}: {results['rows'][name]}", flush=True)
    for name, (x, y) in generated.items():  # CAS: synthetic tail images alone, tested on real ones
        classes = sorted(set(y.tolist()))
        remap = {c: i for i, c in enumerate(classes)}
        net = train(x, torch.tensor([remap[c] for c in y.tolist()]), len(classes), steps // 2, seed)
        rows = torch.tensor([label in remap for label in test_y.tolist()])
        with torch.no_grad():
            predicted = net(test_x[rows]).argmax(dim=1)
        truth = torch.tensor([remap[label] for label in test_y[rows].tolist()])
        results["cas"][name] = float((predicted == truth).float().mean())
    results["seconds"] = round(time.perf_counter() - begin)
    results["per_concept"] = per_concept
    results["tail_real"] = tail_real
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seedselect", type=Path, help="a `seedselect optimize` run of tail concepts (its "
                                                         "baseline/ gives the plain row)")
    parser.add_argument("--bootstrap", type=Path, help="a `seedselect bootstrap` run of the same concepts")
    parser.add_argument("--per-concept", type=int, default=50)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tail-real", type=int, default=None, help="real images of each tail concept in the "
                                                                    "training sets (default: all the world has, 5 to 10)")
    parser.add_argument("--out", type=Path, default=None, help="write results.json and table.md here")
    args = parser.parse_args(argv)
    results = run({"seedselect": args.seedselect, "bootstrap": args.bootstrap}, args.per_concept, args.steps,
                  args.seed, args.tail_real)
    table = training_table(results)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "downstream.json").write_text(json.dumps(results, indent=2) + "\n")
        (args.out / "downstream.md").write_text(table)
    return results


if __name__ == "__main__":
    main()
