"""The method's options beyond the paper, each against a plain version: the nearest-reference and
assigned appearance targets, per-reference starts, candidate starts, the Gaussian shell, patience."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from seedselect_cli.core.initial_seeds import assigned_reference, candidate_seed
from seedselect_cli.core.losses import nearest_appearance_loss
from seedselect_cli.core.nao import chi_mode
from seedselect_cli.core.optimize import best_candidates, optimize_seeds, seed_objective
from seedselect_cli.core.prompts import encode_prompt
from seedselect_cli.core.samplers import ddim_schedule
from seedselect_cli.core.targets import ReferenceEncodings, stack_centroids
from seedselect_cli.files.run_directory import RunDirectory
from seedselect_cli.pipeline import run_optimize
from tests.conftest import make_config
from tests.test_optimize import random_target, seeds


def test_nearest_appearance_loss_is_the_minimum_over_references_in_float64():
    g = torch.Generator().manual_seed(3)
    z0 = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    refs = torch.randn(4, 4, 5, 5, generator=g, dtype=torch.float64)
    plain = torch.tensor([min(float(((z - r) ** 2).mean()) for r in refs) for z in z0], dtype=torch.float64)
    torch.testing.assert_close(nearest_appearance_loss(z0.float(), refs.float()).double(), plain, rtol=1e-6, atol=0)
    per_seed = refs[None].expand(3, *refs.shape).clone()
    per_seed[1] += 10.0  # seed 1's references are others
    plain[1] = min(float(((z0[1] - r) ** 2).mean()) for r in per_seed[1])
    torch.testing.assert_close(nearest_appearance_loss(z0.float(), per_seed.float()).double(), plain, rtol=1e-6, atol=0)


def test_centroids_for_each_appearance_target():
    g = torch.Generator().manual_seed(4)
    enc = ReferenceEncodings(torch.randn(5, 8, generator=g), torch.randn(5, 4, 3, 3, generator=g), tuple(range(5)))
    mean = enc.centroids()
    assert mean.references is None and torch.equal(mean.appearance, enc.appearance.mean(dim=0))
    nearest = enc.centroids(appearance="nearest")
    assert torch.equal(nearest.references, enc.appearance) and torch.equal(nearest.semantic, mean.semantic)
    own = enc.centroids([3, 0, 1], appearance="assigned")
    assert torch.equal(own.appearance, enc.appearance[3]) and own.references is None
    torch.testing.assert_close(own.semantic, enc.semantic[[3, 0, 1]].mean(dim=0))


@pytest.mark.parametrize("n", [1, 3, 5])
def test_assigned_references_take_turns_and_do_not_depend_on_anything_else(n):
    order = [assigned_reference(7, "marsh finch", i, n) for i in range(3 * n)]
    for start in range(2 * n):
        assert sorted(order[start:start + n]) == list(range(n))  # any n consecutive images: n references
    assert order == [assigned_reference(7, "marsh finch", i, n) for i in range(3 * n)]
    if n > 2:
        others = [[assigned_reference(s, c, i, n) for i in range(n)] for s, c in ((8, "marsh finch"), (7, "sea gull"))]
        assert any(o != order[:n] for o in others)  # the order is the class's and seed's own


@pytest.mark.slow
@pytest.mark.parametrize("score", ["semantic", "loss"])
def test_best_candidates_keeps_the_start_of_lowest_score(tiny_models, score):
    config = make_config(["sampler.steps=3"])
    target = random_target(5)
    candidates = torch.stack([seeds(3, k) for k in range(4)], dim=1)  # (B=3, N=4, C, h, w)
    text = encode_prompt(tiny_models, "a red disc")
    choice = best_candidates(tiny_models, candidates, target, text, config.objective(), score=score)
    starts, chosen = choice.starts, choice.chosen
    timesteps = ddim_schedule(tiny_models, 3)
    with torch.no_grad():
        terms = [seed_objective(tiny_models, candidates[:, k], target, text, timesteps, config.objective())
                 for k in range(4)]
    losses = torch.stack([t.semantic if score == "semantic" else t.total for t in terms], dim=1)
    assert chosen == losses.argmin(dim=1).tolist() and len(set(chosen)) > 1  # not always the same candidate
    assert torch.equal(starts, candidates[torch.arange(3), losses.argmin(dim=1)])
    assert candidate_seed(11, 0) == 11 and candidate_seed(11, 1) != candidate_seed(11, 2)
    asked = []  # a stop (SIGTERM, Ctrl-C) during scoring: the choice is made among the candidates scored so far
    chosen = best_candidates(tiny_models, candidates, target, text, config.objective(), score=score,
                             should_stop=lambda: asked.append(1) or len(asked) == 2).chosen
    assert len(asked) == 2 and chosen == losses[:, :2].argmin(dim=1).tolist()


def test_near_enough_keeps_the_first_candidate_within_the_spacing_not_the_nearest(tiny_models):
    """optim.stop_near_reference in selection: of the candidates whose L_sem is within the target's spacing, the
    first is kept (the nearest copies its reference); with none within it, the nearest, as without."""
    config = make_config(["sampler.steps=3"])
    candidates = torch.stack([seeds(3, 20 + k) for k in range(5)], dim=1)
    text = encode_prompt(tiny_models, "a red disc")
    target = random_target(6)
    with torch.no_grad():
        losses = torch.stack([seed_objective(tiny_models, candidates[:, k], target, text, ddim_schedule(tiny_models, 3),
                                             config.objective()).semantic for k in range(5)], dim=1)
    middle = losses.median(dim=1).values  # a spacing half the candidates are within
    spacing = torch.stack([middle[0], middle[1], losses[2].min() - 1.0])  # image 2: none within it
    chosen = best_candidates(tiny_models, candidates, dataclasses.replace(target, spacing=spacing), text,
                             config.objective(), near_enough=True).chosen
    first_within = [int((losses[i] <= spacing[i]).nonzero()[0]) for i in range(2)]
    assert first_within != losses[:2].argmin(dim=1).tolist()  # these draws tell the two rules apart
    assert chosen == [*first_within, int(losses[2].argmin())]
    nearest = best_candidates(tiny_models, candidates, dataclasses.replace(target, spacing=spacing), text,
                              config.objective()).chosen
    assert nearest == losses.argmin(dim=1).tolist()  # without near_enough the spacing is not used


@pytest.mark.slow
def test_the_shell_keeps_every_iterate_at_the_chi_mode(tiny_models):
    config = make_config(["optim.shell=true", "optim.iterations=4"])
    seen = []
    optimize_seeds(tiny_models, seeds(2, 6) * 1.7, random_target(6), encode_prompt(tiny_models, "a red disc"),
                   config.objective(), config.optim_spec(),
                   on_iteration=lambda it, best: seen.append(best.flatten(1).norm(dim=1)))
    mode, start = chi_mode(4 * 16 * 16), (seeds(2, 6) * 1.7).flatten(1).norm(dim=1)
    # the best iterate of each seed is its start (as given, far off the shell) or a step's, on the shell
    for norms in seen:
        assert all(n == pytest.approx(s, rel=1e-5) or n == pytest.approx(mode, rel=1e-5) for n, s in zip(norms, start))
    assert any(n == pytest.approx(mode, rel=1e-5) for n in seen[-1])


@pytest.mark.slow
def test_patience_ends_a_batch_that_stopped_improving(tiny_models, monkeypatch):
    import seedselect_cli.core.optimize as optimize_module

    real = optimize_module.seed_objective
    calls = []

    def flat_after_two(*args, **kwargs):  # the loss improves twice, then stays where it is
        terms = real(*args, **kwargs)
        calls.append(1)
        level = 3.0 - min(len(calls), 3)
        return dataclasses.replace(terms, total=terms.total * 0 + level)

    monkeypatch.setattr(optimize_module, "seed_objective", flat_after_two)
    config = make_config(["optim.iterations=20", "optim.patience=3"])
    [result] = optimize_seeds(tiny_models, seeds(1, 7), random_target(7), encode_prompt(tiny_models, "a red disc"),
                              config.objective(), config.optim_spec())
    assert len(result.loss_history) == 6 and result.loss == 0.0  # improved at 0, 1, 2; three more; stopped


@pytest.mark.parametrize("count", [1, 3, 9])
def test_each_images_semantic_target_is_the_mean_of_its_own_and_the_next_references(tiny_models, count):
    """loss.appearance=assigned loss.semantic_references=m: L_app towards the image's own reference's latent,
    L_sem towards the mean CLIP embedding of it and the next m - 1 in the drawn order (at most all of them)."""
    from seedselect_cli.core.engine import ClassTarget
    from seedselect_cli.core.initial_seeds import own_references
    from seedselect_cli.pipeline import engine_for

    g = torch.Generator().manual_seed(count)
    enc = ReferenceEncodings(torch.nn.functional.normalize(torch.randn(5, 16, generator=g), dim=-1),
                             torch.randn(5, 4, 16, 16, generator=g), tuple(Path(f"r{i}.png") for i in range(5)))
    config = make_config(["loss.appearance=assigned", f"loss.semantic_references={count}"])
    engine = engine_for(tiny_models, config)
    target = ClassTarget("red disc", "a red disc", encode_prompt(tiny_models, "a red disc"), enc)
    [batch] = engine.optimize_batches(target, [[0, 1, 2, 3]], None)
    for row, i in enumerate([0, 1, 2, 3]):
        refs = own_references(config.seed, "red disc", i, 5, count)
        assert refs[0] == assigned_reference(config.seed, "red disc", i, 5) and len(set(refs)) == min(count, 5)
        torch.testing.assert_close(batch.centroids.semantic[row], enc.semantic[refs].mean(dim=0))
        torch.testing.assert_close(batch.centroids.appearance[row], enc.appearance[refs[0]])
    if count == 9:  # every reference: the paper's centroid for L_sem
        torch.testing.assert_close(batch.centroids.semantic[0], enc.semantic.mean(dim=0))


@pytest.mark.slow
def test_reference_starts_and_assigned_targets_in_a_run(tmp_path):
    config = make_config(["init=reference", "loss.appearance=assigned", "n_images=3", "runtime.batch_size=3",
                          "init.candidates=2"])
    entries = run_optimize(config, tmp_path)
    references = [e["reference"] for e in sorted(entries, key=lambda e: e["index"])]
    assert len(set(references)) == 3 and all(e["candidate"] in (0, 1) for e in entries)
    assert sorted(RunDirectory(tmp_path).finished()) == [("red_disc", i) for i in range(3)]


@pytest.mark.slow
def test_method_select_runs_and_records_each_images_chosen_start(tmp_path):
    """`method=select` end to end on the tiny components (fewer starts and iterations, for time): each image's
    reference and chosen candidate are in its manifest entry, and its loss is L_sem alone."""
    config = make_config(["method=select", "init.candidates=3", "n_images=3", "runtime.batch_size=3"])
    entries = run_optimize(config, tmp_path)
    assert len({e["reference"] for e in entries}) == 3 and all(e["candidate"] in (0, 1, 2) for e in entries)
    assert all(e["loss"] == pytest.approx(e["semantic_loss"]) for e in entries)


def test_spacing_is_the_distance_from_the_target_to_the_nearest_other_reference():
    """`Centroids.spacing`: an image's own reference's cosine distance to the nearest other reference; for a mean of
    several (the centroid, a bootstrap subset), the distance of the mean to the nearest reference; None alone."""
    g = torch.Generator().manual_seed(11)
    unit = torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=1)
    encodings = ReferenceEncodings(semantic=unit, appearance=torch.randn(4, 4, 8, 8, generator=g),
                                   paths=tuple(Path(f"{i}.png") for i in range(4)))
    exact = 1 - unit.double() @ unit.double().T
    own = encodings.centroids([2], appearance="assigned").spacing
    assert float(own) == pytest.approx(float(exact[2, [0, 1, 3]].min()), abs=1e-6)
    mean = unit.double().mean(dim=0)
    centroid = 1 - torch.nn.functional.cosine_similarity(unit.double(), mean[None], dim=1)
    assert float(encodings.centroids().spacing) == pytest.approx(float(centroid.min()), abs=1e-6)
    alone = ReferenceEncodings(semantic=unit[:1], appearance=torch.randn(1, 4, 8, 8), paths=(Path("a.png"),))
    assert alone.centroids([0], appearance="assigned").spacing is None
    stacked = stack_centroids([encodings.centroids([i], appearance="assigned") for i in range(4)])
    assert stacked.spacing.shape == (4,)


def test_stop_near_reference_keeps_each_seed_where_it_came_within_its_spacing(tiny_models, monkeypatch):
    """optim.stop_near_reference: a seed whose L_sem falls to its target's spacing is kept at that iterate and
    stops; the others go on as without it; a batch whose seeds have all stopped ends."""
    config = make_config(["optim.iterations=4", "optim.stop_near_reference=true", "loss.lam=1"])
    text = encode_prompt(tiny_models, "a red disc")
    z = seeds(3, 12)
    target = random_target(12)
    free = optimize_seeds(tiny_models, z, target, text, config.objective(),
                          dataclasses.replace(config.optim_spec(), stop_near_reference=False))
    # the spacing of each seed: seed 0 near from the start, seed 1 once it has fallen below a level it reaches,
    # seed 2 never
    level = sorted(free[1].loss_history)[len(free[1].loss_history) // 2]
    spacing = torch.tensor([free[0].loss_history[0] + 1.0, level, -1.0])
    found = optimize_seeds(tiny_models, z, dataclasses.replace(target, spacing=spacing), text, config.objective(),
                           config.optim_spec())
    assert found[0].best_iteration == 0 and torch.equal(found[0].optimized, z[0]) and len(found[0].loss_history) == 1
    reached = next(i for i, loss in enumerate(free[1].loss_history) if loss <= level)
    assert 0 < reached < len(free[1].loss_history) - 1  # seed 1 stops part-way, neither at once nor at the end
    assert len(found[1].loss_history) == reached + 1 and found[1].loss <= level
    # that iterate is the unstopped run's at `reached` (the best of its first reached + 1: the ones before were above)
    again = optimize_seeds(tiny_models, z, target, text, config.objective(),
                           dataclasses.replace(config.optim_spec(), stop_near_reference=False, iterations=reached + 1))
    assert again[1].best_iteration == reached and torch.equal(found[1].optimized, again[1].optimized)
    assert found[2].loss_history == pytest.approx(free[2].loss_history, rel=1e-5)
    all_near = optimize_seeds(tiny_models, z, dataclasses.replace(target, spacing=torch.full((3,), 9.0)), text,
                              config.objective(), config.optim_spec())
    assert [len(r.loss_history) for r in all_near] == [1, 1, 1]
    assert all(r.stopped is None for r in [*found, *all_near])  # stopping near is not a fault



@pytest.mark.parametrize("bootstrap_share", [None, 0.3])
def test_optimize_backtracks_by_optim_backtrack_and_bootstrap_by_its_own(tiny_models, monkeypatch, bootstrap_share):
    """The default backtracks in optimize (`optim.backtrack=0.5`) and not in bootstrap (`bootstrap.backtrack`, null):
    each batch carries its command's share to the optimiser, z_T^G's too."""
    import seedselect_cli.core.engine as engine_module
    from seedselect_cli.core.engine import ClassTarget
    from seedselect_cli.pipeline import engine_for

    g = torch.Generator().manual_seed(51)
    enc = ReferenceEncodings(torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=-1),
                             torch.randn(4, 4, 16, 16, generator=g), tuple(Path(f"r{i}.png") for i in range(4)))
    extra = [] if bootstrap_share is None else [f"bootstrap.backtrack={bootstrap_share}"]
    config = make_config(["bootstrap.candidates=1", "bootstrap.noise=0.5", *extra])
    assert config.optim.backtrack == 0.5 and config.bootstrap.backtrack == bootstrap_share
    engine = engine_for(tiny_models, config)
    target = ClassTarget("red disc", "a red disc", encode_prompt(tiny_models, "a red disc"), enc)
    shares = []
    monkeypatch.setattr(engine_module, "optimize_seeds",
                        lambda *args, **kwargs: shares.append(args[5].backtrack) or optimize_seeds(*args, **kwargs))
    [batch] = engine.optimize_batches(target, [[0, 1]], None)
    engine.run_batch(target, batch)
    z_global = engine.optimize_global_seed(target, None).optimized
    [batch] = engine.bootstrap_batches(target, [[0, 1]], z_global, engine.global_init_seed(target))
    engine.run_batch(target, batch)
    assert shares == [0.5, bootstrap_share, bootstrap_share]
