"""PNG output for 8x8 digits: single images and grids.

Pixels keep the data's sense: 1.0 (ink) is white, 0.0 is black, so digits
are white on black. Grids upscale each image with nearest-neighbour and put
1-pixel mid-gray gaps between cells (and around the border).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

GAP_VALUE = 128


def _to_uint8(images) -> np.ndarray:
    """Tensor or array in [0, 1] -> uint8 array of the same shape."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    x = np.asarray(images, dtype=np.float64)
    return np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)


def png_bytes(image) -> bytes:
    """One image [1, 8, 8] or [8, 8] in [0, 1] as an unscaled 8-bit grayscale PNG."""
    x = _to_uint8(image)
    if x.ndim == 3 and x.shape[0] == 1:
        x = x[0]  # [8, 8]
    if x.ndim != 2:
        raise ValueError(f"image must have shape [1, h, w] or [h, w], got {list(np.shape(image))}")
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, format="PNG")
    return buf.getvalue()


def grid_png_bytes(images, columns: int | None = None, scale: int = 8) -> bytes:
    """Images [n, 1, h, w] in [0, 1] as one PNG grid (columns defaults to ceil(sqrt(n)))."""
    x = _to_uint8(images)
    if x.ndim != 4 or x.shape[1] != 1 or x.shape[0] == 0:
        raise ValueError(f"images must have shape [n, 1, h, w] with n >= 1, got {list(x.shape)}")
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    n, _, h, w = x.shape
    columns = columns or math.ceil(math.sqrt(n))
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    rows = math.ceil(n / columns)
    ch, cw = h * scale, w * scale
    canvas = np.full((rows * (ch + 1) + 1, columns * (cw + 1) + 1), GAP_VALUE, dtype=np.uint8)
    big = x[:, 0].repeat(scale, axis=1).repeat(scale, axis=2)  # [n, h*scale, w*scale]
    for i in range(rows * columns):
        r, c = divmod(i, columns)
        top, left = 1 + r * (ch + 1), 1 + c * (cw + 1)
        canvas[top : top + ch, left : left + cw] = big[i] if i < n else 0
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    return buf.getvalue()


def save_grid(images, path, columns: int | None = None, scale: int = 8) -> Path:
    """Write images [n, 1, h, w] in [0, 1] as a PNG grid to path; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(grid_png_bytes(images, columns, scale))
    return path
