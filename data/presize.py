"""Pre-sized training images: `make_shards --max-side N [--quality Q]`.

An image whose SHORTER side is above N is resized so that its shorter side is exactly N (aspect
ratio kept, the longer side rounded to the nearest pixel) and re-encoded: a JPEG as a baseline
4:2:0 JPEG at quality Q without metadata, anything else as PNG (lossless stays lossless). An image
whose shorter side is already <= N keeps its bytes, as does one that cannot be decoded (the loader
skips it later, exactly as it skips it in full-size shards).

Why the shorter side: the ImageNet eval transform resizes the shorter side to 224 / 0.875 = 256 (timm:
248 at crop_pct 0.9) and crops the centre, and RandomResizedCrop draws crops as fractions of the area,
so bounding the shorter side scales every image by the same kind of factor the loader applies anyway
and, for N >= 256, never makes the eval resize upsample. Bounding the longer side instead (FFCV's
`RGBImageField(max_resolution=...)` does: ratio = max_resolution / max(w, h)) shrinks a typical
500x375 image to 320x240 at N=320, below the eval resize, and shrinks wide images more than tall ones.

The result is a pure function of (bytes, N, Q) for a given Pillow (libjpeg-turbo, zlib) build:
the same input gives byte-identical shards; another Pillow version may encode other bytes.
"""

from __future__ import annotations

import io

from PIL import Image

from .errors import DataError

DEFAULT_QUALITY = 90  # the usual quality of pre-resized ImageNet copies (FFCV's --jpeg-quality default)
RESAMPLE = Image.LANCZOS  # antialiased; a draft (DCT-scaled) decode first only down to >= 2x the target


def check_args(max_side: int | None, quality: int | None, dataset: str) -> int | None:
    """Validate --max-side / --quality before any work; return the quality to use (None: full size)."""
    if max_side is None:
        if quality is not None:
            raise DataError(f"--quality {quality} applies only with --max-side: add --max-side N or drop --quality")
        return None
    if isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 1:
        raise DataError(f"--max-side {max_side} is invalid: use a positive number of pixels (e.g. 320)")
    if dataset not in ("imagenet", "imagefolder"):
        raise DataError(f"--max-side applies to image files (--dataset imagenet or imagefolder), not {dataset}: "
                        "drop --max-side")
    quality = DEFAULT_QUALITY if quality is None else quality
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 95:
        raise DataError(f"--quality {quality} is invalid: use a JPEG quality in 1..95 (default {DEFAULT_QUALITY})")
    return quality


def target_size(width: int, height: int, max_side: int) -> tuple[int, int] | None:
    """(width, height) with the shorter side = max_side, or None when the shorter side is <= max_side."""
    short = min(width, height)
    if short <= max_side:
        return None
    if width <= height:
        return max_side, max(1, round(height * max_side / width))
    return max(1, round(width * max_side / height)), max_side


def presize(data: bytes, ext: str, max_side: int, quality: int) -> tuple[bytes, str, bool]:
    """One encoded image -> (bytes, tar extension, whether it was re-encoded)."""
    try:
        im = Image.open(io.BytesIO(data))
        size = target_size(*im.size, max_side)
        if size is None:
            return data, ext, False
        jpeg = im.format == "JPEG"
        if jpeg:  # DCT-scaled decode of a big JPEG, never below twice the target
            im.draft(None, (2 * size[0], 2 * size[1]))
        im.load()
        if im.mode not in ("RGB", "L"):  # CMYK, palette, alpha: what the loader converts to anyway
            im = im.convert("RGB")
        out = im.resize(size, RESAMPLE)
    except DataError:
        raise
    except Exception:  # undecodable: kept as it is; the loader skips and counts it, as in full-size shards
        return data, ext, False
    buf = io.BytesIO()
    if jpeg:
        out.save(buf, format="JPEG", quality=quality, subsampling=2, optimize=False, progressive=False)
        return buf.getvalue(), "jpg", True
    out.save(buf, format="PNG")
    return buf.getvalue(), "png", True


def rule(max_side: int, quality: int) -> str:
    """The sentence index.json records next to max_side and quality."""
    return (f"train images whose shorter side is > {max_side} px resized to {max_side} px on the shorter side "
            f"(Lanczos) and re-encoded (JPEG: quality {quality}, 4:2:0, baseline, no metadata; other formats: PNG); "
            "smaller or undecodable train images and every val image byte-for-byte")
