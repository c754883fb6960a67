"""Distil the toy world's UNet for few-step sampling: `seedselect_cli/assets/toyworld_turbo`, a few MB.

The shipped toy world was trained for 10 DDIM steps with guidance 4; one Euler step of it draws blurred,
off-colour shapes (README, "Models and samplers"), too poor to say whether seed selection works through one
step. This makes the toy world's SD-Turbo: a student UNet, started from the teacher's weights, trained so
that 1, 2 or 4 Euler steps on trailing timesteps *without guidance* land where the teacher's 10 guided DDIM
steps land from the same seed (knowledge distillation of the sampler, Luhman & Luhman 2021; trained through
the tool's own differentiable rollout, so it learns the very arithmetic it is sampled with). The teacher's
pairs (seed, prompt) -> z_0 cover every concept equally, tail included: the student copies the teacher's
drawing of each concept, its mistakes too, so what seed selection adds stays measurable. The VAE, text
encoder, tokenizer and noise schedule are the teacher's, copied beside the student.

    python scripts/distill_toyworld.py --steps 600 --per-prompt 128   # the shipped weights: 9 min on 2 CPU cores
    python scripts/distill_toyworld.py                 # longer and closer to the teacher: 36 min
    python scripts/distill_toyworld.py --quick --out /tmp/tt   # a few steps: checks the script, not the model
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_toyworld as world

from seedselect_cli.config import ModelConfig
from seedselect_cli.core.prompts import encode_prompt
from seedselect_cli.core.samplers import make_schedule
from seedselect_cli.core.sampling import rollout
from seedselect_cli.files.assets import asset_path
from seedselect_cli.models import load_models

# The teacher the shipped toyworld_turbo was distilled from (distilled.json): DDIM, 10 steps, guidance 4, the
# toyworld sampler preset of the time (its guidance has been 2 since 2026-12-04, RESULTS.md)
TEACHER = ("ddim", 10, 4.0)
STUDENT_STEPS = (1, 2, 4)  # Euler (trailing) step counts the student is trained for, each equally often


def teacher_pairs(models, prompts: list[str], per_prompt: int, seed: int, batch: int = 256):
    """(z_T, prompt index, z_0) from the teacher's 10 guided DDIM steps, `per_prompt` seeds per prompt."""
    name, steps, guidance = TEACHER
    schedule = make_schedule(models, steps, name)
    g = torch.Generator().manual_seed(seed)
    shape = models.latent_shape(32, 32)
    seeds, rows, finals = [], [], []
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            text = encode_prompt(models, prompt)
            for start in range(0, per_prompt, batch):
                z = torch.randn(min(batch, per_prompt - start), *shape, generator=g)
                seeds.append(z)
                rows.append(torch.full((len(z),), row))
                finals.append(rollout(models, z, text, schedule, guidance, checkpoint=False)[-1])
    return torch.cat(seeds), torch.cat(rows), torch.cat(finals)


def distil(teacher, prompts: list[str], z_T: torch.Tensor, rows: torch.Tensor, z_0: torch.Tensor, steps: int,
           batch: int, lr: float, seed: int):
    """The student UNet: the teacher's, trained so that Euler in 1, 2 or 4 steps without guidance gives z_0. Each
    training step takes one concept's seeds through `rollout`, the sampler the student will be used with."""
    student = dataclasses.replace(teacher, unet=copy.deepcopy(teacher.unet).train().requires_grad_(True))
    texts = [encode_prompt(teacher, p) for p in prompts]
    schedules = {n: make_schedule(student, n, "euler") for n in STUDENT_STEPS}
    params = list(student.unet.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    decay = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed)
    members = [(rows == row).nonzero().flatten() for row in range(len(prompts))]
    begin = time.perf_counter()
    for step in range(steps):
        n = STUDENT_STEPS[step % len(STUDENT_STEPS)]
        row = int(torch.randint(len(prompts), (1,), generator=g))
        pick = members[row][torch.randint(len(members[row]), (batch,), generator=g)]
        out = rollout(student, z_T[pick], texts[row], schedules[n], 0.0, checkpoint=False)[-1]
        loss = torch.nn.functional.mse_loss(out, z_0[pick])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay.step()
        if step % 200 == 0 or step == steps - 1:
            print(f"distil {step:>6}/{steps}  {n} step(s)  loss {loss.item():.4f}  {time.perf_counter() - begin:6.0f} s",
                  flush=True)
    student.unet.eval().requires_grad_(False)
    return student


def held_out_error(teacher, student, prompts: list[str], seed: int, per_prompt: int = 16) -> dict[int, float]:
    """Mean squared distance to the teacher's z_0 on fresh seeds, for each student step count (and the teacher's
    own model sampled with Euler at that count, the baseline distillation has to beat)."""
    z_T, rows, z_0 = teacher_pairs(teacher, prompts, per_prompt, seed)
    out = {}
    with torch.no_grad():
        for n in STUDENT_STEPS:
            for who, models in (("student", student), ("teacher", teacher)):
                errors = []
                for row, prompt in enumerate(prompts):
                    mask = rows == row
                    drawn = rollout(models, z_T[mask], encode_prompt(models, prompt), make_schedule(models, n, "euler"),
                                    0.0 if who == "student" else TEACHER[2], checkpoint=False)[-1]
                    errors.append((drawn - z_0[mask]).square().mean())
                out[f"{who} euler {n}"] = round(float(torch.stack(errors).mean()), 4)
    return out


def save(student, source: Path, out: Path, info: dict) -> None:
    """A diffusers folder: the student UNet in float16, the teacher's other components copied."""
    out.mkdir(parents=True, exist_ok=True)
    for part in ("vae", "text_encoder", "tokenizer", "scheduler", "model_index.json"):
        target = out / part
        if target.is_dir():
            shutil.rmtree(target)
        (shutil.copytree if (source / part).is_dir() else shutil.copy)(source / part, target)
    world.save_unet(student.unet, out)
    (out / "distilled.json").write_text(json.dumps(info, indent=2) + "\n")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "seedselect_cli/assets/toyworld_turbo"))
    parser.add_argument("--per-prompt", type=int, default=512, help="teacher samples per concept")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few steps, samples and concepts: checks the script")
    args = parser.parse_args(argv)
    if args.quick:
        args.per_prompt, args.steps, args.batch = 2, 3, 2
    torch.manual_seed(args.seed)
    source = Path(asset_path("toyworld"))
    world = json.loads((source / "world.json").read_text())
    prompts = [world["template"].format(c["name"]) for c in world["concepts"]][:2 if args.quick else None]
    teacher = load_models(ModelConfig(pretrained=str(source), image_encoder=asset_path("toyworld/clip")),
                          torch.device("cpu"), torch.float32, with_image_encoder=False)
    begin = time.perf_counter()
    z_T, rows, z_0 = teacher_pairs(teacher, prompts, args.per_prompt, args.seed)
    print(f"teacher: {len(z_T)} pairs in {time.perf_counter() - begin:.0f} s", flush=True)
    student = distil(teacher, prompts, z_T, rows, z_0, args.steps, args.batch, args.lr, args.seed + 1)
    errors = held_out_error(teacher, student, prompts, args.seed + 2, 2 if args.quick else 16)
    info = {"teacher": {"sampler": TEACHER[0], "steps": TEACHER[1], "guidance_scale": TEACHER[2]},
            "student": {"sampler": "euler", "steps": list(STUDENT_STEPS), "guidance_scale": 0.0},
            "pairs": len(z_T), "train_steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed,
            "seconds": round(time.perf_counter() - begin), "held_out_mse_to_teacher": errors}
    save(student, source, Path(args.out), info)
    print(json.dumps(info, indent=2), flush=True)
    return info


if __name__ == "__main__":
    main()
