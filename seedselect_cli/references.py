"""The two targets SeedSelect steers towards, computed once per class from its reference images.

    mu_v = mean_i normalize(CLIP(I_i))         semantic centroid (DESIGN.md, section 1)
    mu_z = mean_i E(I_i) * scaling_factor      appearance centroid, at the sampler's size
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from seedselect_cli.encoders import clip_embed_pil, vae_encode
from seedselect_cli.models import FrozenModels


@dataclass
class Centroids:
    semantic: torch.Tensor  # mu_v, (D,), the mean of unit CLIP embeddings
    appearance: torch.Tensor  # mu_z, (C, h, w)
    count: int  # number of references behind them


def encode_references(models: FrozenModels, images: list[Image.Image], height: int, width: int,
                      resize_mode: str = "default") -> Centroids:
    """Encode the references with CLIP and the VAE and average them."""
    semantic = clip_embed_pil(models, images).mean(dim=0) if models.image_encoder is not None else None
    appearance = vae_encode(models, images, height, width, resize_mode).mean(dim=0)
    return Centroids(semantic=semantic, appearance=appearance, count=len(images))
