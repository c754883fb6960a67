"""How much arithmetic one image costs under a setting: network passes counted as they run.

Runs `seedselect optimize` (in this process, on the tiny random components, which make the same calls as
any model) with the given overrides, counting every call of the UNet, the VAE decoder and the CLIP
image encoder, forward and backward, weighted by the number of images in its batch, and divides by the
images made. Per-class work (encoding the references, their DDIM inversions) is counted once and
shown apart, as it is shared by all of a class's images. Backward passes are counted as two forwards,
the usual rule for convolution and attention layers.

    python scripts/arithmetic.py                                    # the default settings, toy-world sampler
    python scripts/arithmetic.py method=paper                       # the paper's SeedSelect
    python scripts/arithmetic.py --compare "init=random" "init.candidates=8 optim.iterations=20"
    python scripts/arithmetic.py --bootstrap --compare "" "method=paper"   # seedselect bootstrap, per image

With `--bootstrap` it runs `seedselect bootstrap` instead (`bootstrap.n_images` images); the class's z_T^G, where
the setting makes one, counts as per-class work.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

from seedselect_cli import models as models_module
from seedselect_cli.config import compose_config
from seedselect_cli.pipeline import run_bootstrap, run_optimize

NETWORKS = {"unet": "UNet", "decoder": "VAE decoder", "image_encoder": "CLIP"}


def count_passes(overrides: list[str], n_images: int, bootstrap: bool = False) -> dict:
    """{network: {"forward": images, "backward": images}} per image, and the per-class part apart."""
    # every denoising step recomputed in the backward pass, as `_base` does (the toy world's configs keep theirs;
    # `runtime.memory_budget=auto` among the overrides counts that)
    config = compose_config("toyworld", ["model=tiny", "sampler=toyworld", "dataset.classes=[marsh finch]",
                                         "runtime.progress=false", "runtime.cache=false", "runtime.memory_budget=0",
                                         f"n_images={n_images}",
                                         f"runtime.batch_size={n_images}", f"bootstrap.n_images={n_images}",
                                         *overrides])
    counts: Counter = Counter()
    phase = {"now": "class"}
    real_load = models_module.load_models

    def counting_load(*args, **kwargs):
        models = real_load(*args, **kwargs)
        for attr, module in (("unet", models.unet), ("decoder", models.vae.decoder),
                             ("image_encoder", models.image_encoder)):
            module.register_forward_hook(functools.partial(count_call, attr), with_kwargs=True)
        return models

    def count_call(attr, module, args, kwargs, output):
        """A forward call, by its batch (inputs given by keyword too); and its backward, when a gradient flows
        back through its output (a hook on the output tensor: module backward hooks miss dataclass outputs)."""
        n = _batch([*args, *kwargs.values()])
        counts.update({(phase["now"], attr, "forward"): n})
        out = _first_tensor(output)
        if out is not None and out.requires_grad:
            out.register_hook(lambda grad: counts.update({(phase["now"], attr, "backward"): n}))

    from seedselect_cli import pipeline
    from seedselect_cli.core import engine  # where each batch's candidates are scored and its seeds optimised

    real_best, real_optimize = engine.best_candidates, engine.optimize_seeds
    real_global = engine.Engine.optimize_global_seed

    def per_image(fn):
        def wrapped(*args, **kwargs):
            phase["now"] = "class" if phase.get("global") else "image"
            return fn(*args, **kwargs)
        return wrapped

    def per_class(self, *args, **kwargs):  # bootstrap's z_T^G serves every image of the class
        phase["global"] = True
        try:
            return real_global(self, *args, **kwargs)
        finally:
            phase["global"] = False

    pipeline.load_models = counting_load
    engine.best_candidates = per_image(real_best)
    engine.optimize_seeds = per_image(real_optimize)
    engine.Engine.optimize_global_seed = per_class
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            entries = (run_bootstrap if bootstrap else run_optimize)(config, Path(run_dir))
    finally:
        pipeline.load_models, engine.best_candidates, engine.optimize_seeds = real_load, real_best, real_optimize
        engine.Engine.optimize_global_seed = real_global
    made = len(entries)
    out: dict = {"images": made, "iterations": sum(len(e["loss_history"]) for e in entries) / made}
    for where in ("class", "image"):
        for network in NETWORKS:
            for direction in ("forward", "backward"):
                value = counts[(where, network, direction)]
                out[(where, network, direction)] = value / made if where == "image" else value
    out["unet_equivalents"] = (out[("image", "unet", "forward")] + 2 * out[("image", "unet", "backward")])
    out["class_unet_equivalents"] = (out[("class", "unet", "forward")] + 2 * out[("class", "unet", "backward")])
    return out


def _batch(tensors) -> int:
    first = next((t for t in tensors if torch.is_tensor(t)), None)
    return int(first.shape[0]) if first is not None else 0


def _first_tensor(output) -> torch.Tensor | None:
    """The main tensor of a network's output: a tensor, a tuple's first, or a diffusers/transformers output's."""
    if torch.is_tensor(output):
        return output
    values = output.to_tuple() if hasattr(output, "to_tuple") else output
    return next((v for v in values if torch.is_tensor(v)), None) if isinstance(values, (tuple, list)) else None


def table(rows: dict[str, dict]) -> str:
    header = ("| setting | iterations | UNet fwd / bwd | decoder fwd / bwd | CLIP fwd / bwd | UNet forward-"
              "equivalents per image | per class (references, z_T^G: UNet forward-equivalents) |")
    lines = [header, "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        cells = [f"{r[('image', n, 'forward')]:.0f} / {r[('image', n, 'backward')]:.0f}" for n in NETWORKS]
        lines.append(f"| {name} | {r['iterations']:.1f} | " + " | ".join(cells)
                     + f" | {r['unet_equivalents']:.0f} | {r['class_unet_equivalents']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="config overrides of one setting")
    parser.add_argument("--compare", nargs="+", default=None, help="settings, each a quoted list of overrides")
    parser.add_argument("--n-images", type=int, default=4)
    parser.add_argument("--bootstrap", action="store_true", help="count `seedselect bootstrap`, not `optimize`")
    args = parser.parse_args(argv)
    settings = {s or "defaults": s.split() for s in args.compare} if args.compare else {
        " ".join(args.overrides) or "defaults": args.overrides}
    rows = {name: count_passes(overrides, args.n_images, args.bootstrap) for name, overrides in settings.items()}
    print(table(rows))
    return rows


if __name__ == "__main__":
    sys.exit(main() and 0)
