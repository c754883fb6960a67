"""Does seed selection work through few steps? On the toy world's tail concepts, for each model and sampler
setting, the strict judge's top-1 accuracy of plain sampling and of SeedSelect from the same initial noise
(the named config's defaults otherwise, k = 1), N images per concept. `toyworld` was trained for 10 guided
DDIM steps; `toyworld_turbo` is its UNet distilled for 1 to 4 Euler steps without guidance
(scripts/distill_toyworld.py).

    python scripts/fewstep_experiment.py --n-images 8 --iterations 5     # about 6 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from seedselect_cli.config import compose_config
from seedselect_cli.core.initial_seeds import plain_noise
from seedselect_cli.core.samplers import step_noise
from seedselect_cli.core.sampling import sample_images
from seedselect_cli.files.assets import asset_path
from seedselect_cli.files.tensor_cache import TensorCache
from seedselect_cli.judges import Judge, JudgeConfig
from seedselect_cli.models import load_models
from seedselect_cli.pipeline import engine_for
from seedselect_cli.references import load_encodings

SETTINGS = [("toyworld", "ddim", 10), ("toyworld", "euler", 4), ("toyworld", "euler", 2), ("toyworld", "euler", 1),
            ("toyworld", "lcm", 4), ("toyworld", "lcm", 2),
            ("toyworld_turbo", "euler", 4), ("toyworld_turbo", "euler", 2), ("toyworld_turbo", "euler", 1)]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-images", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1000, help="not a seed the defaults were tuned on")
    parser.add_argument("--settings", nargs="+", default=None,
                        help="CONFIG:SAMPLER:STEPS each (default: every setting in SETTINGS)")
    args = parser.parse_args(argv)
    n = args.n_images
    world = json.loads(Path(asset_path("toyworld/world.json")).read_text())
    concepts = [c["name"] for c in world["concepts"]]
    tail = [c["name"] for c in world["concepts"] if c["bucket"] == "tail"]
    judge = Judge(JudgeConfig(model=asset_path("toyworld/judge")), concepts, torch.device("cpu"))
    rows = []
    settings = [(c, n, int(k)) for c, n, k in (s.split(":") for s in args.settings)] if args.settings else SETTINGS
    for config_name, name, steps in settings:
        config = compose_config(config_name, [
            f"sampler.name={name}", f"sampler.steps={steps}", "kstep=last", f"optim.iterations={args.iterations}",
            f"seed={args.seed}", f"runtime.batch_size={n}", "runtime.progress=false"])
        models = load_models(config.model, torch.device("cpu"), torch.float32)
        engine = engine_for(models, config)
        shape = models.latent_shape(config.sampler.height, config.sampler.width)
        begin, plain_ok, ours_ok = time.perf_counter(), 0, 0
        for concept in tail:
            refs = sorted(Path(asset_path(f"toyworld/references/{concept}")).iterdir())
            encodings = load_encodings(models, refs, config.sampler.height, config.sampler.width,
                                       config.dataset.resize_mode, TensorCache(None, ""), concept)
            target = engine.class_target(concept, config.dataset.prompt_template.format(concept), encodings)
            [batch] = engine.optimize_batches(target, [list(range(n))], engine.centre(target))
            plain_z = torch.stack([plain_noise(shape, config.seed, concept, i) for i in range(n)])
            noise = step_noise(name, batch.init_seeds, shape, steps)
            w = config.sampler.guidance_scale
            plain = sample_images(models, plain_z, target.text_embeds, steps, w, name, noise)
            best = torch.stack([r.optimized for r in engine.run_batch(target, batch)])
            mine = sample_images(models, best, target.text_embeds, steps, w, name, noise)
            plain_ok += sum(v[0] == concept for v in judge.classify(plain, 1)[0])
            ours_ok += sum(v[0] == concept for v in judge.classify(mine, 1)[0])
        total = n * len(tail)
        rows.append({"model": config_name, "sampler": name, "steps": steps, "guidance": config.sampler.guidance_scale,
                     "plain": plain_ok / total, "seedselect": ours_ok / total,
                     "seconds": round(time.perf_counter() - begin)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    main()
