"""The models that score a run in `seedselect evaluate`, none of which drives the optimisation
unless the user names it: a two-tower CLIP (zero-shot classes, fidelity, diversity) and, optionally,
a judge (any `transformers` image classifier) whose verdicts and features count the images right
and place them beside real ones (`quality.py`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from seedselect_cli.errors import UserError
from seedselect_cli.files.datasets import NameLookup
from seedselect_cli.files.datasets.imagenet_names import imagenet_label_names
from seedselect_cli.hub import (
    JUDGE,
    LOAD_ERRORS,
    TRANSFORMERS,
    TWO_TOWER_CLIP,
    offline_for,
    weights_not_available,
    why_offline,
)
from seedselect_cli.models import quiet_libraries, whole
from seedselect_cli.tool_config import JudgeConfig


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
        offline = offline_for(source, "CLIP model", "clip", TRANSFORMERS)
        try:
            with quiet_libraries():
                model = whole(CLIPModel.from_pretrained(source, use_safetensors=True, dtype=torch.float32,
                                                        local_files_only=offline, output_loading_info=True),
                              "CLIP", "clip", name)
                tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=offline)
                processor = AutoImageProcessor.from_pretrained(source, backend="pil", local_files_only=offline)
        except LOAD_ERRORS as exc:
            raise weights_not_available(TWO_TOWER_CLIP, "clip", name, exc, why_offline(offline, False),
                                        TRANSFORMERS) from None
    return EvalClip(model.to(device).eval(), tokenizer, processor, device)


class Judge:
    """A transformers image classifier whose labels map onto the run's classes."""

    def __init__(self, cfg: JudgeConfig, class_names: list[str], device: torch.device):
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        source = os.path.expanduser(cfg.model)
        offline = offline_for(source, "judge", "judge.model", TRANSFORMERS)
        try:
            with quiet_libraries():
                self.model = whole(AutoModelForImageClassification.from_pretrained(
                    source, use_safetensors=True, dtype=torch.float32, local_files_only=offline,
                    output_loading_info=True), "judge", "judge.model", cfg.model).to(device).eval()
                self.processor = AutoImageProcessor.from_pretrained(source, local_files_only=offline)
        except LOAD_ERRORS as exc:
            raise weights_not_available(JUDGE, "judge.model", cfg.model, exc,
                                        why_offline(offline, False), TRANSFORMERS) from None
        # a label is its class by judge.label_map, else by name as `dataset.classes` finds one: a CUB classifier's
        # "094.Pine_Warbler" or "Pine-Warbler" is the run's "Pine Warbler", an ImageNet classifier's label 12
        # ("house finch, linnet, Carpodacus mexicanus") the run's "house finch"
        lookup = NameLookup(class_names)
        mapping = {str(k).lower(): v for k, v in (cfg.label_map or {}).items()}
        readable = imagenet_label_names(self.model.config.id2label)
        self.to_class = {}
        for index, label in self.model.config.id2label.items():
            names = [mapping[str(label).lower()]] if str(label).lower() in mapping else [readable.get(int(index)), label]
            found = (lookup.find(str(name)) for name in names if name)
            self.to_class[int(index)] = next((name for name in found if name), None)
        if not any(self.to_class.values()):
            if cfg.label_map:
                raise UserError(f"judge.label_map maps the labels of judge.model={cfg.model} to no class of the run "
                                f"({', '.join(class_names[:5])}); map them to those names")
            raise UserError(f"judge.model={cfg.model}: none of its labels is a class of the run; map them with "
                            f"judge.label_map={{judge label: class}}")
        self.device = device

    def classify(self, images: list[Image.Image], k: int, batch_size: int = 16
                 ) -> tuple[list[list[str | None]], torch.Tensor]:
        """Each image's k most likely classes (None for a label that is no class of the run, such as a
        rejected "off-model"), and its features: the last hidden state, pooled (N, D)."""
        verdicts, _, features = self.classify_labelled(images, k, batch_size)
        return verdicts, features

    @torch.no_grad()
    def classify_labelled(self, images: list[Image.Image], k: int, batch_size: int = 16
                          ) -> tuple[list[list[str | None]], list[str], torch.Tensor]:
        """As `classify`, with each image's most likely label in the judge's own words besides (what it saw where
        the class is None)."""
        verdicts, labels, features = [], [], []
        for start in range(0, len(images), batch_size):
            inputs = self.processor(images=images[start:start + batch_size], return_tensors="pt").to(self.device)
            output = self.model(**inputs, output_hidden_states=True)
            indices = output.logits.topk(min(k, output.logits.shape[1]), dim=1).indices.tolist()
            verdicts += [[self.to_class.get(i) for i in row] for row in indices]
            labels += [str(self.model.config.id2label[row[0]]) for row in indices]
            hidden = output.hidden_states[-1]
            features.append((hidden.mean(dim=(2, 3)) if hidden.ndim == 4 else hidden[:, 0]).float().cpu())
        return verdicts, labels, torch.cat(features) if features else torch.empty(0)


