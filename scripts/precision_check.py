"""Does a lower precision find the seeds that float32 finds? Side by side on the trained toy world.

For each dtype (float32 first), runs `seedselect optimize` in this process on the toy world (10 DDIM
steps, the default loss and init, --iterations iterations; the seed and loss stay float32 as the
fast path keeps them) for a head-or-middle and a tail concept, N seeds each, and reports per seed the
final loss, its ratio to float32's, and the judge's verdict on the image; and, before optimising, the
cosine between each dtype's gradient of the loss at the seed's start and float32's. Prints a table
(markdown) and the summary the issue asks for: the largest loss ratio, and the share of images
whose verdict matches float32's; and for how many images the low dtype kept another of the
`init.candidates` starts than float32 did (its scores of two near-equal starts rounded the other way:
then the two optimise different starts, BENCHMARKS.md, "Fresh seeds").

    python scripts/precision_check.py                              # 8 seeds, 30 iterations: ~10 min on 2 CPU cores
    python scripts/precision_check.py --device cuda --dtypes float32 bfloat16 float16
    python scripts/precision_check.py --where --concepts "marsh finch"   # which network loses the precision
    python scripts/precision_check.py --dtypes float32 float16 --set optim.backtrack=0.5   # with a config override

`--moved-starts EPS N`: afterwards, each dtype optimises every seed again from its start moved by EPS of the
starts' spread (N draws), each scored by float32 against float32's own run: how far a seed's end moves with the
start, in float32 itself (a chaotic seed ends elsewhere from 1e-4) and in the low dtypes.

    python scripts/precision_check.py --dtypes float32 float16 --concepts "marsh finch" --moved-starts 1e-4 3

`--gradient-noise REL N`: afterwards, float32 optimises every seed again from its own start with Gaussian noise of
REL times the gradient's norm added to the seed's gradient in every iteration (N draws; float16's start gradient is
off from float32's by about 1.4 % on most seeds): how far float32's own end moves with an error of float16's size.
With more dtypes than float32, it then counts the images whose low-dtype end (scored by float32) is within 5 % of the
worst of float32's own ends (its run and the draws): float32's spread, not its one run, as the yardstick.

    python scripts/precision_check.py --dtypes float32 --concepts "marsh finch" --set seed=33 --gradient-noise 0.015 3

`--gpu-convolutions`: a CPU without float16 convolution kernels (no AVX512-FP16) runs float16 convolutions through
PyTorch's reference `_slow_conv2d`; with this flag they take float16 operands, accumulate in float32 and round
their output (backward: the input's gradient) to float16, as a GPU's float16 convolutions do, at under half the
time. Both accumulate in float32; their outputs differ in the last bit now and then (1.4e-5 relative), which a
chaotic seed turns into another end (BENCHMARKS.md, "Two float16 arithmetics").

`--where`: float32 optimises the seeds; at its iterates (the start, and iterations 10 and the last), the loss and
its gradient are computed again with one network at a time in the low dtype (the UNet, the VAE, the text encoder,
CLIP's image encoder), then all of them, and compared with float32's: the loss's relative error and the gradient's
cosine, per network and iterate.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import tempfile
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

import seedselect_cli.core.optimize as optimize_module
from seedselect_cli.config import compose_config
from seedselect_cli.core.engine import image_centroids
from seedselect_cli.core.optimize import optimize_seeds, scaled_backward, seed_objective
from seedselect_cli.core.prompts import encode_prompt
from seedselect_cli.core.samplers import ddim_schedule
from seedselect_cli.files.assets import asset_path
from seedselect_cli.files.datasets import fill_template
from seedselect_cli.files.tensor_cache import TensorCache
from seedselect_cli.judges import Judge, JudgeConfig
from seedselect_cli.models import cast, component_dtype, load_models
from seedselect_cli.pipeline import run_optimize
from seedselect_cli.references import load_encodings


@contextlib.contextmanager
def gpu_convolutions():
    """float16 convolutions on the CPU as a GPU computes them: float16 operands, float32 accumulation, the output
    (and backward, the input's gradient) rounded to float16 (`--gpu-convolutions`, above). Other dtypes and devices
    as they are."""
    conv2d = torch.nn.functional.conv2d

    def float32_accumulated(x, weight, bias=None, *args, **kwargs):
        if x.dtype != torch.float16 or x.device.type != "cpu":
            return conv2d(x, weight, bias, *args, **kwargs)
        bias = None if bias is None else bias.float()
        return conv2d(x.float(), weight.float(), bias, *args, **kwargs).to(torch.float16)

    torch.nn.functional.conv2d = float32_accumulated
    try:
        yield
    finally:
        torch.nn.functional.conv2d = conv2d


def config_for(concepts: list[str], dtype: str, device: str, n: int, iterations: int, method: str | None = None,
               overrides: tuple[str, ...] = ()):
    return compose_config("toyworld", [*([f"method={method}"] if method else []), *overrides,
        "dataset.classes=[" + ",".join(concepts) + "]", f"n_images={n}", f"runtime.batch_size={n}",
        f"runtime.dtype={dtype}", f"runtime.device={device}", f"optim.iterations={iterations}",
        "runtime.progress=false", "runtime.cache=false"])


def concept_targets(models, config, concept: str, indices: list[int] | None = None):
    """The concept's centroids from its toy-world references, and its prompt's embeddings. With
    `loss.appearance=assigned` (the default `method=select`) and the images' `indices`, each image's own targets,
    as `optimize` steered it (`Engine`): the optimised loss, not the class centroid's."""
    paths = sorted(Path(asset_path(f"toyworld/references/{concept}")).glob("*.png"))
    encodings = load_encodings(models, paths, config.sampler.height, config.sampler.width,
                               config.dataset.resize_mode, TensorCache(None, "none"), concept)
    text = encode_prompt(models, fill_template(config.dataset.prompt_template, concept))
    if indices is None:
        return encodings.centroids(), text
    return image_centroids(encodings, config.seed, concept, indices, config.loss), text


def loss_and_gradient(models, z: torch.Tensor, centroids, text: torch.Tensor, config
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss at seeds z and d loss / d z, as the optimisation computes them (seed and loss in float32)."""
    z = z.clone().to(models.device, torch.float32).requires_grad_(True)
    terms = seed_objective(models, z, centroids, text, ddim_schedule(models, config.sampler.steps), config.objective())
    scaled_backward(terms.total, z)
    return terms.total.detach().float().cpu(), z.grad.detach().float().cpu()


NETWORKS = ("unet", "vae", "text_encoder", "image_encoder")


def run_networks(models, dtype: torch.dtype) -> tuple[str, ...]:
    """The networks a run in `dtype` keeps in it (`models.component_dtype`: not the text encoder)."""
    parts = {"unet": models.unet, "vae": models.vae}
    return tuple(name for name in NETWORKS if component_dtype(name, parts, dtype) == dtype)


def in_dtype(models, networks: tuple[str, ...], dtype: torch.dtype):
    """A copy of float32 `models` with `networks` in `dtype` (the others, the seed and the loss stay float32)."""
    return dataclasses.replace(models, **{name: cast(copy.deepcopy(getattr(models, name)), dtype) for name in networks})


def where(concept: str, n: int, iterations: int, device: str, dtype_name: str, method: str | None = None,
          overrides: tuple[str, ...] = ()) -> list[dict]:
    """The loss's relative error and the gradient's cosine to float32's with each network in the low dtype."""
    config = config_for([concept], "float32", device, n, iterations, method, overrides)
    models = load_models(config.model, torch.device(device), torch.float32)
    centroids, text = concept_targets(models, config, concept)
    shape = models.latent_shape(config.sampler.height, config.sampler.width)
    starts = torch.randn((n, *shape), generator=torch.Generator().manual_seed(20261202))
    points = {0: starts, min(10, iterations - 1): None, iterations - 1: None}
    optimize_seeds(models, starts, centroids, text, config.objective(), config.optim_spec(),
                   on_iteration=lambda it, best: points.__setitem__(it, best.cpu().clone()) if it in points else None)
    dtype = getattr(torch, dtype_name)
    reference = {it: loss_and_gradient(models, z, centroids, text, config) for it, z in points.items()}
    rows = []
    for networks in [(name,) for name in NETWORKS] + [NETWORKS]:
        low = in_dtype(models, networks, dtype)
        low_text = encode_prompt(low, fill_template(config.dataset.prompt_template, concept))  # its own text encoder
        for it, z in points.items():
            loss, grad = loss_and_gradient(low, z, centroids, low_text, config)
            ref_loss, ref_grad = reference[it]
            cos = torch.nn.functional.cosine_similarity(grad.flatten(1), ref_grad.flatten(1), dim=1)
            err = (loss - ref_loss) / ref_loss
            rows.append({"networks": "all" if networks == NETWORKS else networks[0], "iteration": it,
                         "loss error": err.tolist(), "cosine": cos.tolist()})
            print(f"| {rows[-1]['networks']} | {it} | {ref_loss.mean():.4f} | {err.mean():+.4f} | "
                  f"{err.abs().max():.4f} | {cos.mean():.4f} | {cos.min():.4f} |", flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concepts", nargs="+", default=["sea finch", "marsh finch"])
    parser.add_argument("--n-images", type=int, default=4, help="seeds per concept")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--method", choices=("select", "paper"), default=None,
                        help="default: the tool's (select); BENCHMARKS.md's tables were measured with paper")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every run, e.g. --set optim.backtrack=0.5 (repeatable)")
    parser.add_argument("--where", action="store_true", help="which network loses the precision (see above)")
    parser.add_argument("--moved-starts", nargs=2, type=float, metavar=("EPS", "N"), default=None,
                        help="optimise again from starts moved by EPS of their spread, N draws (see above)")
    parser.add_argument("--gradient-noise", nargs=2, type=float, metavar=("REL", "N"), default=None,
                        help="float32 again with noise of REL times the gradient's norm added to each iteration's "
                             "seed gradient, N draws (see above)")
    parser.add_argument("--gpu-convolutions", action="store_true",
                        help="float16 convolutions accumulated in float32 as on a GPU, not the CPU's (see above)")
    args = parser.parse_args(argv)
    if args.gradient_noise and args.dtypes[0] != "float32":
        parser.error("--gradient-noise moves float32's own end: put float32 first in --dtypes")
    # float32 is the reference: on CUDA without TF32 convolutions (PyTorch's default allows them, 10-bit operands)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False), \
            gpu_convolutions() if args.gpu_convolutions else contextlib.nullcontext():
        return measure(args)


def measure(args) -> list[dict]:
    if args.where:
        print(f"| {args.dtypes[-1]} network | iteration | float32 loss | loss error, mean | largest | "
              "grad cos, mean | lowest |\n|---|---|---|---|---|---|---|")
        return [row for concept in args.concepts
                for row in where(concept, args.n_images, args.iterations, args.device, args.dtypes[-1], args.method,
                                 tuple(args.overrides))]
    judge = Judge(JudgeConfig(model=asset_path("toyworld/judge")), args.concepts, torch.device("cpu"))
    rows: dict[tuple[str, int], dict] = {}
    for dtype in args.dtypes:
        config = config_for(args.concepts, dtype, args.device, args.n_images, args.iterations, args.method,
                            tuple(args.overrides))
        with tempfile.TemporaryDirectory() as folder:
            entries = run_optimize(config, Path(folder))
            images = [Image.open(Path(folder) / e["image"]).convert("RGB") for e in entries]
            verdicts, _ = judge.classify(images, k=1)
            for entry, verdict in zip(entries, verdicts):
                row = rows.setdefault((entry["class"], entry["index"]), {})
                row[dtype] = {"loss": entry["loss"], "verdict": verdict[0] or "off-model",
                              "candidate": entry.get("candidate")}
                tensors = load_file(Path(folder) / entry["seed_file"])
                row[dtype]["seed"] = tensors["optimized"]
                row.setdefault("start", tensors["initial"])
    # Each dtype's start gradients, and float32's loss at the seed each dtype found ("as good as float32's")
    full = load_models(config.model, torch.device(args.device), torch.float32)
    for concept in args.concepts:
        keys = sorted(k for k in rows if k[0] == concept)
        starts = torch.stack([rows[k]["start"] for k in keys])
        indices = [index for _, index in keys]
        grads = {}
        for d in args.dtypes:
            models = in_dtype(full, run_networks(full, getattr(torch, d)), getattr(torch, d))
            grads[d] = loss_and_gradient(models, starts, *concept_targets(models, config, concept, indices), config)[1]
        rescored = {d: loss_and_gradient(full, torch.stack([rows[k][d]["seed"] for k in keys]),
                                         *concept_targets(full, config, concept, indices), config)[0]
                    for d in args.dtypes}
        for i, key in enumerate(keys):
            for d in args.dtypes:
                rows[key][d]["cosine"] = torch.nn.functional.cosine_similarity(
                    grads[d][i].flatten(), grads[args.dtypes[0]][i].flatten(), dim=0).item()
                rows[key][d]["rescored"] = rescored[d][i].item()
    base = args.dtypes[0]
    print("| concept | seed | " + " | ".join(f"{d} loss (ratio) | float32's loss at its seed (ratio) | {d} verdict | "
                                           f"{d} grad cos" for d in args.dtypes) + " |")
    print("|---|---|" + "---|---|---|---|" * len(args.dtypes))
    for (concept, index), row in sorted(rows.items()):
        cells = []
        for d in args.dtypes:
            r = row[d]
            cells.append(f"{r['loss']:.4f} ({r['loss'] / row[base]['loss']:.3f}) | "
                         f"{r['rescored']:.4f} ({r['rescored'] / row[base]['rescored']:.3f}) | {r['verdict']} | "
                         f"{r['cosine']:.4f}")
        print(f"| {concept} | {index} | " + " | ".join(cells) + " |")
    for d in args.dtypes[1:]:
        worst = max(row[d]["loss"] / row[base]["loss"] for row in rows.values())
        worst_rescored = max(row[d]["rescored"] / row[base]["rescored"] for row in rows.values())
        same = sum(row[d]["verdict"] == row[base]["verdict"] for row in rows.values()) / len(rows)
        cosines = [row[d]["cosine"] for row in rows.values()]
        other_start = sum(row[d]["candidate"] != row[base]["candidate"] for row in rows.values())
        print(f"{d}: largest loss ratio to {base} {worst:.3f} (scored by float32: {worst_rescored:.3f}); verdicts as {base}'s {same:.2f}; "
              f"start-gradient cosine min {min(cosines):.4f}, mean {sum(cosines) / len(cosines):.4f}; "
              f"another candidate start than {base}'s kept for {other_start} of {len(rows)} images")
    if args.moved_starts:
        moved_starts(rows, args, config, full)
    if args.gradient_noise:
        noisy_gradients(rows, args, config, full)
        within_spread(rows, args.dtypes)
    return list(rows.values())


@contextlib.contextmanager
def gradient_noise(rel: float, generator: torch.Generator):
    """Every seed gradient the optimisation computes, plus Gaussian noise of `rel` times its norm (per seed, spread
    evenly over its elements): an error of that size in the gradient, as float16's rounding makes one."""
    exact = optimize_module.scaled_backward

    def noisy(losses: torch.Tensor, seeds: torch.Tensor) -> None:
        exact(losses, seeds)
        g = seeds.grad
        scale = g.flatten(1).norm(dim=1) / g[0].numel() ** 0.5
        g.add_(rel * scale.view(-1, *[1] * (g.ndim - 1)) * torch.randn(g.shape, generator=generator).to(g.device))

    optimize_module.scaled_backward = noisy
    try:
        yield
    finally:
        optimize_module.scaled_backward = exact


def noisy_gradients(rows: dict, args, config, full) -> None:
    """float32's ends with noise in its gradient (`--gradient-noise`), scored over float32's own end, printed and
    kept in each row's float32 entry as `noisy`."""
    rel, draws = args.gradient_noise[0], int(args.gradient_noise[1])
    print(f"\nfloat32 with noise of {rel:g} times the gradient's norm in every iteration ({draws} draws), over "
          f"float32's own end:" + ENDS_TABLE)
    for concept in args.concepts:
        keys, starts, indices = concept_starts(rows, concept)
        targets, text = concept_targets(full, config, concept, indices)
        ends = []
        with gradient_noise(rel, torch.Generator().manual_seed(99)):
            for _ in range(draws):
                found = torch.stack([r.optimized for r in optimize_seeds(full, starts, targets, text,
                                                                         config.objective(), config.optim_spec())])
                ends.append(loss_and_gradient(full, found, targets, text, config)[0])
        report_ends(rows, keys, args.dtypes[0], "float32", "noisy", ends)


def within_spread(rows: dict, dtypes: list[str], slack: float = 0.05) -> None:
    """Per low dtype, the images whose end, scored by float32, is at most `1 + slack` times the worst of float32's own
    ends (its run and its `--gradient-noise` draws): the part 1 criterion measured against float32's spread under an
    error of float16's size rather than against its one run. Printed, and kept in each row's dtype entry as
    `within_spread`."""
    base = dtypes[0]
    for d in dtypes[1:]:
        outside = []
        for key, row in sorted(rows.items()):
            worst = max([1.0, *row[base]["noisy"]])
            ratio = row[d]["rescored"] / row[base]["rescored"]
            row[d]["within_spread"] = ratio <= (1 + slack) * worst
            if not row[d]["within_spread"]:
                outside.append(f"{key[0]} {key[1]} at {ratio:.3f} (float32's worst {worst:.3f})")
        print(f"{d}: end within {1 + slack:g} times the worst of {base}'s own ends for {len(rows) - len(outside)} of "
              f"{len(rows)} images" + (f"; outside: {', '.join(outside)}" if outside else ""), flush=True)


ENDS_TABLE = "\n\n| dtype | concept | seed | ends |\n|---|---|---|---|"  # the head of `report_ends`'s rows


def concept_starts(rows: dict, concept: str) -> tuple[list, torch.Tensor, list[int]]:
    """The rows of `concept` in index order: their keys, float32's starts (N, C, h, w) and the image indices."""
    keys = sorted(k for k in rows if k[0] == concept)
    return keys, torch.stack([rows[k]["start"] for k in keys]), [index for _, index in keys]


def report_ends(rows: dict, keys: list, base: str, dtype: str, name: str, ends: list[torch.Tensor]) -> None:
    """Each draw's ends (float32's loss at each seed found) over the `base` run's own end (float32's, scored alike),
    kept in each row's `dtype` entry as `name` and printed as a table row per image."""
    for i, key in enumerate(keys):
        own = rows[key][base]["rescored"]
        rows[key][dtype][name] = [e[i].item() / own for e in ends]
        print(f"| {dtype} | {key[0]} | {key[1]} | " + ", ".join(f"{e[i].item() / own:.3f}" for e in ends) + " |",
              flush=True)


def moved_starts(rows: dict, args, config, full) -> None:
    """Each dtype's ends from moved starts, scored by float32, over float32's own end (`--moved-starts`), printed and
    kept in each row's dtype entry as `moved`."""
    eps, draws = args.moved_starts[0], int(args.moved_starts[1])
    print(f"\nFrom starts moved by {eps:g} of their spread ({draws} draws), each scored by float32 over float32's own "
          f"end:" + ENDS_TABLE)
    for d in args.dtypes:
        models = load_models(config.model, torch.device(args.device), getattr(torch, d))  # as a run loads them
        for concept in args.concepts:
            keys, starts, indices = concept_starts(rows, concept)
            targets, text = concept_targets(models, config, concept, indices)
            exact = concept_targets(full, config, concept, indices)
            generator = torch.Generator().manual_seed(1234)
            ends = []
            for _ in range(draws):
                moved = starts + eps * starts.std() * torch.randn(starts.shape, generator=generator)
                found = torch.stack([r.optimized for r in optimize_seeds(models, moved, targets, text,
                                                                         config.objective(), config.optim_spec())])
                ends.append(loss_and_gradient(full, found, *exact, config)[0])
            report_ends(rows, keys, args.dtypes[0], d, "moved", ends)


if __name__ == "__main__":
    main()
