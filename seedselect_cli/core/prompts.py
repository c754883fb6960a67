"""The prompt's side of sampling: c(y) of [negative prompt, prompt], computed once per prompt (`encode_prompt`), and
the UNet's conditioning for a batch of latents with or without classifier-free guidance (`conditioning`): the hidden
states for SD; for SDXL also the pooled embedding and the added time ids, which travel beside them as each step's
context."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from seedselect_cli.core.frozen import FrozenModels


@dataclass(frozen=True)
class PromptEmbeds:
    """c(y) of [negative prompt, prompt], computed once per prompt: the text encoder's hidden states (2, L, D) and,
    for SDXL, the second encoder's pooled embedding (2, P), which its UNet takes beside the added time ids."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None


@torch.no_grad()
def encode_prompt(models: FrozenModels, prompt: str, negative_prompt: str = "") -> PromptEmbeds:
    """Text embeddings of [negative prompt, prompt], as diffusers' pipelines compute them. SD: the text encoder's
    last hidden states. SDXL (`StableDiffusionXLPipeline.encode_prompt`): both encoders' penultimate hidden states
    side by side and the second's pooled projection; an empty negative prompt gives zeros where the checkpoint says
    `force_zeros_for_empty_prompt` (SDXL's default, what its pipeline draws when no negative prompt is given)."""
    if models.text_encoder_2 is None:
        ids = _token_ids(models.tokenizer, [negative_prompt, prompt], models.device)
        return PromptEmbeds(models.text_encoder(ids)[0].to(models.unet.dtype))
    hidden, pooled = [], None
    for tokenizer, encoder in ((models.tokenizer, models.text_encoder), (models.tokenizer_2, models.text_encoder_2)):
        out = encoder(_token_ids(tokenizer, [negative_prompt, prompt], models.device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        if out[0].ndim == 2:  # the projection model's text_embeds: the pooled embedding
            pooled = out[0]
    hidden = torch.cat(hidden, dim=-1)
    if not negative_prompt and models.force_zeros_for_empty_prompt:
        hidden, pooled = hidden.clone(), pooled.clone()
        hidden[0], pooled[0] = 0.0, 0.0
    return PromptEmbeds(hidden.to(models.unet.dtype), pooled.to(models.unet.dtype))


def _token_ids(tokenizer, texts: list[str], device: torch.device) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def uses_guidance(guidance_scale: float) -> bool:
    """Whether classifier-free guidance runs: a scale of 1 or less is the conditional pass alone (as diffusers)."""
    return guidance_scale > 1.0


def guided_embeddings(text_embeds: PromptEmbeds, batch: int, guidance_scale: float,
                      size: tuple[int, int] | None = None) -> tuple[torch.Tensor, ...]:
    """The UNet's conditioning for a batch, [uncond x batch, cond x batch] with guidance, [cond x batch] without:
    (hidden states,) for SD; for SDXL also the pooled embeddings and the added time ids at image `size` (height,
    width): original size, crop (0, 0) and target size, its pipeline's defaults."""
    rows = (lambda t: t.repeat_interleave(batch, dim=0)) if uses_guidance(guidance_scale) else (
        lambda t: t[1:].expand(batch, *t.shape[1:]))
    if text_embeds.pooled is None:
        return (rows(text_embeds.hidden),)
    if size is None:
        raise ValueError("SDXL's conditioning needs the image size for its added time ids")
    time_ids = torch.tensor([[*size, 0, 0, *size]] * 2, dtype=text_embeds.hidden.dtype, device=text_embeds.hidden.device)
    return rows(text_embeds.hidden), rows(text_embeds.pooled), rows(time_ids)


def conditioning(models: FrozenModels, text_embeds: PromptEmbeds, z: torch.Tensor, guidance_scale: float
                 ) -> tuple[torch.Tensor, ...]:
    """`guided_embeddings` for a batch of latents z (B, C, h, w): the image size is the latents' times the VAE's."""
    f = models.vae_scale_factor
    return guided_embeddings(text_embeds, z.shape[0], guidance_scale, (z.shape[-2] * f, z.shape[-1] * f))
