"""Does a lower precision find the seeds that float32 finds? Side by side on the trained toy world.

For each dtype (float32 first), runs `seedselect optimize` in this process on the toy world (10 DDIM
steps, the default loss and init, --iterations iterations; the seed and loss stay float32 as the
fast path keeps them) for a head-or-middle and a tail concept, N seeds each, and reports per seed the
final loss, its ratio to float32's, and the judge's verdict on the image; and, before optimising, the
cosine between each dtype's gradient of the loss at the seed's start and float32's. Prints a table
(markdown) and the summary the issue asks for: the largest loss ratio, and the share of images
whose verdict matches float32's.

    python scripts/precision_check.py                              # 8 seeds, 30 iterations: ~10 min on 2 CPU cores
    python scripts/precision_check.py --device cuda --dtypes float32 bfloat16 float16
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from PIL import Image
from safetensors.torch import load_file

from seedselect_cli.config import load_config, register_resolvers
from seedselect_cli.core.optimize import seed_objective
from seedselect_cli.core.sampling import ddim_schedule, encode_prompt
from seedselect_cli.files.assets import asset_path
from seedselect_cli.files.datasets import fill_template
from seedselect_cli.files.tensor_cache import TensorCache
from seedselect_cli.judges import Judge, JudgeConfig
from seedselect_cli.models import load_models
from seedselect_cli.pipeline import run_optimize
from seedselect_cli.references import load_encodings


def config_for(concepts: list[str], dtype: str, device: str, n: int, iterations: int):
    register_resolvers()
    with initialize_config_module("seedselect_cli.configs", version_base="1.3"):
        return load_config(compose("toyworld", [
            "dataset.classes=[" + ",".join(concepts) + "]", f"n_images={n}", f"runtime.batch_size={n}",
            f"runtime.dtype={dtype}", f"runtime.device={device}", f"optim.iterations={iterations}",
            "runtime.progress=false", "runtime.cache=false"]))


def start_gradients(config, concept: str, starts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """d loss / d z_T at the given starts, with the models in `dtype` (seed and loss in float32)."""
    models = load_models(config.model, torch.device(config.runtime.device), dtype)
    paths = sorted(Path(asset_path(f"toyworld/references/{concept}")).glob("*.png"))
    encodings = load_encodings(models, paths, config.sampler.height, config.sampler.width,
                               config.dataset.resize_mode, TensorCache(None, "none"), concept)
    text = encode_prompt(models, fill_template(config.dataset.prompt_template, concept))
    z = starts.clone().to(models.device, torch.float32).requires_grad_(True)
    terms = seed_objective(models, z, encodings.centroids(), text, ddim_schedule(models, config.sampler.steps),
                           config.objective())
    terms.total.sum().backward()
    return z.grad.detach().float().cpu()


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concepts", nargs="+", default=["sea finch", "marsh finch"])
    parser.add_argument("--n-images", type=int, default=4, help="seeds per concept")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    judge = Judge(JudgeConfig(model=asset_path("toyworld/judge")), args.concepts, torch.device("cpu"))
    rows: dict[tuple[str, int], dict] = {}
    for dtype in args.dtypes:
        config = config_for(args.concepts, dtype, args.device, args.n_images, args.iterations)
        with tempfile.TemporaryDirectory() as folder:
            entries = run_optimize(config, Path(folder))
            images = [Image.open(Path(folder) / e["image"]).convert("RGB") for e in entries]
            verdicts, _ = judge.classify(images, k=1)
            for entry, verdict in zip(entries, verdicts):
                row = rows.setdefault((entry["class"], entry["index"]), {})
                row[dtype] = {"loss": entry["loss"], "verdict": verdict[0] or "off-model"}
                row.setdefault("start", load_file(Path(folder) / entry["seed_file"])["initial"])
    for concept in args.concepts:
        keys = sorted(k for k in rows if k[0] == concept)
        starts = torch.stack([rows[k]["start"] for k in keys])
        grads = {d: start_gradients(config_for(args.concepts, d, args.device, args.n_images, args.iterations),
                                    concept, starts, getattr(torch, d)) for d in args.dtypes}
        for i, key in enumerate(keys):
            for d in args.dtypes:
                rows[key][d]["cosine"] = torch.nn.functional.cosine_similarity(
                    grads[d][i].flatten(), grads[args.dtypes[0]][i].flatten(), dim=0).item()
    base = args.dtypes[0]
    print("| concept | seed | " + " | ".join(f"{d} loss (ratio) | {d} verdict | {d} grad cos" for d in args.dtypes) + " |")
    print("|---|---|" + "---|---|---|" * len(args.dtypes))
    for (concept, index), row in sorted(rows.items()):
        cells = []
        for d in args.dtypes:
            r = row[d]
            cells.append(f"{r['loss']:.4f} ({r['loss'] / row[base]['loss']:.3f}) | {r['verdict']} | {r['cosine']:.4f}")
        print(f"| {concept} | {index} | " + " | ".join(cells) + " |")
    for d in args.dtypes[1:]:
        worst = max(row[d]["loss"] / row[base]["loss"] for row in rows.values())
        same = sum(row[d]["verdict"] == row[base]["verdict"] for row in rows.values()) / len(rows)
        cosines = [row[d]["cosine"] for row in rows.values()]
        print(f"{d}: largest loss ratio to {base} {worst:.3f}; verdicts as {base}'s {same:.2f}; "
              f"start-gradient cosine min {min(cosines):.4f}, mean {sum(cosines) / len(cosines):.4f}")
    return list(rows.values())


if __name__ == "__main__":
    main()
