"""Does the generated set help a few-shot classifier? The paper's few-shot experiment, small.

Trains a linear probe (multinomial logistic regression) on CLIP features of the real few-shot
images of a run's classes, once on those alone and once with the run's generated images added (and
with plain sampling's, if `seedselect evaluate` rendered them in RUN/baseline/), and reports top-1
accuracy on held-out real images of the same classes, in the table of
`scripts/downstream_classifier.py`, with the Classification Accuracy Score of each generated set:

    python scripts/linear_probe.py --dataset cub --root /data/CUB_200_2011 --run runs/cub \\
        --shots 5 --test-split test

Real images come from the dataset adapters (`seedselect_cli/files/datasets/`): `--shots` per class from
`--train-split`, drawn as `seedselect` draws its references (same `--seed`), and every image of
`--test-split` that is not one of those shots for testing. For few-shot benchmarks whose splits
are class splits (miniImageNet, CIFAR-FS) pass the same split twice: the held-out images are the
rest of each class. `--clip` defaults to the run's image encoder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from seedselect_cli.config import Config, load_structured
from seedselect_cli.devices import resolve_device
from seedselect_cli.files.datasets import DatasetConfig, load_classes
from seedselect_cli.files.images import load_rgb
from seedselect_cli.files.run_directory import RunDirectory
from seedselect_cli.judges import load_clip
from seedselect_cli.report import training_table


def features(clip, paths: list[Path], batch_size: int = 32) -> torch.Tensor:
    return torch.cat([clip.images([load_rgb(p) for p in paths[i:i + batch_size]]) for i in range(0, len(paths),
                                                                                                  batch_size)])


def train_probe(x: torch.Tensor, y: torch.Tensor, n_classes: int, weight_decay: float = 1e-3,
                steps: int = 300) -> torch.nn.Linear:
    """Multinomial logistic regression on fixed features, full batch, L-BFGS."""
    torch.manual_seed(0)
    probe = torch.nn.Linear(x.shape[1], n_classes)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(probe(x), y) + weight_decay * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return probe


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, help="dataset adapter: cub, mini_imagenet, cifar_fs, ...")
    parser.add_argument("--root", required=True, help="the data set's folder")
    parser.add_argument("--run", required=True, help="a seedselect run directory of the same classes")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--test-split", default="test")
    parser.add_argument("--seed", type=int, default=None, help="default: the run's seed")
    parser.add_argument("--clip", default=None, help="a two-tower CLIP; default: the run's image encoder")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    run = Path(args.run)
    config = load_structured(Config, OmegaConf.load(run / "config.yaml"))
    entries = sorted(RunDirectory(run).finished().values(), key=lambda e: (e["class"], e["index"]))
    classes = list(dict.fromkeys(e["class"] for e in entries))
    seed = config.seed if args.seed is None else args.seed
    train = load_classes(DatasetConfig(name=args.dataset, root=args.root, classes=classes, shots=args.shots,
                                       split=args.train_split), seed)
    test = load_classes(DatasetConfig(name=args.dataset, root=args.root, classes=classes, split=args.test_split),
                        seed)
    index = {r.name: i for i, r in enumerate(train)}
    shots = {p for r in train for p in r.images}
    held_out = [(p, index[r.name]) for r in test for p in r.images if p not in shots]
    if not held_out:
        raise SystemExit("no held-out test images: choose --test-split or fewer --shots")

    clip = load_clip(args.clip or config.model.image_encoder, resolve_device(args.device))
    x_real = features(clip, [p for r in train for p in r.images])
    y_real = torch.tensor([index[r.name] for r in train for _ in r.images])
    y_gen = torch.tensor([index[e["class"]] for e in entries])
    generated = {"generated": features(clip, [run / e["image"] for e in entries])}
    plain = [run / "baseline" / e["image"] for e in entries]
    if all(p.is_file() for p in plain):  # `seedselect evaluate` rendered plain sampling from the same seeds
        generated["plain"] = features(clip, plain)
    x_test = features(clip, [p for p, _ in held_out])
    y_test = torch.tensor([label for _, label in held_out])

    def top1(x: torch.Tensor, y: torch.Tensor, n_classes: int, x_eval: torch.Tensor, y_eval: torch.Tensor) -> float:
        probe = train_probe(x, y, n_classes)
        with torch.no_grad():
            return float((probe(x_eval).argmax(dim=1) == y_eval).float().mean())

    sets = {"real only": (x_real, y_real),
            **{f"real + {k}": (torch.cat([x_real, x]), torch.cat([y_real, y_gen])) for k, x in generated.items()}}
    results: dict = {"rows": {name: {"train_images": len(y), "all": top1(x, y, len(train), x_test, y_test)}
                              for name, (x, y) in sets.items()},
                     "cas": {k: top1(x, y_gen, len(train), x_test, y_test) for k, x in generated.items()},
                     "classes": len(train), "test_images": len(held_out)}
    print(training_table(results))
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
