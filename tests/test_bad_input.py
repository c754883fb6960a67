"""Bad input, answered by the error contract: exit code 2, one `error:` line that says what to do, no
traceback, nothing written. Odd but valid input works. Inputs live outside the working directory,
which must stay empty."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from seedselect_cli.cli import main
from tests.conftest import random_image
from tests.runs import QUICK

TINY = "--config-name=tiny"  # the random tiny components: the default config is the toy world
FAST = [*QUICK, "n_images=1", "runtime.batch_size=1"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """One folder per kind of reference set, and a few files."""
    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)

    def folder(name: str) -> Path:
        (root / name).mkdir()
        return root / name

    folder("empty")
    (folder("text") / "notes.png").write_text("these are notes, not an image")
    good = random_image(rng, (64, 48))
    good.save(root / "good.png")
    jpeg, png = (root / "good.jpg"), (root / "good.png")
    good.save(jpeg, quality=90)
    truncated = folder("truncated")
    (truncated / "cut.jpg").write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    (truncated / "cut.png").write_bytes(png.read_bytes()[: png.stat().st_size // 2])
    (folder("zero_bytes") / "empty.png").write_bytes(b"")
    Image.new("RGB", (1, 1), (255, 0, 0)).save(folder("one_pixel") / "dot.png")
    Image.new("1", (10_000, 10_000)).save(folder("bomb") / "bomb.png")  # 1e8 pixels > Pillow's limit, 12 kB
    # A seed file of the wrong shape for the tiny model: valid metadata, (4, 8, 8) seeds instead of (4, 16, 16).
    metadata = {"prompt": "x", "model": "tiny", "steps": "2", "guidance_scale": "7.5", "height": "32", "width": "32",
                "scheduler_config": "{}", "dtype": "float32", "format": "seedselect-seed/1"}
    save_file({"initial": torch.randn(4, 8, 8), "optimized": torch.randn(4, 8, 8)}, root / "small.safetensors",
              metadata=metadata)
    (root / "pickle.safetensors").write_bytes(b"\x80\x04\x95not safetensors")
    # single-file checkpoints, as Stable Diffusion's own releases ship them (a stand-in tensor of the original layout)
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3)}, root / "sd-v1.safetensors")
    (root / "sd-v1.ckpt").write_bytes(b"\x80\x04\x95a pickled checkpoint")
    # the Hugging Face cache's folders of two repositories (their files in snapshots/, refs/main naming the newer of
    # the model's two), and a model's folder with one of its networks' below it
    for repo, index, commits in (("models--org--sd", "model_index.json", ("c1", "c2")), ("models--org--clip",
                                                                                          "config.json", ("c3",))):
        for commit in commits:
            (root / "hub" / repo / "snapshots" / commit).mkdir(parents=True)
            (root / "hub" / repo / "snapshots" / commit / index).write_text("{}")
        (root / "hub" / repo / "refs").mkdir()
        (root / "hub" / repo / "refs" / "main").write_text(commits[-1])
    os.utime(root / "hub" / "models--org--sd" / "snapshots" / "c1", (2e9, 2e9))  # the newest on disk is not main's
    (root / "sd" / "unet").mkdir(parents=True)
    (root / "sd" / "model_index.json").write_text("{}")
    (root / "sd" / "unet" / "config.json").write_text("{}")
    return root


CASES = {
    "missing folder": (["optimize", "dataset.root={inputs}/nope"], "is not an existing folder"),
    "empty folder": (["optimize", "dataset.root={inputs}/empty"], "holds no image files"),
    "non-images": (["optimize", "dataset.root={inputs}/text"], "0 readable images"),
    "truncated jpeg and png": (["optimize", "dataset.root={inputs}/truncated"], "0 readable images"),
    "zero bytes": (["optimize", "dataset.root={inputs}/zero_bytes"], "not an image Pillow can read"),
    "1x1 pixels": (["optimize", "dataset.root={inputs}/one_pixel"], "only 1x1 pixels"),
    "decompression bomb": (["optimize", "dataset.root={inputs}/bomb"], "decompression-bomb limit"),
    "lambda": (["optimize", "loss.lam=1.5"], "loss.lam=1.5 is invalid"),
    "k": (["optimize", "kstep.k=0"], "kstep.k=0 is invalid"),
    "k above steps": (["optimize", "kstep.k=11"], "kstep.k=11 is invalid"),
    "steps": (["optimize", "sampler.steps=0"], "sampler.steps=0 is invalid"),
    "fewer steps than k": (["optimize", "sampler.steps=2"],
                           ("kstep.k=3 is invalid: must be between 1 and sampler.steps=2; with fewer steps take "
                           "kstep=last (k=1) or kstep=paper (k=2)")),
    "one step, k of 3": (["optimize", "sampler.steps=1"], "sampler.steps=1; with fewer steps take kstep=last (k=1)"),
    "k without its weights": (["optimize", "kstep.k=1"], ("needs exactly kstep.k=1 weights; kstep=last (k=1) and "
                                                         "kstep=paper (k=2) set both")),
    "sampler": (["optimize", "sampler.name=heun"], "sampler.name='heun' is invalid: choose one of ddim, euler"),
    "lcm steps": (["optimize", "sampler.name=lcm", "sampler.steps=60", "kstep=last"], "at most 50 steps"),
    "lr": (["optimize", "optim.lr=-1"], "optim.lr=-1.0 is invalid"),
    "shots": (["optimize", "dataset.shots=0"], "dataset.shots=0 is invalid"),
    "n_images": (["optimize", "n_images=0"], "n_images=0 is invalid"),
    "bootstrap n_images": (["bootstrap", "bootstrap.n_images=0"], "bootstrap.n_images=0 is invalid"),
    "weights of the wrong length": (["optimize", "kstep.weights=[0.5,0.5]"], "needs exactly kstep.k=3 weights"),
    "not a number": (["optimize", "optim.lr=fast"], "optim.lr='fast' is invalid: must be a number"),
    "not a whole number": (["optimize", "optim.iterations=3.7"], "optim.iterations=3.7 is invalid: must be a whole "),
    "not a bool": (["optimize", "runtime.compile=maybe"], "runtime.compile='maybe' is invalid: must be true or false"),
    "a tool's key of the wrong type": (["evaluate", "run_dir=x", "images_per_class=all"],
                                       "images_per_class='all' is invalid: must be a whole number"),
    "unknown config name": (["optimize", "--config-name", "cub_tial"], "cub_tial"),
    "unknown key": (["optimize", "optim.learning_rate=0.1"], "optim.learning_rate"),
    "unknown group option": (["optimize", "loss=focal"], "focal"),
    "unknown dataset layout": (["optimize", "dataset.name=coco"], "dataset.name='coco' is invalid"),
    "model path that does not exist": (
        ["optimize", "model.pretrained={inputs}/no/such/model"], "folder {inputs}/no/such/model does not exist"),
    "image encoder path that does not exist": (
        ["optimize", "model.image_encoder=./no_such_clip"], "folder ./no_such_clip does not exist"),
    "single-file checkpoint": (
        ["optimize", "model.pretrained={inputs}/sd-v1.safetensors"],
        ("model.pretrained={inputs}/sd-v1.safetensors is a single checkpoint file; the Stable Diffusion model loads "
         "from a folder in the diffusers layout with its configs, or from a Hub id: convert it once")),
    "single-file checkpoint to redraw with": (
        ["generate", "seed_file={inputs}/small.safetensors", "out=x.png", "model={inputs}/sd-v1.safetensors"],
        "then pass model={inputs}/sd-v1"),
    "the Hugging Face cache's folder of a model, not its snapshot": (
        ["optimize", "model.pretrained={inputs}/hub/models--org--sd"],
        ("is the Hugging Face cache's folder of org/sd, not a model's folder (no model_index.json): its files are in "
         "its snapshots; pass model.pretrained={inputs}/hub/models--org--sd/snapshots/c2, or the Hub id, "
         "model.pretrained=org/sd")),
    "the cache's folder of an image encoder": (
        ["optimize", "model.image_encoder={inputs}/hub/models--org--clip"],
        ("(no config.json): its files are in its snapshots; pass model.image_encoder={inputs}/hub/models--org--clip/"
         "snapshots/c3, or the Hub id, model.image_encoder=org/clip")),
    "the snapshots/ folder of the cache's folder of a model": (
        ["optimize", "model.pretrained={inputs}/hub/models--org--sd/snapshots"],
        ("snapshots is in the Hugging Face cache's folder of org/sd, not a model's folder (no model_index.json): its "
         "files are in its snapshots; pass model.pretrained={inputs}/hub/models--org--sd/snapshots/c2")),
    "the Hugging Face cache itself": (
        ["optimize", "model.pretrained={inputs}/hub"],
        ("model.pretrained={inputs}/hub is a Hugging Face cache, not a model's folder (no model_index.json): pass one "
         "of its models by its Hub id, model.pretrained=org/sd, with HF_HUB_CACHE={inputs}/hub where it is not the "
         "default cache")),
    "one network's folder of a model": (
        ["optimize", "model.pretrained={inputs}/sd/unet"],
        ("model.pretrained={inputs}/sd/unet is the unet of the model in {inputs}/sd, not the model's folder (no "
         "model_index.json): pass model.pretrained={inputs}/sd")),
    "one network's folder to redraw with": (
        ["generate", "seed_file={inputs}/small.safetensors", "out=x.png", "model={inputs}/sd/unet"],
        "pass model={inputs}/sd"),
    "pickled checkpoint": (["optimize", "model.pretrained={inputs}/sd-v1.ckpt"],
                           ("is a file; the Stable Diffusion model loads from a folder in the diffusers layout with "
                            "its configs and .safetensors weights (seedselect reads no pickled checkpoints)")),
    "image encoder file": (["optimize", "model.image_encoder={inputs}/sd-v1.safetensors"],
                           "the CLIP image encoder loads from a folder in the transformers layout"),
    "cuda without cuda": (["optimize", "runtime.device=cuda"], "use runtime.device=cpu"),  # why: test_devices.py
    "one GPU of several": (["optimize", "runtime.device=cuda:1"],
                           "for GPU 1 run `CUDA_VISIBLE_DEVICES=1 seedselect ...` with runtime.device=cuda"),
    "generate on cuda without cuda": (["generate", "seed_file={inputs}/pickle.safetensors", "out=x.png",
                                       "runtime.device=cuda"], "use runtime.device=cpu"),
    "evaluate on cuda without cuda": (["evaluate", "run_dir={inputs}", "runtime.device=cuda"],
                                      "use runtime.device=cpu"),
    "cuda graphs on the cpu": (["optimize", "runtime.device=cpu", "runtime.cuda_graphs=true"],
                               "runtime.cuda_graphs=true needs a CUDA device, not cpu"),
    "cuda graphs neither on nor off": (["optimize", "runtime.cuda_graphs=sometimes"],
                                       "runtime.cuda_graphs='sometimes' is invalid: choose one of auto, true, false"),
    "cuda graphs without checkpoints": (["optimize", "runtime.cuda_graphs=true", "sampler.checkpointing=false"],
                                        "keep sampler.checkpointing=true"),
    "run directory under a file": (["optimize", "hydra.run.dir={inputs}/good.png/run"], "is a file"),
    "seed file that is not safetensors": (
        ["generate", "seed_file={inputs}/pickle.safetensors", "out=x.png"], "is not a safetensors seed file"),
    "seed file of the wrong shape": (
        ["generate", "seed_file={inputs}/small.safetensors", "out=x.png"], "does not fit model tiny"),
    "seed file that does not exist": (["generate", "seed_file=nope.safetensors", "out=x.png"], "does not exist"),
    "seed file that is a folder": (["generate", "seed_file={inputs}", "out=x.png"],
                                   ("out=x.png names a file, but seed_file={inputs} is a folder: name a folder for "
                                   "its images (e.g. out=x), or pass one seed file")),
    "an image for a seed file": (["generate", "seed_file={inputs}/good.png", "out=x.png"],
                                 "is an image; pass its seed file"),
    "output that is not an image": (["generate", "seed_file={inputs}/small.safetensors", "out=x.txt"], "out=x.txt"),
    "unknown command": (["optimise"], "unknown command 'optimise'"),
    "one class not in a list": (["optimize", "dataset.classes=Pine Warbler"],
                                "it takes a list, e.g. 'dataset.classes=[Pine Warbler]'"),
    "every class as a word": (["optimize", "dataset.classes=all"],
                              ("dataset.classes='all' is invalid: for every class of the data set's split, pass "
                               "dataset.classes=null")),
    "generate without out": (["generate", "seed_file={inputs}/small.safetensors"], "out is required: pass out=IMAGE.png"),
    "evaluate without a run": (["evaluate"], "run_dir is required: pass run_dir=RUN (the folder"),
    "a run's key given to generate": (["generate", "seed_file={inputs}/small.safetensors", "out=x.png", "sampler.steps=5"],
                                      "generate takes seed_file, out, tensor, model, runtime.device, runtime.dtype, and "),
    "a run's key given to evaluate": (["evaluate", "run_dir={inputs}", "n_images=3"], "evaluate takes run_dir, classes,"),
    "an environment variable as the shell writes it": (
        ["optimize", "dataset.root={inputs}/${{USER}}/refs"],
        ("dataset.root refers to ${{USER}}, which is no key of the config: for the environment variable write "
         "${{oc.env:USER}}; for a name that holds '${{', write it as '\\${{'")),
    "a run directory whose name holds ${": (["optimize", "hydra.run.dir=runs/a\\${{b}}"],
                                           ("hydra.run.dir=runs/a${{b}}: Hydra cannot run a job in a folder whose "
                                            "name holds '${{'")),  # Hydra's traceback, and the folder left behind
    "a sweep directory whose name holds ${": (["optimize", "hydra.sweep.dir=sw/a\\${{b}}", "seed=1,2", "-m"],
                                             "hydra.sweep.dir=sw/a${{b}}: Hydra cannot run a job in a folder"),
    "a comma without -m": (["optimize", "dataset.root={inputs}/birds, rare"],
                           ("dataset.root={inputs}/birds, rare is several values (a comma separates them): to run a "
                            "job for each, add -m; for one value that holds a comma, quote it, 'dataset.root=\"{inputs}"
                            "/birds, rare\"'")),
    "a key's path mistyped in an interpolation": (["optimize", "dataset.root=${{dataset.rooot}}"],
                                                  ("dataset.root refers to ${{dataset.rooot}}, which is no key of the "
                                                   "config: check its spelling")),
    "an environment variable in the run directory": (["optimize", "hydra.run.dir=runs/${{USER}}"],
                                                     "hydra.run.dir refers to ${{USER}}, which is no key of the config"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, inputs, tmp_path, monkeypatch, capsys):
    if "cuda without cuda" in case and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    args, expected = CASES[case]
    args = [a.format(inputs=inputs) for a in args]
    if args[0] in ("optimize", "bootstrap"):
        args = [args[0], TINY, *FAST, *args[1:]]  # the case's own value last, so that it wins
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected.format(inputs=inputs) in lines[0] and "Traceback" not in err
    assert os.listdir(tmp_path) == [], "a failed command left files behind"


def test_a_folder_whose_name_holds_a_dollar_brace_is_read_as_the_error_says(tmp_path, monkeypatch, capsys):
    """`${` in a path is an interpolation to Hydra; the error's advice, `\\${`, reads the folder as named."""
    refs = tmp_path / "data ${v1}" / "blue_thing"
    refs.mkdir(parents=True)
    rng = np.random.default_rng(7)
    for i in range(2):
        random_image(rng).save(refs / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    assert main(["optimize", TINY, *FAST, f"dataset.root={refs}", "hydra.run.dir=run"]) == 2
    assert "write it as '\\${'" in capsys.readouterr().err
    escaped = str(refs).replace("${", "\\${")
    assert main(["optimize", TINY, *FAST, f"dataset.root={escaped}", "hydra.run.dir=run"]) == 0
    [entry] = [json.loads(line) for line in (tmp_path / "run" / "manifest.jsonl").read_text().splitlines()]
    assert entry["class"] == "blue_thing" and (tmp_path / "run" / entry["image"]).is_file()
    # RUN/config.yaml reads back as that folder (it read as an interpolation, and the run as damaged): a resume
    # and evaluate take it
    assert main(["optimize", TINY, *FAST, f"dataset.root={escaped}", "hydra.run.dir=run", "n_images=2"]) == 0
    assert len((tmp_path / "run" / "manifest.jsonl").read_text().splitlines()) == 2
    assert main(["evaluate", "run_dir=run"]) == 0
    assert (tmp_path / "run" / "report" / "metrics.json").is_file()


def test_odd_images_work_and_broken_ones_are_skipped_by_name(inputs, tmp_path, monkeypatch, caplog):
    """CMYK, 16-bit, palette and RGBA references work; a truncated file beside them is skipped, named."""
    refs = tmp_path / "refs" / "odd_modes"
    refs.mkdir(parents=True)
    rng = np.random.default_rng(1)
    random_image(rng, (40, 30), "CMYK").save(refs / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 65536, size=(30, 40), dtype=np.uint16)).save(refs / "grey16.png")
    random_image(rng, (40, 30), "P").save(refs / "palette.png")
    random_image(rng, (40, 30), "RGBA").save(refs / "alpha.png")
    (refs / "cut.jpg").write_bytes((inputs / "truncated" / "cut.jpg").read_bytes())
    monkeypatch.chdir(tmp_path)
    assert main(["optimize", TINY, f"dataset.root={refs}", "hydra.run.dir=run", *FAST]) == 0
    [entry] = [json.loads(line) for line in (tmp_path / "run" / "manifest.jsonl").read_text().splitlines()]
    assert (tmp_path / "run" / entry["image"]).is_file()
    log = (tmp_path / "run" / "optimize.log").read_text()
    assert "skipping reference image" in log and "cut.jpg" in log
    assert not any(name in log for name in ("cmyk.jpg", "grey16.png", "palette.png", "alpha.png"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["../../escape", "a/b", "Mésange bleue", "..", "鳥"])
def test_any_class_name_stays_inside_the_run_directory(name, inputs, tmp_path, monkeypatch):
    refs = tmp_path / "refs"
    refs.mkdir()
    (refs / "ref.png").write_bytes((inputs / "good.png").read_bytes())
    monkeypatch.chdir(tmp_path)
    assert main(["optimize", TINY, f"dataset.root={refs}", f"dataset.classes=[{json.dumps(name, ensure_ascii=False)}]", "hydra.run.dir=run",
                 *FAST]) == 0
    run = (tmp_path / "run").resolve()
    [entry] = [json.loads(line) for line in (run / "manifest.jsonl").read_text().splitlines()]
    assert entry["class"] == name
    for key in ("image", "seed_file"):
        path = (run / entry[key]).resolve()
        assert path.is_file() and run in path.parents
    outside = {p for p in tmp_path.rglob("*") if p.is_file()} - set(run.rglob("*")) - {refs / "ref.png"}
    assert outside == set()


def test_two_classes_of_one_folder_name_are_refused_before_anything_is_written(tmp_path, monkeypatch, reference_folder):
    """No adapter makes two class names of one slug today (imagefolder refuses 'a b' beside 'a_b'); should one, the
    run names both classes instead of writing one class's images over the other's."""
    from seedselect_cli import pipeline
    from seedselect_cli.errors import UserError
    from seedselect_cli.files.datasets import ClassRecord
    from tests.conftest import make_config

    images = tuple(sorted(reference_folder.iterdir()))
    twins = [ClassRecord("red fox", "a photo of a red fox", images, len(images)),
             ClassRecord("red_fox", "a red_fox", images, len(images))]
    monkeypatch.setattr(pipeline, "load_classes", lambda *args, **kwargs: twins)
    with pytest.raises(UserError, match=r"classes 'red fox' and 'red_fox' map to the same folder name \(red_fox\)"):
        pipeline.run_optimize(make_config([f"dataset.root={reference_folder}"]), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_run_s_image_given_as_seed_file_is_answered_with_its_seed_file(tmp_path):
    from seedselect_cli.errors import UserError
    from seedselect_cli.files.seed_files import load_seed_file

    image, seed = tmp_path / "RUN" / "images" / "c" / "00003.png", tmp_path / "RUN" / "seeds" / "c" / "00003.safetensors"
    for path in (image, seed):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
    with pytest.raises(UserError, match=f"^seed_file={image} is an image; its seed file is {seed}$"):
        load_seed_file(image)
