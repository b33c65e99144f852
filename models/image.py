"""Image preprocessing shared by training on image folders and the image handler."""

from __future__ import annotations

import numpy as np
from PIL import Image

SIZE = 28


def pil_to_array(img: Image.Image, size: int = SIZE, invert_light: bool = True) -> np.ndarray:
    """Any mode, any size -> uint8 (size, size) grayscale, the layout of the MNIST rows.

    MNIST digits are light strokes on a dark background; photos and drawings are usually the
    reverse, so with ``invert_light`` an image whose border is mostly light is inverted.
    """
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on white so transparent pixels do not turn black.
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    if img.mode != "L":
        img = img.convert("L")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    if invert_light:
        # The border's mean (corners counted twice), without building a copy of it.
        edge = int(arr[0].sum()) + int(arr[-1].sum()) + int(arr[:, 0].sum()) + int(arr[:, -1].sum())
        if edge > 127 * 2 * (arr.shape[0] + arr.shape[1]):
            arr = 255 - arr
    return arr


def normalize(pixels: np.ndarray, mean: float, std: float) -> np.ndarray:
    """uint8 pixels (..., H, W) -> float32 (..., 1, H, W), scaled to [0, 1] then standardised."""
    x = pixels.astype(np.float32) / 255.0
    return ((x - mean) / std)[..., None, :, :]
