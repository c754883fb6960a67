"""`seedselect evaluate`: metrics against plain formulas, a constructed case with a known answer, the
baseline, the report and the judge."""

from __future__ import annotations

import itertools
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import seedselect_cli.evaluate as evaluate_module
from seedselect_cli import quality
from seedselect_cli.errors import UserError
from seedselect_cli.evaluate import run_evaluate
from seedselect_cli.files.assets import asset_path
from seedselect_cli.limits import SHOWN_CLASSES
from seedselect_cli.pipeline import run_bootstrap, run_optimize
from seedselect_cli.progress import never_improved
from seedselect_cli.report import (
    LABEL_WIDTH,
    PER_ROW,
    THUMB,
    image_marks,
    loss_curves,
    marked_first,
    marks_line,
    plotted_classes,
    write_report,
)
from seedselect_cli.tool_config import EvaluateConfig, JudgeConfig
from tests.conftest import make_config, random_image
from tests.runs import read_manifest


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("evaluate") / "run"
    run_optimize(make_config(["n_images=3", "runtime.batch_size=3"]), run_dir)
    return run_dir


@pytest.mark.slow
def test_copies_of_the_references_score_fidelity_one_and_diversity_zero(tmp_path):
    """The constructed case: every reference and every 'generated' image is the same picture."""
    refs = tmp_path / "refs" / "copy_cat"
    refs.mkdir(parents=True)
    random_image(np.random.default_rng(5), (48, 40)).save(refs / "a.png")
    for name in ("b.png", "c.png"):
        shutil.copy(refs / "a.png", refs / name)
    run_dir = tmp_path / "run"
    run_optimize(make_config([f"dataset.root={refs}", "n_images=2", "runtime.batch_size=2"]), run_dir)
    for image in (run_dir / "images" / "copy_cat").glob("*.png"):
        shutil.copy(refs / "a.png", image)
    metrics = run_evaluate(EvaluateConfig(run_dir=str(run_dir), baseline=False))
    result = metrics["classes"]["copy_cat"]
    assert result["seedselect"]["fidelity"] == pytest.approx(1.0, abs=1e-5)
    assert result["seedselect"]["diversity"] == pytest.approx(0.0, abs=1e-5)
    assert result["references"] == {"n_images": 3, "diversity": pytest.approx(0.0, abs=1e-5)}
    assert result["seedselect"]["top1"] is None  # the only class: no figure, and a note that says why
    assert "classifying among one class is right by construction" in metrics["notes"][0]
    assert "a class has 2 images:" in metrics["notes"][1]  # and the set measures say little at that size
    assert "plain" not in result and metrics["baseline"] is None



@pytest.mark.slow
def test_a_one_shot_run_says_why_its_ratio_and_copies_are_blank_and_counts_no_copies(tmp_path):
    """One reference (dataset.shots=1, a 1-shot set): diversity_ratio has no references' variety to divide by and
    copies no real image to say how near is too near; the notes say so, and the marks line
    does not count the unmeasured images as 0 copies. Enough real held-out images give copies back."""
    refs = tmp_path / "refs" / "lone_cat"
    refs.mkdir(parents=True)
    random_image(np.random.default_rng(31), (48, 40)).save(refs / "a.png")
    run_dir = tmp_path / "run"
    run_optimize(make_config([f"dataset.root={refs}", "n_images=2", "runtime.batch_size=2"]), run_dir)
    metrics = run_evaluate(EvaluateConfig(run_dir=str(run_dir), baseline=False))
    ours = metrics["classes"]["lone_cat"]["seedselect"]
    assert ours["diversity_ratio"] is None and ours["copies"] is None and ours["diversity"] is not None
    ratio, copies = (next(n for n in metrics["notes"] if n.startswith(f"{key} is left out"))
                     for key in ("diversity_ratio", "copies"))
    assert "for 1 class of 1 with one reference" in ratio and "two references or more" in ratio
    assert f"it needs {quality.COPIES_MINIMUM} held-out real images" in copies and "heldout=DIR" in copies
    rows = [json.loads(line) for line in (run_dir / "report" / "images.jsonl").read_text().splitlines()]
    assert [r["copy"] for r in rows] == [None, None]
    assert ("of the run's 2 images: copies not measured (under 19 held-out real images of the class), "
            in marks_line(rows, Path("R")))

    heldout = tmp_path / "heldout" / "lone_cat"
    heldout.mkdir(parents=True)
    for i in range(quality.COPIES_MINIMUM):  # as many as copies needs
        random_image(np.random.default_rng(40 + i), (48, 40)).save(heldout / f"{i}.png")
    metrics = run_evaluate(EvaluateConfig(run_dir=str(run_dir), baseline=False, heldout=str(heldout.parent)))
    assert metrics["classes"]["lone_cat"]["seedselect"]["copies"] is not None
    assert [n for n in metrics["notes"] if n.startswith("copies")] == []
    assert any(n.startswith("diversity_ratio is left out") for n in metrics["notes"])
    mixed = rows[:1] + [{**rows[1], "copy": True}]
    assert "1 copy of a reference of 1 measured (1 not: under 19 held-out real images of the class)" in marks_line(
        mixed, Path("R"))

def test_a_run_not_finished_says_whose_images_the_figures_are(demo_run, tmp_path):
    """A run stopped early, or still being made by another process, is reported with how many of its images the
    figures cover, and what to do; a finished run is not."""
    from seedselect_cli.job_dir import ActiveMark

    done = run_evaluate(EvaluateConfig(run_dir=str(demo_run), baseline=False))
    assert not any("not finished" in note for note in done["notes"])
    run = tmp_path / "run"
    shutil.copytree(demo_run, run, ignore=shutil.ignore_patterns("report", "baseline"))
    lines = (run / "manifest.jsonl").read_text().splitlines(keepends=True)
    (run / "manifest.jsonl").write_text("".join(lines[:2]))
    metrics = run_evaluate(EvaluateConfig(run_dir=str(run), baseline=False))
    assert metrics["n_images"] == 2 and metrics["notes"][0] == (
        "the run is not finished: these figures are of 2 images of the 3 it asks for (3 of each of 1 class); run the "
        "same `seedselect optimize` in it to finish")
    mark = ActiveMark()
    mark.hold(run)  # as a running `seedselect optimize` holds it
    try:
        metrics = run_evaluate(EvaluateConfig(run_dir=str(run), baseline=False))
    finally:
        mark.release()
    assert metrics["notes"][0].endswith("; another process is still making them (RUN/.active)")
    assert "not finished" in (run / "report" / "index.html").read_text()


def test_loss_curves_keep_each_images_best_so_far_and_end_at_the_runs_kept_losses(demo_run):
    """The report's loss plot: the kept curve against a plain loop on fresh random curves of different lengths (a seed
    that stopped keeps its best to the end), and on a real run it ends at the mean of the manifest's kept losses."""
    g = torch.Generator().manual_seed(7)
    histories = [(torch.rand(n, generator=g) + 0.1).tolist() for n in (9, 4, 9, 1)]
    kept, current = loss_curves(histories)
    for i in range(9):
        best = [min(h[:i + 1]) for h in histories]  # h[:i + 1] of a shorter curve is all of it
        assert kept[i] == pytest.approx(sum(best) / 4)
        assert current[i] == pytest.approx(np.mean([h[i] for h in histories if len(h) > i]))
    curves = [[0.3, 0.5, 0.4], [0.3, 0.2], [0.1], [0.2]]
    entries = [{"loss_history": h} for h in curves] + [{"loss_history": [0.2], "drawn": True}]
    assert never_improved(entries) == 1  # a curve of one loss took no step: its start on purpose (selection alone,
    # or kept as drawn)
    entries = [json.loads(line) for line in (demo_run / "manifest.jsonl").read_text().splitlines()]
    kept, current = loss_curves([e["loss_history"] for e in entries])
    assert kept[-1] == pytest.approx(np.mean([e["loss"] for e in entries]))
    assert all(b <= a for a, b in itertools.pairwise(kept)) and kept[0] == pytest.approx(current[0])


@pytest.mark.parametrize("n_classes", [3, SHOWN_CLASSES, SHOWN_CLASSES + 5])
def test_the_loss_plot_shows_the_first_classes_and_the_mean_over_all_of_a_larger_run(n_classes):
    """A run of hundreds of classes (an ImageNet-LT sweep): the plot drew its first 20 classes and said nothing of
    the others; now the mean over every image stands for them, named as such."""
    entries = [{"class": f"class {i % n_classes}", "loss_history": [1.0, 0.5]} for i in range(2 * n_classes + 1)]
    curves, count = plotted_classes(entries)
    assert count == n_classes
    names = [f"class {i}" for i in range(min(n_classes, SHOWN_CLASSES))]
    assert [name for name, _ in curves[:len(names)]] == names
    assert all(of_class == [e for e in entries if e["class"] == name] for name, of_class in curves[:len(names)])
    if n_classes > SHOWN_CLASSES:
        assert curves[-1] == (f"all {n_classes} classes", entries)
    assert len(curves) == len(names) + (n_classes > SHOWN_CLASSES)


def test_report_with_the_baseline_beside_the_result(demo_run, monkeypatch, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="seedselect_cli.evaluate"):  # how many, where: hours on a large run
        metrics = run_evaluate(EvaluateConfig(run_dir=str(demo_run)))
    assert (f"drawing 3 images of plain Stable Diffusion from the run's seeds into {demo_run / 'baseline'}, kept for "
            f"the next evaluate (0 already there; ") in caplog.text
    report = demo_run / "report"
    assert json.loads((report / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    red = metrics["classes"]["red_disc"]
    for method in ("seedselect", "plain"):
        assert red[method]["n_images"] == 3 and -1 <= red[method]["fidelity"] <= 1
        assert set(red[method]) == {"n_images", "top1", "top5", "fidelity", "diversity", *QUALITY}
        assert red[method]["precision"] is None and red[method]["kid"] is None  # no held-out images here
        assert red[method]["diversity_ratio"] > 0 and red[method]["copies"] is None  # nor copies
        assert metrics["overall"][method]["fidelity"] == pytest.approx(red[method]["fidelity"])
    baseline = sorted(p.name for p in (demo_run / "baseline" / "images" / "red_disc").iterdir())
    assert baseline == ["00000.png", "00001.png", "00002.png"]
    page = (report / "index.html").read_text()
    links = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert {"loss.png", "metrics.json", "sheets/red_disc.png"} <= set(links)
    assert all(not link.startswith(("/", "http")) and (report / link).is_file() for link in links)
    assert '<img src="sheets/red_disc.png" alt="red_disc" loading="lazy">' in page  # hundreds of classes: as scrolled

    calls = []
    monkeypatch.setattr(evaluate_module, "sample_images", lambda *a, **k: calls.append(1))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="seedselect_cli.evaluate"):
        again = run_evaluate(EvaluateConfig(run_dir=str(demo_run)))
    assert calls == [] and again["classes"] == metrics["classes"]  # the baseline is cached
    assert "drawing" not in caplog.text  # (the first call shows the level catches it)
    assert metrics["made_by"] == "optimize" and "SeedSelect bootstrap" not in page
    assert metrics["model"] == "tiny" and metrics["model_commits"] == []  # built in code: no Hub commit


@pytest.mark.slow
def test_the_baseline_drawn_in_batches_is_what_one_at_a_time_draws_on_the_toy_world(tmp_path):
    """evaluate renders plain sampling `batch_size` images at a time: on the trained toy world each image is the one
    drawn alone (as `generate tensor=initial` draws it) to the last bit of a pixel, and in a batch the same image
    whatever its batch."""
    from seedselect_cli.evaluate import read_run, render_baseline

    run = tmp_path / "run"
    run_optimize(make_config(["n_images=5", "runtime.batch_size=5", "optim.iterations=1", "init.candidates=1"],
                             name="demo"), run)
    config, entries = read_run(run)
    drawn = {}
    for batch_size in (1, 2, 5):
        shutil.rmtree(run / "baseline", ignore_errors=True)
        paths = render_baseline(run, config, entries, EvaluateConfig(run_dir=str(run), batch_size=batch_size))
        drawn[batch_size] = {key: np.asarray(Image.open(path), dtype=int) for key, path in paths.items()}
    for key, alone in drawn[1].items():
        assert alone.std() > 10  # a drawing, not a flat image
        for batch_size in (2, 5):
            assert np.abs(drawn[batch_size][key] - alone).max() <= 1, (key, batch_size)


QUALITY = ("precision", "recall", "density", "coverage", "kid", "diversity_ratio", "copies")


def judge_and_heldout(tmp_path: Path) -> dict:
    """A tiny random judge of the demo run's class and 60 held-out images of it: EvaluateConfig's arguments."""
    from transformers import ResNetConfig, ResNetForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    judge = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                      num_labels=1, id2label={0: "red_disc"},
                                                      label2id={"red_disc": 0}))
    judge.save_pretrained(tmp_path / "judge")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "judge")
    rng = np.random.default_rng(8)
    (tmp_path / "heldout" / "red_disc").mkdir(parents=True)
    for i in range(60):
        random_image(rng, (32, 32)).save(tmp_path / "heldout" / "red_disc" / f"{i}.png")
    return {"heldout": str(tmp_path / "heldout"), "judge": JudgeConfig(model=str(tmp_path / "judge"))}


def test_held_out_images_give_precision_recall_and_kid_in_the_judges_space(demo_run, tmp_path):
    """With 60 held-out images of the class: every quality figure, measured in the judge's features; the
    references themselves as the run's images would be copies."""
    metrics = run_evaluate(EvaluateConfig(run_dir=str(demo_run), baseline=False, **judge_and_heldout(tmp_path)))
    red = metrics["classes"]["red_disc"]
    assert metrics["quality_space"] == "judge features"
    assert red["heldout"] == {"n_images": 60, "source": f"{tmp_path / 'heldout'}/<class>"}
    assert all(red["seedselect"][k] is not None for k in QUALITY if k != "recall")
    assert red["seedselect"]["recall"] is None  # 3 images: no k-NN ball of k = 3 among them
    assert 0 <= red["seedselect"]["precision"] <= 1
    assert metrics["overall"]["seedselect"]["kid"] == pytest.approx(red["seedselect"]["kid"])


def test_the_decoder_ceiling_scores_the_held_out_images_through_the_runs_vae(demo_run, tmp_path, monkeypatch):
    """`decoder_ceiling=true`: each held-out image after the run's VAE, against the other held-out images, in the
    judge's features; the figures per class and over the classes, and a note beside the images' precision."""
    passed = []
    real_encode = evaluate_module.vae_encode
    monkeypatch.setattr(evaluate_module, "vae_encode", lambda models, images, *a: passed.append(len(images))
                        or real_encode(models, images, *a))
    metrics = run_evaluate(EvaluateConfig(run_dir=str(demo_run), baseline=False, decoder_ceiling=True,
                                          **judge_and_heldout(tmp_path)))
    heldout = metrics["classes"]["red_disc"]["heldout"]
    assert passed == [60]  # every held-out image, once
    assert 0 <= heldout["round_trip_precision"] <= 1 and 0 <= heldout["precision"] <= 1
    ceiling = metrics["decoder_ceiling"]
    assert ceiling["round_trip_precision"] == heldout["round_trip_precision"]
    assert ceiling["note"] in metrics["notes"] and "SeedSelect" in ceiling["note"]
    without = run_evaluate(EvaluateConfig(run_dir=str(demo_run), baseline=False, **judge_and_heldout(tmp_path / "b")))
    assert "decoder_ceiling" not in without and "round_trip_precision" not in without["classes"]["red_disc"]["heldout"]


@pytest.mark.slow
def test_the_plain_baseline_of_a_bootstrap_run_starts_from_independent_seeds(tmp_path, capsys):
    """The paper's scheme, every image from one z_T^G: the baseline is drawn from each image's own noise, and
    the report calls the run's images what they are."""
    run_dir = tmp_path / "run"
    run_bootstrap(make_config(["bootstrap.n_images=2", "bootstrap.global_iterations=2", "bootstrap.iterations=2",
                               "bootstrap.noise=0", "bootstrap.candidates=1", "runtime.batch_size=2"]), run_dir)
    metrics = run_evaluate(EvaluateConfig(run_dir=str(run_dir)))
    assert metrics["classes"]["red_disc"]["plain"]["diversity"] > 0  # not the same z_T^G twice
    assert metrics["made_by"] == "bootstrap" and "SeedSelect bootstrap" in capsys.readouterr().out
    assert "SeedSelect bootstrap" in (run_dir / "report" / "index.html").read_text()


def test_images_jsonl_says_of_each_image_what_metrics_json_says_of_its_class(demo_run, tmp_path):
    """report/images.jsonl, image by image, against metrics.json's means: the judge's top-1, fidelity, precision's
    k-NN membership and copies, for the run's images and plain sampling's; the marks on the contact sheet. The
    run's images are replaced by toy-world references the toy judge tells apart: a purple disc (its "marsh finch",
    mapped to the run's class), a yellow triangle, and another purple disc."""
    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    shapes = Path(asset_path("toyworld/references"))
    for index, picture in enumerate(["marsh finch/00.png", "snow wren/00.png", "marsh finch/01.png"]):
        shutil.copyfile(shapes / picture, run / "images" / "red_disc" / f"{index:05d}.png")
    args = judge_and_heldout(tmp_path)  # its held-out images, and the toy world's judge instead of its random one
    args["judge"] = JudgeConfig(model=asset_path("toyworld/judge"), label_map={"marsh finch": "red_disc"})
    metrics = run_evaluate(EvaluateConfig(run_dir=str(run), **args))
    rows = [json.loads(line) for line in (run / "report" / "images.jsonl").read_text().splitlines()]
    entries = {e["index"]: e for e in map(json.loads, (run / "manifest.jsonl").read_text().splitlines())}
    assert sorted((r["set"], r["index"]) for r in rows) == sorted((s, i) for s in ("seedselect", "plain")
                                                                    for i in entries)
    for method in ("seedselect", "plain"):
        mine, red = [r for r in rows if r["set"] == method], metrics["classes"]["red_disc"][method]
        assert np.mean([r["judge_top1"] == "red_disc" for r in mine]) == pytest.approx(red["judge_top1"])
        assert np.mean([r["fidelity"] for r in mine]) == pytest.approx(red["fidelity"], abs=1e-6)
        assert np.mean([r["on_real_manifold"] for r in mine]) == pytest.approx(red["precision"])
        assert np.mean([r["copy"] for r in mine]) == pytest.approx(red["copies"])
        assert all((r["judge_top1"] == "red_disc") == (r["judge_label"] == "marsh finch") for r in mine)
        assert all((run / r["image"]).is_file() for r in mine)
    ours = sorted((r for r in rows if r["set"] == "seedselect"), key=lambda r: r["index"])
    assert [r["judge_label"] for r in ours] == ["marsh finch", "snow wren", "marsh finch"]
    assert [r["judge_top1"] for r in ours] == ["red_disc", None, "red_disc"]
    for r in (r for r in rows if r["set"] == "seedselect"):
        history = entries[r["index"]]["loss_history"]
        assert r["unrefined"] == (min(history) >= history[0]) and r["loss"] == entries[r["index"]]["loss"]
    line = marks_line(rows, Path("R"))
    n_copies = sum(r['copy'] for r in ours)
    unlike = sum(not r["on_real_manifold"] for r in ours)
    assert f"of the run's 3 images: 1 rejected by the judge, {unlike} unlike the held-out real images, {n_copies} " \
           f"{'copy' if n_copies == 1 else 'copies'} of a " \
           f"reference, {sum(r['unrefined'] for r in ours)} unrefined" in line and str(Path("R") / "images.jsonl") in line
    one = [{"set": "seedselect", "class": "a", "copy": True, "unrefined": True, "judge_label": "b", "judge_top1": None}]
    assert "of the run's 1 image: 1 rejected by the judge, 1 copy of a reference, 1 unrefined;" in marks_line(one, Path("R"))
    assert image_marks({"judge_top1": None, "judge_label": "off-model", "copy": True, "unrefined": True}, "a") == [
        ("judge: off-model", "red"), ("copy", "darkorange"), ("unrefined", "dimgray")]
    assert image_marks({"judge_top1": "a", "judge_label": "A", "on_real_manifold": False, "copy": True}, "a") == [
        ("unlike real images", "royalblue"), ("copy", "darkorange")]
    assert image_marks({"judge_top1": "a", "judge_label": "A", "copy": False, "unrefined": False,
                        "on_real_manifold": True}, "a") == []
    assert image_marks({"judge_top1": None, "judge_label": None, "copy": None}, "a") == []  # no judge, no measure


def test_a_class_sheet_shows_the_marked_images_beyond_its_first_row(tmp_path):
    """A class of 11 images, of which images 3, 9 and 10 are marked: the sheet shows the first 8 and then, in a row of
    their own, the marked ones among the rest (9 and 10); with none marked beyond the first 8, no such row."""
    rng = np.random.default_rng(5)
    paths = []
    for i in range(11):
        paths.append(tmp_path / f"{i}.png")
        random_image(rng, (32, 32)).save(paths[-1])
    entries = [{"class": "c", "index": i, "loss_history": [0.5, 0.4]} for i in range(11)]
    figures = {"n_images": 11, "fidelity": 0.5}
    metrics = {"n_images": 11, "clip": "x", "classified_among": 1, "baseline": None, "overall": {"seedselect": figures},
               "classes": {"c": {"references": {"n_images": 1, "diversity": None},
                                 "heldout": {"n_images": 0, "source": None}, "seedselect": figures}}}

    def sheet_shape(marked: set[int], n: int = 11) -> tuple[int, int]:
        rows = [{"set": "seedselect", "class": "c", "index": i, "judge_top1": None if i in marked else "c",
                 "judge_label": "off-model" if i in marked else "c", "copy": False, "unrefined": False}
                for i in range(n)]
        report = write_report(tmp_path, metrics, entries[:n], {"c": [random_image(rng, (32, 32))]},
                              {"seedselect": paths[:n]}, rows)
        with Image.open(report / "sheets" / "c.png") as sheet:
            return sheet.height // THUMB, (sheet.width - LABEL_WIDTH) // THUMB

    assert sheet_shape({3, 9, 10}) == (3, PER_ROW)  # references, the first 8, "marked (2 more)"
    # a class of hundreds: its last row shows the judge's rejections first, then copies, then the other marks
    rows = [{"class": "c", "judge_top1": "c", "judge_label": "c", "copy": False, "unrefined": False,
             "on_real_manifold": i % 2 == 0} for i in range(20)]
    rows[17].update(judge_top1=None, judge_label="off-model")
    rows[13]["copy"] = True
    rows[4]["unrefined"] = True
    order = [int(path.stem) for path, _ in marked_first([(Path(f"{i}.png"), row) for i, row in enumerate(rows)], "c")]
    assert order == [17, 13, 1, 3, 4, 5, 7, 9, 11, 15, 19]
    assert sheet_shape({3}) == (2, PER_ROW)
    assert sheet_shape({1}, n=3) == (2, 3)  # as wide as its longest row: no empty columns


def test_a_judge_with_mapped_labels(demo_run, tmp_path):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    judge = ViTForImageClassification(ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37, image_size=32,
        patch_size=8, num_labels=3, id2label={0: "disc", 1: "square", 2: "triangle"},
        label2id={"disc": 0, "square": 1, "triangle": 2}))
    judge.save_pretrained(tmp_path / "judge")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "judge")
    metrics = run_evaluate(EvaluateConfig(run_dir=str(demo_run), baseline=False, top_k=2, judge=JudgeConfig(
        model=str(tmp_path / "judge"), label_map={"disc": "red_disc"})))
    red = metrics["classes"]["red_disc"]["seedselect"]
    assert 0 <= red["judge_top1"] <= red["judge_top2"] <= 1 and metrics["judge"] == str(tmp_path / "judge")
    with pytest.raises(UserError, match="none of its labels is a class of the run"):
        run_evaluate(EvaluateConfig(run_dir=str(demo_run), baseline=False,
                                    judge=JudgeConfig(model=str(tmp_path / "judge"))))

    # a classifier's labels as its data set spells them (CUB's "094.Pine_Warbler") are the run's classes unmapped
    from seedselect_cli.judges import Judge

    judge.config.id2label = {0: "042.Red-Disc", 1: "Brewer_Blackbird", 2: "Chuck-will's-widow"}
    judge.config.label2id = {label: index for index, label in judge.config.id2label.items()}
    judge.save_pretrained(tmp_path / "judge")
    classes = ["red disc", "Brewer's Blackbird", "Chuck will Widow", "Pine Warbler"]
    assert Judge(JudgeConfig(model=str(tmp_path / "judge")), classes, torch.device("cpu")).to_class == {
        0: "red disc", 1: "Brewer's Blackbird", 2: "Chuck will Widow"}
    assert Judge(JudgeConfig(model=str(tmp_path / "judge"), label_map={"Brewer_Blackbird": "Pine Warbler"}),
                 classes, torch.device("cpu")).to_class[1] == "Pine Warbler"  # judge.label_map first
    metrics = run_evaluate(EvaluateConfig(run_dir=str(demo_run), baseline=False, top_k=2,
                                          judge=JudgeConfig(model=str(tmp_path / "judge"))))
    assert metrics["classes"]["red_disc"]["seedselect"]["judge_top1"] is not None


def test_a_judge_without_some_of_its_weights_is_refused_rather_than_started_at_random(tmp_path):
    """A classifier folder that lacks a tensor (its head, say: a backbone saved as a classifier) would judge with random
    weights, said only in transformers' silenced log; it is refused, naming the tensor (by the name transformers 5
    gives it in the model, which may differ from the file's: `query` is `q_proj`)."""
    import random

    from safetensors.torch import load_file, save_file
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    from seedselect_cli.judges import Judge

    ViTForImageClassification(ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37, image_size=32, patch_size=8,
        num_labels=2, id2label={0: "disc", 1: "square"}, label2id={"disc": 0, "square": 1})).save_pretrained(
        tmp_path / "judge")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "judge")
    [weights] = (tmp_path / "judge").glob("*.safetensors")
    tensors = load_file(weights)
    del tensors[random.choice(sorted(tensors))]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(UserError, match=f"^cannot use judge.model={tmp_path / 'judge'}: its judge weights lack 1 "
                                        "tensor of the ViTForImageClassification it describes "
                                        "\\(e.g. '[a-z0-9_.]+'\\), which would start at random"):
        Judge(JudgeConfig(model=str(tmp_path / "judge")), ["disc", "square"], torch.device("cpu"))


def test_an_imagenet_classifier_judges_imagenet_classes_without_a_label_map(tmp_path):
    """transformers' ImageNet-1k classifiers name their labels by synonym lists ("house finch, linnet, Carpodacus
    mexicanus", 999 "toilet tissue, toilet paper, bathroom tissue"), where a run of ImageNet-LT or miniImageNet
    classes has CLIP's names ("house finch", "toilet paper"); the label's index says which class it is. A synonym
    that is another class's name is not taken for it; a judge labelled by WordNet id maps too."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    from seedselect_cli.files.datasets.imagenet_names import imagenet_classes
    from seedselect_cli.judges import Judge

    id2label = {i: f"{name}, synonym {i}" for i, (_, name) in enumerate(imagenet_classes())}
    id2label.update({0: "tench, Tinca tinca", 12: "house finch, linnet, Carpodacus mexicanus",
                     999: "toilet tissue, toilet paper, bathroom tissue", 5: "electric ray, toilet paper"})
    torch.manual_seed(0)
    judge = ViTForImageClassification(ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37, image_size=32,
        patch_size=8, num_labels=1000, id2label=id2label, label2id={v: k for k, v in id2label.items()}))
    judge.save_pretrained(tmp_path / "imagenet")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "imagenet")
    mapped = Judge(JudgeConfig(model=str(tmp_path / "imagenet")), ["house finch", "toilet paper", "Tench"],
                   torch.device("cpu")).to_class
    assert {i: c for i, c in mapped.items() if c} == {0: "Tench", 12: "house finch", 999: "toilet paper"}

    judge.config.id2label = {0: "n01532829", 1: "n15075141", 2: "off-model"}  # WordNet ids
    judge.config.label2id = {v: k for k, v in judge.config.id2label.items()}
    judge.config.num_labels = 3
    judge.classifier = torch.nn.Linear(32, 3)
    judge.save_pretrained(tmp_path / "wnids")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "wnids")
    assert Judge(JudgeConfig(model=str(tmp_path / "wnids")), ["house finch", "toilet paper"],
                 torch.device("cpu")).to_class == {0: "house finch", 1: "toilet paper", 2: None}


def test_bad_run_directories_are_user_errors(tmp_path, demo_run):
    with pytest.raises(UserError, match="not a seedselect run directory"):
        run_evaluate(EvaluateConfig(run_dir=str(tmp_path)))
    with pytest.raises(UserError, match=r"images is a folder inside a run; pass the run directory, run_dir="):
        run_evaluate(EvaluateConfig(run_dir=str(demo_run / "images")))
    shutil.copytree(demo_run, tmp_path / "sweep" / "seed-1")  # a sweep's folder (-m): a run directory per job
    shutil.copytree(demo_run, tmp_path / "sweep" / "seed-0")
    with pytest.raises(UserError, match=r"holds run directories, not a run \(seed-0, seed-1\): evaluate each, e.g. "
                                        r"run_dir=.*/sweep/seed-0$"):
        run_evaluate(EvaluateConfig(run_dir=str(tmp_path / "sweep")))
    shutil.copytree(demo_run, tmp_path / "outputs" / "demo" / "2026-12-06_10-53-01")  # Hydra's outputs/<config>/<time>
    with pytest.raises(UserError, match=r"holds run directories, not a run \(demo/2026-12-06_10-53-01\): evaluate "
                                        r"each, e.g. run_dir=.*/outputs/demo/2026-12-06_10-53-01$"):
        run_evaluate(EvaluateConfig(run_dir=str(tmp_path / "outputs")))
    with pytest.raises(UserError, match="not in the list to classify among"):
        run_evaluate(EvaluateConfig(run_dir=str(demo_run), classes=["cat", "dog"], baseline=False))
    spelled = run_evaluate(EvaluateConfig(run_dir=str(demo_run), classes=["Red-Disc", "dog"], baseline=False))
    assert spelled["classified_among"] == 2 and spelled["classes"]["red_disc"]["seedselect"]["top1"] is not None


def test_classes_file_names_the_classes_to_classify_among_as_classes_does(tmp_path, demo_run):
    """`classes_file=FILE`, for a list of hundreds: one name a line, blank lines and # comments passed over, the same
    metrics as the list typed; with `classes` too, or a file that is not there or names none, one line."""
    listed = tmp_path / "among.txt"
    listed.write_text("# the demo's class and a distractor\nRed-Disc\n\n  dog  \n", encoding="utf-8")
    typed = run_evaluate(EvaluateConfig(run_dir=str(demo_run), classes=["Red-Disc", "dog"], baseline=False))
    read = run_evaluate(EvaluateConfig(run_dir=str(demo_run), classes_file=str(listed), baseline=False))
    assert read["classified_among"] == 2
    assert read["classes"]["red_disc"]["seedselect"] == typed["classes"]["red_disc"]["seedselect"]
    with pytest.raises(UserError, match="^classes and classes_file both name the classes"):
        run_evaluate(EvaluateConfig(run_dir=str(demo_run), classes=["dog"], classes_file=str(listed)))
    with pytest.raises(UserError, match=r"^classes_file=.*missing.txt cannot be read"):
        run_evaluate(EvaluateConfig(run_dir=str(demo_run), classes_file=str(tmp_path / "missing.txt")))
    (tmp_path / "empty.txt").write_text("# nothing\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"^classes_file=.*empty.txt names no class"):
        run_evaluate(EvaluateConfig(run_dir=str(demo_run), classes_file=str(tmp_path / "empty.txt")))


def test_a_held_out_folder_that_is_not_there_is_a_user_error(tmp_path, demo_run):
    """A mistyped heldout=DIR, or a run whose dataset.heldout is not on this machine, would otherwise give a report
    with every measure against real images blank."""
    import shutil

    from omegaconf import OmegaConf

    from seedselect_cli.files.run_directory import CONFIG

    with pytest.raises(UserError, match=r"^heldout=.*/nope is not an existing folder"):
        run_evaluate(EvaluateConfig(run_dir=str(demo_run), baseline=False, heldout=str(tmp_path / "nope")))
    run = shutil.copytree(demo_run, tmp_path / "run")
    config = OmegaConf.load(run / CONFIG)
    config.dataset.heldout = str(tmp_path / "moved")
    OmegaConf.save(config, run / CONFIG)
    with pytest.raises(UserError, match=r"^the run's dataset.heldout=.*/moved is not an existing folder here"):
        run_evaluate(EvaluateConfig(run_dir=str(run), baseline=False))
    (tmp_path / "moved").mkdir()
    assert "heldout=DIR" in " ".join(run_evaluate(EvaluateConfig(run_dir=str(run), baseline=False))["notes"])


def test_a_run_whose_data_set_moved_is_evaluated_with_dataset_root(tmp_path, demo_run):
    """The run's dataset.root, recorded on the machine it ran on, may not be here: evaluate says so and takes
    dataset_root=DIR for where the data set is now."""
    import shutil

    from omegaconf import OmegaConf

    from seedselect_cli.files.run_directory import CONFIG

    run = shutil.copytree(demo_run, tmp_path / "run")
    config = OmegaConf.load(run / CONFIG)
    moved = shutil.copytree(config.dataset.root, tmp_path / "moved")
    config.dataset.root = str(tmp_path / "gone")
    OmegaConf.save(config, run / CONFIG)
    with pytest.raises(UserError, match=r"^the run's dataset.root=.*/gone is not an existing folder here; .* pass "
                                        r"dataset_root=DIR"):
        run_evaluate(EvaluateConfig(run_dir=str(run), baseline=False))
    with pytest.raises(UserError, match=r"^dataset_root=.*/nope is not an existing folder"):
        run_evaluate(EvaluateConfig(run_dir=str(run), baseline=False, dataset_root=str(tmp_path / "nope")))
    metrics = run_evaluate(EvaluateConfig(run_dir=str(run), baseline=False, dataset_root=str(moved)))
    before = run_evaluate(EvaluateConfig(run_dir=str(demo_run), baseline=False))
    assert metrics["overall"] == before["overall"]


@pytest.mark.slow
def test_zero_shot_among_every_class_of_the_data_set(tmp_path, caplog):
    from tests.layouts import make_cub

    root = make_cub(tmp_path / "CUB_200_2011", classes=("001.Black_footed_Albatross", "094.Pine_Warbler",
                                                        "095.Cerulean_Warbler"))
    run_dir = tmp_path / "run"
    run_optimize(make_config([f"dataset.root={root}", "model=tiny", "sampler=tiny", "runtime.device=cpu",
                              "dataset.classes=[Pine Warbler]", "runtime.progress=false"], name="cub_tail"), run_dir)
    assert "has 3 images, fewer than dataset.shots=5" in caplog.text  # the run says it of its references
    caplog.clear()
    among_run = run_evaluate(EvaluateConfig(run_dir=str(run_dir), baseline=False))
    among_all = run_evaluate(EvaluateConfig(run_dir=str(run_dir), baseline=False, dataset_classes=True, top_k=2))
    assert among_run["classified_among"] == 1 and among_all["classified_among"] == 3
    assert among_run["classes"]["Pine Warbler"]["seedselect"]["top1"] is None  # among one class: no figure
    assert among_all["classes"]["Pine Warbler"]["seedselect"]["top1"] in (0.0, 1.0)  # one image, among 3
    assert set(among_all["classes"]) == {"Pine Warbler"}
    assert among_all["classes"]["Pine Warbler"]["heldout"]["source"] == "dataset.split=test"
    # the test split's one image of the class: evaluate says why the measures against real images are blank; it
    # does not say again what the run said of its references, nor warn of dataset.shots for its draw of real images
    assert among_all["classes"]["Pine Warbler"]["heldout"]["n_images"] == 1
    assert any(n.startswith("precision, density, coverage and kid are left out for 1 class of 1") and
               "it has 1 image (dataset.split=test)" in n for n in among_all["notes"])
    assert "dataset.shots" not in caplog.text


def test_images_per_class_scores_each_classs_first_images_in_both_sets(demo_run, tmp_path):
    """`images_per_class=2` on a run of 3 images: the first two indices of the class, for the run and for plain
    sampling alike, the same figures as a run of those two alone, and a note that says so; the run stays whole."""
    from seedselect_cli.evaluate import first_of_each_class

    rng = np.random.default_rng(71)
    entries = [{"class": c, "index": int(i)} for c, i in zip(rng.choice(["a", "b"], 12), rng.permutation(12))]
    kept = first_of_each_class(entries, 2)
    assert kept == [e for e in entries if e["index"] in sorted(x["index"] for x in entries if x["class"] == e["class"])[:2]]
    assert first_of_each_class(entries, None) is entries and len(first_of_each_class(entries, 99)) == 12

    metrics = run_evaluate(EvaluateConfig(run_dir=str(demo_run), images_per_class=2))
    rows = [json.loads(line) for line in (demo_run / "report" / "images.jsonl").read_text().splitlines()]
    assert sorted((r["set"], r["index"]) for r in rows) == [("plain", 0), ("plain", 1), ("seedselect", 0),
                                                            ("seedselect", 1)]
    assert metrics["n_images"] == 2 and metrics["classes"]["red_disc"]["plain"]["n_images"] == 2
    assert any("first 2 images of each class (images_per_class=2): 2 of the run's 3" in n for n in metrics["notes"])
    alone = tmp_path / "two"  # the same run cut to its first two images, evaluated whole
    shutil.copytree(demo_run, alone, ignore=shutil.ignore_patterns("report"))
    lines = (alone / "manifest.jsonl").read_text().splitlines()
    (alone / "manifest.jsonl").write_text("".join(line + "\n" for line in lines if json.loads(line)["index"] < 2))
    whole = run_evaluate(EvaluateConfig(run_dir=str(alone)))
    for method in ("seedselect", "plain"):
        assert metrics["overall"][method] == whole["overall"][method], method
    assert not any("images_per_class" in n for n in whole["notes"])
    assert len(read_manifest(demo_run)) == 3
