"""Reference images: robust loading, CLIP preprocessing as the processor does it, centroids."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from seedselect_cli.encoders import clip_embed_pil, clip_pixels, vae_encode
from seedselect_cli.errors import UserError
from seedselect_cli.images import load_references, load_rgb
from seedselect_cli.references import encode_references
from tests.conftest import random_image


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "LA", "1", "I;16"])
def test_odd_modes_load_as_rgb(tmp_path, mode):
    rng = np.random.default_rng(0)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, size=(30, 40), dtype=np.uint16))
        suffix = ".png"
    else:
        image = random_image(rng, (40, 30), mode)
        suffix = ".tiff" if mode == "CMYK" else ".png"
    path = tmp_path / f"img{suffix}"
    image.save(path)
    rgb = load_rgb(path)
    assert rgb.mode == "RGB" and rgb.size == (40, 30)
    if mode == "I;16":  # 16-bit values are scaled to 8 bits, not clipped at 255
        assert np.asarray(rgb).mean() > 64


def test_transparent_pixels_become_white_and_exif_rotation_is_applied(tmp_path):
    rgba = Image.new("RGBA", (20, 10), (255, 0, 0, 0))
    rgba.save(tmp_path / "clear.png")
    assert np.asarray(load_rgb(tmp_path / "clear.png")).min() == 255
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.new("RGB", (40, 20), (0, 128, 0)).save(tmp_path / "rotated.jpg", exif=exif)
    assert load_rgb(tmp_path / "rotated.jpg").size == (20, 40)


def test_broken_files_are_skipped_with_a_warning_unless_too_few_remain(tmp_path, caplog):
    random_image(np.random.default_rng(1)).save(tmp_path / "good.png")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("not an image")
    paths = sorted(tmp_path.iterdir())
    with caplog.at_level(logging.WARNING):
        images, kept = load_references(paths, "class 'x'")
    assert [p.name for p in kept] == ["good.png"] and len(images) == 1
    assert "empty.png" in caplog.text and "notes.jpg" in caplog.text
    with pytest.raises(UserError, match="1 readable images, 2 needed"):
        load_references(paths, "class 'x'", minimum=2)


def test_clip_pixels_matches_the_image_processor(tiny_models):
    """The differentiable preprocessing of generated images agrees with the processor on references."""
    rng = np.random.default_rng(2)
    image = random_image(rng, (64, 48))  # non-square, downscaled, centre-cropped
    expected = tiny_models.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 127.5 - 1
    ours = clip_pixels(tensor, tiny_models.image_processor)
    assert ours.shape == expected.shape
    # PIL's and torch's bicubic resampling differ slightly; normalised pixels have std ~ 1.
    assert (ours - expected).abs().mean() < 0.05


def test_centroids_are_the_means_of_the_encodings(tiny_models):
    rng = np.random.default_rng(3)
    images = [random_image(rng, size) for size in [(40, 40), (50, 30), (32, 64)]]
    centroids = encode_references(tiny_models, images, 32, 32)
    embeds = clip_embed_pil(tiny_models, images)
    assert torch.allclose(embeds.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(centroids.semantic, embeds.mean(0))
    torch.testing.assert_close(centroids.appearance, vae_encode(tiny_models, images, 32, 32).mean(0))
    assert centroids.appearance.shape == (4, 16, 16) and centroids.count == 3
    single = [clip_embed_pil(tiny_models, [im])[0] for im in images]  # batching does not change encodings
    torch.testing.assert_close(torch.stack(single), embeds, rtol=1e-5, atol=1e-6)
