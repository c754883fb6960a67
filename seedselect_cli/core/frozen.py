"""The frozen networks SeedSelect runs through, as plain data: what `models.py` loads and the method reads."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from seedselect_cli.errors import UserError


def is_sdxl_unet(unet: UNet2DConditionModel) -> bool:
    """Whether a UNet is SDXL's: conditioned also on a pooled text embedding and the added time ids."""
    return unet.config.addition_embed_type == "text_time"


@dataclass(frozen=True)
class HubCommits:
    """The Hugging Face Hub commits the weights came from (None: a folder that does not say, the tiny components,
    or not loaded): what a seed file records and a resumed run loads again, so that one run's images come from one
    set of weights."""

    model: str | None = None  # model.pretrained's
    image_encoder: str | None = None  # model.image_encoder's


@dataclass
class FrozenModels:
    """Everything SeedSelect needs from Stable Diffusion and CLIP, frozen and on one device. SDXL adds a second
    text encoder with its tokenizer (`text_encoder_2`, `tokenizer_2`: its pooled embedding and the added time ids
    condition the UNet too) and, as its diffusers pipeline, zero embeddings for an empty negative prompt."""

    vae: AutoencoderKL
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler
    image_encoder: CLIPVisionModelWithProjection | None
    image_processor: Any  # a transformers CLIP image processor
    name: str  # model.pretrained, recorded in seed files
    device: torch.device
    dtype: torch.dtype
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: CLIPTokenizer | None = None
    force_zeros_for_empty_prompt: bool = False
    commits: HubCommits = HubCommits()

    @property
    def is_xl(self) -> bool:
        return is_sdxl_unet(self.unet)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, H, W) of a seed z_T for images of `height` x `width` pixels."""
        f = self.vae_scale_factor
        if height % f or width % f:
            raise UserError(f"sampler size {height}x{width} must be a multiple of the VAE factor {f}")
        return (self.unet.config.in_channels, height // f, width // f)

    def scheduler_json(self) -> str:
        """The DDIM scheduler's config, enough to rebuild the exact same schedule."""
        return json.dumps(dict(self.scheduler.config), sort_keys=True, default=str)
