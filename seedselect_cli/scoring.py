"""What the instruments say of a set of generated images, per class and per image: the measures
`seedselect evaluate` reports (metrics.json) and lists image by image (report/images.jsonl).

A set is first embedded once (`embed`: CLIP, the judge, pixels); `score` turns it into each class's
means, `image_rows` into each image's own values of the same measures, `overall` into means over classes.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from seedselect_cli import quality
from seedselect_cli.files.images import load_rgb
from seedselect_cli.judges import EvalClip, Judge


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Whether each row's label is among its k highest logits: (N,) bool. Equal logits rank by class index, the lower
    first, as `argmax` picks (a report's per-image top-1): a row right at k is right at every larger k. (`topk` picks
    among equal logits differently for each k: a class two prompts cut to the same text share was right at k = 1
    and wrong at k = 5.)"""
    k = min(k, logits.shape[1])
    ranked = torch.sort(logits, dim=1, descending=True, stable=True).indices
    return (ranked[:, :k] == labels[:, None]).any(dim=1)


def mean_pairwise_distance(embeds: torch.Tensor) -> float | None:
    """Mean of 1 - cos over all pairs of unit rows; None for fewer than two."""
    n = embeds.shape[0]
    if n < 2:
        return None
    cos = embeds @ embeds.T
    return float((1 - cos)[torch.triu_indices(n, n, offset=1).unbind()].mean())


@dataclass
class Embedded:
    """A set of images as evaluate sees them: CLIP embeddings, the judge's verdicts and features (if
    there is a judge), pixels for `copies`."""

    clip: torch.Tensor  # (N, D) unit rows
    verdicts: list[list[str | None]] | None
    judge: torch.Tensor | None  # (N, F)
    labels: list[str] | None  # the judge's top-1 label of each image, in its own words
    pixels: torch.Tensor  # (N, P)

    @property
    def features(self) -> torch.Tensor:
        """Where precision, recall, KID and diversity_ratio are measured: the judge's features where there
        is a judge (a space that did not drive the optimisation), else CLIP's."""
        return self.judge if self.judge is not None else self.clip


def embed(clip: EvalClip, judge: Judge | None, paths_or_images: list, top_k: int, batch_size: int,
          what: str | None = None) -> Embedded:
    """Embed images, `batch_size` at a time (paths are read a batch at a time: only what is measured is kept);
    the judge's verdicts are its `top_k` labels. `what`: a progress bar's label (none without it)."""
    parts: dict[str, list] = {"clip": [], "verdicts": [], "labels": [], "judge": [], "pixels": []}
    starts = range(0, len(paths_or_images), batch_size)
    for start in (tqdm(starts, desc=what, unit="batch", disable=not sys.stderr.isatty()) if what else starts):
        chunk = paths_or_images[start:start + batch_size]
        images = [load_rgb(p) if isinstance(p, Path) else p for p in chunk]
        parts["clip"].append(clip.images(images, batch_size))
        parts["pixels"].append(quality.pixel_features(images))
        if judge is not None:
            verdicts, labels, features = judge.classify_labelled(images, top_k, batch_size)
            parts["verdicts"] += verdicts
            parts["labels"] += labels
            parts["judge"].append(features)
    if not parts["clip"]:
        return Embedded(torch.empty(0, 0), None, None, None, torch.empty(0, 0))
    judged = judge is not None
    return Embedded(torch.cat(parts["clip"]), parts["verdicts"] if judged else None,
                    torch.cat(parts["judge"]) if judged else None, parts["labels"] if judged else None,
                    torch.cat(parts["pixels"]))


def score(seen: Embedded, labels: list[int], text: torch.Tensor, centroids: torch.Tensor, class_index: dict[str, int],
          names: list[str], top_k: int, references: dict[str, Embedded],
          heldout: dict[str, Embedded | None]) -> dict[str, dict]:
    """Per-class metrics of one set of images (all classes together), keyed by class name: CLIP's zero-shot
    top-1 and top-`top_k` against `text` (one row per candidate class), fidelity to each class's reference
    centroid, diversity, the judge's verdicts, and the set measures of `quality` against `references` and the
    held-out real images."""
    embeds = seen.clip
    label_tensor = torch.tensor(labels)
    logits = embeds @ text.T
    top1, topk = topk_correct(logits, label_tensor, 1), topk_correct(logits, label_tensor, top_k)
    rows_of: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        rows_of.setdefault(name, []).append(i)
    result = {}
    for name, rows in rows_of.items():
        fidelity = F.cosine_similarity(embeds[rows], centroids[class_index[name]][None], dim=-1)
        n_classes = text.shape[0]  # top-1 among one class, or top-k among k or fewer, is right by construction
        metrics = {"n_images": len(rows), "top1": float(top1[rows].float().mean()) if n_classes > 1 else None,
                   f"top{top_k}": float(topk[rows].float().mean()) if n_classes > top_k else None,
                   "fidelity": float(fidelity.mean()), "diversity": mean_pairwise_distance(embeds[rows])}
        if seen.verdicts is not None:
            metrics["judge_top1"] = sum(seen.verdicts[i][0] == name for i in rows) / len(rows)
            metrics[f"judge_top{top_k}"] = sum(name in seen.verdicts[i] for i in rows) / len(rows)
        real, refs = heldout[name], references[name]
        metrics.update(quality.set_quality(
            real.features if real is not None else None, seen.features[rows], refs.clip, embeds[rows], refs.pixels,
            seen.pixels[rows], real.pixels if real is not None else None))
        result[name] = metrics
    return result


def image_rows(seen: Embedded, names: list[str], text: torch.Tensor, centroids: torch.Tensor,
               class_index: dict[str, int], candidates: list[str], references: dict[str, Embedded],
               heldout: dict[str, Embedded | None]) -> list[dict]:
    """What each instrument says of each image of one set (in `names`' order), for report/images.jsonl: the
    per-image parts of `score`'s means (judge_top1, fidelity, precision, copies), so a person can set them beside
    the picture and a script can keep the images they pass."""
    top1 = (seen.clip @ text.T).argmax(dim=1).tolist()
    fidelity = F.cosine_similarity(seen.clip, centroids[[class_index[n] for n in names]], dim=-1).tolist()
    rows = [{"clip_top1": candidates[top1[i]] if len(candidates) > 1 else None,
             "judge_top1": seen.verdicts[i][0] if seen.verdicts is not None else None,
             "judge_label": seen.labels[i] if seen.labels is not None else None,
             "fidelity": fidelity[i]} for i in range(len(names))]
    for name in dict.fromkeys(names):
        at = [i for i, n in enumerate(names) if n == name]
        real = heldout[name]
        inside = (quality.on_manifold(real.features, seen.features[at]).tolist()
                  if real is not None and len(real.features) > quality.K else [None] * len(at))
        copied = quality.copied(references[name].pixels, seen.pixels[at], real.pixels if real is not None else None)
        for j, i in enumerate(at):
            rows[i]["on_real_manifold"] = inside[j]
            rows[i]["copy"] = bool(copied[j]) if copied is not None else None
    return rows


def overall(per_class: dict[str, dict]) -> dict:
    """Image-weighted means of every metric over the classes (diversity: over classes that have one)."""
    total = sum(m["n_images"] for m in per_class.values())
    out = {"n_images": total}
    keys = [k for k in next(iter(per_class.values())) if k != "n_images"]
    for key in keys:
        rows = [(m[key], m["n_images"]) for m in per_class.values() if m[key] is not None]
        out[key] = sum(v * n for v, n in rows) / sum(n for _, n in rows) if rows else None
    return out
