"""The SeedSelect loop: gradient descent on a batch of seeds z_T through the frozen sampler.

The per-seed losses are summed before the backward pass, so each seed gets exactly the gradient
it would get alone, and AdamW (element-wise) keeps a separate state for each. The best iterate of
each seed is kept, with its losses, and the loss curve is recorded. A seed whose loss or gradient
stops being finite is frozen at its best iterate and the others go on; so is, with
`optim.stop_near_reference`, a seed whose L_sem has fallen to its target's spacing (`Centroids.spacing`: nearer
than that to its reference, an image copies it). With `optim.backtrack`, a seed whose loss rises above its best
by that share goes halfway back to its best iterate instead of stepping, and steps half as far from then on: the
authors' AdamW at lr 0.1 often leaps out of a seed's basin at the first step, and where the seed then ends is
chaotic (RESULTS.md). `should_stop` ends the loop after the current step (Ctrl-C, SIGTERM). The last iteration
evaluates its iterate without a backward pass: the step it would take is never evaluated (bootstrap's 5 iterations,
about 15 % less time an image on the demo).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from seedselect_cli.core.cuda_graphs import GraphCache, checkpointed
from seedselect_cli.core.encoders import clip_embed, clip_pixels, vae_decode
from seedselect_cli.core.frozen import FrozenModels
from seedselect_cli.core.losses import (
    LossTerms,
    appearance_loss,
    combine,
    kstep_semantic_loss,
    nearest_appearance_loss,
    seed_norm_prior,
)
from seedselect_cli.core.nao import chi_mode
from seedselect_cli.core.prompts import PromptEmbeds
from seedselect_cli.core.samplers import Schedule, make_schedule
from seedselect_cli.core.sampling import rollout
from seedselect_cli.core.specs import Objective, OptimSpec
from seedselect_cli.core.targets import Centroids

log = logging.getLogger(__name__)


@dataclass
class SeedResult:
    """One optimised seed: z_T before and after (best iterate), its losses, its loss curve."""

    initial: torch.Tensor  # (C, h, w) float32, CPU
    optimized: torch.Tensor  # (C, h, w) float32, CPU: the iterate with the lowest loss
    loss: float
    semantic_loss: float
    appearance_loss: float
    loss_history: list[float]
    best_iteration: int
    seconds: float  # wall time of the batch, divided by the batch size
    stopped: str | None = None  # why this seed stopped early (a non-finite loss or gradient), if it did

    @classmethod
    def of_start(cls, start: torch.Tensor, terms: LossTerms, row: int, seconds: float) -> SeedResult:
        """A start kept as it is, never stepped: its losses are those of row `row` of `terms`, its one iterate."""
        z = start.detach().float().cpu().clone()
        loss = float(terms.total[row])
        return cls(initial=z, optimized=z.clone(), loss=loss, semantic_loss=float(terms.semantic[row]),
                   appearance_loss=float(terms.appearance[row]), loss_history=[loss], best_iteration=0,
                   seconds=seconds)

    @property
    def usable(self) -> bool:
        """Whether some iterate had a finite loss (the one kept)."""
        return math.isfinite(self.loss)


# The backward pass runs on the loss times this power of two, and the gradient is divided by it again: exact in
# every dtype, and it lifts the cotangents of float16 networks (about 1e-5 per element of an SD latent) out of
# float16's subnormal range, where they lose their bits (loss scaling, Micikevicius et al. 2018). BENCHMARKS.md,
# "Low precision against float32 on the trained toy world".
LOSS_SCALE = 2.0 ** 10


def scaled_backward(losses: torch.Tensor, seeds: torch.Tensor) -> None:
    """d sum(losses) / d seeds into `seeds.grad`, through the loss scale."""
    (losses.sum() * LOSS_SCALE).backward()
    seeds.grad.div_(LOSS_SCALE)


def semantic_embedding(models: FrozenModels, latents: torch.Tensor) -> torch.Tensor:
    """v = normalize(CLIP(D(z / scaling_factor))) of latents, differentiably."""
    return clip_embed(models, clip_pixels(vae_decode(models, latents), models.image_processor))


@dataclass
class RolledOut:
    """What one pass of the sampler gives the loss: the latents after the last k steps (the last is z_0), and, with
    lam > 0, the unit CLIP embedding of each decoded (B, D) (None with lam = 0: no decode, no CLIP)."""

    latents: list[torch.Tensor]
    embeds: list[torch.Tensor] | None


def roll_out(models: FrozenModels, z_T: torch.Tensor, text_embeds: PromptEmbeds, schedule: Schedule,
             objective: Objective, noise: torch.Tensor | None = None, unchecked_steps: int = 0,
             graphs: GraphCache | None = None) -> RolledOut:
    """Roll out the sampler from z_T and embed the images the loss looks at (arguments as `seed_objective`)."""
    loss, kstep, sampler = objective.loss, objective.kstep, objective.sampler
    checkpoint = sampler.checkpointing
    keep = kstep.k if loss.lam > 0 else 1
    latents = rollout(models, z_T, text_embeds, schedule, sampler.guidance_scale,
                      keep_last=keep, checkpoint=checkpoint, noise=noise, unchecked_steps=unchecked_steps, graphs=graphs)
    if loss.lam <= 0:
        return RolledOut(latents, None)
    if checkpoint and torch.is_grad_enabled():  # keep only the embedding of each decoded image
        embed = functools.partial(semantic_embedding, models)
        return RolledOut(latents, [checkpointed(graphs, ("the decodes and CLIP embeddings",), embed, z) for z in latents])
    return RolledOut(latents, [semantic_embedding(models, z) for z in latents])


def loss_terms(rolled: RolledOut, z_T: torch.Tensor, centroids: Centroids, objective: Objective) -> LossTerms:
    """The SeedSelect loss of each seed of the batch from its rolled-out latents and embeddings."""
    loss, kstep = objective.loss, objective.kstep
    if rolled.embeds is not None:
        contrast = None
        if loss.semantic == "contrastive":
            if centroids.classes is None:
                raise ValueError("the contrastive loss needs the centroids of every class (Centroids.classes)")
            contrast = (centroids.classes, centroids.class_index, loss.temperature)
        semantic = kstep_semantic_loss(rolled.embeds, centroids.semantic, kstep.weights, loss.distance, contrast)
    else:  # lam = 0: no decode, no CLIP
        semantic = torch.zeros(z_T.shape[0], device=z_T.device)
    z_0 = rolled.latents[-1]
    if centroids.references is not None:
        appearance = nearest_appearance_loss(z_0, centroids.references.to(z_T.device))
    else:
        appearance = appearance_loss(z_0, centroids.appearance.to(z_T.device))
    norm = seed_norm_prior(z_T) if loss.norm_weight > 0 else None
    return combine(semantic, appearance, loss.lam, norm, loss.norm_weight)


def seed_objective(models: FrozenModels, z_T: torch.Tensor, centroids: Centroids, text_embeds: PromptEmbeds,
                   schedule: Schedule, objective: Objective, noise: torch.Tensor | None = None,
                   unchecked_steps: int = 0, graphs: GraphCache | None = None) -> LossTerms:
    """Roll out the sampler from z_T and evaluate the SeedSelect loss for each seed of the batch (`noise`: what
    the sampler adds between steps, `step_noise`; `unchecked_steps`: the steps the memory budget keeps; `graphs`:
    the CUDA graphs of the checkpointed calls, if any)."""
    rolled = roll_out(models, z_T, text_embeds, schedule, objective, noise, unchecked_steps, graphs)
    return loss_terms(rolled, z_T, centroids, objective)


@dataclass
class Choice:
    """What selection kept of each image's candidate starts: the start (B, C, h, w), which candidate it is, whether
    it already draws the concept (`drawn_within`), and its loss terms from the scoring pass (CPU, float32)."""

    starts: torch.Tensor
    chosen: list[int]
    drawn: list[bool]
    terms: LossTerms


@torch.no_grad()
def best_candidates(models: FrozenModels, candidates: torch.Tensor, centroids: Centroids, text_embeds: PromptEmbeds,
                    objective: Objective, noise: torch.Tensor | None = None, score: str = "semantic",
                    should_stop: Callable[[], bool] | None = None, near_enough: bool = False,
                    drawn_within: tuple[torch.Tensor, torch.Tensor] | None = None) -> Choice:
    """Selection in the literal sense: of each image's N candidate starts (B, N, C, h, w), the one of lowest
    `score` ("semantic": L_sem, whether it draws the concept; "loss": the whole loss), scored by one forward pass
    each without gradients (about a third of an iteration's arithmetic). When `should_stop()` turns true the
    choice is made among the candidates scored so far, so a stop waits for one forward pass, not N. With
    `near_enough` (`optim.stop_near_reference`) every candidate whose L_sem is within its target's spacing counts as
    good as the nearest, and the first of them is kept: the nearest of all is the one that copies its reference.
    With `drawn_within=(mu_v, radius)` (`bootstrap.keep_drawn`: the class's centroid and its references' spread) the
    first candidate whose k-step distance to mu_v is within the radius already draws the concept as a reference
    does: it is kept, and marked drawn; an image with none such keeps its lowest-scored, as without."""
    schedule = make_schedule(models, objective.sampler.steps, objective.sampler.name)
    targets = centroids.to(models.device)
    loss, kstep = objective.loss, objective.kstep
    scored: list[LossTerms] = []
    within = []
    if drawn_within is not None:
        centroid, radius = (t.to(models.device) for t in drawn_within)
    for k in range(candidates.shape[1]):
        z = candidates[:, k].to(models.device, torch.float32)
        rolled = roll_out(models, z, text_embeds, schedule, objective, noise)
        terms = loss_terms(rolled, z, targets, objective)
        scored.append(LossTerms(*(t.float().cpu() for t in (terms.total, terms.semantic, terms.appearance))))
        if drawn_within is not None:
            distance = kstep_semantic_loss(rolled.embeds, centroid, kstep.weights, loss.distance)
            within.append((distance <= radius).cpu())
        if should_stop is not None and should_stop():
            break
    losses = torch.stack([t.semantic if score == "semantic" else t.total for t in scored], dim=1)
    if near_enough and score == "semantic" and centroids.spacing is not None:
        losses = losses.clamp_min(centroids.spacing.float().cpu().expand(len(losses))[:, None])
    best = losses.nan_to_num(nan=float("inf")).argmin(dim=1)  # the first of equals
    drawn = torch.zeros(len(best), dtype=torch.bool)
    if within:
        within = torch.stack(within, dim=1)  # (B, scored)
        drawn = within.any(dim=1)
        best = torch.where(drawn, within.int().argmax(dim=1), best)  # argmax: the first True
    rows = torch.arange(len(best))
    kept = LossTerms(*(torch.stack([getattr(t, name) for t in scored], dim=1)[rows, best]
                       for name in ("total", "semantic", "appearance")))
    return Choice(candidates[rows, best], best.tolist(), drawn.tolist(), kept)


def backtracking_step(optimizer: torch.optim.Optimizer, z: torch.Tensor, best_z: torch.Tensor,
                      step_scale: torch.Tensor, rose: torch.Tensor) -> None:
    """`optim.backtrack`: the optimiser's step on the seeds `z` (B, ...), each seed's step times its `step_scale`
    (B,); a seed whose loss `rose` (B, bool) takes no step but goes halfway back to its best iterate `best_z`, and its
    optimiser state (AdamW's moments) is left as it was, untouched by the gradient of the point it leaves."""
    before = z.detach().clone()
    state = optimizer.state[z]
    kept = {key: value.clone() for key, value in state.items() if torch.is_tensor(value) and value.shape == z.shape}
    optimizer.step()
    with torch.no_grad():
        z.copy_(torch.lerp(before, z, step_scale.to(z.device, z.dtype).view(-1, *[1] * (z.ndim - 1))))
        back = rose.to(z.device)
        if back.any():
            z[back] = torch.lerp(best_z[back], before[back], 0.5)
            for key, value in kept.items():
                state[key][back] = value[back]


def clip_seed_gradients(grad: torch.Tensor, max_norm: float) -> None:
    """`optim.grad_clip`: each seed's gradient (a row of `grad`, (B, ...)) scaled in place to at most `max_norm`, as
    `torch.nn.utils.clip_grad_norm_` scales the one seed ReNO optimises, so a seed's step does not depend on its batch."""
    norms = grad.flatten(1).norm(dim=1)
    grad.mul_((max_norm / (norms + 1e-6)).clamp(max=1.0).view(-1, *[1] * (grad.ndim - 1)))


def optimize_seeds(models: FrozenModels, z_init: torch.Tensor, centroids: Centroids, text_embeds: PromptEmbeds,
                   objective: Objective, optim: OptimSpec, iterations: int | None = None, progress=None,
                   should_stop: Callable[[], bool] | None = None,
                   on_iteration: Callable[[int, torch.Tensor], None] | None = None,
                   noise: torch.Tensor | None = None, unchecked_steps: int = 0, graphs: GraphCache | None = None
                   ) -> list[SeedResult]:
    """Optimise a batch of seeds `z_init` (B, C, h, w) on `objective` for `iterations` (default
    `optim.iterations`).

    `centroids` are shared by the batch ((D,), (C, h, w)) or per seed ((B, D), (B, C, h, w)).
    `on_iteration(it, best)` sees the best iterates (B, C, h, w) after each iteration's loss. `noise`, the
    sampler's between steps; `unchecked_steps`, the steps whose activations the memory budget keeps; `graphs`,
    the CUDA graphs of the checkpointed calls (`runtime.cuda_graphs`), if any.
    """
    start = time.perf_counter()
    iterations = optim.iterations if iterations is None else iterations
    schedule = make_schedule(models, objective.sampler.steps, objective.sampler.name)
    centroids = centroids.to(models.device)
    z = z_init.detach().to(models.device, torch.float32).clone().requires_grad_(True)
    optimizer = optim.optimizer([z], lr=optim.lr)
    batch = z.shape[0]
    best_loss = torch.full((batch,), float("inf"))
    best_sem, best_app = torch.zeros(batch), torch.zeros(batch)
    best_iter = torch.zeros(batch, dtype=torch.long)
    best_z = z.detach().clone()
    history: list[list[float]] = [[] for _ in range(batch)]
    stopped: list[str | None] = [None] * batch
    # optim.patience: the iteration of each seed's last improvement by 1 % of its best loss
    settled_best = torch.full((batch,), float("inf"))
    last_gain = torch.zeros(batch, dtype=torch.long)
    # optim.stop_near_reference: the seeds whose L_sem has come within their target's spacing, kept where they are
    spacing = (centroids.spacing.float().cpu().expand(batch)
               if optim.stop_near_reference and centroids.spacing is not None else None)
    near = torch.zeros(batch, dtype=torch.bool)
    step_scale = torch.ones(batch)  # optim.backtrack: each seed's share of the optimiser's step, halved at each rise

    for it in range(iterations):
        if it == optim.lr_drop_at and it > 0:  # the authors' schedule: lr / 10 after 3 iterations
            for group in optimizer.param_groups:
                group["lr"] = optim.lr * optim.lr_drop_factor
        optimizer.zero_grad(set_to_none=True)
        last = it == iterations - 1  # its step would never be evaluated: its loss is all it gives, so no backward
        with torch.set_grad_enabled(not last):
            terms = seed_objective(models, z, centroids, text_embeds, schedule, objective, noise, unchecked_steps,
                                   graphs)
        total = terms.total.detach().float().cpu()
        frozen = torch.tensor([reason is not None for reason in stopped]) | near
        # A seed already stopped, or whose loss is not finite, takes no part in the backward pass.
        live = torch.isfinite(total) & ~frozen
        if last:
            grad_ok = torch.ones(batch, dtype=torch.bool)
        else:
            scaled_backward(torch.where(live.to(z.device), terms.total, torch.zeros_like(terms.total)), z)
            grad_ok = torch.isfinite(z.grad).flatten(1).all(dim=1).cpu()
        for i in range(batch):
            if stopped[i] is None and not near[i] and not (live[i] and grad_ok[i]):
                what = "loss" if not live[i] else "gradient"
                stopped[i] = f"its {what} became {_non_finite(total[i]) if what == 'loss' else 'non-finite'} " \
                             f"at iteration {it}"
                log.warning("seed %d of the batch stopped: %s; keeping its best iterate", i, stopped[i])
        frozen = torch.tensor([reason is not None for reason in stopped]) | near

        improved = ~frozen & (total < best_loss)
        if improved.any():
            best_z[improved.to(best_z.device)] = z.detach()[improved.to(z.device)]
            best_loss = torch.where(improved, total, best_loss)
            best_sem = torch.where(improved, terms.semantic.detach().float().cpu(), best_sem)
            best_app = torch.where(improved, terms.appearance.detach().float().cpu(), best_app)
            best_iter = torch.where(improved, torch.full_like(best_iter, it), best_iter)
        for i, value in enumerate(total.tolist()):
            if not frozen[i]:
                history[i].append(value)
        if spacing is not None:  # near enough: this iterate is kept (its best: every one before was farther)
            near |= ~frozen & improved & (terms.semantic.detach().float().cpu() <= spacing)
            frozen = frozen | near
        if on_iteration is not None:
            on_iteration(it, best_z.detach())
        if last or frozen.all():
            if progress is not None:
                progress.update(1)
            break
        gained = ~frozen & (total < settled_best - 0.01 * settled_best.abs().nan_to_num(posinf=0.0))
        settled_best = torch.where(gained, total, settled_best)
        last_gain = torch.where(gained, torch.full_like(last_gain, it), last_gain)
        if optim.patience and bool(((it - last_gain) >= optim.patience)[~frozen].all()):
            break  # no seed has improved for optim.patience iterations: the rest would change nothing
        if frozen.any():
            z.grad[frozen.to(z.device)] = 0.0
        if optim.grad_clip is not None:
            clip_seed_gradients(z.grad, optim.grad_clip)
        if optim.backtrack is None:
            optimizer.step()
        else:
            rose = ~frozen & (total > best_loss + optim.backtrack * best_loss.abs())
            backtracking_step(optimizer, z, best_z, step_scale, rose)
            step_scale = torch.where(rose, step_scale / 2, step_scale)
        if optim.shell:  # back onto the Gaussian shell, where the model has seen its seeds
            with torch.no_grad():
                z.mul_(chi_mode(z[0].numel()) / z.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (z.ndim - 1)))
        if frozen.any():  # AdamW's momentum and weight decay move a seed even without gradient
            with torch.no_grad():
                z[frozen.to(z.device)] = best_z[frozen.to(z.device)]
        if progress is not None:
            progress.set_postfix(loss=f"{total[~frozen].mean().item():.4f}", best=f"{best_loss.mean().item():.4f}",
                                 refresh=False)  # the bar redraws at its own interval (30 s in a log file)
            progress.update(1)
        if should_stop is not None and should_stop():
            break

    seconds = (time.perf_counter() - start) / batch
    return [
        SeedResult(
            initial=z_init[i].detach().float().cpu().clone(),
            optimized=best_z[i].detach().float().cpu().clone(),
            loss=float(best_loss[i]), semantic_loss=float(best_sem[i]), appearance_loss=float(best_app[i]),
            loss_history=history[i], best_iteration=int(best_iter[i]), seconds=seconds, stopped=stopped[i],
        )
        for i in range(batch)
    ]


def _non_finite(value: torch.Tensor) -> str:
    return "nan" if torch.isnan(value) else "infinite"
