"""Moving between pixels, VAE latents and CLIP embeddings, the way each model expects.

References (PIL images) go through the libraries' own preprocessors: diffusers' `VaeImageProcessor`
for the VAE, the checkpoint's CLIP image processor for CLIP. Generated images are tensors that
gradients must flow through, so `clip_pixels` repeats the CLIP processor's resize, centre crop and
normalisation with differentiable torch operations (a test holds it to the processor's output).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from seedselect_cli.core.frozen import FrozenModels


def vae_processor(models: FrozenModels) -> VaeImageProcessor:
    return VaeImageProcessor(vae_scale_factor=models.vae_scale_factor)


@torch.no_grad()
def vae_encode(models: FrozenModels, images: list[Image.Image], height: int, width: int,
               resize_mode: str = "default", batch_size: int = 8) -> torch.Tensor:
    """E(I) * scaling_factor for each image, resized to the sampler's size: (N, C, h, w) float32.

    Uses the mean of the VAE's posterior, so the same references always give the same centroid.
    """
    pixels = vae_processor(models).preprocess(images, height=height, width=width, resize_mode=resize_mode)
    latents = []
    for chunk in pixels.split(batch_size):
        posterior = models.vae.encode(chunk.to(models.device, models.vae.dtype)).latent_dist
        latents.append(posterior.mean.float() * models.vae.config.scaling_factor)
    return torch.cat(latents)


def vae_decode(models: FrozenModels, latents: torch.Tensor) -> torch.Tensor:
    """I = D(z / scaling_factor), pixels in [-1, 1], float32 (differentiable)."""
    latents = latents / models.vae.config.scaling_factor
    return models.vae.decode(latents.to(models.vae.dtype)).sample.float()


def to_pil(models: FrozenModels, images: torch.Tensor) -> list[Image.Image]:
    """Decoded images in [-1, 1] to 8-bit PIL images, as diffusers' pipelines do."""
    return vae_processor(models).postprocess(images.detach().float().cpu(), output_type="pil")


def clip_pixels(images: torch.Tensor, processor) -> torch.Tensor:
    """Differentiable copy of the CLIP image processor: [-1, 1] images -> normalised CLIP input."""
    x = ((images.float() + 1) / 2).clamp(0, 1)  # what the processor's rescale gives from 8-bit pixels
    size = processor.size
    h, w = x.shape[-2:]
    if "shortest_edge" in size:
        short = size["shortest_edge"]
        scale = short / min(h, w)
        new_h, new_w = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
        if scale != 1:
            x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    else:
        x = F.interpolate(x, size=(size["height"], size["width"]), mode="bicubic", antialias=True,
                          align_corners=False)
    if getattr(processor, "do_center_crop", True) and processor.crop_size:
        ch, cw = processor.crop_size["height"], processor.crop_size["width"]
        top, left = (x.shape[-2] - ch) // 2, (x.shape[-1] - cw) // 2
        x = x[..., top:top + ch, left:left + cw]
    # channel by channel with Python numbers: no copy from the host, so that this can be a CUDA graph
    return torch.stack([(x[:, c] - m) / s for c, (m, s) in enumerate(zip(processor.image_mean, processor.image_std))],
                       dim=1)


def clip_embed(models: FrozenModels, pixel_values: torch.Tensor) -> torch.Tensor:
    """normalize(CLIP(I)) from preprocessed pixels: (N, D) float32, unit norm."""
    embeds = models.image_encoder(pixel_values=pixel_values.to(models.device, models.image_encoder.dtype)).image_embeds
    return F.normalize(embeds.float(), dim=-1)


@torch.no_grad()
def clip_embed_pil(models: FrozenModels, images: list[Image.Image], batch_size: int = 16) -> torch.Tensor:
    """normalize(CLIP(I)) of PIL images through the checkpoint's own image processor."""
    out = []
    for start in range(0, len(images), batch_size):
        pixels = models.image_processor(images=images[start:start + batch_size], return_tensors="pt")
        out.append(clip_embed(models, pixels["pixel_values"]))
    return torch.cat(out)
