"""Image preparation: any PIL image to the RGB tensor training sees (decode, RGB conversion, resize, centre crop)."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageOps


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
    """Decode image bytes fully (so corruption raises here, not later) and convert to RGB."""
    image = Image.open(io.BytesIO(data))
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
