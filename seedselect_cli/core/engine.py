"""The per-class engine: the seeds of these image indices of this class, optimised towards its targets.

    engine = Engine(models, objective, optim, init, bootstrap, seed, starts)
    target = engine.class_target(name, prompt, encodings)
    for batch in engine.optimize_batches(target, blocks, engine.centre(target)):   # `seedselect optimize`
        results = engine.run_batch(target, batch)
        images = [engine.render(target, s, r.optimized) for s, r in zip(batch.init_seeds, results)]
    z_global = engine.optimize_global_seed(target, engine.centre(target))   # `seedselect bootstrap`, stage 1
                                                                # (skipped with bootstrap.noise=1: z_global None)
    for batch in engine.bootstrap_batches(target, blocks, z_global.optimized, engine.global_init_seed(target)):
        results = engine.run_batch(target, batch)

It knows nothing of run directories, shards or the command line: `pipeline.py` decides which indices
are missing and writes what comes back; the scripts, the bench and the tests call it the same way.
Each image's starting noise depends only on (`seed`, class, index), never on the batch it runs in.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from PIL import Image

from seedselect_cli.core.bootstrap import Batch, bootstrap_batches
from seedselect_cli.core.cuda_graphs import GraphCache
from seedselect_cli.core.frozen import FrozenModels
from seedselect_cli.core.initial_seeds import SeedStarts, assigned_reference, init_seed_for, own_references
from seedselect_cli.core.optimize import SeedResult, best_candidates, optimize_seeds
from seedselect_cli.core.prompts import PromptEmbeds, encode_prompt
from seedselect_cli.core.samplers import make_schedule, step_noise
from seedselect_cli.core.sampling import sample_images, step_activation_bytes, steps_within_budget
from seedselect_cli.core.specs import BootstrapSpec, InitSpec, LossSpec, Objective, OptimSpec
from seedselect_cli.core.targets import Centroids, ReferenceEncodings, stack_centroids

log = logging.getLogger(__name__)


@dataclass
class ClassTarget:
    """One class as the method sees it: its name (which keys its seeds' noise), prompt and text
    embeddings, its encoded references, and for the contrastive loss every class's mu_v (N, D) with
    this class's row."""

    name: str
    prompt: str
    text_embeds: PromptEmbeds
    encodings: ReferenceEncodings
    contrast: tuple[torch.Tensor, int] | None = None

    def targets(self, centroids: Centroids) -> Centroids:
        """`centroids` with the contrastive loss's classes attached where it has them."""
        if self.contrast is None:
            return centroids
        return dataclasses.replace(centroids, classes=self.contrast[0], class_index=self.contrast[1])


def batch_blocks(missing: list[int], n_images: int, batch_size: int) -> list[list[int]]:
    """The batches that make the `missing` images: always the same blocks of indices, [0, B), [B, 2B), ...

    Batched kernels round differently from one batch size or composition to another, so an image is
    always optimised together with the same neighbours: a resumed run redoes a missing image in its
    original block (recomputing, not rewriting, the finished ones) and gets bit-for-bit the same seed.
    """
    blocks = sorted({i // batch_size for i in missing})
    return [list(range(b * batch_size, min((b + 1) * batch_size, n_images))) for b in blocks]


def image_centroids(encodings: ReferenceEncodings, seed: int, class_name: str, indices: list[int], loss: LossSpec
                    ) -> Centroids:
    """What images `indices` of a class are steered towards in `optimize`: the class's centroids, shared; or, with
    loss.appearance=assigned, per image (B, ...), its own reference's latent and the mean CLIP embedding of it and
    the next `loss.semantic_references` - 1 references."""
    if loss.appearance != "assigned":
        return encodings.centroids(appearance=loss.appearance)
    n = len(encodings.paths)
    return stack_centroids([encodings.centroids(own_references(seed, class_name, i, n, loss.semantic_references),
                                                appearance="assigned") for i in indices])


@dataclass
class Engine:
    """What every class of a run shares: the frozen models, the method's settings and where seeds start."""

    models: FrozenModels
    objective: Objective
    optim: OptimSpec
    init: InitSpec
    bootstrap: BootstrapSpec
    seed: int  # the run's seed: with the class and index it draws each image's noise and subset
    starts: SeedStarts
    # `runtime.memory_budget` in bytes for the kept activations of denoising steps; None or 0: recompute them all
    memory_budget: float | None = None
    graphs: GraphCache | None = None  # the checkpointed calls as CUDA graphs (`runtime.cuda_graphs`), else None
    _step_bytes: dict = dataclasses.field(default_factory=dict)  # batch size -> bytes one kept step takes

    def unchecked_steps(self, target: ClassTarget, z: torch.Tensor, noise: torch.Tensor | None) -> int:
        """How many denoising steps keep their activations within the memory budget, for a batch like `z`
        (measured once per batch size by running one step)."""
        sampler = self.objective.sampler
        if not self.memory_budget or not sampler.checkpointing:
            return 0
        batch = z.shape[0]
        measured = batch in self._step_bytes
        if not measured:
            schedule = make_schedule(self.models, sampler.steps, sampler.name)
            self._step_bytes[batch] = step_activation_bytes(self.models, z.to(self.models.device, torch.float32),
                                                            target.text_embeds, schedule, sampler.guidance_scale,
                                                            noise)
        kept = steps_within_budget(self.memory_budget, self._step_bytes[batch], sampler.steps)
        if not measured:
            log.info("memory budget %.3g GB: %d of %d denoising steps keep their activations (%.0f MB each at "
                     "batch %d), %d recomputed", self.memory_budget / 2**30, kept, sampler.steps,
                     self._step_bytes[batch] / 2**20, batch, sampler.steps - kept)
        return kept

    def class_target(self, name: str, prompt: str, encodings: ReferenceEncodings,
                     contrast: tuple[torch.Tensor, int] | None = None) -> ClassTarget:
        text_embeds = encode_prompt(self.models, prompt, self.objective.sampler.negative_prompt)
        return ClassTarget(name, prompt, text_embeds, encodings, contrast)

    def drawn_within(self, target: ClassTarget) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`bootstrap.keep_drawn`'s test of a start: the class's mu_v and its references' spread (None with fewer
        than two references: nothing to measure a spread by, so every start is optimised)."""
        spread = target.encodings.spread(self.objective.loss.distance)
        if spread is None:
            return None
        return target.encodings.centroids().semantic, spread

    def centre(self, target: ClassTarget) -> torch.Tensor | None:
        """Where the class's seeds start (`init`): None for fresh noise, else a centroid of its inverted references
        (or, for init=reference, every reference's inversion)."""
        return self.starts.centre(target.encodings, target.prompt, target.text_embeds)

    def optimize_batches(self, target: ClassTarget, blocks: list[list[int]], centre: torch.Tensor | None
                         ) -> Iterator[Batch]:
        """`seedselect optimize`: a batch of seeds per block, each started from its own init seed (and the class's
        `centre`, or its own reference's inversion for init=reference), steered towards the class's centroids (or
        its own reference's latent for loss.appearance=assigned, and the mean CLIP embedding of its own and the next
        `loss.semantic_references` - 1 references)."""
        encodings, appearance = target.encodings, self.objective.loss.appearance
        for chunk in blocks:
            init_seeds = [init_seed_for(self.seed, target.name, i) for i in chunk]
            own = [assigned_reference(self.seed, target.name, i, len(encodings.paths)) for i in chunk]
            centroids = image_centroids(encodings, self.seed, target.name, chunk, self.objective.loss)
            z_init = self.starts.seeds(centre, init_seeds, own, self.init.candidates)
            uses_reference = self.init.method == "reference" or appearance == "assigned"
            # the reference's file name, not its path: a run directory names nothing of the machine it ran on
            extra = [{"reference": encodings.paths[r].name} if uses_reference else {} for r in own]
            yield Batch(chunk, init_seeds, z_init, centroids, self.optim.iterations, extra, self.optim.backtrack)

    def bootstrap_batches(self, target: ClassTarget, blocks: list[list[int]], z_global: torch.Tensor | None,
                          global_init_seed: int) -> Iterator[Batch]:
        """`seedselect bootstrap`, stage 2: each image from z_T^G (mixed with its own noise; None: with
        `bootstrap.noise=1`, from its own noise alone) towards its own subset of references."""
        sampler = self.objective.sampler
        return bootstrap_batches(self.bootstrap, self.objective.loss.appearance, self.seed, target.name, blocks,
                                 target.encodings, z_global, global_init_seed,
                                 self.models.latent_shape(sampler.height, sampler.width))

    @property
    def uses_global_seed(self) -> bool:
        """Whether `seedselect bootstrap` starts its images from a z_T^G (`bootstrap.noise` < 1)."""
        return self.bootstrap.noise < 1

    def global_init_seed(self, target: ClassTarget) -> int:
        return init_seed_for(self.seed, target.name, "bootstrap")

    def optimize_global_seed(self, target: ClassTarget, centre: torch.Tensor | None, progress=None,
                             should_stop: Callable[[], bool] | None = None) -> SeedResult:
        """`seedselect bootstrap`, stage 1: z_T^G, one seed optimised on the centroids of all the class's references
        for `bootstrap.global_iterations`."""
        encodings = target.encodings
        own = assigned_reference(self.seed, target.name, 0, len(encodings.paths))
        appearance = "nearest" if self.objective.loss.appearance == "nearest" else "centroid"  # z_T^G serves all
        z_init = self.starts.seeds(centre, [self.global_init_seed(target)], [own], self.init.candidates)
        batch = Batch([-1], [self.global_init_seed(target)], z_init, encodings.centroids(appearance=appearance),
                      self.bootstrap.global_iterations, [{}], self.bootstrap.backtrack)
        [result] = self.run_batch(target, batch, progress, should_stop)
        return result

    def run_batch(self, target: ClassTarget, batch: Batch, progress=None,
                  should_stop: Callable[[], bool] | None = None,
                  on_iteration: Callable[[int, torch.Tensor], None] | None = None) -> list[SeedResult]:
        """Optimise one batch: with `init.candidates` > 1 first keep each image's best start (recorded in
        `batch.extra` as `candidate`; with `batch.keep_drawn`, a start that already draws the concept is kept
        as it is, `drawn` in `batch.extra`), then `batch.iterations` of gradient descent, backtracking by
        `batch.backtrack` (`progress`, `should_stop`, `on_iteration`: as `optimize_seeds`, over the seeds that are
        refined). Each result's `seconds` includes its share of the scoring."""
        start = time.perf_counter()
        centroids = target.targets(batch.centroids)
        sampler = self.objective.sampler
        noise = step_noise(sampler.name, batch.init_seeds, tuple(batch.z_init.shape[-3:]), sampler.steps)
        drawn = [False] * len(batch.indices)
        choice = None
        if batch.z_init.ndim == 5:
            within = self.drawn_within(target) if batch.keep_drawn else None
            choice = best_candidates(self.models, batch.z_init, centroids, target.text_embeds, self.objective, noise,
                                     self.init.candidate_score, should_stop,
                                     near_enough=self.optim.stop_near_reference, drawn_within=within)
            batch.z_init, drawn = choice.starts, choice.drawn
            for extra, k, kept in zip(batch.extra, choice.chosen, drawn):
                extra["candidate"] = k
                if within is not None:
                    extra["drawn"] = kept
        scoring = (time.perf_counter() - start) / len(batch.indices)
        refine = [i for i, kept in enumerate(drawn) if not kept]
        results: list[SeedResult | None] = [None] * len(batch.indices)
        if refine:
            z, rows = batch.z_init[refine], centroids.rows(refine) if len(refine) < len(drawn) else centroids
            step = noise[:, refine] if noise is not None else None
            optim = dataclasses.replace(self.optim, backtrack=batch.backtrack)
            refined = optimize_seeds(self.models, z, rows, target.text_embeds, self.objective, optim,
                                     iterations=batch.iterations, progress=progress, should_stop=should_stop,
                                     on_iteration=on_iteration, noise=step,
                                     unchecked_steps=self.unchecked_steps(target, z, step), graphs=self.graphs)
            for i, result in zip(refine, refined):
                results[i] = result
        for i, kept in enumerate(drawn):
            if kept:  # drawn as the start is: its loss is the scoring pass's, towards its own targets
                results[i] = SeedResult.of_start(batch.z_init[i], choice.terms, i, seconds=0.0)
        for result in results:
            result.seconds += scoring
        return results

    def render(self, target: ClassTarget, init_seed: int, z_T: torch.Tensor) -> Image.Image:
        """The image the seed `z_T` (C, h, w) of the image whose init seed is `init_seed` (its sampler noise) gives:
        sampled alone, as `seedselect generate` redraws it pixel for pixel."""
        sampler = self.objective.sampler
        noise = step_noise(sampler.name, [init_seed], tuple(z_T.shape), sampler.steps)
        return sample_images(self.models, z_T[None], target.text_embeds, sampler.steps, sampler.guidance_scale,
                             sampler.name, noise)[0]
