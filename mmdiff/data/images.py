"""Image preparation: any PIL image to the RGB tensor training sees (decode, RGB conversion, resize, centre crop).

:data:`MAX_IMAGE_PIXELS` is the data path's one bound on image size, checked from the header before any pixel is
decoded: by the training and evaluation readers (``shards.record_image``: a counted ``oversized_image`` skip) and
by ``mmdiff data folder`` (``folder.py``: not packed). It is far under PIL's own decompression-bomb limit
(about 179 million pixels, an error only past twice that), which let a 12000 x 12000 PNG through at +1.6 GB.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

# 8192 x 8192 (a 67-megapixel photo fits; decoded as RGB it takes 200 MB). Read at call time, so tests can lower it.
MAX_IMAGE_PIXELS = 8192 * 8192


class ImageTooLargeError(ValueError):
    """An image whose header gives more than :data:`MAX_IMAGE_PIXELS` pixels (it is never decoded)."""


def check_image_size(image: Image.Image) -> None:
    """Raise ImageTooLargeError when an opened (not yet decoded) image has more than :data:`MAX_IMAGE_PIXELS`."""
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageTooLargeError(f"{width}x{height} is over the data limit of {MAX_IMAGE_PIXELS} pixels")


def open_image_header(data) -> Image.Image:
    """Open image bytes or a file (its header only, nothing decoded) without PIL's decompression-bomb warning, which
    :func:`check_image_size` supersedes with a lower limit; PIL's DecompressionBombError (far larger) still raises."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data) if isinstance(data, bytes | bytearray) else data)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: EXIF rotation applied, transparency composited on white, 16-bit/float scaled to 8 bit."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        arr = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            arr = arr * 255.0 if arr.size and arr.max() <= 1.0 else arr
        elif image.mode.startswith("I;16") or (arr.size and arr.max() > 255):
            arr = arr / 257.0
        image = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes fully (so corruption raises here, not later) and convert to RGB; an image over
    :data:`MAX_IMAGE_PIXELS` raises ImageTooLargeError from its header, before it is decoded."""
    image = open_image_header(data)
    check_image_size(image)
    image.load()
    return to_rgb(image)


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` (antialiased bicubic), then centre-crop to (size, size)."""
    w, h = image.size
    if (w, h) == (size, size):
        return image
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return image.crop((left, top, left + size, top + size))


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor (3, H, W) in [-1, 1]."""
    arr = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


def prepare_image(image: Image.Image, size: int) -> torch.Tensor:
    """Any PIL image -> float32 (3, size, size) in [-1, 1], exactly as training batches are prepared."""
    return image_to_tensor(resize_center_crop(to_rgb(image), size))
