"""Tiny random Stable Diffusion and CLIP components, built in code for the demo and the tests.

Same classes and formats as a real checkpoint (diffusers' `get_dummy_components` style), small
enough to run 30 iterations on a CPU in seconds. Built under a fixed torch seed, so every build
gives the same weights: a seed file made with them regenerates the same image.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

IMAGE_SIZE = 32  # pixels; the VAE below halves it once, so seeds are 4 x 16 x 16
UNET = {  # what the SD- and the SDXL-shaped tiny UNets share
    "block_out_channels": (32, 64), "layers_per_block": 1, "sample_size": IMAGE_SIZE // 2, "in_channels": 4,
    "out_channels": 4, "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "norm_num_groups": 16,
}


def build_tiny_tokenizer(max_length: int = 16) -> CLIPTokenizer:
    """A CLIP tokenizer over single bytes: the 256 byte symbols, their end-of-word forms, 2 specials."""
    symbols = sorted(ByteLevel.alphabet())
    vocab = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={tok: i for i, tok in enumerate(vocab)}, merges=[], model_max_length=max_length)


def build_tiny_models() -> dict[str, Any]:
    """VAE, UNet, text encoder, tokenizer and DDIM scheduler with fixed random weights."""
    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**UNET, cross_attention_dim=32, attention_head_dim=8)
        torch.manual_seed(1)
        vae = AutoencoderKL(
            block_out_channels=[16, 32],
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
            up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
            latent_channels=4,
            norm_num_groups=16,
            sample_size=IMAGE_SIZE,
        )
        torch.manual_seed(2)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                hidden_size=32,
                intermediate_size=37,
                num_attention_heads=4,
                num_hidden_layers=2,
                max_position_embeddings=tokenizer.model_max_length,
                vocab_size=len(tokenizer),
            )
        )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )
    return {"vae": vae, "unet": unet, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler": scheduler}


def build_tiny_sdxl_models() -> dict[str, Any]:
    """The same in SDXL's shape (diffusers' SDXL `get_dummy_components`): a UNet conditioned on both text encoders'
    hidden states side by side, the second's pooled projection and the added time ids; its own fixed weights."""
    tokenizer = build_tiny_tokenizer()
    text_config = CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=32,
        max_position_embeddings=tokenizer.model_max_length, vocab_size=len(tokenizer),
    )
    parts = build_tiny_models()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        parts["unet"] = UNet2DConditionModel(
            **UNET,
            cross_attention_dim=64,  # 32 + 32: both encoders' hidden states
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=6 * 8 + 32,  # six time ids, and the pooled embedding
        )
        torch.manual_seed(6)
        parts["text_encoder"] = CLIPTextModel(text_config)
        torch.manual_seed(7)
        parts["text_encoder_2"] = CLIPTextModelWithProjection(text_config)
    parts["tokenizer_2"] = build_tiny_tokenizer()
    parts["force_zeros_for_empty_prompt"] = True
    return parts


def build_tiny_image_encoder() -> tuple[CLIPVisionModelWithProjection, CLIPImageProcessorPil]:
    """A small CLIP vision tower with projection, and its image processor (resize, crop, normalise)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        encoder = CLIPVisionModelWithProjection(
            CLIPVisionConfig(
                hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                image_size=IMAGE_SIZE, patch_size=4, projection_dim=16,
            )
        )
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return encoder, processor


def build_tiny_clip() -> tuple[CLIPModel, CLIPTokenizer, CLIPImageProcessorPil]:
    """A small two-tower CLIP for `evaluate`, whose image tower is the tiny image encoder's (so its
    image embeddings are those the optimisation used) and whose text tower is random."""
    encoder, processor = build_tiny_image_encoder()
    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        clip = CLIPModel(CLIPConfig(
            text_config={"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
                         "num_hidden_layers": 2, "max_position_embeddings": tokenizer.model_max_length,
                         "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                         "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id},
            vision_config=encoder.config.to_dict(), projection_dim=16,
        ))
    clip.vision_model.load_state_dict(encoder.vision_model.state_dict())
    clip.visual_projection.load_state_dict(encoder.visual_projection.state_dict())
    return clip, tokenizer, processor
