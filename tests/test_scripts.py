"""The example scripts run on the tiny components and the tiny data set layouts."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from seedselect_cli.config import ModelConfig
from seedselect_cli.files.atomic import slugify
from seedselect_cli.files.run_directory import RunDirectory
from seedselect_cli.models import load_models
from seedselect_cli.pipeline import run_bootstrap
from seedselect_cli.report import training_table
from tests.conftest import make_config
from tests.layouts import make_cub

pytestmark = pytest.mark.slow  # minutes together: the quick loop (`pytest -m "not slow"`) leaves it out

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_linear_probe_with_and_without_the_generated_set(tmp_path):
    root = make_cub(tmp_path / "CUB_200_2011", per_class=5)  # 4 train, 1 test image per class
    run_dir = tmp_path / "run"
    run_bootstrap(make_config([f"dataset.root={root}", "model=tiny", "sampler=tiny", "runtime.device=cpu",
                               "bootstrap.n_images=3", "bootstrap.global_iterations=2", "bootstrap.iterations=2",
                               "sampler.steps=3", "runtime.progress=false", "runtime.batch_size=3"],
                              name="cub_tail"), run_dir)
    results = load_script("linear_probe").main(["--dataset", "cub", "--root", str(root), "--run", str(run_dir),
                                                "--shots", "2"])
    assert results["classes"] == 2 and results["test_images"] == 2  # the one test-split image of each class
    rows = results["rows"]
    assert rows["real only"]["train_images"] == 4 and rows["real + generated"]["train_images"] == 10
    assert all(0 <= rows[k]["all"] <= 1 for k in ("real only", "real + generated")) and 0 <= results["cas"]["generated"] <= 1


def test_bench_runs_its_modes_on_the_tiny_components():
    rows = load_script("bench").main(["--tiny", "--steps", "3", "--batch", "1", "2", "--warmup", "0",
                                      "--iterations", "1", "--modes", "fast", "graphed", "plain"])
    assert [(r["mode"], r["batch"]) for r in rows] == [(m, b) for m in ("fast", "graphed", "plain") for b in (1, 2)]
    assert all(r["s_per_iteration"] > 0 and r["tflop_per_iteration"] > 0 and r["dtype"] == "float32" for r in rows)
    assert rows[1]["tflop_per_iteration"] > rows[0]["tflop_per_iteration"]  # twice the seeds, more work
    # the graphed calls do the fast path's work (their FLOPs are counted with the graphs set aside)
    assert [r["tflop_per_iteration"] for r in rows[2:4]] == pytest.approx([r["tflop_per_iteration"] for r in rows[:2]])
    # a bootstrapped image: its scored starts, its iterations and its render, per image of the batch
    for r in rows:
        assert r["score_s"] > 0 and r["s_per_bootstrap_image"] == pytest.approx(
            (4 * r["s_per_iteration"] + (8 + 1) * r["score_s"]) / r["batch"] + r["render_s"])


def test_bench_keeps_the_steps_the_memory_budget_holds_and_recomputes_less():
    """`bench.py --memory-budget`: as `runtime.memory_budget`, the steps whose activations fit stay (auto: all 3 on
    this machine), the rest are recomputed; the counted work falls by the recomputed forward passes."""
    bench = load_script("bench")
    common = ["--tiny", "--steps", "3", "--batch", "1", "--warmup", "0", "--iterations", "1", "--modes", "fast"]
    recompute, = bench.main(common)
    keep_all, = bench.main([*common, "--memory-budget", "auto"])
    too_small, = bench.main([*common, "--memory-budget", "0.000001"])  # about a kilobyte: not one step
    assert (recompute["kept_steps"], keep_all["kept_steps"], too_small["kept_steps"]) == (0, 3, 0)
    assert keep_all["tflop_per_iteration"] < recompute["tflop_per_iteration"]
    assert too_small["tflop_per_iteration"] == pytest.approx(recompute["tflop_per_iteration"])


@pytest.mark.slow
def test_precision_check_says_which_network_loses_the_precision():
    """`precision_check.py --where` on the toy world: a row per network and iterate, float32's iterates scored with
    one network at a time in float16 (its convolutions as a GPU's: `--gpu-convolutions`, twice as fast here as the
    CPU's reference kernel); float16 keeps the gradient's direction (BENCHMARKS.md)."""
    rows = load_script("precision_check").main(["--where", "--concepts", "marsh finch", "--n-images", "1",
                                                "--iterations", "4", "--dtypes", "float16", "--gpu-convolutions"])
    assert [(r["networks"], r["iteration"]) for r in rows] == [  # the start and the last iterate (10 in longer runs)
        (n, it) for n in ("unet", "vae", "text_encoder", "image_encoder", "all") for it in (0, 3)]
    assert all(abs(r["loss error"][0]) < 0.01 and r["cosine"][0] > 0.99 for r in rows), rows


def test_precision_check_scores_each_seed_on_the_loss_it_was_optimised_on():
    """`precision_check.py`'s table: float32's loss at the seed a run found, scored again, is the loss the run
    recorded, under the default's per-image targets (`method=select`), not the class centroid's; and
    `--moved-starts 0` and `--gradient-noise 0` give back float32's own end; each row says which candidate start the run kept. With a config
    override (`--set`) for every run."""
    rows = load_script("precision_check").main(["--concepts", "marsh finch", "--n-images", "2", "--iterations", "2",
                                                "--dtypes", "float32", "--moved-starts", "0", "1",
                                                "--gradient-noise", "0", "1", "--set", "optim.backtrack=0.5",
                                                "--set", "init.candidates=3"])  # 3 starts, not 16: for time
    config = load_script("precision_check").config_for(["marsh finch"], "float32", "cpu", 2, 2, None,
                                                         ("optim.backtrack=0.5", "init.candidates=3"))
    assert config.optim.backtrack == 0.5 and config.runtime.dtype == "float32" and config.init.candidates == 3
    assert len(rows) == 2
    for row in rows:
        assert row["float32"]["rescored"] == pytest.approx(row["float32"]["loss"], rel=1e-3), row["float32"]
        assert row["float32"]["moved"] == pytest.approx([1.0], rel=1e-4)  # starts not moved: float32's own end
        assert row["float32"]["noisy"] == pytest.approx([1.0], rel=1e-4)  # no noise: float32's own end
        assert row["float32"]["candidate"] in range(config.init.candidates)  # which start selection kept
    assert config.init.candidates > 1


def test_precision_checks_gradient_noise_adds_an_error_of_its_share_of_each_seeds_gradient_norm():
    """`--gradient-noise`: each seed's gradient, as `scaled_backward` computes it, plus noise whose norm is REL times
    that gradient's, drawn fresh; without the context the gradient is exact again."""
    from seedselect_cli.core import optimize

    g = torch.Generator().manual_seed(71)
    z = (torch.randn(3, 4, 8, 8, generator=g) * torch.tensor([0.1, 1.0, 10.0]).view(3, 1, 1, 1)).requires_grad_(True)
    weights = torch.randn(4, 8, 8, generator=g)

    def gradient() -> torch.Tensor:
        z.grad = None
        optimize.scaled_backward((weights * z ** 3).flatten(1).sum(dim=1), z)
        return z.grad.clone()

    exact = gradient()
    with load_script("precision_check").gradient_noise(0.05, torch.Generator().manual_seed(72)):
        noisy, again = gradient(), gradient()
    errors = (noisy - exact).flatten(1).norm(dim=1) / exact.flatten(1).norm(dim=1)
    assert errors.tolist() == pytest.approx([0.05] * 3, rel=0.2) and not torch.equal(noisy, again)
    assert torch.equal(gradient(), exact)


def test_precision_check_counts_ends_within_float32s_own_spread(capsys):
    """`--gradient-noise` with a low dtype: an image counts when the low dtype's end, scored by float32, is at most
    1.05 times the worst of float32's own ends (its run, 1.0, and its noisy draws), and the line names the others."""
    def row(float16: float, noisy: list[float]) -> dict:
        return {"float32": {"rescored": 0.2, "noisy": noisy}, "float16": {"rescored": 0.2 * float16}}

    rows = {("marsh finch", 0): row(1.04, [0.97, 0.99]),  # within 5 % of float32's own run
            ("marsh finch", 1): row(1.124, [0.628, 0.788, 1.222]),  # beyond its run, inside its spread (seed 33)
            ("sea finch", 2): row(1.703, [0.98, 1.01]),  # another candidate start: beyond its spread (seed 36)
            ("sea finch", 3): row(0.9, [1.3])}  # below float32's end
    load_script("precision_check").within_spread(rows, ["float32", "float16"])
    assert [r["float16"]["within_spread"] for _, r in sorted(rows.items())] == [True, True, False, True]
    assert capsys.readouterr().out == ("float16: end within 1.05 times the worst of float32's own ends for 3 of 4 "
                                       "images; outside: sea finch 2 at 1.703 (float32's worst 1.010)\n")


def fresh_tiny_models():
    """New tiny components: `bench.prepare` changes them in place, so not conftest's shared fixture."""
    return load_models(ModelConfig(pretrained="tiny", image_encoder="tiny"), torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("layout", ["all", "unet"])
def test_bench_puts_the_networks_it_is_told_in_channels_last(layout):
    bench = load_script("bench")
    args = argparse.Namespace(channels_last=layout, group_norm="native")
    models = bench.prepare(fresh_tiny_models(), "graphed", args, accelerate=False)
    unet_conv, vae_conv = models.unet.conv_in.weight, models.vae.decoder.conv_in.weight
    assert unet_conv.is_contiguous(memory_format=torch.channels_last) and not unet_conv.is_contiguous()
    assert vae_conv.is_contiguous(memory_format=torch.channels_last) == (layout == "all")
    plain = bench.prepare(fresh_tiny_models(), "plain", args, accelerate=False)
    assert plain.unet.conv_in.weight.is_contiguous()  # the authors' path keeps its layout


@pytest.mark.parametrize("shape", [(2, 12, 5, 7), (2, 12, 5, 7, "channels_last"), (3, 12, 35)])
def test_reduced_group_norm_is_group_norm_in_float64_and_keeps_the_layout(shape):
    bench = load_script("bench")
    g = torch.Generator().manual_seed(len(shape))
    x = torch.randn(shape[:4] if shape[-1] == "channels_last" else shape, generator=g, dtype=torch.float64) * 3 + 2
    if shape[-1] == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    norm = bench.ReducedGroupNorm(4, 12, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(12, generator=g, dtype=torch.float64))
        norm.bias.copy_(torch.randn(12, generator=g, dtype=torch.float64))
    y = norm(x)
    expected = torch.nn.functional.group_norm(x, 4, norm.weight, norm.bias, 1e-6)
    assert y.stride() == x.stride()  # the input's memory format, channels-last included
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)
    grad_y = torch.randn(y.shape, generator=g, dtype=torch.float64)
    ours = torch.autograd.grad(y, (x, norm.weight, norm.bias), grad_y)
    theirs = torch.autograd.grad(expected, (x, norm.weight, norm.bias), grad_y)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)
    # bfloat16 in, bfloat16 out, statistics in float32: within bfloat16's rounding of the float32 result
    low = norm.to(torch.bfloat16)(x.detach().to(torch.bfloat16))
    reference = torch.nn.functional.group_norm(x.detach().to(torch.bfloat16).float(), 4, norm.weight.float(),
                                               norm.bias.float(), 1e-6)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), reference, rtol=2**-7, atol=2**-7)


def test_bench_swaps_every_group_norm_and_the_networks_compute_the_same():
    bench = load_script("bench")
    args = argparse.Namespace(channels_last="all", group_norm="reduced")
    native, reduced = fresh_tiny_models(), bench.prepare(fresh_tiny_models(), "graphed", args, accelerate=False)
    norms = [m for net in (reduced.unet, reduced.vae) for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(type(m) is bench.ReducedGroupNorm for m in norms)
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(2, *native.latent_shape(32, 32), generator=g)
    text = torch.randn(2, 77, native.unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        outputs = [(models.unet(latents, 500, encoder_hidden_states=text).sample, models.vae.decode(latents).sample)
                   for models in (native, reduced)]
    for a, b in zip(*outputs):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert not any(type(m) is bench.ReducedGroupNorm  # the authors' path keeps PyTorch's
                   for m in bench.prepare(fresh_tiny_models(), "plain", args, accelerate=False).unet.modules())


def test_bench_counts_sd_turbos_iteration_a_tenth_of_the_papers():
    """One Euler step without guidance and k = 1: one UNet call at batch 1 in place of 20 at batch 2."""
    rows = load_script("bench").main(["--flops", "--model", "sd_turbo"])
    counts = {row["call"]: row["tflop"] for row in rows}
    assert abs(counts["UNet, batch 1"] - 0.804) < 0.01
    iteration = counts["one iteration, batch 1 (forward, backward, recomputation)"]
    assert 10.5 < iteration < 12  # against 127 TFLOP for the paper's 20 guided DDIM steps, k = 3


@pytest.mark.slow
def test_bench_runs_sdxl_shaped_components_and_counts_sdxl_turbos_iteration():
    """--model sdxl*: the tiny components in SDXL's shape run every mode; SDXL's UNet (counted on the meta device)
    at 512 px is about twice SD 2.1's, and the VAE decode outweighs it in SDXL-Turbo's one-step iteration."""
    bench = load_script("bench")
    rows = bench.main(["--tiny", "--model", "sdxl", "--steps", "3", "--batch", "1", "--warmup", "0", "--iterations",
                       "1", "--modes", "fast", "plain"])
    assert [r["mode"] for r in rows] == ["fast", "plain"] and all(r["s_per_iteration"] > 0 for r in rows)
    counts = {row["call"]: row["tflop"] for row in bench.main(["--flops", "--model", "sdxl_turbo"])}
    assert abs(counts["UNet, batch 1"] - 1.589) < 0.01 and abs(counts["VAE decode"] - 2.515) < 0.01
    assert 12.5 < counts["one iteration, batch 1 (forward, backward, recomputation)"] < 14


def test_bench_counts_flops_and_operations_without_a_gpu():
    rows = load_script("bench").main(["--flops", "--steps", "2", "--k", "1"])
    counts = {row["call"]: row["tflop"] for row in rows}
    assert abs(counts["UNet, batch 2 (CFG)"] - 1.609) < 0.01  # SD 2.1-base at 512 px, as in the issue
    assert abs(counts["VAE decode"] - 2.515) < 0.01 and abs(counts["CLIP image"] - 0.335) < 0.01
    unet, vae, clip, iteration, eager = (row["operations"] for row in rows)
    # 2 steps: forward, recomputation and backward of 2 UNet calls, the decode and CLIP, which CUDA graphs
    # replay instead; what stays eager is the loss on the embeddings and latents
    assert iteration - eager > 4 * unet + 3 * (vae + clip) and 0 < eager < vae
    assert counts["one iteration, batch 1 (forward, backward, recomputation)"] > 2 * 3 * 1.609


def test_init_experiment_scores_each_start_on_the_toy_world(tmp_path, capsys):
    rows = load_script("init_experiment").main(["--out", str(tmp_path), "--concepts", "marsh finch", "--n-images", "2",
                                                "--checkpoints", "1", "2", "--settings", "random", "nao",
                                                "--set", "init.candidates=2"])  # not the default's 16: for time
    assert [(r["init"], r["norm_weight"]) for r in rows] == [("random", 0.0), ("random", 0.1), ("nao", 0.0),
                                                             ("nao", 0.1)]
    assert all(set(r["accuracy"]) == {1, 2} and all(0 <= a <= 1 for a in r["accuracy"].values()) for r in rows)
    assert all(0 <= r["diversity"] <= 2 for r in rows)
    assert capsys.readouterr().out.count("init.candidates=2") == 4  # --set: in every setting's overrides
    table = (tmp_path / "init_results.md").read_text()
    assert "| nao | 0.1 |" in table and "iterations to 0.50" in table


def test_downstream_classifier_reports_the_table_of_the_linear_probe(tmp_path, monkeypatch):
    """On a stand-in run of renders (its images, and its baseline/ for plain): every training set scored by
    bucket, the oracle beside them, a CAS per synthetic set; few steps, so only the shape is checked (and fewer
    test and oracle renders, the long tail rendered once: three quarters of the test's time was rendering)."""
    import functools

    downstream = load_script("downstream_classifier")
    world = downstream.world
    monkeypatch.setattr(downstream, "TEST_PER_CONCEPT", 10)
    monkeypatch.setattr(downstream, "ORACLE_PER_CONCEPT", 20)
    monkeypatch.setattr(world, "long_tailed_set", functools.cache(world.long_tailed_set))
    rng = np.random.default_rng(0)
    run_dir = tmp_path / "run"
    out = RunDirectory(run_dir)
    out.start("seed: 0\n")
    for name in ("pine warbler", "marsh finch"):
        slug = slugify(name)
        for index in range(3):
            for root in (run_dir, run_dir / "baseline"):
                path = root / "images" / slug / f"{index:05d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                world.render(name, rng).save(path)
            out.seed_path(slug, index).parent.mkdir(parents=True, exist_ok=True)
            out.seed_path(slug, index).write_bytes(b"")
            out.append_manifest({"class": name, "index": index, "image": f"images/{slug}/{index:05d}.png",
                                 "seed_file": f"seeds/{slug}/{index:05d}.safetensors"})
    results = downstream.run({"seedselect": run_dir, "bootstrap": None}, per_concept=2, steps=3)
    assert list(results["rows"]) == ["real only", "real + plain", "real + seedselect", "oracle (balanced real)"]
    assert results["rows"]["real + seedselect"]["train_images"] == results["rows"]["real only"]["train_images"] + 4
    assert all(0 <= r[b] <= 1 for r in results["rows"].values() for b in ("head", "middle", "tail", "all"))
    assert set(results["cas"]) == {"plain", "seedselect"}
    table = training_table(results)
    assert "| real + seedselect | 7801 |" in table and "Classification Accuracy Score" in table

    # --tail-real 1: one real image of each tail concept, the rest of the long tail as it is
    x, y = downstream.long_tailed_real(1)
    tail = [i for i, name in enumerate(world.CONCEPTS) if downstream.BUCKET_OF[name] == "tail"]
    counts = torch.bincount(y, minlength=len(world.CONCEPTS))
    assert counts[tail].tolist() == [1] * len(tail) and len(x) == len(y) == 7797 - sum(c for _, c, _ in world.RANKED
                                                                                       if c <= 10) + len(tail)
    assert counts[0] == 2400


@pytest.mark.slow
def test_distill_toyworld_writes_a_loadable_few_step_world(tmp_path):
    """`distill_toyworld.py --quick`: a diffusers folder the tool loads (the student UNet in float16 beside the toy
    world's other components) and its held-out distances to the teacher, per step count."""
    from seedselect_cli.config import ModelConfig
    from seedselect_cli.files.assets import asset_path
    from seedselect_cli.models import load_models

    info = load_script("distill_toyworld").main(["--quick", "--out", str(tmp_path / "turbo")])
    assert set(info["held_out_mse_to_teacher"]) == {f"{who} euler {n}" for who in ("student", "teacher") for n in (1, 2, 4)}
    models = load_models(ModelConfig(pretrained=str(tmp_path / "turbo"), image_encoder=asset_path("toyworld/clip")),
                         torch.device("cpu"), torch.float32, with_image_encoder=False)
    assert models.unet.config.sample_size == 8 and (tmp_path / "turbo" / "distilled.json").is_file()
    saved = json.loads((tmp_path / "turbo" / "unet" / "config.json").read_text())
    assert saved["_name_or_path"] == "turbo"  # the world's name, not the teacher's folder on this machine


def test_arithmetic_counts_every_network_pass_of_an_image_forward_and_backward():
    """The counts follow from the settings: per iteration each of S steps runs the UNet on 2 rows (CFG) forward,
    again when its checkpoint is recomputed, and backward; the last k decodes and CLIP calls the same; the last
    iteration forward only (its step would never be evaluated); each candidate start one forward pass; the final
    image S more UNet calls and a decode."""
    script = load_script("arithmetic")
    s, it, k, n = 3, 2, 3, 4
    base = ["method=paper", f"sampler.steps={s}", f"optim.iterations={it}"]  # one start: counted from the paper's
    rows = script.main(["--n-images", "2", "--compare", " ".join(base), " ".join([*base, f"init.candidates={n}"])])
    plain, select = rows.values()
    assert plain[("image", "unet", "forward")] == (it - 1) * s * 2 * 2 + s * 2 + s * 2
    assert plain[("image", "unet", "backward")] == (it - 1) * s * 2
    assert plain[("image", "image_encoder", "forward")] == (it - 1) * k * 2 + k
    assert plain[("image", "image_encoder", "backward")] == plain[("image", "decoder", "backward")] == (it - 1) * k
    assert plain[("image", "decoder", "forward")] == (it - 1) * k * 2 + k + 1
    assert select[("image", "unet", "forward")] - plain[("image", "unet", "forward")] == n * s * 2
    assert select[("image", "unet", "backward")] == plain[("image", "unet", "backward")]
    assert plain["unet_equivalents"] == (it - 1) * s * 2 * 4 + s * 2 + s * 2

    # --bootstrap: the paper's scheme counts z_T^G (its iterations) per class, its images `bootstrap.iterations`
    # each; with bootstrap.candidates each image scores that many starts of its own and no z_T^G is made
    g, b = 3, 2
    common = [f"sampler.steps={s}", f"bootstrap.global_iterations={g}", f"bootstrap.iterations={b}"]
    rows = script.main(["--bootstrap", "--n-images", "2", "--compare", " ".join(["method=paper", *common]),
                        " ".join([*common, "bootstrap.noise=1", f"bootstrap.candidates={n}"])])
    paper, chosen = rows.values()
    refine = (b - 1) * s * 2 * 4 + s * 2  # b iterations, the last forward only
    assert paper["class_unet_equivalents"] == (g - 1) * s * 2 * 4 + s * 2
    assert paper["unet_equivalents"] == refine + s * 2
    assert chosen["class_unet_equivalents"] == 0
    assert chosen["unet_equivalents"] == n * s * 2 + refine + s * 2


def test_toyworld_contact_sheet_has_a_row_for_every_concept_run(tmp_path):
    """A run of head concepts only once gave a sheet of its column titles alone (it drew tail rows only)."""
    from PIL import Image

    script = load_script("toyworld_experiment")
    rng = np.random.default_rng(7)
    concepts = ["pine gull", "marsh finch"]  # a head and a tail concept
    for concept in concepts:
        for folder in ("seedselect/baseline", "seedselect", "bootstrap"):
            (tmp_path / folder / "images" / slugify(concept)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                tmp_path / folder / "images" / slugify(concept) / "00000.png")
    cell, head = 16, 20
    with Image.open(script.contact_sheet(tmp_path, concepts, n=2, cell=cell)) as sheet:
        pixels = np.asarray(sheet.convert("RGB"))
    assert pixels.shape[0] == head + len(concepts) * cell
    for row in range(len(concepts)):  # the SeedSelect column of each row holds that concept's image
        x = 120 + 5 * cell + 12 + 2 * cell + 12
        assert (pixels[head + row * cell:head + (row + 1) * cell, x:x + cell] != 255).any()


def test_toyworld_encoder_check_draws_off_model_shapes_in_the_concepts_colour_and_ranks_real_ones_nearer():
    script = load_script("toyworld_encoder_check")
    rng = np.random.default_rng(0)
    colours = dict(script.generator.COLOURS)
    purple = np.array(colours[script.generator.LOOKS["marsh finch"].split()[0]], dtype=float)
    for kind in script.OFF_KINDS:
        for image in script.in_colour("marsh finch", kind, 3, rng):
            pixels = np.asarray(image.convert("RGB"), dtype=float).reshape(-1, 3)
            vivid = pixels[pixels.max(axis=1) - pixels.min(axis=1) > 60]  # the shape, not the grey background
            assert len(vivid) and np.abs(vivid.mean(axis=0) - purple).max() < 60, kind
    assert script.generator.COLOURS == colours  # the generator's palette is put back

    rows = {r["set"]: r for r in script.check(*_encoder_and_judge(), "snow wren", 16, np.random.default_rng(1))}
    assert set(rows) == {"real", *script.OFF_KINDS, "holed", "marsh wren (yellow cross)",
                         "snow finch (yellow square)", "rock gull (yellow circle)"}
    assert rows["holed"]["auc"] > 0.8  # a hole moves a drawing away from the references (the judge: measured only)
    assert np.isnan(rows["real"]["auc"]) and rows["real"]["judge_right"] >= 0.9
    # in the shipped world the encoder tells a yellow triangle from every other yellow concept; the judge
    # rejects every off-model drawing
    assert all(rows[name]["auc"] > 0.9 for name in rows if "(" in name)
    assert all(rows[kind]["judge_right"] <= 0.1 for kind in script.OFF_KINDS)


def _encoder_and_judge():
    from seedselect_cli.config import compose_config
    from seedselect_cli.files.assets import asset_path
    from seedselect_cli.judges import Judge, JudgeConfig

    world = json.loads(Path(asset_path("toyworld/world.json")).read_text())
    models = load_models(compose_config("toyworld").model, torch.device("cpu"), torch.float32)
    return models, Judge(JudgeConfig(model=asset_path("toyworld/judge")), [c["name"] for c in world["concepts"]],
                         torch.device("cpu"))


def test_toyworld_selection_measures_how_a_score_chooses_among_seeds(tmp_path):
    script = load_script("toyworld_selection")
    right = np.array([True, False, True, False, False, False])
    perfect, backwards = np.array([0.1, 0.9, 0.2, 0.8, 0.7, 0.6]), np.array([0.9, 0.1, 0.8, 0.2, 0.3, 0.4])
    assert script.auc(perfect, right) == 1.0 and script.auc(backwards, right) == 0.0
    # 3 of these 6 hold no right seed 4 times in 20: the perfect score is right the other 16; the backwards score
    # never (it picks a right seed only when all 3 are right); of 2, when both are right: 1 pair in 15
    assert abs(script.best_of(perfect, right, 3, trials=20000) - 0.8) < 0.01
    assert script.best_of(backwards, right, 3) == 0.0
    assert abs(script.best_of(backwards, right, 2, trials=20000) - 1 / 15) < 0.01
    assert script.best_of(perfect, right, 6) == 1.0 and np.isnan(script.auc(perfect, np.ones(6, bool)))

    figures = script.main(["--concepts", "snow wren", "--n", "8", "--k", "8", "--out", str(tmp_path)])
    f = figures["snow wren"]
    # with k = n every draw holds all 8 seeds: the best of them is one seed, right or not
    for score in ("L_sem", "L_app nearest", "contrastive L_sem", "CLIP zero-shot"):
        assert f[f"best of 8 by {score}"] in (0.0, 1.0) and (np.isnan(f[f"auc {score}"]) or 0 <= f[f"auc {score}"] <= 1)
    assert f["perfect of 8"] == (1.0 if f["rate"] > 0 else 0.0)
    assert (tmp_path / "selection.md").read_text().count("| snow wren |") == 1
    from PIL import Image

    with Image.open(tmp_path / "best_scored.png") as sheet:
        assert sheet.height == 64 + 14  # one concept's row

    # --label manifold: right is lying on the real manifold, as evaluate's precision counts it (the same 8 seeds)
    on = script.main(["--concepts", "snow wren", "--n", "8", "--k", "8", "--out", str(tmp_path / "m"),
                      "--label", "manifold"])["snow wren"]
    assert 0 <= on["rate"] <= 1 and on["perfect of 8"] == (1.0 if on["rate"] > 0 else 0.0)
    assert "on the real manifold" in (tmp_path / "m" / "selection.md").read_text()

    # --demo-sheet: each of the demo's 4 images, its reference and its 16 candidate starts
    assert script.main(["--demo-sheet", str(tmp_path / "demo.png")]) == {}
    with Image.open(tmp_path / "demo.png") as sheet:
        assert sheet.size == (64 * 17, (64 + 14) * 4)


def test_train_toyworld_trains_a_worlds_unet_on_with_the_empty_prompt_on_balanced_renders(tmp_path, monkeypatch):
    """`train_toyworld.py --only unet --unet-from-world --unconditional balanced` (RESULTS.md's probe): the empty
    prompt's rows train on the balanced latents and every other row on the long tail; the world's UNet is
    trained on from its weights and saved, and world.json says how it was trained."""
    import shutil

    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from seedselect_cli.files.assets import asset_path

    script = load_script("train_toyworld")
    world = Path(asset_path("toyworld"))
    unet = UNet2DConditionModel.from_pretrained(world / "unet", dtype=torch.float32)
    text_encoder = CLIPTextModel.from_pretrained(world / "text_encoder", dtype=torch.float32)
    tokenizer = script.build_tokenizer()
    empty = script.tokens(tokenizer, [""])[0]
    seen = []
    real_add_noise = DDPMScheduler.add_noise
    # each step encodes its prompts, then noises its latents: record both
    text_encoder.register_forward_pre_hook(lambda module, args: seen.append([args[0].clone()]))
    monkeypatch.setattr(DDPMScheduler, "add_noise", lambda self, z0, eps, t: seen[-1].append(z0.clone()) or
                        real_add_noise(self, z0, eps, t))
    shape, n = (4, 8, 8), 12
    labels = torch.randint(len(script.CONCEPTS), (n,))
    long_tail = (torch.full((n, *shape), 3.0), torch.zeros(n, *shape))
    balanced = (torch.full((5, *shape), -3.0), torch.zeros(5, *shape))
    script.train_diffusion(tokenizer, *long_tail, labels, 1.0, 2, 0, unconditional=balanced, unconditional_share=0.5,
                           start=(unet, text_encoder))
    rows = [(z0[i, 0, 0, 0].item(), torch.equal(ids[i], empty)) for ids, z0 in seen for i in range(len(z0))]
    assert len(seen) == 2 and len(rows) == 128
    assert {value for value, is_empty in rows if is_empty} == {-3.0} and {value for value, is_empty in rows
                                                                         if not is_empty} == {3.0}
    assert 0.3 < sum(is_empty for _, is_empty in rows) / len(rows) < 0.7

    out = tmp_path / "world"
    shutil.copytree(world, out, ignore=shutil.ignore_patterns("heldout", "references", "judge", "clip"))
    monkeypatch.setattr(script, "RANKED", [(name, 3, looks) for name, _, looks in script.RANKED])  # for time
    script.main(["--only", "unet", "--unet-from-world", "--quick", "--unconditional", "balanced",
                 "--unconditional-share", "0.2", "--out", str(out)])
    before = json.loads((world / "world.json").read_text())
    written = json.loads((out / "world.json").read_text())
    assert (written["unconditional"], written["unconditional_share"]) == ("balanced", 0.2)
    assert (written["unet_steps"], written["trained_on_from"]["unet_steps"]) == (before["unet_steps"] + 3,
                                                                                 before["unet_steps"])
    assert written["seconds"]["unet"] >= before["seconds"]["unet"]  # the time before counts too
    assert json.loads((out / "unet" / "config.json").read_text())["_name_or_path"] == "world"  # not this machine's path
    trained = UNet2DConditionModel.from_pretrained(out / "unet", dtype=torch.float32).state_dict()
    shipped = UNet2DConditionModel.from_pretrained(world / "unet", dtype=torch.float32).state_dict()
    assert any(not torch.equal(trained[k], shipped[k]) for k in shipped)  # trained on from the world's, and saved
    assert max((trained[k] - shipped[k]).abs().max().item() for k in shipped) < 0.05  # not from scratch


def test_copies_floor_counts_references_as_copies_and_real_images_not(tmp_path):
    script = load_script("copies_floor")
    world = Path(script.asset_path("toyworld"))
    for concept in ("pine gull", "snow wren"):  # a head and a tail concept
        for source, target in (("references", tmp_path / "images"), ("heldout", tmp_path / "baseline" / "images")):
            folder = target / slugify(concept)
            folder.mkdir(parents=True)
            for path in sorted((world / source / concept).glob("*.png"))[:8]:
                (folder / path.name).write_bytes(path.read_bytes())
    table = script.floor_table(tmp_path, [32, 8])
    assert {bucket for _, bucket, _ in table} == {"head", "tail"}
    for side in (32, 8):
        for bucket in ("head", "tail"):
            assert table[side, bucket, "run"] == 1.0  # a reference is its own copy
            assert table[side, bucket, "plain"] == 0.0  # no real image is nearer than the nearest real image
            assert 0.0 <= table[side, bucket, "held-out real"] <= 0.1


def test_train_toyworld_judge_rejects_what_it_is_told_and_world_json_says_so(tmp_path):
    """`--only judge --judge-rejects ...`: the judge trains on those off-model kinds alone (here with `holed`, a
    concept with a hole punched in it, which the shipped judge never saw), and world.json records them."""
    import shutil

    from seedselect_cli.files.assets import asset_path

    script = load_script("train_toyworld")
    rng = np.random.default_rng(5)
    image = script.render("marsh finch", rng)
    holed = script.punch_hole(image, rng)

    def coloured(im):
        pixels = np.asarray(im, dtype=np.float32)
        return int((pixels.max(axis=2) - pixels.min(axis=2) > 40).sum())

    assert coloured(holed) < 0.95 * coloured(image)  # a hole of at least a twentieth of the shape's area
    drawn = []
    real_render_off_model = script.render_off_model
    script.render_off_model = lambda rng, kind=None: drawn.append(kind) or real_render_off_model(rng, kind)
    x, y = script.judge_batch(np.random.default_rng(0), 1, 6, ("holed", "star"))
    script.render_off_model = real_render_off_model
    assert set(drawn) <= {"holed", "star"} and len(drawn) == 6 and (y == len(script.CONCEPTS)).sum() == 6
    assert len(x) == len(script.CONCEPTS) + 6
    out = tmp_path / "world"
    shutil.copytree(asset_path("toyworld"), out, ignore=shutil.ignore_patterns("heldout", "references", "clip"))
    script.main(["--only", "judge", "--quick", "--judge-rejects", "holed", "star", "--out", str(out)])
    assert json.loads((out / "world.json").read_text())["judge"]["rejects"] == ["holed", "star"]
