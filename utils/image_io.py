"""PNG and mp4 output (imageio + imageio-ffmpeg), written atomically."""
from __future__ import annotations

import os
from typing import Sequence

import imageio.v2 as imageio
import numpy as np
import torch

from utils.files import atomic_path


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[C, H, W] in [0, 1] -> [H, W, C] uint8 (grey images become 3 channels)."""
    image = image.detach().float().clamp(0, 1)
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    return (image.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


def image_grid(images: torch.Tensor, cols: int) -> torch.Tensor:
    """Tile images row by row, `cols` per row, without padding (the last row filled with black).

    Args:
        images: [N, C, H, W] with C = 3, or 1 (grey, repeated to 3).
        cols: images per row (>= 1).
    Returns:
        [3, ceil(N / cols) H, cols W]
    """
    n, c, h, w = images.shape
    rows = -(-n // cols)
    images = images.expand(-1, 3, -1, -1) if c == 1 else images
    images = torch.cat([images, images.new_zeros(rows * cols - n, 3, h, w)])
    return images.reshape(rows, cols, 3, h, w).permute(2, 0, 3, 1, 4).reshape(3, rows * h, cols * w)


def save_png(image: torch.Tensor, path: str | os.PathLike) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        imageio.imwrite(tmp, to_uint8(image), format="png")


def write_video(frames: Sequence[np.ndarray], path: str | os.PathLike, fps: int = 30) -> None:
    """Write uint8 [H, W, 3] frames as an mp4 (H.264 via imageio-ffmpeg)."""
    with atomic_path(path, suffix=".mp4") as tmp:
        imageio.mimwrite(tmp, list(frames), fps=fps, quality=8, macro_block_size=1, format="FFMPEG")
