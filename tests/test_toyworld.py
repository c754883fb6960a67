"""The toy world shipped in the package (scripts/train_toyworld.py): complete, small, loadable by
diffusers and transformers as a real checkpoint is, with a strict judge that rejects off-model shapes,
and a place where the method's direction can be checked: on tail concepts the judge (which took no
part in the optimisation) finds SeedSelect's images closer to the concept than plain sampling's."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from seedselect_cli.config import load_config
from seedselect_cli.evaluate import run_evaluate
from seedselect_cli.files.assets import asset_path
from seedselect_cli.files.atomic import slugify
from seedselect_cli.pipeline import run
from seedselect_cli.tool_config import EvaluateConfig, JudgeConfig
from tests.conftest import compose_raw, make_config

pytestmark = pytest.mark.slow  # minutes together: the quick loop (`pytest -m "not slow"`) leaves it out

ROOT = Path(asset_path("toyworld"))
WORLD = json.loads((ROOT / "world.json").read_text())
TAIL = [c["name"] for c in WORLD["concepts"] if c["bucket"] == "tail"]


def test_the_shipped_world_is_complete_small_and_long_tailed():
    size = sum(f.stat().st_size for f in ROOT.rglob("*") if f.is_file())
    assert size <= 20 * 2**20
    counts = [c["count"] for c in WORLD["concepts"]]
    assert counts == sorted(counts, reverse=True) and counts[0] >= 1000 and len(TAIL) >= 5
    assert all(c["count"] <= 10 for c in WORLD["concepts"] if c["bucket"] == "tail")
    words = {w for c in WORLD["concepts"] if c["bucket"] != "tail" for w in c["name"].split()}
    assert all(set(name.split()) <= words for name in TAIL)  # tail names recombine frequent words
    for concept in WORLD["concepts"]:
        assert len(list((ROOT / "references" / concept["name"]).glob("*.png"))) == min(5, concept["count"])
    for config in [*ROOT.rglob("config.json"), *Path(asset_path("toyworld_turbo")).rglob("config.json")]:
        origin = json.loads(config.read_text()).get("_name_or_path", "")  # no folder of the machine that trained it
        assert not Path(origin).is_absolute(), (config, origin)


def test_the_distilled_few_step_world_draws_in_one_step_what_the_world_draws_in_ten():
    """`toyworld_turbo` (scripts/distill_toyworld.py): under 10 MB, loaded by its named config, and on fresh seeds
    (not the distillation's) 1, 2 and 4 Euler steps without guidance land far closer to the toy world's 10 guided
    DDIM steps than the toy world's own Euler steps do."""
    from seedselect_cli.core.prompts import encode_prompt
    from seedselect_cli.core.samplers import make_schedule
    from seedselect_cli.core.sampling import rollout
    from seedselect_cli.models import load_models

    turbo = Path(asset_path("toyworld_turbo"))
    assert sum(f.stat().st_size for f in turbo.rglob("*") if f.is_file()) < 10 * 2**20
    config = load_config(compose_raw("toyworld_turbo", []))
    assert (config.sampler.name, config.sampler.steps, config.sampler.guidance_scale) == ("euler", 1, 0.0)
    student = load_models(config.model, torch.device("cpu"), torch.float32, with_image_encoder=False)
    teacher = load_models(load_config(compose_raw("toyworld", [])).model, torch.device("cpu"), torch.float32,
                          with_image_encoder=False)
    z = torch.randn(16, *teacher.latent_shape(32, 32), generator=torch.Generator().manual_seed(20261202))
    errors = {}
    with torch.no_grad():
        for concept in TAIL[:3]:
            prompt = WORLD["template"].format(concept)
            target = rollout(teacher, z, encode_prompt(teacher, prompt), make_schedule(teacher, 10, "ddim"), 4.0)[-1]
            for steps in (1, 2, 4):
                for who, models, w in (("student", student, 0.0), ("teacher", teacher, 4.0)):
                    drawn = rollout(models, z, encode_prompt(models, prompt), make_schedule(models, steps, "euler"), w)[-1]
                    errors.setdefault((who, steps), []).append(float((drawn - target).square().mean()))
    mean = {key: sum(v) / len(v) for key, v in errors.items()}
    assert mean[("student", 1)] < 0.5 * mean[("teacher", 1)], mean
    assert mean[("student", 2)] < mean[("teacher", 2)], mean
    assert mean[("student", 4)] < 0.3, mean


def test_diffusers_and_transformers_load_it_as_they_load_a_real_checkpoint():
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open
    from transformers import AutoModelForImageClassification, CLIPModel

    for weights in ROOT.glob("*/*.safetensors"):  # stored in float16
        with safe_open(weights, "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} <= {"F16", "I64"}, weights  # noqa: SIM118 (I64: BatchNorm counts)
    pipe = StableDiffusionPipeline.from_pretrained(ROOT, dtype=torch.float32, use_safetensors=True,
                                                   local_files_only=True)
    image = pipe("a photo of a red circle", num_inference_steps=5, height=32, width=32, output_type="pil",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    assert CLIPModel.from_pretrained(ROOT / "clip", use_safetensors=True).config.projection_dim > 0
    judge = AutoModelForImageClassification.from_pretrained(ROOT / "judge", use_safetensors=True)
    assert set(judge.config.id2label.values()) == {c["name"] for c in WORLD["concepts"]} | {"off-model"}


def judge_verdicts(images: list[Image.Image]) -> list[str]:
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    judge = AutoModelForImageClassification.from_pretrained(ROOT / "judge", use_safetensors=True).float().eval()
    processor = AutoImageProcessor.from_pretrained(ROOT / "judge")
    with torch.no_grad():
        logits = judge(**processor(images, return_tensors="pt")).logits
    return [judge.config.id2label[i] for i in logits.argmax(-1).tolist()]


def test_the_judge_knows_every_concept_from_its_references_and_held_out_images():
    names, images = [], []
    for concept in WORLD["concepts"]:
        for folder, n in (("references", 5), ("heldout", 8)):
            for path in sorted((ROOT / folder / concept["name"]).glob("*.png"))[:n]:
                names.append(concept["name"])
                images.append(Image.open(path).convert("RGB"))
    verdicts = judge_verdicts(images)
    assert sum(v == n for v, n in zip(verdicts, names)) / len(names) >= 0.95


def test_the_judge_rejects_off_model_shapes():
    """Stars, blobs, stretched shapes, melted ones (the off-model kinds it was trained to reject, drawn
    fresh from another seed): at least 90 % are "off-model"."""
    import sys

    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import train_toyworld

    rng = np.random.default_rng(1234)
    images = [train_toyworld.render_off_model(rng, kind) for kind in train_toyworld.OFF_KINDS for _ in range(10)]
    verdicts = judge_verdicts(images)
    assert sum(v == "off-model" for v in verdicts) / len(verdicts) >= 0.9


def test_the_decoder_gives_back_what_it_is_given_tail_shapes_and_off_model_ones_alike():
    """Stable Diffusion's VAE reconstructs a rare bird as well as a common one: the long tail is its UNet's. The
    toy world's decoder, trained on the long tail alone, could not (a real green square came back a notched blob,
    judged right 0.00 to 1.00 and at precision 0.00 to 0.50 per tail concept), so no seed could draw one; it was
    retrained on balanced data (`train_toyworld.finetune_decoder`). Fresh renders of every tail concept now come
    back judged right (measured: 1.00 each) and inside the held-out images' region of the judge's features
    (precision 0.63 to 1.00, mean 0.83), and off-model images come back off-model (0.79; the old decoder 0.83):
    it does not tidy a blob into a square."""

    import numpy as np
    from diffusers import AutoencoderKL

    from seedselect_cli.judges import Judge
    from seedselect_cli.quality import precision_recall

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import toyworld_drawable
    import train_toyworld

    judge = Judge(JudgeConfig(model=str(ROOT / "judge")), [c["name"] for c in WORLD["concepts"]], torch.device("cpu"))
    vae = AutoencoderKL.from_pretrained(ROOT / "vae", dtype=torch.float32)
    rng = np.random.default_rng(4321)
    precisions = []
    with torch.no_grad():
        for concept in TAIL:
            back = toyworld_drawable.round_trip(vae, [train_toyworld.render(concept, rng) for _ in range(16)])
            verdicts, features = judge.classify(back, k=1)
            heldout = [Image.open(p).convert("RGB") for p in sorted((ROOT / "heldout" / concept).glob("*.png"))]
            precisions.append(precision_recall(judge.classify(heldout, k=1)[1], features)[0])
            assert sum(v[0] == concept for v in verdicts) >= 15, (concept, verdicts)
            assert precisions[-1] >= 0.5, (concept, precisions)
        assert sum(precisions) / len(precisions) >= 0.75, precisions
        off = [train_toyworld.render_off_model(rng, kind) for kind in train_toyworld.OFF_KINDS for _ in range(6)]
        kept = [v[0] is None for v in judge.classify(toyworld_drawable.round_trip(vae, off), k=1)[0]]
    assert sum(kept) / len(kept) >= 0.7, kept


def concept_probability(folder: Path, concept: str) -> float:
    """The judge's mean probability (softmax over the concepts and "off-model") of `concept` for the
    images in `folder`."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    judge = AutoModelForImageClassification.from_pretrained(ROOT / "judge", use_safetensors=True).float().eval()
    processor = AutoImageProcessor.from_pretrained(ROOT / "judge")
    images = [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.png"))]
    assert images, folder
    with torch.no_grad():
        probabilities = judge(**processor(images, return_tensors="pt")).logits.softmax(-1)
    return probabilities[:, judge.config.label2id[concept]].mean().item()


def test_seedselect_moves_tail_concepts_towards_the_concept_and_evaluate_says_how_far(tmp_path):
    """With the defaults (`method=select`: 16 fresh starts scored, then refined; 15 iterations here, for time) and
    seed 0, 4 images of each of two tail concepts in one batch, SeedSelect raises the strict judge's probability of
    the concept over plain sampling from the same seeds (measured at the world's guidance 2: sea gull 0.000 -> 0.924,
    marsh finch 0.495 -> 0.752; at the guidance 4 of before, 0.000 -> 0.183 and 0.249 -> 0.993). evaluate reports
    every instrument of the quality issue for both."""
    concepts = ["sea gull", "marsh finch"]
    config = make_config([f"dataset.classes=[{','.join(concepts)}]", "n_images=4", "runtime.batch_size=4",
                          "sampler.steps=10", "optim.iterations=15", "init.candidates=16"],  # the default's 16
                         name="toyworld")
    run(config, tmp_path, "optimize")
    metrics = run_evaluate(EvaluateConfig(run_dir=str(tmp_path), dataset_classes=True,
                                          judge=JudgeConfig(model=str(ROOT / "judge"))))
    for concept in concepts:
        slug = slugify(concept)
        plain = concept_probability(tmp_path / "baseline" / "images" / slug, concept)
        selected = concept_probability(tmp_path / "images" / slug, concept)
        print(f"{concept}: the judge's probability of the concept, plain {plain:.3f}, SeedSelect {selected:.3f}")
        assert selected > plain + 0.05, (concept, plain, selected)
        scores = metrics["classes"][concept]
        for method in ("plain", "seedselect"):  # every instrument of the quality issue, for both
            assert {"judge_top1", "precision", "recall", "diversity_ratio", "copies"} <= set(scores[method])


def test_drawable_measures_the_models_own_samples_with_evaluates_instruments(tmp_path):
    """`toyworld_drawable.py`: the model at its best (a head concept) lies among real images, its weakest tail concept's
    drawings do not (measured at these 16 seeds and the preset's guidance 2: pine gull precision 1.00, all judged
    right; marsh finch 0.25 judged right, precision 0.00; at guidance 4: 0.81, and 0.25 judged right at 0.06)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import toyworld_drawable

    rows = toyworld_drawable.main(["--concepts", "pine gull", "marsh finch", "--n", "16",
                                   "--sheet", str(tmp_path / "sheet.png")])
    head, tail = rows
    print(rows)
    assert head["right"] == 1.0 and head["precision"] >= 0.6 and head["precision"] == head["precision_of_right"]
    assert tail["right"] < 0.5 and tail["precision"] <= 0.25
    assert 0 < head["diversity_ratio"] and 0 <= head["recall"] <= 1 and (tmp_path / "sheet.png").is_file()


def test_another_batch_size_makes_the_same_images(tmp_path):
    """The seeds found do not depend on how many are optimised together: each seed's loss is its own (summed
    before the backward pass) and AdamW's state is element-wise, so a batch of 3 and batches of 2 and 1 differ only
    in the kernels' rounding, and on the trained world that stays in the last digits. Measured on the demo at batch
    1, 2 and 4 (24 iterations): the same losses to 4 digits, pixels within 1 of 255, with and without backtracking.
    Here seed 26, 8 iterations from the best of 4 starts (fails when one seed's rise makes the whole batch backtrack:
    checked)."""
    from seedselect_cli.config import compose_config

    made = {}
    for batch_size in (3, 2):
        config = compose_config("demo", ["seed=26", "n_images=3", "optim.iterations=8", "init.candidates=4",
                                         "runtime.progress=false",
                                         f"runtime.batch_size={batch_size}"])
        entries = run(config, tmp_path / f"b{batch_size}", "optimize")
        made[batch_size] = {e["index"]: e for e in entries}
    assert sorted(made[3]) == sorted(made[2]) == [0, 1, 2]
    for index, together in made[3].items():
        apart = made[2][index]
        assert apart["loss"] == pytest.approx(together["loss"], rel=1e-3), index
        assert apart["loss_history"] == pytest.approx(together["loss_history"], rel=1e-2, abs=1e-4), index
        a, b = (np.asarray(Image.open(tmp_path / f"b{n}" / made[n][index]["image"]), dtype=float) for n in (3, 2))
        assert np.abs(a - b).max() <= 2, index
    assert min(e["loss"] / e["loss_history"][0] for e in made[3].values()) < 0.8  # the seeds did move
