"""Reading reference images robustly, whatever their mode, orientation or bit depth.

Every image comes out as 8-bit RGB PIL, upright (EXIF orientation applied), transparency
composited onto white. A broken file raises `UnreadableImage` (a `UserError`) naming it.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from seedselect_cli.errors import UserError, count_of

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}
MIN_SIDE = 8  # pixels; smaller images carry nothing a model can use
MAX_BYTES = 1 << 30  # a reference image file larger than 1 GiB is refused before it is read
CHUNK = 1 << 20
# The formats `generate` writes, by `out=`'s suffix (PNG with the seed file's metadata in its text chunks).
WRITTEN_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
EXIF_DESCRIPTION = 0x010E  # ImageDescription: where a JPEG or WebP that generate writes keeps its seed's metadata
VECTOR_SUFFIXES = {".svg", ".svgz", ".eps", ".pdf", ".ai"}
# Photos in formats not read as references (a phone's HEIC, AVIF, JPEG XL, camera raw): said, not silently passed over
UNREAD_PHOTO_SUFFIXES = {".heic", ".heif", ".avif", ".jxl", ".jfif", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf",
                         ".orf", ".rw2"}


class UnreadableImage(UserError):
    """An image file Pillow cannot read whole; `path` and `reason` let a caller say what to do with it."""

    def __init__(self, path: Path, reason: str, message: str):
        super().__init__(message)
        self.path = path
        self.reason = reason  # what Pillow said, e.g. "Truncated File Read"


def no_images_hint(folder: Path) -> str:
    """What to do about a folder without usable image files, from what it does hold."""
    try:
        names = [p for p in folder.iterdir() if not p.name.startswith(".")]
    except OSError:
        names = []
    if any(p.suffix.lower() in VECTOR_SUFFIXES for p in names):
        return "render vector images (SVG, EPS, PDF) to PNG first"
    if photos := unread_photos(names):
        return f"convert its photos ({first_names(photos)}) to JPEG or PNG first"
    if names and all(p.is_dir() for p in names):
        return "it holds only folders: for one folder per class use --config-name imagefolder"
    return f"add reference images ({', '.join(sorted(s.lstrip('.') for s in IMAGE_SUFFIXES)[:6])}, ...) to it"


def unread_photos(paths: list[Path]) -> list[Path]:
    """The photos among `paths` in a format that is not read as a reference (HEIC, AVIF, camera raw, ...), sorted."""
    return sorted(p for p in paths if p.suffix.lower() in UNREAD_PHOTO_SUFFIXES and not p.name.startswith("."))


def first_names(paths: list[Path]) -> str:
    """The first three names of `paths`, and `...` for more."""
    return ", ".join(p.name for p in paths[:3]) + (", ..." if len(paths) > 3 else "")


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside `folder`, sorted by name (hidden files skipped); photos in formats not read (a
    phone's HEIC) are passed over with a warning."""
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    if photos := unread_photos(files):
        log.warning("%s: %s passed over (%s): seedselect reads %s; to use them as references, convert to JPEG or PNG",
                    folder, count_of(len(photos), "photo"), first_names(photos),
                    ", ".join(sorted(s.lstrip(".") for s in IMAGE_SUFFIXES)))
    return sorted(p for p in files if p.suffix.lower() in IMAGE_SUFFIXES)


def file_sha256(path: Path) -> str:
    """SHA-256 of a reference image file, read in chunks. `UserError` for an unreadable or absurdly
    large file."""
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise UserError(f"{path}: the file is {size / 2**30:.1f} GiB, over the {MAX_BYTES >> 30} GiB a reference "
                            f"image may have; remove it or make it smaller")
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return digest.hexdigest()


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16- or 32-bit integer grey: scale to 8 bits instead of clipping at 255 as convert() does.
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        span = max(array.max() - array.min(), 1e-12)
        image = Image.fromarray(((array - array.min()) / span * 255.0).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info or image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(path: Path) -> Image.Image:
    """Open one image as upright 8-bit RGB. Raises `UserError` saying what is wrong with it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image = ImageOps.exif_transpose(image)
                image.load()
                rgb = _to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(f"{path}: image is too large (over Pillow's decompression-bomb limit); resize it") from None
    except UnidentifiedImageError:
        raise UnreadableImage(path, "not an image Pillow can read",
                              f"{path}: not an image Pillow can read; remove it or convert it to PNG or JPEG") from None
    except (OSError, ValueError, SyntaxError) as exc:
        reason = str(exc).splitlines()[0] or type(exc).__name__
        raise UnreadableImage(path, reason, f"{path}: unreadable image ({reason}); remove it or save it again") from None
    if min(rgb.size) < MIN_SIDE:
        raise UserError(f"{path}: image is only {rgb.size[0]}x{rgb.size[1]} pixels (at least {MIN_SIDE} needed); use a "
                        f"larger reference")
    return rgb


def seedselect_metadata(path: Path) -> str | None:
    """The seed metadata (JSON) that an image seedselect wrote carries, a PNG's `seedselect` text chunk or a JPEG's or
    WebP's EXIF ImageDescription; None for any other file, readable or not."""
    try:
        with Image.open(path) as image:
            text = image.info.get("seedselect") or image.getexif().get(EXIF_DESCRIPTION)
    except Exception:  # noqa: BLE001 (not an image, or a broken one: not seedselect's)
        return None
    return text if isinstance(text, str) and text.startswith("{") else None
