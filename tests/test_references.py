"""Reference images: robust loading, CLIP preprocessing as the processor does it, centroids, the cache."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from seedselect_cli import references
from seedselect_cli.core.encoders import clip_embed_pil, clip_pixels, vae_encode
from seedselect_cli.core.targets import (
    ReferenceEncodings,
    encode_images,
    encoder_fingerprint,
    stack_centroids,
)
from seedselect_cli.errors import UserError
from seedselect_cli.files.images import load_rgb
from seedselect_cli.files.tensor_cache import TensorCache
from seedselect_cli.references import load_encodings
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


def test_broken_files_are_skipped_with_a_warning_unless_too_few_remain(tiny_models, tmp_path, caplog):
    random_image(np.random.default_rng(1)).save(tmp_path / "good.png")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("not an image")
    paths = sorted(tmp_path.iterdir())
    with caplog.at_level(logging.WARNING):
        encodings = load_encodings(tiny_models, paths, 32, 32, "default", TensorCache(None, "x"), "class 'x'")
    assert [p.name for p in encodings.paths] == ["good.png"] and encodings.appearance.shape == (1, 4, 16, 16)
    assert "empty.png" in caplog.text and "notes.jpg" in caplog.text
    with pytest.raises(UserError, match="1 readable image, 2 needed"):
        load_encodings(tiny_models, paths, 32, 32, "default", TensorCache(None, "x"), "class 'x'", minimum=2)


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
    semantic, appearance = encode_images(tiny_models, images, 32, 32)
    centroids = ReferenceEncodings(semantic, appearance, ("a", "b", "c")).centroids()
    embeds = clip_embed_pil(tiny_models, images)  # all three in one batch
    assert torch.allclose(embeds.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(centroids.semantic, embeds.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(centroids.appearance, vae_encode(tiny_models, images, 32, 32).mean(0),
                               rtol=1e-5, atol=1e-5)
    assert centroids.appearance.shape == (4, 16, 16) and centroids.count == 3


def test_subset_centroids_count_repeats(tiny_models):
    g = torch.Generator().manual_seed(5)
    encodings = ReferenceEncodings(torch.randn(4, 16, generator=g), torch.randn(4, 4, 16, 16, generator=g),
                                   tuple("abcd"))
    subset = encodings.centroids([1, 1, 3])
    torch.testing.assert_close(subset.semantic, (2 * encodings.semantic[1] + encodings.semantic[3]) / 3)
    torch.testing.assert_close(subset.appearance, (2 * encodings.appearance[1] + encodings.appearance[3]) / 3)
    batch = stack_centroids([subset, encodings.centroids([0]), encodings.centroids()])
    assert batch.semantic.shape == (3, 16) and batch.appearance.shape == (3, 4, 16, 16)
    torch.testing.assert_close(batch.semantic[1], encodings.semantic[0])


def test_the_cache_returns_what_was_encoded_without_encoding_again(tiny_models, reference_folder, tmp_path,
                                                                    monkeypatch):
    paths = sorted(reference_folder.iterdir())
    cache = TensorCache(tmp_path / "cache", encoder_fingerprint(tiny_models, 32, 32, "default"))
    fresh = load_encodings(tiny_models, paths, 32, 32, "default", cache, "refs")
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == len(paths)

    calls = []
    monkeypatch.setattr(references, "encode_images", lambda *a, **k: calls.append(a) or encode_images(*a, **k))
    cached = load_encodings(tiny_models, paths, 32, 32, "default", cache, "refs")
    assert calls == []
    torch.testing.assert_close(cached.semantic, fresh.semantic, rtol=0, atol=0)
    torch.testing.assert_close(cached.appearance, fresh.appearance, rtol=0, atol=0)

    # A changed image, or a damaged cache entry, is encoded again.
    random_image(np.random.default_rng(9), (30, 30)).save(paths[0])
    next((tmp_path / "cache").rglob("*.safetensors")).write_bytes(b"garbage")
    again = load_encodings(tiny_models, paths, 32, 32, "default", cache, "refs")
    assert len(calls) == 2
    assert not torch.equal(again.appearance[0], fresh.appearance[0])


def test_the_cache_key_follows_weights_and_preprocessing(tiny_models, tiny_models64):
    key = encoder_fingerprint(tiny_models, 32, 32, "default")
    assert key == encoder_fingerprint(tiny_models, 32, 32, "default")
    assert key != encoder_fingerprint(tiny_models, 64, 32, "default")
    assert key != encoder_fingerprint(tiny_models, 32, 32, "crop")
    assert key != encoder_fingerprint(tiny_models64, 32, 32, "default")
    with torch.no_grad():
        weight = next(tiny_models.vae.parameters())
        weight.view(-1)[0] += 1.0
        try:
            assert key != encoder_fingerprint(tiny_models, 32, 32, "default")
        finally:
            weight.view(-1)[0] -= 1.0


def test_a_cache_that_cannot_be_written_is_said_once_and_then_left_alone(tmp_path, caplog):
    """runtime.cache_dir on a file (or a read-only disk): one warning, no error, nothing read back."""
    (tmp_path / "a_file").write_text("")
    cache = TensorCache(tmp_path / "a_file", "x")
    tensors = {"v": torch.randn(3, generator=torch.Generator().manual_seed(5))}
    with caplog.at_level(logging.WARNING):
        for key in ("ab" * 32, "cd" * 32, "ef" * 32):
            cache.put(key, tensors)
            assert cache.get(key, {"v": (3,)}) is None
    warnings = [r.getMessage() for r in caplog.records if "cache: cannot write" in r.getMessage()]
    assert len(warnings) == 1 and "going on without writing to the cache" in warnings[0], warnings
