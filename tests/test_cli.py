"""The `seedselect` command as a user runs it: from another directory, through the console script."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open

import seedselect_cli
from seedselect_cli.cli import main
from seedselect_cli.errors import UserError
from seedselect_cli.files.seed_files import load_seed_file, save_seed_file
from seedselect_cli.pipeline import evaluate_command
from tests.conftest import make_config
from tests.runs import QUICK, forked, read_manifest, seedselect

TINY = "--config-name=tiny"  # the random tiny components: the default config is the toy world
FAST = QUICK
MANIFEST_KEYS = {"class", "prompt", "image", "seed_file", "index", "init_seed", "iterations", "loss",
                 "loss_history", "semantic_loss", "appearance_loss", "seconds"}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`seedselect optimize` in a process of its own, its progress on, its output pipes (as a cluster job's log).
    Forked: the generate below that redraws its image pixel for pixel is a new Python's, as a user starts it."""
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    run_dir = elsewhere / "run"
    done = forked("optimize", TINY, f"hydra.run.dir={run_dir}", "n_images=2", *FAST[:-1], "runtime.progress=true",
                  cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    return run_dir, elsewhere, done


@pytest.mark.slow
def test_optimize_writes_the_run_directory_of_the_contract(demo_run):
    run_dir, *_ = demo_run
    assert (run_dir / "config.yaml").is_file()
    entries = read_manifest(run_dir)
    assert [e["index"] for e in entries] == [0, 1]
    for entry in entries:
        assert MANIFEST_KEYS <= entry.keys() and entry["class"] == "red_disc"
        assert entry["image"] == f"images/red_disc/{entry['index']:05d}.png"
        assert entry["seed_file"] == f"seeds/red_disc/{entry['index']:05d}.safetensors"
        assert len(entry["loss_history"]) == entry["iterations"] == 2
        image = Image.open(run_dir / entry["image"])
        assert image.size == (32, 32) and "a photo of a red disc" in image.text["parameters"]
        assert json.loads(image.text["seedselect"])["init_seed"] == str(entry["init_seed"])
        with safe_open(str(run_dir / entry["seed_file"]), framework="pt") as handle:
            meta = handle.metadata()
            for key in ("initial", "optimized"):
                tensor = handle.get_tensor(key)
                assert tensor.dtype.is_floating_point and tensor.dtype.itemsize == 4 and tuple(tensor.shape) == (4, 16, 16)
        for key in ("prompt", "model", "steps", "guidance_scale", "height", "width", "scheduler", "dtype"):
            assert meta[key], key
    assert entries[0]["init_seed"] != entries[1]["init_seed"]


@pytest.mark.slow
def test_generate_reproduces_the_image_pixel_for_pixel(demo_run, capsys, monkeypatch):
    run_dir, elsewhere, _ = demo_run
    entry = read_manifest(run_dir)[1]
    done = seedselect("generate", f"seed_file={run_dir / entry['seed_file']}", "out=again.png", cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    again = np.asarray(Image.open(elsewhere / "again.png"))
    assert np.array_equal(again, np.asarray(Image.open(run_dir / entry["image"])))
    # the run's own device, dtype, torch and threads: nothing to warn of (one process or several, `-n 0`)
    assert not re.search(r"the seed's run drew|in the seed's run", done.stdout), done.stdout
    with Image.open(elsewhere / "again.png") as image:  # the text chunks a run's image has, but the loss
        assert image.info["parameters"].startswith(entry["prompt"]) and "SeedSelect loss" not in image.info["parameters"]
    # the rest in this process (`main`): a process of its own is checked above
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["generate", f"seed_file={run_dir / entry['seed_file']}", "out=half.png", "runtime.dtype=bfloat16"]) == 0
    assert "drawing in bfloat16 on cpu; the seed's run drew in float32 on cpu" in capsys.readouterr().out
    assert main(["generate", f"seed_file={run_dir / entry['seed_file']}", "out=plain.png", "tensor=initial"]) == 0
    assert not np.array_equal(np.asarray(Image.open(elsewhere / "plain.png")), again)
    # a seed drawn with another torch: said, since kernels may round differently (here they do not: same pixels)
    seed = load_seed_file(run_dir / entry["seed_file"])
    assert seed.metadata["torch_version"] == torch.__version__ and seed.metadata["diffusers_version"]
    save_seed_file(elsewhere / "old.safetensors", seed.initial, seed.optimized,
                   {**seed.metadata, "torch_version": "2.1.0"})
    capsys.readouterr()
    assert main(["generate", "seed_file=old.safetensors", "out=old.png"]) == 0
    assert f"drawing with torch {torch.__version__} here, 2.1.0 in the seed's run" in capsys.readouterr().out
    assert np.array_equal(np.asarray(Image.open(elsewhere / "old.png")), again)
    assert not (elsewhere / ".hydra").exists()


@pytest.mark.slow
def test_rerun_resumes_and_completes(demo_run, monkeypatch):
    run_dir, elsewhere, _ = demo_run
    first = [(run_dir / e["image"]).read_bytes() for e in read_manifest(run_dir)]
    monkeypatch.chdir(elsewhere)  # in this process (`main`): optimize in a process of its own made the run
    assert main(["optimize", TINY, f"hydra.run.dir={run_dir}", "n_images=3", *FAST]) == 0
    entries = read_manifest(run_dir)
    assert [e["index"] for e in entries] == [0, 1, 2]
    assert [(run_dir / e["image"]).read_bytes() for e in entries[:2]] == first


@pytest.mark.slow
def test_bad_value_through_the_console_script(tmp_path):
    done = seedselect("optimize", "loss.lam=2", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("error: loss.lam=2.0 is invalid") and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_help(capsys):
    assert main(["--help"]) == 0
    assert "optimize" in capsys.readouterr().out
    done = seedselect("optimize", "--help", cwd=os.getcwd())
    assert done.returncode == 0 and "seedselect optimize" in done.stdout and "dataset: cifar_fs, cub, folder, imagefolder, imagenet_lt, mini_imagenet" in done.stdout


def test_help_version_and_an_unknown_command_are_answered_without_importing_torch_or_hydra():
    """The console script's entry answers them in a tenth of a second: importing torch and Hydra took 2 s."""
    script = ("import sys; from seedselect_cli.entry import main\n"
              "codes = [main(['--help']), main(['--version']), main([]), main(['optimise'])]\n"
              "heavy = sorted(m for m in ('torch', 'hydra', 'diffusers', 'transformers') if m in sys.modules)\n"
              "print(codes, heavy)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[0, 0, 0, 2] []"
    assert done.stdout.startswith("usage: seedselect COMMAND") and f"seedselect {seedselect_cli.__version__}\n" in done.stdout
    assert done.stderr.startswith("error: unknown command 'optimise': did you mean optimize? choose one of optimize, "
                                  "bootstrap, generate, evaluate")


@pytest.mark.parametrize("command, line", [
    ("evaluate", "seedselect evaluate run_dir=RUN 'judge.model=${asset:toyworld/judge}'"),
    ("generate", "seedselect generate seed_file="),
])
def test_tool_help_prints_its_examples_as_typed(command, line, capsys):
    """The help text goes through OmegaConf and string.Template: a `${...}` a user types must come out whole."""
    assert main([command, "--help"]) == 0
    assert line in capsys.readouterr().out


def test_help_names_every_named_config():
    """`seedselect optimize --help` lists the named configs: each file of configs/ that is one, and no other."""
    configs = Path(seedselect_cli.__file__).parent / "configs"
    named = {p.stem for p in configs.glob("*.yaml") if not p.stem.startswith("_")}
    header = yaml.safe_load((configs / "hydra" / "help" / "seedselect.yaml").read_text())["header"]
    sentence = header.split("Named configs:")[1].split(".\n")[0]
    listed = {re.sub(r"\s*\(.*", "", part).strip() for part in re.sub(r"\([^)]*\)", "", sentence).split(",")}
    assert listed == named


@pytest.mark.parametrize("args, message", [  # the rest of the bad values: tests/test_bad_input.py
    (["optimize", "--config-name", "folder"], "dataset.root is required"),
    (["optimize", "dataset.root=/no/such/folder"], "/no/such/folder"),
    (["generate", "out=x.png"], "seed_file is required"),
    (["generate"], ("seed_file and out are required: pass seed_file=RUN/seeds/<class>/<index>.safetensors "
                    "out=IMAGE.png")),  # in the order `--help` lists them
])
def test_user_errors_exit_2_with_one_line(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args + ["runtime.progress=false"] * (args[0] == "optimize")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("args, message", [
    (["optimize", "-m", "seed=0,1", "loss.lam=0.5,0.9,9"], "loss.lam=9.0 is invalid: must be between 0 and 1"),
    (["optimize", "-m", "dataset.classes=[marsh finch],[nope]"], "dataset.classes: no class named 'nope'"),
    (["bootstrap", "-m", "runtime.shard=0/2,1/2,2/2"], "runtime.shard='2/2' is invalid"),
    (["generate", "-m", "seed_file=a.safetensors,b.safetensors", "out=x.png"], "seed_file=a.safetensors does not"),
])
def test_a_sweeps_bad_value_is_one_line_before_any_job_runs(args, message, capsys, tmp_path, monkeypatch):
    """A sweep ran its jobs one after another until one met its slip (the third value of loss.lam after two whole
    runs; on Slurm, every job of the array queued and failing). Each value is now checked first."""
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and message in line, line
    assert not list(tmp_path.iterdir())  # no multirun/ folder: no job started


def test_a_slurm_sweep_is_checked_for_its_values_not_for_the_files_of_its_nodes(tmp_path, monkeypatch):
    """A Slurm array is submitted from a login node that may not see the nodes' scratch, where its data set and
    weights are, nor has the environment of a job (SLURM_TMPDIR): there only the values are checked, those that do
    not read the nodes' environment; on this machine (Hydra's own launcher, submitit's local one) the files too.
    Without Slurm's sbatch on the PATH a Slurm sweep is one line (before: submitit's traceback)."""
    from seedselect_cli.preflight import preflight

    sweep = ["-m", "--config-name", "cub_tail", f"dataset.root={tmp_path / 'scratch'}", "model.pretrained=/scratch/sd",
             "runtime.shard=0/2,1/2"]
    with pytest.raises(UserError, match=r"^hydra/launcher=slurm submits the sweep's jobs with Slurm's sbatch, which "
                                        r"is not on this machine's PATH: run the command on the cluster's login node"):
        preflight("bootstrap", [*sweep, "hydra/launcher=slurm"], "demo")
    login_node = tmp_path / "bin"
    login_node.mkdir()
    (login_node / "sbatch").write_text("#!/bin/sh\nexit 1\n")
    (login_node / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{login_node}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("SLURM_TMPDIR", raising=False)
    assert preflight("bootstrap", [*sweep, "hydra/launcher=slurm"], "demo") is None
    assert preflight("bootstrap", [*sweep, "hydra/launcher=slurm", "runtime.cache_dir=${oc.env:SLURM_TMPDIR}/c"],
                     "demo") is None  # a job's own environment
    with pytest.raises(UserError, match=r"^runtime.cache_dir reads the environment variable SLURM_TMPDIR, which is "
                                        r"not set here: set it \(export SLURM_TMPDIR=...\) or give it a default"):
        preflight("bootstrap", ["--config-name", "tiny", "runtime.cache_dir=${oc.env:SLURM_TMPDIR}/c"], "demo")
    with pytest.raises(UserError, match=r"loss.lam=9.0 is invalid"):
        preflight("bootstrap", [*sweep, "hydra/launcher=slurm", "loss.lam=0.5,9"], "demo")
    for local in ([], ["hydra/launcher=local"]):
        with pytest.raises(UserError, match=r"/scratch/sd does not exist|scratch is not an existing folder"):
            preflight("bootstrap", [*sweep, *local], "demo")


def test_a_sweep_is_checked_in_one_job_per_value_not_in_every_job():
    from seedselect_cli.preflight import sweep_jobs

    assert sweep_jobs(["seed=0,1,2", "loss.lam=0.5,0.9", "n_images=2"]) == ([
        ["seed=0", "loss.lam=0.5", "n_images=2"], ["seed=0", "loss.lam=0.9", "n_images=2"],
        ["seed=1", "loss.lam=0.5", "n_images=2"], ["seed=2", "loss.lam=0.5", "n_images=2"]], 6)
    classes = ",".join(f"[class {i}]" for i in range(200))
    jobs, every = sweep_jobs([f"dataset.classes={classes}", "runtime.shard=0/4,1/4,2/4,3/4"])
    assert (len(jobs), every) == (203, 800)
    assert sweep_jobs(["hydra/sweeper=optuna", "seed=0,1"]) == ([], 0)  # another sweeper makes its own jobs


@pytest.mark.parametrize("launcher", ["hydra/launcher=slurm", "hydra/launcher=local", "+hydra/launcher=submitit_slurm"])
def test_a_cluster_sweep_without_the_submitit_launcher_says_what_to_install(launcher, capsys, tmp_path, monkeypatch):
    """The plain install leaves out hydra-submitit-launcher (the cluster extra); a sweep on its launchers said
    Hydra's "Could not load 'hydra/launcher/submitit_slurm'" and its config search path, exit 1."""
    from seedselect_cli import preflight

    assert preflight.submitit_launcher_installed()  # the test extra has it: what the check looks for is there
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(preflight, "submitit_launcher_installed", lambda: False)
    assert main(["bootstrap", "-m", launcher, "runtime.shard=0/2,1/2"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.endswith("runs through Hydra's submitit launcher, which is not installed here: pip install "
                         "hydra-submitit-launcher (seedselect's cluster extra)")
    assert not list(tmp_path.iterdir())


def test_every_commands_bad_values_are_answered_before_diffusers_loads(tmp_path):
    """The one-line errors of each command's values, and of the seed file, run and weights folders it names (and of
    a run directory holding another config), come from its checks alone: diffusers (with torch._dynamo and every
    model class it imports, about 4.5 s of a command's start here) is not imported before them, nor torch (2 s more:
    a bad value was answered in 3.1 s, 1.1 s without it)."""
    cases = {("generate", "seed_file=s.safetensors", "out=x.png"): "seed_file=s.safetensors does not exist",
             ("generate", "seed_file=.", "out=x.png"): "seed_file=. is a folder without seed files",
             ("evaluate", "run_dir=r"): "run_dir=r is not a seedselect run directory",
             ("evaluate", "run_dir=r", "top_k=0"): "top_k=0 is invalid",
             ("optimize", "n_images=0"): "n_images=0 is invalid",
             ("bootstrap", "bootstrap.n_images=0"): "bootstrap.n_images=0 is invalid",
             ("optimize", "model.image_encoder=./no/clip"): "the CLIP image encoder folder ./no/clip does not exist",
             ("generate", "seed_file=s.safetensors", "out=x.png", "model=./no/sd"): "model folder ./no/sd does not",
             ("evaluate", "run_dir=run", "judge.model=./no/judge"): "the judge (an image-classification model) "
                                                                     "folder ./no/judge does not exist"}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("seed: 0\n")  # a run directory, to the check of judge.model=
    from seedselect_cli.config import compose_config, to_yaml

    (tmp_path / "old").mkdir()  # an earlier run of the demo with 1 iteration
    (tmp_path / "old" / "config.yaml").write_text(to_yaml(compose_config("demo", ["optim.iterations=1"])))
    cases[("optimize", "hydra.run.dir=old")] = "old holds a run made with another config (optim.iterations: 1 there"
    script = ("import sys; from seedselect_cli.cli import main\n"
              f"for args in {list(map(list, cases))!r}:\n"
              "    assert main(args) == 2, args\n"
              "    assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers')], args\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, check=False, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == len(cases) and all(m in line for m, line in zip(cases.values(), lines)), lines


@pytest.mark.slow
def test_generate_redraws_a_folder_of_seeds_as_the_runs_images_and_goes_on_after_a_stop(demo_run, tmp_path, capsys,
                                                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)  # in this process (`main`): generate in a process of its own is checked above
    run_dir = tmp_path / "run"
    shutil.copytree(demo_run[0], run_dir)
    entries = read_manifest(run_dir)
    capsys.readouterr()
    assert main(["generate", f"seed_file={run_dir / 'seeds'}", "out=again"]) == 0
    done = capsys.readouterr()
    for entry in entries:  # OUT mirrors RUN/images
        drawn = tmp_path / "again" / Path(entry["image"]).relative_to("images")
        assert np.array_equal(np.asarray(Image.open(drawn)), np.asarray(Image.open(run_dir / entry["image"])))
    n = len(entries)
    assert f"drawing {n} images into again\n" in done.out  # said before the models load
    assert f"drew {n} images into again; {n} of {n} are pixel for pixel the run's images" in done.out
    # a stop half-way, then the same command: only what is missing is drawn; a damaged seed file stops it, one line
    (tmp_path / "again" / Path(entries[0]["image"]).relative_to("images")).unlink()
    (run_dir / "seeds" / "red_disc" / "zzzzz.safetensors").write_bytes(b"not a seed file")
    assert main(["generate", f"seed_file={run_dir / 'seeds'}", "out=again"]) == 2
    done = capsys.readouterr()
    [line] = done.err.strip().splitlines()
    assert line.startswith("error: seed_file=") and "zzzzz.safetensors" in line and "stay in again" in line
    assert f"{n - 1} of the {n + 1} images are already in again; drawing the other 2" in done.out
    assert len(list((tmp_path / "again").rglob("*.png"))) == n
    (run_dir / "seeds" / "red_disc" / "zzzzz.safetensors").unlink()
    # into the run's own folders: refused, for one seed as for a folder of them, and nothing there is touched
    image = run_dir / entries[0]["image"]
    before = image.read_bytes()
    capsys.readouterr()
    for seed_file, out in ((run_dir / entries[0]["seed_file"], image), (run_dir / "seeds", run_dir / "images")):
        assert main(["generate", f"seed_file={seed_file}", f"out={out}", "tensor=initial"]) == 2
        assert capsys.readouterr().err.startswith(f"error: out={out} is in {run_dir / 'images'}, which holds the "
                                                  f"run's own files")
    assert image.read_bytes() == before
    # ... but the run's own images of its own seeds, drawn as the run drew them, are a repair: allowed
    assert main(["generate", f"seed_file={run_dir / 'seeds'}", f"out={run_dir / 'images'}"]) == 0
    assert f"every image is already in {run_dir / 'images'} ({n})" in capsys.readouterr().out
    assert main(["generate", f"seed_file={run_dir}", "out=again"]) == 0  # the run directory: its seeds
    assert f"every image is already in again ({n})" in capsys.readouterr().out
    # one class's seeds in another dtype: compared with that class's images, and the ones that differ named
    assert main(["generate", f"seed_file={run_dir / 'seeds' / 'red_disc'}", "out=half", "runtime.dtype=bfloat16"]) == 0
    out = capsys.readouterr().out
    assert f"0 of {n} are pixel for pixel the run's images in {run_dir / 'images' / 'red_disc'}" in out
    assert "not pixel for pixel the run's: 00000.png, 00001.png" in out


@pytest.mark.slow
def test_generate_on_a_cpu_draws_with_the_threads_the_seeds_run_drew_with(tmp_path, monkeypatch, capsys):
    """Another thread count sums in another order, and a pixel can differ by one. A seed file drawn on a CPU records
    its threads, and `generate` takes them unless OMP_NUM_THREADS says. In this process (`main`), each command's
    OMP_NUM_THREADS and the threads torch starts with set as a new process's would be: three processes cost 30 s."""
    from seedselect_cli import devices

    threads = torch.get_num_threads()
    monkeypatch.setattr(devices, "_threads_fitted", [True])  # as where OMP_NUM_THREADS is set, or cores are free
    monkeypatch.setattr(devices, "_threads_said", set())
    monkeypatch.chdir(tmp_path)
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        torch.set_num_threads(2)
        assert main(["optimize", TINY, "hydra.run.dir=run", "n_images=1", *FAST]) == 0
        [entry] = read_manifest(tmp_path / "run")
        assert load_seed_file(tmp_path / "run" / entry["seed_file"]).metadata["cpu_threads"] == "2"
        monkeypatch.delenv("OMP_NUM_THREADS")
        torch.set_num_threads(1)  # the generating process's own count, not the run's
        capsys.readouterr()
        assert main(["generate", f"seed_file=run/{entry['seed_file']}", "out=again.png"]) == 0
        assert "drawing with 2 CPU threads, as the seed's run did" in capsys.readouterr().out
        assert torch.get_num_threads() == 2  # (here 1 and 2 threads happen to draw the same pixels)
        assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png")),
                              np.asarray(Image.open(tmp_path / "run" / entry["image"])))
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        capsys.readouterr()
        assert main(["generate", f"seed_file=run/{entry['seed_file']}", "out=one.png"]) == 0
        assert "drawing with 1 CPU thread (OMP_NUM_THREADS); the seed's run drew with 2" in capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_generate_replaces_only_images_seedselect_drew(demo_run, tmp_path, capsys, monkeypatch):
    """`out=` naming a file that is not seedselect's (a reference, a photo) is refused, and the file kept; an image
    generate drew, in any format (JPEG and WebP keep the seed's metadata in EXIF), is replaced, as is a run's damaged
    image redrawn as its run drew it (the repair evaluate prints)."""
    from seedselect_cli.files.images import seedselect_metadata

    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    shutil.copytree(demo_run[0], run_dir)
    [entry, *_] = read_manifest(run_dir)
    seed = f"seed_file={run_dir / entry['seed_file']}"
    Image.new("RGB", (8, 8), "red").save(tmp_path / "photo.png")
    photo = (tmp_path / "photo.png").read_bytes()
    assert main(["generate", seed, "out=photo.png"]) == 2
    assert "error: out=photo.png exists and is not an image seedselect drew" in capsys.readouterr().err
    assert (tmp_path / "photo.png").read_bytes() == photo
    for name in ("a.png", "a.jpg", "a.webp"):
        assert main(["generate", seed, f"out={name}"]) == 0
        assert json.loads(seedselect_metadata(tmp_path / name))["prompt"] == entry["prompt"]
        assert main(["generate", seed, f"out={name}", "tensor=initial"]) == 0  # its own: replaced
        assert json.loads(seedselect_metadata(tmp_path / name))["tensor"] == "initial"
    damaged = run_dir / entry["image"]
    damaged.write_bytes(damaged.read_bytes()[:50])
    assert main(["generate", seed, f"out={damaged}"]) == 0
    assert np.array_equal(np.asarray(Image.open(damaged)), np.asarray(Image.open(demo_run[0] / entry["image"])))


def test_generate_of_a_folder_wants_a_folder_with_seeds(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "seeds").mkdir()
    assert main(["generate", "seed_file=seeds", "out=images"]) == 2
    assert capsys.readouterr().err.startswith("error: seed_file=seeds is a folder without seed files (.safetensors)")
    assert not (tmp_path / "images").exists()
    (tmp_path / "seeds" / "a.safetensors").write_bytes(b"")  # a seed file, to the check of out= (not read)
    for name in ("image.png", "image.GIF"):  # any image's name, not only the ones generate writes
        assert main(["generate", "seed_file=seeds", f"out={name}"]) == 2
        assert capsys.readouterr().err.startswith(f"error: out={name} names a file, but seed_file=seeds is a folder")
    assert not list(tmp_path.glob("image*"))


def test_generate_rejects_a_file_that_is_not_a_seed_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fake.safetensors").write_bytes(b"not safetensors at all")
    assert main(["generate", "seed_file=fake.safetensors", "out=x.png"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: seed_file=fake.safetensors is not a safetensors seed file")
    assert not (tmp_path / "x.png").exists()


def test_folder_of_non_images_is_a_user_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "refs").mkdir()
    (tmp_path / "refs" / "a.png").write_text("not a png")
    assert main(["optimize", TINY, "dataset.root=refs", "hydra.run.dir=run", *FAST]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: class 'refs' has 0 readable images") and "a.png" in err
    assert not (tmp_path / "run" / "manifest.jsonl").exists()


@pytest.mark.slow
def test_paths_are_read_from_where_the_command_was_started_also_when_hydra_changes_into_the_run(
        tmp_path, reference_folder, monkeypatch):
    """With hydra.job.chdir=true (Hydra 1.1's default, kept in many users' configs) the job runs inside its run
    directory; dataset.root, dataset.classes_file and dataset.heldout typed relative to where the command started
    still name the same folders, and RUN/config.yaml names them absolutely."""
    monkeypatch.chdir(tmp_path)  # the references are in refs/blue_thing
    Path("classes.txt").write_text("blue thing\n")
    Path("held/blue thing").mkdir(parents=True)
    assert main(["optimize", TINY, *FAST, "n_images=1", "init.candidates=1", "dataset.root=refs/blue_thing",
                 "dataset.classes_file=classes.txt", "dataset.heldout=held", "hydra.run.dir=run",
                 "hydra.job.chdir=true"]) == 0
    saved = yaml.safe_load(Path("run/config.yaml").read_text())["dataset"]
    assert (saved["root"], saved["heldout"]) == (str(reference_folder), str(tmp_path / "held"))
    assert saved["classes"] == ["blue thing"] and saved["classes_file"] is None
    assert Path.cwd() == tmp_path and len(read_manifest(tmp_path / "run")) == 1


@pytest.mark.slow
def test_a_stopped_evaluate_keeps_its_plain_images_and_the_same_command_goes_on(demo_run, tmp_path, monkeypatch,
                                                                                   capsys):
    """Drawing plain Stable Diffusion for a bulk run's images takes long; Ctrl-C keeps the ones drawn (RUN/baseline)
    and says so, and the same command draws the rest."""
    import signal

    import seedselect_cli.evaluate as evaluate_module

    run_dir = tmp_path / "run"
    shutil.copytree(demo_run[0], run_dir, ignore=shutil.ignore_patterns("baseline", "report"))
    monkeypatch.chdir(tmp_path)
    real = evaluate_module.atomic_write

    def interrupted(path, write):
        real(path, write)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C after the first plain image

    monkeypatch.setattr(evaluate_module, "atomic_write", interrupted)
    assert main(["evaluate", "run_dir=run", "batch_size=1"]) == 130
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line == ("seedselect: stopped by SIGINT; the plain images drawn are kept for the next evaluate: run the "
                    "same command again to go on")
    assert len(list((run_dir / "baseline").rglob("*.png"))) == 1 and not (run_dir / "report").exists()
    monkeypatch.setattr(evaluate_module, "atomic_write", real)
    n = len(read_manifest(run_dir))
    assert main(["evaluate", "run_dir=run", "batch_size=1"]) == 0
    assert "kept for the next evaluate (1 already there;" in capsys.readouterr().out
    assert len(list((run_dir / "baseline").rglob("*.png"))) == n


@pytest.mark.slow
@pytest.mark.parametrize("made", [ValueError, RuntimeError])
def test_ctrl_c_inside_a_library_that_makes_an_error_of_it_is_said_as_the_stop(made, demo_run, tmp_path, monkeypatch,
                                                                              capsys):
    """Ctrl-C while safetensors read a seed file: the stop, raised by the handler inside the reader's native code,
    came back as the reader's own ValueError ("could not determine the shape of object type
    'torch.storage.UntypedStorage'", seen once in the suite), and generate said the user's seed file was not a seed
    file, with exit code 2. The command now says the stop, whatever error a library made of it."""
    import signal

    import safetensors.torch

    from seedselect_cli.interrupt import StopNow

    monkeypatch.chdir(tmp_path)
    real = safetensors.torch.load_file

    def interrupted(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGINT)  # the handler raises StopNow here, inside the "library"
            time.sleep(1)
        except StopNow:
            raise made("could not determine the shape of object type 'torch.storage.UntypedStorage'") from None
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "load_file", interrupted)
    capsys.readouterr()
    assert main(["generate", f"seed_file={demo_run[0] / 'seeds'}", "out=again"]) == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        "seedselect: stopped by SIGINT; the images drawn are kept: run the same command again to go on"]
    # the next command starts without that stop: a damaged seed file is its one error line again, exit code 2
    monkeypatch.setattr(safetensors.torch, "load_file", real)
    (tmp_path / "bad.safetensors").write_bytes(b"not a seed file")
    assert main(["generate", "seed_file=bad.safetensors", "out=x.png"]) == 2
    assert capsys.readouterr().err.startswith("error: seed_file=")


def test_real_model_offline_without_weights_is_one_line(tmp_path, reference_folder, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["optimize", "--config-name", "folder", f"dataset.root={reference_folder}",
                 "model.pretrained=no-such-org/no-such-model", "runtime.progress=false"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [err.strip()], err
    assert err.startswith("error: the Stable Diffusion model 'no-such-org/no-such-model' is not (wholly) in "
                          "the Hugging Face cache")
    assert not (tmp_path / "outputs").exists()  # the run's folder taken back


@pytest.mark.slow
def test_evaluate_writes_the_report_of_a_demo_run(demo_run, monkeypatch, capsys):
    run_dir, elsewhere, _ = demo_run
    monkeypatch.chdir(elsewhere)  # in this process (`main`): optimize and generate are run as processes above
    capsys.readouterr()
    assert main(["evaluate", f"run_dir={run_dir}"]) == 0
    out = capsys.readouterr().out
    assert "plain" in out and "SeedSelect" in out and "beside real images" in out
    for name in ("metrics.json", "index.html", "loss.png", "sheets/red_disc.png"):
        assert (run_dir / "report" / name).is_file(), name
    assert main(["evaluate", f"run_dir={elsewhere / 'nothing'}"]) == 2
    assert capsys.readouterr().err.startswith("error: run_dir=")


@pytest.mark.slow
def test_the_next_command_a_run_prints_runs_as_printed(tmp_path, monkeypatch, capsys):
    """The last line of `optimize` is the `evaluate` command for its run, quoted for a shell and for Hydra (a folder
    with a space, an apostrophe and parentheses, which Hydra reads only in its own quotes)."""
    monkeypatch.chdir(tmp_path)  # in this process (`main`): commands in processes of their own are checked above
    assert main(["optimize", TINY, *FAST, "n_images=1", "hydra.run.dir=\"my run's (1)\""]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("next, the metrics and contact sheets: seedselect evaluate ")
    program, command, *args = shlex.split(line.split(": ", 1)[1])
    assert (program, command) == ("seedselect", "evaluate")
    assert main([command, *args, "baseline=false"]) == 0
    assert (tmp_path / "my run's (1)" / "report" / "metrics.json").is_file()


def test_a_toy_world_run_is_told_to_evaluate_with_the_toy_judge():
    """...and among all of the world's concepts where its data set holds them all (a folder of one concept does not)."""
    from seedselect_cli.files.assets import asset_path

    among_all = " 'judge.model=${asset:toyworld/judge}' dataset_classes=true"
    assert evaluate_command(make_config(name="demo"), Path("r")).endswith(among_all)
    assert evaluate_command(make_config(name="toyworld_turbo"), Path("r")).endswith(among_all)
    refs = Path(asset_path("toyworld/references")) / "marsh finch"
    assert evaluate_command(make_config(["dataset=folder", f"dataset.root='{refs}'"], name="demo"), Path("r")).endswith(
        " 'judge.model=${asset:toyworld/judge}'")
    assert evaluate_command(make_config(), Path("a b")) == "seedselect evaluate run_dir='a b'"


@pytest.mark.parametrize("args", [["optimize", "loss.lam=0.5", "--cfg", "job"],
                                  ["optimize", "--cfg", "job", "loss.lam=0.5"],
                                  ["evaluate", "run_dir=x", "--cfg", "job"]])
def test_hydra_options_before_or_after_the_overrides(args, capsys):
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "lam: 0.5" in out or "run_dir: x" in out


@pytest.mark.slow
def test_a_reader_that_goes_away_ends_hydras_answers_quietly(tmp_path):
    """`seedselect optimize --info | head -2`: Hydra logs its --info, and each line logged after the reader had gone
    was said with a traceback of its own on stderr (2,642 lines); `--help | head` and `--cfg job | head` print, and
    end quietly too. Exit 0, nothing on stderr."""
    for args in (["optimize", "--info"], ["optimize", "--help"], ["optimize", "--cfg", "job"]):
        proc = subprocess.Popen([sys.executable, "-m", "seedselect_cli", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline()  # the first line, then the reader goes, as `head -1` does
        proc.stdout.close()
        err = proc.stderr.read()
        assert proc.wait(timeout=120) == 0 and err == "", (args, err[:2000])


@pytest.mark.parametrize("args", [["optimize", "--info"], ["bootstrap", "--config-name", "tiny", "--info"],
                                  ["optimize", "--info", "defaults"], ["optimize", "loss.lam=0.5", "--info"]])
def test_hydras_info_answers_alone_and_beside_overrides(args, tmp_path, monkeypatch, capsys):
    """`--info` takes an optional value: the command's own `hydra.job.name=...` put after it was read as that
    value (`invalid choice: 'hydra.job.name=optimize'`, exit 2). It answers, and writes nothing."""
    import logging

    monkeypatch.chdir(tmp_path)
    handlers, level = list(logging.root.handlers), logging.root.level
    try:
        assert main(args) == 0, capsys.readouterr().err
    finally:  # Hydra's --info leaves the root logger at DEBUG, printing to this test's stderr: the process ends there
        logging.root.handlers[:] = handlers
        logging.root.setLevel(level)
    out = capsys.readouterr().out
    assert ("Defaults List" if "defaults" in args else "Installed Hydra Plugins") in out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_seeds_and_runs_travel_to_another_folder_and_install(tmp_path, monkeypatch):
    """A toy-world run records the package's assets as asset:..., not as this install's path: moved to
    another folder, and with the assets somewhere else, generate redraws its image pixel for pixel and
    evaluate reads it; a seed file of a local folder takes model= for where its weights are now."""
    import seedselect_cli.files.assets as assets_module
    import seedselect_cli.generate as generate_module
    from seedselect_cli.cli import main
    from seedselect_cli.files.assets import asset_path

    monkeypatch.chdir(tmp_path)
    assert main(["optimize", "n_images=1", "optim.iterations=2", "init.candidates=2", "runtime.progress=false",
                 "hydra.run.dir=a/run"]) == 0  # 2 starts, not the default's 16: the test is of where files are
    install = asset_path("")
    for path in (tmp_path / "a" / "run").rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".jsonl", ".safetensors"):
            assert install.encode() not in path.read_bytes(), path
    shutil.move(tmp_path / "a" / "run", tmp_path / "moved")
    elsewhere = tmp_path / "env2" / "assets"
    shutil.copytree(install, elsewhere, ignore=shutil.ignore_patterns("heldout", "judge", "*.tsv"))
    (elsewhere / "toyworld" / "heldout").mkdir()  # there, but empty: evaluate need not read 1,280 real images here
    monkeypatch.setattr(assets_module, "asset_path", lambda relative: str(elsewhere / relative))
    loaded = []
    real_load = generate_module.load_models
    monkeypatch.setattr(generate_module, "load_models", lambda cfg, *a, **k: loaded.append(cfg.pretrained)
                        or real_load(cfg, *a, **k))
    [entry] = read_manifest(tmp_path / "moved")
    assert main(["generate", f"seed_file=moved/{entry['seed_file']}", "out=again.png"]) == 0
    assert loaded == [str(elsewhere / "toyworld")]
    assert np.array_equal(np.asarray(Image.open("again.png")), np.asarray(Image.open(tmp_path / "moved" / entry["image"])))
    assert main(["evaluate", "run_dir=moved", "baseline=false"]) == 0
    metrics = json.loads((tmp_path / "moved" / "report" / "metrics.json").read_text())
    assert metrics["clip"] == str(elsewhere / "toyworld" / "clip")
    assert main(["generate", f"seed_file=moved/{entry['seed_file']}", "out=local.png",
                 f"model={os.path.join(install, 'toyworld')}"]) == 0
    assert loaded[-1] == os.path.join(install, "toyworld")


@pytest.mark.slow
def test_progress_written_to_a_file_is_lines_not_bars(demo_run):
    """stdout and stderr are pipes there, as in a cluster job's log: the progress is logged in lines, without cursor
    codes or carriage returns."""
    done = demo_run[2]
    assert re.search(r"\[INFO\] - red_disc: 2/2 images \(2 new\), [\d.]+ s/image, loss", done.stdout), done.stdout
    for stream in (done.stdout, done.stderr):
        assert "\x1b[" not in stream and "\r" not in stream


def test_the_quoting_an_unreadable_override_is_shown_with_reads_back_in_a_shell(capsys):
    """The hint of an unreadable override is pasted into a shell: the shell must hand Hydra an override it reads,
    with apostrophes ("Brewer's Blackbird"), double quotes, `$`, backslashes and backquotes as typed; and so must
    every `key=value` of the commands the tool prints (`override_arg`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from seedselect_cli.shell import for_the_shell, override_arg

    def shell_echo(words: str) -> str:  # what a POSIX shell makes of `words` typed as one argument
        return subprocess.run(["sh", "-c", f"printf %s {words}"], check=True, capture_output=True, text=True).stdout

    for text in ['dataset.classes=["Café"]', 'dataset.classes=["Black-footed Albatross","Brewer\'s Blackbird"]',
                 'sampler.negative_prompt="it\'s \\"bad\\" $HOME `x` \\\\"']:
        assert shell_echo(for_the_shell(text)) == text, (text, for_the_shell(text))
    for value in ("/runs/a", "/runs/my run", "/runs/my run's (1)", "/runs/[a],b", 'a"b\\', "/runs/Café~", "x=y",
                  "C:\\runs\\my run (1)"):  # a backslash inside Hydra's quotes is kept as it is
        word = override_arg("run_dir", value)  # the commands the tool prints: one word, read back as typed
        assert OverridesParser.create().parse_override(shell_echo(word)).value() == value, (value, word)
    assert override_arg("run_dir", "/runs/my run") == "run_dir='/runs/my run'"  # Hydra reads it as it is
    assert main(["optimize", "dataset.classes=[Black-footed Albatross,Brewer's Blackbird]"]) == 2
    hint = re.search(r"e\.g\. (.*) \(the outer quotes", capsys.readouterr().err).group(1)
    assert OverridesParser.create().parse_override(shell_echo(hint)).value() == ["Black-footed Albatross", "Brewer's Blackbird"]


def test_a_value_the_shell_split_at_its_spaces_is_named_and_quoted_whole(capsys, tmp_path, monkeypatch):
    """`dataset.classes=[sea gull]` typed unquoted reaches seedselect as two words; the hint quotes the value the
    user typed, not its first word, and the quoted hint reads back as that value; nothing is written."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    monkeypatch.chdir(tmp_path)
    typed = {"dataset.classes=[Pine Warbler,sea gull]": ["Pine Warbler", "sea gull"],
             "dataset.prompt_template=a photo of {}": "a photo of {}",
             "hydra.run.dir=my run": "my run"}
    for line, value in typed.items():
        words = line.split(" ")
        assert main(["optimize", "n_images=2", *words, "seed=3"]) == 2
        [error] = capsys.readouterr().err.strip().splitlines()
        assert error.startswith(f"error: cannot read the overrides {' '.join(map(repr, words))}: the shell split "
                                f"{line} at its spaces into {len(words)} words; quote it, e.g. "), error
        hint = re.search(r"e\.g\. (.*) \(the outer quotes", error).group(1)
        assert OverridesParser.create().parse_override(shlex.split(hint)[0]).value() == value
    assert main(["optimize", "dataset.classes=[Café]"]) == 2  # one word: no split to speak of
    assert "cannot read the override 'dataset.classes=[Café]': values with spaces" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_folder_of_ones_own_configs_is_checked_as_the_package_s(tmp_path, capsys, monkeypatch):
    """`--config-dir DIR`: the user's configs (building on a named one) are checked before anything runs, as the
    package's are (they were not checked at all), and a near miss of their names is suggested; a relative
    `--config-path`, which Hydra reads inside the package, says to use --config-dir."""
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "my_configs"
    mine.mkdir()
    (mine / "exp1.yaml").write_text("defaults:\n  - tiny\n  - _self_\nn_images: 1\nsampler:\n  steps: 3\n"
                                    "optim:\n  iterations: 2\nruntime:\n  progress: false\n")
    (mine / "bad.yaml").write_text("defaults:\n  - tiny\n  - _self_\nloss:\n  lam: 7\n")
    for args, said in ((["--config-dir", "my_configs", "--config-name", "bad"], "loss.lam=7.0 is invalid"),
                       (["--config-dir", "my_configs", "--config-name", "exp"], "did you mean --config-name exp1?"),
                       (["--config-dir", "my_configs", "--config-name", "exp1", "dataset.root=nowhere"],
                        "dataset.root=" + str(tmp_path / "nowhere") + " is not an existing folder"),
                       (["--config-dir", "nope", "--config-name", "exp1"], "--config-dir nope is not an existing"),
                       (["--config-path", "my_configs", "--config-name", "exp1"],
                        "for a folder of your own configs pass --config-dir my_configs")):
        assert main(["optimize", *args]) == 2, args
        [line] = capsys.readouterr().err.strip().splitlines()
        assert said in line, (args, line)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["my_configs"], args  # nothing written
    assert main(["optimize", "--config-dir", "my_configs", "--config-name", "exp1"]) == 0
    [run_dir] = (tmp_path / "outputs" / "exp1").iterdir()
    assert len(read_manifest(run_dir)) == 1


def stop_the_clock(monkeypatch) -> None:
    """Hydra's `${now:...}` at 2026-12-06 15:40:37, however long a test takes."""
    import datetime

    import hydra.core.utils

    class OneSecond(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 12, 6, 15, 40, 37)

    monkeypatch.setattr(hydra.core.utils, "datetime", OneSecond)


@pytest.mark.slow  # seven commands, five of them end to end
def test_commands_started_in_the_same_second_each_get_a_run_directory_of_their_own(tmp_path, monkeypatch, capsys):
    """A Slurm array's jobs start together, and Hydra's default folder is named after the second: each command gets
    a folder of its own (`<time>`, `<time>_2`, ...), made by it alone, and a failed start takes back its own and no
    other. Before, they shared one, and a job of another config was refused as a resume of a run it never began.
    A folder named after the day (`${now:%Y-%m-%d}`) is still shared: it is chosen to be."""
    from seedselect_cli.core import initial_seeds

    stop_the_clock(monkeypatch)
    monkeypatch.chdir(tmp_path)
    second = tmp_path / "outputs" / "tiny" / "2026-12-06_15-40-37"
    assert main(["optimize", TINY, *FAST, "loss.lam=0.5"]) == 0
    assert main(["optimize", TINY, *FAST, "loss.lam=0.9"]) == 0, capsys.readouterr().err
    real = initial_seeds.initial_noise
    monkeypatch.setattr(initial_seeds, "initial_noise", lambda shape, seed: real(shape, seed) * float("nan"))
    assert main(["optimize", TINY, *FAST, "loss.lam=0.7"]) == 2  # fails after its folder was made
    assert "could not be made" in capsys.readouterr().err
    monkeypatch.setattr(initial_seeds, "initial_noise", real)
    assert main(["optimize", TINY, *FAST, "loss.lam=0.5"]) == 0
    out = capsys.readouterr().out
    assert f"{second}_3" in out and f"{second}_4" not in out  # the failed start's folder was taken back
    folders = sorted((tmp_path / "outputs" / "tiny").iterdir())
    assert [p.name for p in folders] == [second.name, f"{second.name}_2", f"{second.name}_3"]
    lams = [yaml.safe_load((p / "config.yaml").read_text())["loss"]["lam"] for p in folders]
    assert lams == [0.5, 0.9, 0.5] and len({len(read_manifest(p)) for p in folders} - {0}) == 1
    for _ in range(2):  # one folder a day: the second command resumes the first's run
        assert main(["optimize", TINY, *FAST, "hydra.run.dir=day/${now:%Y-%m-%d}"]) == 0
    assert [p.name for p in (tmp_path / "day").iterdir()] == ["2026-12-06"]
    assert len(read_manifest(tmp_path / "day" / "2026-12-06")) == len(read_manifest(second))


@pytest.mark.parametrize("args, environ, said", [
    (["runtime.shard=1/4"], {}, "runtime.shard=1/4 splits the run among 4 processes"),
    ([], {"WORLD_SIZE": "2", "RANK": "1"}, "torchrun (WORLD_SIZE=2) splits the run among 2 processes"),
])
def test_shards_in_the_default_folder_are_told_to_share_one(args, environ, said, tmp_path, monkeypatch, capsys):
    """Shards write one run directory together; the default folder is another for each process (each start's own), so
    shards left to it would split the set among folders: the line says to pass the same hydra.run.dir, nothing made."""
    monkeypatch.chdir(tmp_path)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    assert main(["bootstrap", TINY, *args]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {said}, which write one run directory together: pass each the same "
                           f"hydra.run.dir=DIR (the default, {tmp_path}/outputs/tiny/<time>, is a new folder"), line
    assert not list(tmp_path.iterdir())
    assert main(["bootstrap", TINY, *args, *FAST, "hydra.run.dir=run"]) == 0  # with it, the shard's classes (or none)


def test_a_stopped_run_in_a_folder_named_after_its_start_says_that_folder(tmp_path, monkeypatch, capsys):
    """`hydra.run.dir=runs/${now:%H-%M-%S}` given on the command line is, like the default, a new folder at each start:
    the stop line names the folder to resume in, which the same command alone would not."""
    import signal

    from seedselect_cli.files.run_directory import RunDirectory

    stop_the_clock(monkeypatch)
    monkeypatch.chdir(tmp_path)
    real = RunDirectory.append_manifest

    def preempted(self, entry):
        real(self, entry)
        os.kill(os.getpid(), signal.SIGTERM)  # as Slurm does when it preempts the job

    monkeypatch.setattr(RunDirectory, "append_manifest", preempted)
    args = ["optimize", TINY, *FAST, "runtime.batch_size=1", "hydra.run.dir=runs/${now:%H-%M-%S}"]
    assert main(args) == 143
    [line] = capsys.readouterr().err.strip().splitlines()
    folder = tmp_path / "runs" / "15-40-37"
    assert line.endswith(f"run the same command with hydra.run.dir={folder} again to resume"), line
    monkeypatch.setattr(RunDirectory, "append_manifest", real)
    assert main([*args, f"hydra.run.dir={folder}"]) == 0
    assert len(read_manifest(folder)) == 2 and [p.name for p in (tmp_path / "runs").iterdir()] == [folder.name]


def test_a_folder_switched_in_under_the_demo_keeps_its_classes_only_where_the_command_names_them():
    """`dataset=folder` on the default config would draw the folder's images as the demo's marsh finch (its
    `dataset.classes`, kept): refused, unless the command line names the class; a folder config's own runs."""
    from seedselect_cli.preflight import check_kept_classes

    demo = make_config(["dataset=folder", "dataset.root=imgs/tiger_cat"], name="demo")
    with pytest.raises(UserError, match=r"^dataset=folder keeps the demo config's dataset.classes=\[marsh finch\]: "
                                        r"the images of .*imgs/tiger_cat would be drawn and named as 'marsh finch'"):
        check_kept_classes("demo", ["dataset=folder", "dataset.root=imgs/tiger_cat"], demo)
    named = ["dataset=folder", "dataset.root=imgs/tiger_cat", "dataset.classes=[tiger cat]"]
    check_kept_classes("demo", named, make_config(named, name="demo"))
    check_kept_classes("folder", ["dataset.root=imgs/tiger_cat"], make_config(["dataset.root=imgs/tiger_cat"],
                                                                             name="folder"))
    check_kept_classes("demo", [], make_config(name="demo"))  # the demo's own imagefolder layout
