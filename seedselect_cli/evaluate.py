"""`seedselect evaluate`: did it work? Metrics of a run's images, beside plain Stable Diffusion.

For each class and overall: zero-shot CLIP accuracy among the run's classes (or a given list),
top-1 and top-k; optionally a judge's accuracy (any `transformers` image classifier); fidelity,
the cosine similarity of each image to its class's reference centroid; diversity, the mean
pairwise CLIP distance among a class's images (and among its references). The baseline is plain
Stable Diffusion from the seeds before optimisation (for `bootstrap` runs, whose images share one
start, and `init=inversion` or `nao` runs, whose starts carry the references, from the noise
`optimize` would have drawn), rendered once and cached in RUN/baseline/.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from PIL import Image
from tqdm.auto import tqdm

from seedselect_cli.config import DEVICES, Config, check_config, check_template, load_structured
from seedselect_cli.datasets import load_classes
from seedselect_cli.errors import UserError, first_line
from seedselect_cli.generate import seed_dtype
from seedselect_cli.images import load_rgb
from seedselect_cli.models import DTYPES, load_models, quiet_libraries, resolve_device, scheduler_from_json
from seedselect_cli.sampling import encode_prompt, sample_images
from seedselect_cli.seed_files import load_seed_file
from seedselect_cli.writer import CONFIG, RunDirectory, atomic_write, slugify

log = logging.getLogger(__name__)


@dataclass
class JudgeConfig:
    model: str | None = None  # a transformers image-classification model: Hub id or folder
    label_map: dict[str, str] | None = None  # judge label -> run class; None: labels equal to class names


@dataclass
class EvaluateRuntime:
    device: str = "auto"
    dtype: str | None = None  # for rendering the baseline; None: the dtype the run's seeds were made in


@dataclass
class EvaluateConfig:
    run_dir: str = "???"
    classes: list[str] | None = None  # zero-shot among these class names; None: the run's classes
    dataset_classes: bool = False  # zero-shot among every class of the run's data set (e.g. all 200 of CUB)
    prompt_template: str | None = None  # None: the run's dataset.prompt_template
    clip: str | None = None  # the two-tower CLIP that judges; None: the run's model.image_encoder
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    baseline: bool = True  # render plain Stable Diffusion from the seeds before optimisation
    top_k: int = 5
    batch_size: int = 16
    runtime: EvaluateRuntime = field(default_factory=EvaluateRuntime)


@dataclass
class EvalClip:
    """A two-tower CLIP: unit image and text embeddings in one space."""

    model: torch.nn.Module
    tokenizer: object
    processor: object
    device: torch.device

    @torch.no_grad()
    def images(self, images: list[Image.Image], batch_size: int = 16) -> torch.Tensor:
        out = []
        for start in range(0, len(images), batch_size):
            pixels = self.processor(images=images[start:start + batch_size], return_tensors="pt")["pixel_values"]
            pooled = self.model.vision_model(pixel_values=pixels.to(self.device)).pooler_output
            out.append(F.normalize(self.model.visual_projection(pooled).float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.empty(0)

    @torch.no_grad()
    def texts(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        pooled = self.model.text_model(**tokens).pooler_output
        return F.normalize(self.model.text_projection(pooled).float(), dim=-1).cpu()


def load_clip(name: str, device: torch.device) -> EvalClip:
    if name == "tiny":
        from seedselect_cli.tiny import build_tiny_clip

        model, tokenizer, processor = build_tiny_clip()
    else:
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        source = os.path.expanduser(name)
        try:
            with quiet_libraries():
                model = CLIPModel.from_pretrained(source, use_safetensors=True, dtype=torch.float32)
                tokenizer = AutoTokenizer.from_pretrained(source)
                processor = AutoImageProcessor.from_pretrained(source, backend="pil")
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot load the CLIP model {name!r} for evaluation ({type(exc).__name__}): "
                            f"pass clip=<Hub id or folder of a two-tower CLIP>") from None
    return EvalClip(model.to(device).eval(), tokenizer, processor, device)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Whether each row's label is among its k highest logits: (N,) bool."""
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)


def mean_pairwise_distance(embeds: torch.Tensor) -> float | None:
    """Mean of 1 - cos over all pairs of unit rows; None for fewer than two."""
    n = embeds.shape[0]
    if n < 2:
        return None
    cos = embeds @ embeds.T
    return float((1 - cos)[torch.triu_indices(n, n, offset=1).unbind()].mean())


class Judge:
    """A transformers image classifier whose labels map onto the run's classes."""

    def __init__(self, cfg: JudgeConfig, class_names: list[str], device: torch.device):
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        source = os.path.expanduser(cfg.model)
        try:
            with quiet_libraries():
                self.model = AutoModelForImageClassification.from_pretrained(
                    source, use_safetensors=True, dtype=torch.float32).to(device).eval()
                self.processor = AutoImageProcessor.from_pretrained(source)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot load the judge {cfg.model!r} ({type(exc).__name__}): pass judge.model=<Hub id or "
                            f"folder of an image-classification model>") from None
        lookup = {name.lower(): name for name in class_names}
        mapping = {str(k).lower(): v for k, v in (cfg.label_map or {}).items()}
        self.to_class = {}
        for index, label in self.model.config.id2label.items():
            target = mapping.get(str(label).lower(), label)
            self.to_class[int(index)] = lookup.get(str(target).lower())
        if not any(self.to_class.values()):
            if cfg.label_map:
                raise UserError(f"judge.label_map maps the labels of judge.model={cfg.model} to no class of the run "
                                f"({', '.join(class_names[:5])}); map them to those names")
            raise UserError(f"judge.model={cfg.model}: none of its labels is a class of the run; map them with "
                            f"judge.label_map={{judge label: class}}")
        self.device = device

    @torch.no_grad()
    def top(self, images: list[Image.Image], k: int, batch_size: int = 16) -> list[list[str | None]]:
        out = []
        for start in range(0, len(images), batch_size):
            inputs = self.processor(images=images[start:start + batch_size], return_tensors="pt").to(self.device)
            logits = self.model(**inputs).logits
            indices = logits.topk(min(k, logits.shape[1]), dim=1).indices.tolist()
            out += [[self.to_class.get(i) for i in row] for row in indices]
        return out


def check_evaluate(cfg: EvaluateConfig) -> None:
    """Every value of `seedselect evaluate`, before anything is read or loaded."""
    if cfg.top_k < 1:
        raise UserError(f"top_k={cfg.top_k} is invalid: must be at least 1")
    if not 1 <= cfg.batch_size <= 1024:
        raise UserError(f"batch_size={cfg.batch_size} is invalid: must be between 1 and 1024")
    if cfg.prompt_template is not None:
        check_template("prompt_template", cfg.prompt_template)
    if cfg.runtime.dtype is not None and cfg.runtime.dtype not in ("auto", *DTYPES):
        raise UserError(f"runtime.dtype={cfg.runtime.dtype!r} is invalid: choose one of auto, {', '.join(DTYPES)} "
                        f"(or leave it unset for the dtype the run's seeds were made in)")
    if cfg.runtime.device not in DEVICES:
        raise UserError(f"runtime.device={cfg.runtime.device!r} is invalid: choose one of {', '.join(DEVICES)}")


def read_run(run_dir: Path) -> tuple[Config, list[dict]]:
    """The run's config and finished manifest entries, in manifest order (both read back: checked)."""
    if run_dir.is_file():
        raise UserError(f"run_dir={run_dir} is a file; pass the run's folder (the one holding {CONFIG} and images/)")
    if not (run_dir / CONFIG).is_file():
        raise UserError(f"run_dir={run_dir} is not a seedselect run directory (no {CONFIG}); pass the folder a "
                        f"`seedselect optimize` or `bootstrap` run wrote")
    try:
        config = load_structured(Config, OmegaConf.load(run_dir / CONFIG))
        check_config(config)
    except (UserError, OmegaConfBaseException, yaml.YAMLError, OSError) as exc:
        raise UserError(f"run_dir={run_dir}: its {CONFIG} is damaged ({first_line(exc)}); evaluate a run that "
                        f"seedselect wrote") from None
    entries = sorted((e for e in RunDirectory(run_dir).finished().values() if _usable_entry(e)),
                     key=lambda e: (e["class"], int(e["index"])))
    if not entries:
        raise UserError(f"run_dir={run_dir} holds no finished images yet; run `seedselect optimize` or `bootstrap` "
                        f"in it first (same hydra.run.dir) and evaluate then")
    return config, entries


def _usable_entry(entry: dict) -> bool:
    """What evaluate reads of a manifest entry besides its files: a prompt and a finite loss curve."""
    history = entry.get("loss_history")
    return (isinstance(entry.get("prompt"), str) and isinstance(history, list) and len(history) > 0
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in history))


def check_writable(run_dir: Path) -> None:
    """evaluate writes RUN/report/ and RUN/baseline/: the run directory must take new files."""
    probe = run_dir / f".write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"run_dir={run_dir} is not writable ({exc.strerror}); evaluate writes its report there: "
                        f"copy the run to a writable folder and evaluate the copy") from None


def _usable_image(path: Path, size: tuple[int, int]) -> bool:
    """A cached image that reads whole and has the run's size; anything else is rendered again."""
    if not path.is_file() or path.is_symlink():
        return False
    try:
        image = load_rgb(path)
    except UserError:
        log.warning("%s is damaged; rendering it again", path)
        return False
    if image.size != size:
        log.warning("%s is %dx%d, not the run's %dx%d; rendering it again", path, *image.size, *size)
        return False
    return True


def render_baseline(run_dir: Path, config: Config, entries: list[dict], cfg: EvaluateConfig) -> dict[tuple, Path]:
    """Plain Stable Diffusion for every entry, from its seed before optimisation; rendered once."""
    from seedselect_cli.initial_seeds import init_seed_for, initial_noise

    paths = {(e["class"], e["index"]): run_dir / "baseline" / "images" / slugify(e["class"]) / f"{e['index']:05d}.png"
             for e in entries}
    size = (config.sampler.width, config.sampler.height)
    missing = [e for e in entries if not _usable_image(paths[(e["class"], e["index"])], size)]
    if missing:
        first = load_seed_file(run_dir / missing[0]["seed_file"]).metadata
        device = resolve_device(cfg.runtime.device)
        models = load_models(dataclasses.replace(config.model, pretrained=first["model"]), device,
                             seed_dtype(cfg.runtime.dtype, first["dtype"], device), with_image_encoder=False)
        models.scheduler = scheduler_from_json(first["scheduler_config"])
        shape = models.latent_shape(config.sampler.height, config.sampler.width)
        prompts: dict[str, torch.Tensor] = {}
        for entry in tqdm(missing, desc="plain Stable Diffusion", unit="img"):
            if entry.get("method", "optimize") == "optimize" and entry.get("init", "random") == "random":
                z_T = load_seed_file(run_dir / entry["seed_file"]).initial
            else:  # a bootstrap image starts from z_T^G, an init=nao one from the references' centroid: draw
                # the noise plain sampling would start from
                z_T = initial_noise(models, shape, init_seed_for(config.seed, entry["class"], entry["index"]))
            if entry["prompt"] not in prompts:
                prompts[entry["prompt"]] = encode_prompt(models, entry["prompt"], config.sampler.negative_prompt)
            image = sample_images(models, z_T[None], prompts[entry["prompt"]], config.sampler.steps,
                                  config.sampler.guidance_scale)[0]
            path = paths[(entry["class"], entry["index"])]
            atomic_write(path, lambda tmp, image=image: image.save(tmp, format="PNG"))
    return paths


def score(clip: EvalClip, paths: list[Path], labels: list[int], text: torch.Tensor, centroids: torch.Tensor,
          class_index: dict[str, int], judge: Judge | None, names: list[str], cfg: EvaluateConfig,
          what: str) -> dict[str, dict]:
    """Per-class metrics of one set of images (all classes together), keyed by class name. Images are
    read a batch at a time: only their embeddings and verdicts are kept."""
    embeds, verdicts = [], []
    for start in tqdm(range(0, len(paths), cfg.batch_size), desc=what, unit="batch"):
        images = [load_rgb(p) for p in paths[start:start + cfg.batch_size]]
        embeds.append(clip.images(images, cfg.batch_size))
        if judge is not None:
            verdicts += judge.top(images, cfg.top_k, cfg.batch_size)
    embeds = torch.cat(embeds)
    label_tensor = torch.tensor(labels)
    logits = embeds @ text.T
    top1, topk = topk_correct(logits, label_tensor, 1), topk_correct(logits, label_tensor, cfg.top_k)
    rows_of: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        rows_of.setdefault(name, []).append(i)
    result = {}
    for name, rows in rows_of.items():
        fidelity = F.cosine_similarity(embeds[rows], centroids[class_index[name]][None], dim=-1)
        metrics = {"n_images": len(rows), "top1": float(top1[rows].float().mean()),
                   f"top{cfg.top_k}": float(topk[rows].float().mean()), "fidelity": float(fidelity.mean()),
                   "diversity": mean_pairwise_distance(embeds[rows])}
        if judge is not None:
            metrics["judge_top1"] = sum(verdicts[i][0] == name for i in rows) / len(rows)
            metrics[f"judge_top{cfg.top_k}"] = sum(name in verdicts[i] for i in rows) / len(rows)
        result[name] = metrics
    return result


def readable_references(record) -> list[Image.Image]:
    """A class's reference images; a broken one is skipped with a warning, as `optimize` skipped it."""
    images = []
    for path in record.images:
        try:
            images.append(load_rgb(path))
        except UserError as exc:
            log.warning("skipping reference image %s", str(exc).replace("\n", "\\n"))
    if not images:
        raise UserError(f"class {record.name!r} has no readable reference images any more; restore them under "
                        f"the run's dataset.root")
    return images


def run_evaluate(cfg: EvaluateConfig) -> dict:
    """Score the run in `cfg.run_dir` and its baseline; write RUN/report/. Returns metrics.json's content."""
    from seedselect_cli.report import print_table, write_report

    check_evaluate(cfg)
    run_dir = Path(cfg.run_dir).expanduser()
    # 1. The run: its config, finished images, classes, and each class's references.
    config, entries = read_run(run_dir)
    check_writable(run_dir)
    run_classes = list(dict.fromkeys(e["class"] for e in entries))
    records = {r.name: r for r in load_classes(dataclasses.replace(config.dataset, classes=run_classes), config.seed)}
    if cfg.dataset_classes:
        every = dataclasses.replace(config.dataset, classes=None, shots=1)
        candidates = list(dict.fromkeys([*run_classes, *(r.name for r in load_classes(every, config.seed))]))
    else:
        candidates = list(cfg.classes) if cfg.classes else run_classes
    absent = [c for c in run_classes if c not in candidates]
    if absent:
        raise UserError(f"classes: the run's class {absent[0]!r} is not in the list to classify among; add it")
    template = cfg.prompt_template or config.dataset.prompt_template

    # 2. The judges: the CLIP (zero-shot, fidelity, diversity) and, if asked for, a classifier.
    device = resolve_device(cfg.runtime.device)
    clip = load_clip(cfg.clip or config.model.image_encoder, device)
    judge = Judge(cfg.judge, candidates, device) if cfg.judge.model else None
    text = clip.texts([template.format(c) for c in candidates])
    class_index = {c: i for i, c in enumerate(candidates)}
    references = {c: readable_references(records[c]) for c in run_classes}
    ref_embeds = {c: clip.images(images, cfg.batch_size) for c, images in references.items()}
    centroids = torch.zeros(len(candidates), text.shape[1])
    for c in run_classes:
        centroids[class_index[c]] = ref_embeds[c].mean(dim=0)

    # 3. SeedSelect's images and, beside them, plain Stable Diffusion's from the same seeds.
    names = [e["class"] for e in entries]
    labels = [class_index[n] for n in names]
    sets = {"seedselect": [run_dir / e["image"] for e in entries]}
    out = RunDirectory(run_dir)
    if cfg.baseline:
        with out.writing(run_dir / "baseline"):
            baseline = render_baseline(run_dir, config, entries, cfg)
        sets["plain"] = [baseline[(e["class"], e["index"])] for e in entries]
    scores = {method: score(clip, paths, labels, text, centroids, class_index, judge, names, cfg, f"scoring {method}")
              for method, paths in sets.items()}

    # 4. metrics.json, contact sheets, loss curves, index.html; a table in the terminal.
    metrics = {
        "run_dir": str(run_dir), "n_images": len(entries), "clip": cfg.clip or config.model.image_encoder,
        "judge": cfg.judge.model, "classified_among": len(candidates), "top_k": cfg.top_k,
        "baseline": "plain Stable Diffusion from the seeds before optimisation" if cfg.baseline else None,
        "overall": {method: overall(per_class) for method, per_class in scores.items()},
        "classes": {c: {"references": {"n_images": len(references[c]),
                                       "diversity": mean_pairwise_distance(ref_embeds[c])},
                        **{method: scores[method][c] for method in scores}} for c in run_classes},
    }
    with out.writing(run_dir / "report"):
        write_report(run_dir, metrics, entries, references, sets)
    print_table(metrics)
    return metrics


def overall(per_class: dict[str, dict]) -> dict:
    """Image-weighted means of every metric over the classes (diversity: over classes that have one)."""
    total = sum(m["n_images"] for m in per_class.values())
    out = {"n_images": total}
    keys = [k for k in next(iter(per_class.values())) if k != "n_images"]
    for key in keys:
        rows = [(m[key], m["n_images"]) for m in per_class.values() if m[key] is not None]
        out[key] = sum(v * n for v, n in rows) / sum(n for _, n in rows) if rows else None
    return out
