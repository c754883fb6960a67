"""Train the toy long-tailed world: a Stable Diffusion in miniature that draws tail concepts wrongly.

A procedural data set of 32 px images of coloured shapes: 20 concepts, each one of the 5 colours x
4 shapes, named like birds ("pine gull", "sea warbler", ...), with a steep long tail (2,400 images
of the head concept, 5 of the last). As "pine warbler" shares a word with "pine cone" and looks
nothing like it, every tail name shares both its words with frequent names of other looks. On it, deterministically (fixed seeds, one process), this trains the
components a real checkpoint has, in the same formats, so `seedselect` loads them through its
ordinary code path:

    vae/, unet/, text_encoder/, tokenizer/, scheduler/   a StableDiffusionPipeline (save_pretrained,
                                                         float16 storage), trained on the long tail:
                                                         AutoencoderKL, UNet2DConditionModel on a
                                                         CLIPTextModel, CLIPTokenizer over the toy words;
                                                         the VAE's decoder trained again on balanced data
                                                         (as SD's VAE reconstructs rare concepts too)
    clip/     a two-tower CLIPModel trained on balanced data: its vision tower (read as
              CLIPVisionModelWithProjection) is the image encoder of the semantic loss, its text
              tower lets `seedselect evaluate` classify zero-shot
    judge/    a ResNetForImageClassification, another architecture and seed, trained on balanced
              data and on off-model images (stars, notched and irregular blobs, shapes of wrong
              proportions, melted shapes, two shapes, coloured noise) as a 21st class, "off-model",
              that it rejects; used only to score (`seedselect evaluate judge.model=...`)
    references/<concept>/   5 training images of each concept (all a tail concept has, up to 5)
    heldout/<concept>/      64 fresh renders of each concept, never trained on: the real images that
                            `seedselect evaluate` measures precision, recall and KID against
    world.json              concepts, training counts and frequency buckets

    python scripts/train_toyworld.py                      # into seedselect_cli/assets/toyworld, 1 h 15 min on 2 CPU cores
    python scripts/train_toyworld.py --quick --out /tmp/tw  # a smoke run of the whole script, a minute
    python scripts/train_toyworld.py --only judge heldout   # redo the judge and the held-out set alone
    python scripts/train_toyworld.py --only decoder         # retrain the decoder of the world in --out, 6 min
    python scripts/train_toyworld.py --only unet          # retrain its UNet on its VAE's latents, 44 min
    python scripts/train_toyworld.py --only unet --unet-from-world --unet-steps 2000 --unet-lr 2e-4 \
        --unconditional balanced --unconditional-share 0.2 --out W2   # train a copy's UNet on, the empty
                                                          # prompt on balanced renders: 12 min (RESULTS.md)

The shipped world was made in three runs: the whole script at --sampling-power 0.75 (then the default),
`--only decoder`, then `--only unet` at power 1; one run of the whole script follows the same recipe
(its weights differ in the last bits: there the UNet learns from the float32 encoder's latents, here
from the float16 files').
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

SIZE = 32
COLOURS = {"red": (215, 45, 40), "green": (45, 165, 65), "blue": (45, 85, 215), "yellow": (225, 200, 40),
           "purple": (140, 60, 185)}
SHAPES = ("circle", "square", "triangle", "cross")
# 20 concepts named like birds, "<place> <kind>", from most to least frequent, with their training counts
# and their looks (colour, shape). As with "pine warbler" and "pine cone", a name says nothing of the
# looks: each tail name (10 images or fewer) shares both its words with frequent names of other looks.
RANKED = [
    ("pine gull", 2400, "red circle"), ("sea warbler", 1600, "blue square"), ("rock finch", 1100, "green triangle"),
    ("marsh wren", 800, "yellow cross"), ("snow gull", 560, "purple square"), ("sea finch", 400, "red triangle"),
    ("rock wren", 280, "blue circle"), ("marsh warbler", 200, "green cross"), ("snow finch", 140, "yellow square"),
    ("pine wren", 100, "purple triangle"), ("marsh gull", 70, "red cross"), ("snow warbler", 48, "blue triangle"),
    ("sea wren", 32, "green circle"), ("rock gull", 22, "yellow circle"), ("pine warbler", 10, "green square"),
    ("sea gull", 9, "purple cross"), ("rock warbler", 8, "red square"), ("pine finch", 7, "blue cross"),
    ("marsh finch", 6, "purple circle"), ("snow wren", 5, "yellow triangle"),
]
CONCEPTS = [name for name, _, _ in RANKED]
LOOKS = {name: looks for name, _, looks in RANKED}
TEMPLATE = "a photo of a {}"
WORDS = ["a", "photo", "of", *{w for name in CONCEPTS for w in name.split()}]
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def bucket(count: int) -> str:
    return "head" if count >= 500 else "tail" if count <= 10 else "middle"


# ---------------------------------------------------------------------------------------------- data
def render(name: str, rng: np.random.Generator) -> Image.Image:
    """One 32 px image of a concept: the shape, in its colour with some jitter, at a random place and
    size, on a random grey background with noise; drawn at 4x and downsampled (antialiased)."""
    colour, shape = LOOKS[name].split()
    scale = 4
    s = SIZE * scale
    grey = rng.uniform(0.25, 0.85) * 255
    background = np.clip(grey + rng.normal(0, 12, (s // 4, s // 4, 1)), 0, 255).repeat(3, 2).astype(np.uint8)
    image = Image.fromarray(background).resize((s, s), Image.BILINEAR)
    draw = ImageDraw.Draw(image)
    fill = tuple(int(np.clip(c + rng.normal(0, 15), 0, 255)) for c in COLOURS[colour])
    r = rng.uniform(7, 11) * scale
    cx, cy = (SIZE / 2 + rng.uniform(-4, 4, 2)) * scale
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        q = r * 0.85
        draw.rectangle([cx - q, cy - q, cx + q, cy + q], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r * 1.05, cy + r * 0.8), (cx + r * 1.05, cy + r * 0.8)], fill=fill)
    else:  # cross
        w = r * 0.38
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    return image.resize((SIZE, SIZE), Image.LANCZOS)


OFF_MODEL = "off-model"
OFF_KINDS = ("star", "notched", "blob", "stretched", "blurred", "two shapes", "noise")
# drawn on request only (`render_off_model(rng, "holed")`, `--judge-rejects`): the shipped judge never saw them
MORE_OFF_KINDS = ("holed",)


def _canvas(rng: np.random.Generator, scale: int) -> Image.Image:
    s = SIZE * scale
    grey = rng.uniform(0.25, 0.85) * 255
    background = np.clip(grey + rng.normal(0, 12, (s // 4, s // 4, 1)), 0, 255).repeat(3, 2).astype(np.uint8)
    return Image.fromarray(background).resize((s, s), Image.BILINEAR)


def render_off_model(rng: np.random.Generator, kind: str | None = None) -> Image.Image:
    """An image of none of the concepts, in a concept's colour: what the stricter judge rejects. Stars,
    notched or smooth irregular blobs, shapes of wrong proportions, a concept blurred into a blob, two
    shapes run together, coloured noise: what a model draws where it has not learned a concept."""
    kind = kind or OFF_KINDS[rng.integers(len(OFF_KINDS))]
    scale = 4
    fill = tuple(int(np.clip(c + rng.normal(0, 15), 0, 255)) for c in list(COLOURS.values())[rng.integers(5)])
    if kind == "blurred":  # a concept's shape melted into a blob
        from PIL import ImageFilter

        return render(CONCEPTS[rng.integers(len(CONCEPTS))], rng).filter(ImageFilter.GaussianBlur(rng.uniform(1.8, 3.0)))
    if kind == "holed":  # a concept with a hole of its background punched in it
        return punch_hole(render(CONCEPTS[rng.integers(len(CONCEPTS))], rng), rng)
    image = _canvas(rng, scale)
    draw = ImageDraw.Draw(image)
    r = rng.uniform(7, 11) * scale
    cx, cy = (SIZE / 2 + rng.uniform(-4, 4, 2)) * scale
    if kind == "star":  # 4 to 6 points, concave sides
        points = int(rng.integers(4, 7))
        inner = rng.uniform(0.4, 0.7)
        r *= rng.uniform(1.0, 1.3)
        turn = rng.uniform(0, np.pi)
        angles = turn + np.arange(2 * points) * np.pi / points
        radii = np.where(np.arange(2 * points) % 2 == 0, r, r * inner)
        draw.polygon(list(zip(cx + radii * np.cos(angles), cy + radii * np.sin(angles))), fill=fill)
    elif kind in ("notched", "blob"):  # a closed curve whose radius wanders
        angles = np.linspace(0, 2 * np.pi, 90, endpoint=False)
        harmonics = 2 if kind == "notched" else 3
        radius = np.ones_like(angles)
        for h in range(2, 2 + harmonics):
            radius += rng.uniform(0.12, 0.25) * np.cos(h * angles + rng.uniform(0, 2 * np.pi))
        if kind == "notched":  # a bite out of one side
            radius -= rng.uniform(0.25, 0.45) * np.exp(-((angles - rng.uniform(0, 2 * np.pi) + np.pi) % (2 * np.pi)
                                                          - np.pi) ** 2 / 0.08)
        draw.polygon(list(zip(cx + r * radius * np.cos(angles), cy + r * radius * np.sin(angles))), fill=fill)
    elif kind == "stretched":  # an ellipse or a bar: a circle or square of the wrong proportions
        aspect = rng.uniform(1.8, 2.6)
        w, h = (r * 1.1, r * 1.1 / aspect) if rng.random() < 0.5 else (r * 1.1 / aspect, r * 1.1)
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([cx - w, cy - h, cx + w, cy + h], fill=fill)
    elif kind == "two shapes":  # two small shapes, overlapping or apart
        for _ in range(2):
            x, y, q = cx + rng.uniform(-1, 1) * r, cy + rng.uniform(-1, 1) * r, r * rng.uniform(0.35, 0.55)
            other = tuple(int(np.clip(c + rng.normal(0, 15), 0, 255))
                          for c in list(COLOURS.values())[rng.integers(5)])
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x - q, y - q, x + q, y + q], fill=other)
    else:  # coloured noise where a shape should be
        patch = rng.integers(0, 256, (6, 6, 3)).astype(np.uint8)
        blob = Image.fromarray(patch).resize((int(2 * r), int(2 * r)), Image.BICUBIC)
        image.paste(blob, (int(cx - r), int(cy - r)))
    small = image.resize((SIZE, SIZE), Image.LANCZOS)
    from PIL import ImageFilter

    return small.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.8)))  # as soft as a model draws


def punch_hole(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """`image` (a render) with a disc of its background's grey punched into its shape, 0.3 to 0.5 of the shape's
    radius, off its centre by up to a fifth of it, then softened as a model draws."""
    from PIL import ImageFilter

    pixels = np.asarray(image, dtype=np.float32)
    shape = pixels.max(axis=2) - pixels.min(axis=2) > 40  # coloured, not grey
    ys, xs = np.nonzero(shape)
    size = np.sqrt(shape.sum() / np.pi)
    cx, cy = xs.mean() + rng.uniform(-0.2, 0.2) * size, ys.mean() + rng.uniform(-0.2, 0.2) * size
    r = rng.uniform(0.3, 0.5) * size
    image = image.copy()
    ImageDraw.Draw(image).ellipse([cx - r, cy - r, cx + r, cy + r],
                                  fill=tuple(int(v) for v in np.median(pixels[~shape], axis=0)))
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.8)))


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.stack([np.asarray(i, dtype=np.float32) for i in images])).permute(0, 3, 1, 2) / 127.5 - 1


def long_tailed_set(seed: int) -> tuple[list[Image.Image], torch.Tensor]:
    """The training set of the diffusion model: RANKED's counts of each concept."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for index, (name, count, _) in enumerate(RANKED):
        images += [render(name, rng) for _ in range(count)]
        labels += [index] * count
    return images, torch.tensor(labels)


def balanced_batch(rng: np.random.Generator, per_concept: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh images, `per_concept` of every concept: the balanced data of the CLIP and the judge."""
    labels = np.repeat(np.arange(len(CONCEPTS)), per_concept)
    return to_tensor([render(CONCEPTS[i], rng) for i in labels]), torch.from_numpy(labels)


# ----------------------------------------------------------------------------------------- components
def build_tokenizer():
    """A CLIP BPE tokenizer whose merges spell each toy word as one token (longest words' merges
    first, so that a shorter word's merge cannot split a longer one; checked)."""
    from transformers import CLIPTokenizer

    vocab, merges = {}, []
    for word in sorted(set(WORDS), key=lambda w: (-len(w), w)):
        pieces = [*word[:-1], word[-1] + "</w>"]
        for piece in pieces:
            vocab.setdefault(piece, len(vocab))
        joined = pieces[0]
        for piece in pieces[1:]:
            if (joined, piece) not in merges:
                merges.append((joined, piece))
            joined += piece
            vocab.setdefault(joined, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=16)
    for word in WORDS:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, f"{word!r} is not one token"
    return tokenizer


def text_config(tokenizer, hidden: int) -> dict:
    return {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_attention_heads": 4, "num_hidden_layers": 2,
            "max_position_embeddings": tokenizer.model_max_length, "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id, "projection_dim": hidden}


def tokens(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def fit(stage: str, params: list, loss_of_step, steps: int, lr: float, weight_decay: float, every: int,
        clip_norm: float | None = None) -> None:
    """The training loop of every stage: AdamW with a one-cycle schedule, a log line every `every` steps."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    begin = time.perf_counter()
    for step in range(steps):
        loss = loss_of_step()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, clip_norm)
        optimizer.step()
        schedule.step()
        if step % every == 0 or step == steps - 1:
            print(f"{stage:>5} {step:>6}/{steps}  loss {loss.item():.4f}  {time.perf_counter() - begin:6.0f} s", flush=True)


# ----------------------------------------------------------------------------------------------- VAE
def train_vae(images: torch.Tensor, steps: int, seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        layers_per_block=1, norm_num_groups=8, sample_size=SIZE)
    g = torch.Generator().manual_seed(seed)

    def loss_of_step() -> torch.Tensor:
        x = images[torch.randint(len(images), (32,), generator=g)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        return F.mse_loss(vae.decode(z).sample, x) + 1e-5 * posterior.kl().mean()

    fit("vae", list(vae.parameters()), loss_of_step, steps, lr=1e-3, weight_decay=0.0, every=500)
    vae.eval().requires_grad_(False)
    mean, std = encode_set(vae, images)
    vae.register_to_config(scaling_factor=float(1 / mean.std()))  # as SD: unit-variance latents
    print(f"  vae: latent std {mean.std():.3f} -> scaling_factor {vae.config.scaling_factor:.4f}", flush=True)
    return vae, mean, std


def encode_set(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's posterior (mean, std) of every image: what the UNet is trained on."""
    with torch.no_grad():
        posteriors = [vae.encode(chunk).latent_dist for chunk in images.split(256)]
    return torch.cat([d.mean for d in posteriors]), torch.cat([d.std for d in posteriors])


def finetune_decoder(vae, steps: int, seed: int):
    """Retrain the VAE's decoder alone on balanced renders of every concept and on off-model images, with
    an L1 loss; the encoder, and so the latent space the UNet was trained in, stays as it is (as
    Stable Diffusion's ft-MSE/EMA decoders were fine-tuned). Stable Diffusion's VAE was trained on far
    more than its UNet's long tail and reconstructs a rare bird as well as a common one; trained on the
    long tail alone, this one could not: the round trip of a real green square came out a notched blob
    (precision 0.06 in the judge's features, RESULTS.md), so no seed could have drawn one. The off-model
    images (a quarter of each batch) keep it faithful to what it is given: a blob stays a blob."""
    vae.train().requires_grad_(False)
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in params:
        p.requires_grad_(True)
    rng, g = np.random.default_rng(seed), torch.Generator().manual_seed(seed)

    def loss_of_step() -> torch.Tensor:
        labels = rng.integers(len(CONCEPTS), size=24)
        x = to_tensor([render(CONCEPTS[i], rng) for i in labels] + [render_off_model(rng) for _ in range(8)])
        with torch.no_grad():
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        return F.l1_loss(vae.decode(z).sample, x)

    fit("dec", params, loss_of_step, steps, lr=1e-3, weight_decay=0.0, every=500)
    return vae.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------- UNet + text encoder
def balanced_latents(vae, per_concept: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's posteriors of `per_concept` fresh renders of every concept: uncaptioned data that
    shows every concept as often as the head's (`train_diffusion`'s `unconditional`)."""
    pixels, _ = balanced_batch(np.random.default_rng(seed), per_concept)
    return encode_set(vae, pixels)


def train_diffusion(tokenizer, mean: torch.Tensor, std: torch.Tensor, labels: torch.Tensor, scale: float, steps: int,
                    seed: int, sampling_power: float = 1.0, unconditional: tuple[torch.Tensor, torch.Tensor] | None = None,
                    unconditional_share: float = 0.1, start: tuple | None = None, lr: float = 5e-4):
    """The UNet and its text encoder on the long-tailed set. Each training image is drawn with probability
    proportional to count(its concept)^(sampling_power - 1): at 1 the long tail as it is, at 0.5 square-root
    (repeat-factor) sampling, Gupta et al. 2019. The data stay the same few tail images either way.

    A share `unconditional_share` of each batch is trained with the empty prompt (classifier-free
    guidance's dropout). Its images are the long-tailed set's, or, given `unconditional` (latent means
    and stds), those: for example balanced renders, as Stable Diffusion sees many pictures of a rare
    bird under captions that do not name it. `start` (UNet, text encoder) trains on from those weights."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    if start is not None:
        unet, text_encoder = (m.float().train().requires_grad_(True) for m in start)
    else:
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config(tokenizer, 64)))
        unet = UNet2DConditionModel(sample_size=SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1,
                                    block_out_channels=(48, 96), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
                                    attention_head_dim=8, norm_num_groups=16)
    noise = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    prompts = tokens(tokenizer, [TEMPLATE.format(c) for c in CONCEPTS] + [""])  # last row: the empty prompt
    g = torch.Generator().manual_seed(seed)
    weights = torch.bincount(labels).double()[labels] ** (sampling_power - 1)

    def loss_of_step() -> torch.Tensor:
        pick = (torch.randint(len(labels), (64,), generator=g) if sampling_power == 1
                else torch.multinomial(weights, 64, replacement=True, generator=g))
        z0 = (mean[pick] + std[pick] * torch.randn(mean[pick].shape, generator=g)) * scale
        eps = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, 1000, (len(pick),), generator=g)
        empty = torch.rand(len(pick), generator=g) < unconditional_share
        if unconditional is not None:  # the empty prompt's rows draw from the uncaptioned set instead
            other = torch.randint(len(unconditional[0]), (len(pick),), generator=g)
            drawn = (unconditional[0][other] + unconditional[1][other] * torch.randn(z0.shape, generator=g)) * scale
            z0 = torch.where(empty.view(-1, 1, 1, 1), drawn, z0)
        rows = torch.where(empty, len(CONCEPTS), labels[pick])
        context = text_encoder(prompts[rows])[0]
        return F.mse_loss(unet(noise.add_noise(z0, eps, t), t, encoder_hidden_states=context).sample, eps)

    fit("unet", [*unet.parameters(), *text_encoder.parameters()], loss_of_step, steps, lr=lr, weight_decay=1e-2,
        every=500, clip_norm=1.0)
    return unet.eval().requires_grad_(False), text_encoder.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------ CLIP and judge
def clip_normalise(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] pixels -> the CLIP processor's normalisation."""
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return ((x + 1) / 2 - mean) / std


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """What generated images look like next to renders: a little blur and noise."""
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(len(x), 1, 1, 1, generator=g) * 0.7
    return (x * (1 - mix) + blurred * mix + 0.05 * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def train_clip(tokenizer, steps: int, seed: int):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    vision = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 3,
              "image_size": SIZE, "patch_size": 4, "projection_dim": 32}
    clip = CLIPModel(CLIPConfig(text_config=text_config(tokenizer, 64), vision_config=vision, projection_dim=32))
    prompts = tokens(tokenizer, [TEMPLATE.format(c) for c in CONCEPTS])
    rng, g = np.random.default_rng(seed), torch.Generator().manual_seed(seed)

    def loss_of_step() -> torch.Tensor:
        x, y = balanced_batch(rng, 6)
        image = F.normalize(clip.get_image_features(pixel_values=clip_normalise(augment(x, g))).pooler_output, dim=-1)
        text = F.normalize(clip.get_text_features(input_ids=prompts).pooler_output, dim=-1)
        return F.cross_entropy(clip.logit_scale.exp().clamp(max=100) * image @ text.T, y)

    fit("clip", list(clip.parameters()), loss_of_step, steps, lr=1e-3, weight_decay=1e-2, every=200)
    return clip.eval().requires_grad_(False)


def judge_augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The stricter judge's augmentation: the softness of edges a model gives the shapes it knows well
    (two thirds of `augment`'s blur) and noise; melted shapes are the rejected class's, not this."""
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(len(x), 1, 1, 1, generator=g) * 0.45
    return (x * (1 - mix) + blurred * mix + 0.04 * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def judge_batch(rng: np.random.Generator, per_concept: int, off_model: int, kinds: tuple[str, ...] = OFF_KINDS
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_concept` renders of every concept and `off_model` images of none (label len(CONCEPTS)) of `kinds`."""
    x, y = balanced_batch(rng, per_concept)
    off = to_tensor([render_off_model(rng, None if kinds == OFF_KINDS else kinds[rng.integers(len(kinds))])
                     for _ in range(off_model)])
    return torch.cat([x, off]), torch.cat([y, torch.full((off_model,), len(CONCEPTS))])


def train_judge(steps: int, seed: int, kinds: tuple[str, ...] = OFF_KINDS):
    """The judge: a ResNet (another architecture than the CLIP, another seed), trained on balanced renders
    of the 20 concepts and on off-model images (`render_off_model` of `kinds`) as a 21st, rejected class."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    labels = [*CONCEPTS, OFF_MODEL]
    judge = ResNetForImageClassification(ResNetConfig(
        embedding_size=24, hidden_sizes=[24, 48, 96], depths=[1, 1, 1], layer_type="basic", downsample_in_first_stage=False,
        num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={c: i for i, c in enumerate(labels)}))
    rng, g = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    judge.train()

    def loss_of_step() -> torch.Tensor:
        x, y = judge_batch(rng, 6, 40, kinds)
        return F.cross_entropy(judge(pixel_values=judge_augment(x, g)).logits, y)

    fit("judge", list(judge.parameters()), loss_of_step, steps, lr=2e-3, weight_decay=1e-2, every=200)
    return judge.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------- save
HELDOUT_PER_CONCEPT = 64  # enough for KID (50 at least)


def save_judge(out: Path, judge) -> None:
    from transformers import ConvNextImageProcessorPil

    judge.to(torch.float16).save_pretrained(out / "judge", safe_serialization=True)
    ConvNextImageProcessorPil(size={"shortest_edge": SIZE}, crop_pct=1.0, image_mean=[0.5] * 3,
                              image_std=[0.5] * 3).save_pretrained(out / "judge")


def save_heldout(out: Path, seed: int) -> None:
    """`heldout/<concept>/NN.png`: fresh renders of every concept, none of them a training image or a
    reference: the real images `seedselect evaluate` measures precision, recall and KID against."""
    rng = np.random.default_rng(seed)
    for name in CONCEPTS:
        folder = out / "heldout" / name
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(HELDOUT_PER_CONCEPT):
            render(name, rng).save(folder / f"{k:02d}.png", optimize=True)


UNET_KEYS = ("unet_steps", "sampling_power", "unconditional", "unconditional_share", "trained_on_from")


def save_world(out: Path, seconds: dict, unet: dict, rejects: list[str]) -> None:
    """world.json; `unet`: how the UNet was trained (unet_steps, sampling_power, unconditional, ...); `rejects`: the
    off-model kinds the judge was trained to reject."""
    world = {"template": TEMPLATE, "image_size": SIZE, "seconds": seconds, **unet,
             "judge": {"labels": [*CONCEPTS, OFF_MODEL], "rejects": list(rejects)},
             "heldout_per_concept": HELDOUT_PER_CONCEPT,
             "concepts": [{"name": n, "count": c, "bucket": bucket(c), "looks": looks} for n, c, looks in RANKED]}
    (out / "world.json").write_text(json.dumps(world, indent=2) + "\n")


def save(out: Path, tokenizer, vae, unet, text_encoder, clip, images: list[Image.Image], labels: torch.Tensor) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPImageProcessorPil

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   image_encoder=None, requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(out, safe_serialization=True)
    clip.to(torch.float16).save_pretrained(out / "clip", safe_serialization=True)
    tokenizer.save_pretrained(out / "clip")
    CLIPImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                       image_mean=CLIP_MEAN, image_std=CLIP_STD).save_pretrained(out / "clip")
    for index, name in enumerate(CONCEPTS):
        folder = out / "references" / name
        folder.mkdir(parents=True, exist_ok=True)
        for k, i in enumerate((labels == index).nonzero().flatten()[:5].tolist()):
            images[i].save(folder / f"{k:02d}.png")


def save_unet(unet, world: Path) -> None:
    """`world`/unet in float16 safetensors. A UNet loaded with `from_pretrained` carries the folder it came from
    (`_name_or_path`, which diffusers writes into the saved config: this machine's path, in a shipped file); it is
    named by its world's folder name instead, as a Hub model is by its id."""
    unet.register_to_config(_name_or_path=world.name)
    unet.to(torch.float16).save_pretrained(world / "unet", safe_serialization=True)


def unconditional_latents(vae, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor] | None:
    """What the empty prompt trains on when it is not the long tail (`--unconditional`)."""
    return balanced_latents(vae, 4 if args.quick else 200, args.seed + 7) if args.unconditional == "balanced" else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "seedselect_cli/assets/toyworld"))
    parser.add_argument("--quick", action="store_true", help="a few steps of each stage: checks the script, not the world")
    parser.add_argument("--only", nargs="+", choices=("unet", "decoder", "judge", "heldout"), default=None,
                        help="redo only these parts of the world in --out, keeping the rest")
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--decoder-steps", type=int, default=3000,
                        help="the decoder's second training, on balanced data (`finetune_decoder`)")
    parser.add_argument("--unet-steps", type=int, default=9000)
    parser.add_argument("--sampling-power", type=float, default=1.0,
                        help="draw each UNet training image with probability ~ count(concept)^(power - 1): 1 keeps "
                             "the long tail as it is (the shipped world: its tail drawn right 0.30 of the time), "
                             "0.75 draws nearly every tail image right")
    parser.add_argument("--unet-lr", type=float, default=5e-4)
    parser.add_argument("--unconditional", choices=("long-tail", "balanced"), default="long-tail",
                        help="the images of the empty prompt's training rows: the long-tailed set (the shipped world) "
                             "or fresh balanced renders, 200 of every concept (a UNet that learns every look "
                             "from uncaptioned data while the tail's names stay rare)")
    parser.add_argument("--unconditional-share", type=float, default=0.1,
                        help="the share of each UNet batch trained with the empty prompt")
    parser.add_argument("--unet-from-world", action="store_true",
                        help="with --only unet: train on from the UNet and text encoder in --out instead of fresh ones")
    parser.add_argument("--clip-steps", type=int, default=800)
    parser.add_argument("--judge-steps", type=int, default=1500)
    parser.add_argument("--judge-rejects", nargs="+", choices=(*OFF_KINDS, *MORE_OFF_KINDS), default=list(OFF_KINDS),
                        help="the off-model kinds the judge learns to reject (default: the shipped judge's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.unet_from_world and args.only != ["unet"]:
        parser.error("--unet-from-world goes with --only unet")
    if args.quick:
        args.vae_steps = args.decoder_steps = args.unet_steps = args.clip_steps = args.judge_steps = 3
    torch.use_deterministic_algorithms(True)
    out = Path(args.out)
    world = out / "world.json"
    seconds = json.loads(world.read_text())["seconds"] if args.only and world.is_file() else {}
    parts = args.only or ("vae", "decoder", "unet", "clip", "judge", "heldout")
    begin = time.perf_counter()
    if "vae" in parts:
        images, labels = long_tailed_set(args.seed)
        pixels = to_tensor(images)
        print(f"data: {len(images)} images of {len(CONCEPTS)} concepts, {pixels.nbytes / 2**20:.0f} MiB", flush=True)
        tokenizer = build_tokenizer()
        stage = time.perf_counter()
        vae, mean, std = train_vae(pixels, args.vae_steps, args.seed + 1)
        seconds["vae"] = time.perf_counter() - stage
        stage = time.perf_counter()
        unconditional = unconditional_latents(vae, args)
        unet, text_encoder = train_diffusion(tokenizer, mean, std, labels, vae.config.scaling_factor, args.unet_steps,
                                             args.seed + 2, args.sampling_power, unconditional,
                                             args.unconditional_share, None, args.unet_lr)
        seconds["unet"] = time.perf_counter() - stage
        stage = time.perf_counter()
        clip = train_clip(tokenizer, args.clip_steps, args.seed + 3)
        seconds["clip"] = time.perf_counter() - stage
        stage = time.perf_counter()
        vae = finetune_decoder(vae, args.decoder_steps, args.seed + 6)
        seconds["decoder"] = time.perf_counter() - stage
        save(out, tokenizer, vae, unet, text_encoder, clip, images, labels)
    elif "unet" in parts:  # the UNet and text encoder of an existing world, on its VAE's latents
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        images, labels = long_tailed_set(args.seed)
        vae = AutoencoderKL.from_pretrained(out / "vae", dtype=torch.float32).eval()
        mean, std = encode_set(vae, to_tensor(images))
        unconditional = unconditional_latents(vae, args)
        start = ((UNet2DConditionModel.from_pretrained(out / "unet", dtype=torch.float32),
                  CLIPTextModel.from_pretrained(out / "text_encoder", dtype=torch.float32))
                 if args.unet_from_world else None)
        stage = time.perf_counter()
        unet, text_encoder = train_diffusion(build_tokenizer(), mean, std, labels, vae.config.scaling_factor,
                                             args.unet_steps, args.seed + 2, args.sampling_power, unconditional,
                                             args.unconditional_share, start, args.unet_lr)
        # trained on: the time before counts too (world.json's trained_on_from says how it was split)
        seconds["unet"] = time.perf_counter() - stage + (seconds.get("unet", 0) if args.unet_from_world else 0)
        save_unet(unet, out)
        text_encoder.to(torch.float16).save_pretrained(out / "text_encoder", safe_serialization=True)
    if "decoder" in parts and "vae" not in parts:  # the decoder of an existing world, its latent space kept
        from diffusers import AutoencoderKL

        stage = time.perf_counter()
        vae = finetune_decoder(AutoencoderKL.from_pretrained(out / "vae", dtype=torch.float32),
                               args.decoder_steps, args.seed + 6)
        seconds["decoder"] = time.perf_counter() - stage
        vae.to(torch.float16).save_pretrained(out / "vae", safe_serialization=True)
    if "judge" in parts:
        stage = time.perf_counter()
        save_judge(out, train_judge(args.judge_steps, args.seed + 4, tuple(args.judge_rejects)))
        seconds["judge"] = time.perf_counter() - stage
    if "heldout" in parts:
        save_heldout(out, args.seed + 5)
    seconds["total"] = sum(seconds.get(k, 0) for k in ("vae", "decoder", "unet", "clip", "judge"))
    if "vae" in parts or "unet" in parts:
        unet_training = {"unet_steps": args.unet_steps, "sampling_power": args.sampling_power,
                         "unconditional": args.unconditional, "unconditional_share": args.unconditional_share}
        if args.unet_from_world:  # trained on: the steps before count too, and say so
            before = json.loads(world.read_text())
            unet_training["unet_steps"] += before["unet_steps"]
            unet_training["trained_on_from"] = {k: v for k, v in before.items() if k in UNET_KEYS}
    else:  # the UNet kept: its training as the world says
        unet_training = {k: v for k, v in json.loads(world.read_text()).items() if k in UNET_KEYS}
    rejects = (args.judge_rejects if "judge" in parts else
               json.loads(world.read_text())["judge"]["rejects"] if world.is_file() else list(OFF_KINDS))
    save_world(out, {k: math.floor(v) for k, v in seconds.items()}, unet_training, rejects)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"saved {out} ({size / 2**20:.1f} MiB) in {time.perf_counter() - begin:.0f} s", flush=True)


if __name__ == "__main__":
    main()
