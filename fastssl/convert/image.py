"""Reading and normalizing one image: the bytes of a source file (or a Fashion-MNIST array) -> the JPEG to store.

Runs in worker processes: module-level functions, so they pickle by name.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

DEFAULT_MAX_SIDE = 512
DEFAULT_QUALITY = 95
# Decompression-bomb guard: a file declaring more pixels is skipped before any decode. Pillow's own
# error threshold (2 x Image.MAX_IMAGE_PIXELS), which also applies to larger caps.
DEFAULT_MAX_PIXELS = 178_956_970

# EXIF orientation -> the transpose that makes the pixels upright (tag 0x0112).
_EXIF_ORIENTATION = 0x0112
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "F"})

# What a worker says about one sample: how it was stored, or (jpeg=None) why it was skipped.
KEPT, REENCODED, RESIZED = "kept", "reencoded", "resized"
Result = tuple[bytes | None, str]


def encode_image_bytes(data: bytes, max_side: int, quality: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Result:
    """Turn the bytes of one image file into the JPEG to store.

    Returns ``(jpeg, how)`` with ``how`` in {"kept", "reencoded", "resized"}, or ``(None, reason)`` when
    the bytes are not a decodable image or declare more than ``max_pixels`` pixels. Never raises for bad input.
    """
    if not data:
        return None, "empty file (0 bytes)"
    try:
        with warnings.catch_warnings():
            # Sizes between Pillow's warning and error thresholds are checked against max_pixels below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        return None, f"too many pixels (possible decompression bomb): {e}"
    except UnidentifiedImageError:
        # PIL's message names the BytesIO object by address; keep reasons deterministic.
        return None, "not an image (no image format recognised)"
    except Exception as e:  # any decoder failure means "skip this file"
        return None, f"cannot read image header: {type(e).__name__}: {e}"
    width, height = im.size
    if width * height > max_pixels:
        im.close()
        return None, (
            f"too many pixels (possible decompression bomb): {width} x {height} = {width * height:,d} "
            f"> --max-pixels {max_pixels:,d}"
        )
    try:
        with im, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return _encode_opened(im, data, max_side, quality)
    except Exception as e:  # idem: never let one bad file stop the run
        return None, f"cannot decode: {type(e).__name__}: {e}"


def _encode_opened(im: Image.Image, data: bytes, max_side: int, quality: int) -> Result:
    width, height = im.size
    orientation = im.getexif().get(_EXIF_ORIENTATION, 1) if im.format in ("JPEG", "WEBP", "PNG") else 1
    fits = max(width, height) <= max_side
    if im.format == "JPEG" and fits and im.mode in ("RGB", "L") and orientation in (0, 1):
        im.load()  # a full decode: truncated or corrupt files must be caught here, not in a loader
        return data, KEPT

    target = _fit(width, height, max_side)
    if not fits and im.format == "JPEG":
        # Let libjpeg decode at 1/2, 1/4 or 1/8 scale while staying >= 2x the target: much faster for
        # big photos, and the Lanczos pass below still sees enough pixels for a sharp result.
        im.draft(None, (2 * target[0], 2 * target[1]))
    im.load()
    im = _to_rgb_or_gray(im)
    if im.size != target:
        im = im.resize(target, Image.Resampling.LANCZOS)
    if orientation in _UPRIGHT:
        # Loaders disagree on whether to honour EXIF orientation; storing upright pixels without the
        # tag makes every backend see the same image.
        im = im.transpose(_UPRIGHT[orientation])
    return _jpeg(im, quality), (REENCODED if fits else RESIZED)


def _fit(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Size with the longer side at most ``max_side``, aspect ratio kept (each side >= 1)."""
    if max(width, height) <= max_side:
        return width, height
    if width >= height:
        return max_side, max(1, round(height * max_side / width))
    return max(1, round(width * max_side / height)), max_side


def _to_rgb_or_gray(im: Image.Image) -> Image.Image:
    """Mode RGB, or L for single-channel images; transparency is flattened onto white."""
    if im.mode in ("RGB", "L"):
        return im
    if im.mode.startswith("I;16"):
        # 16-bit grayscale (e.g. PNG): keep the high byte; convert("L") would clip everything above 255.
        return Image.fromarray((np.asarray(im, dtype=np.uint16) >> 8).astype(np.uint8), "L")
    gray = im.mode in _GRAY_MODES
    has_alpha = im.mode in ("RGBA", "RGBa", "LA", "La", "PA") or (im.mode == "P" and "transparency" in im.info)
    if has_alpha:
        rgba = im.convert("RGBA")
        out = Image.new("L" if gray else "RGB", im.size, "white")
        out.paste(rgba.convert(out.mode), mask=rgba.getchannel("A"))
        return out
    return im.convert("L" if gray else "RGB")


def _jpeg(im: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    # Explicit 4:2:0 and no optimize pass: the bytes then depend only on libjpeg, not on Pillow defaults.
    im.save(buf, "JPEG", quality=quality, subsampling="4:2:0" if im.mode == "RGB" else 0, optimize=False)
    return buf.getvalue()


def _read_source(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def encode_files(
    paths: Sequence[str], max_side: int, quality: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> list[Result]:
    """Read and encode each file of ``paths`` (a worker's chunk); an unreadable file becomes ``(None, reason)``."""
    out: list[Result] = []
    for path in paths:
        try:
            data = _read_source(path)
        except OSError as e:  # permission denied, symlink loop, vanished, I/O error: skip, named
            out.append((None, f"cannot read file: {e.strerror or e}"))
            continue
        out.append(encode_image_bytes(data, max_side, quality, max_pixels))
    return out


def encode_gray_arrays(images: np.ndarray, quality: int) -> list[Result]:
    """(N, H, W) uint8 -> one grayscale JPEG per image."""
    return [(_jpeg(Image.fromarray(a, "L"), quality), REENCODED) for a in images]
