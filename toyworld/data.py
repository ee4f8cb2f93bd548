"""The toy world's training images: every object rendered by the project's renderer from the training cameras.

Views follow stage 2's camera distribution over its whole relaxation schedule (GenerateCamParams' widest ranges:
radius 3.5-5.5, polar 45-105, any azimuth, fovy 0.16-0.60, stock jitter), so the prior knows every view the
distillation will ask about. Renders are stored premultiplied over black with their alpha, and composited at batch
time over the training loop's kinds of background (white, black, a random colour), with random horizontal flips.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from arguments.params import GenerateCamParams
from gaussian_renderer import render
from scene.cameras import OrbitCameraSampler
from toyworld.world import ToyObject, all_objects, object_splats, view_of_azimuth
from utils.files import atomic_path

DATA_VERSION = 1
BG_WHITE, BG_BLACK = 0.35, 0.20  # background probabilities; a uniform random colour otherwise


def camera_params(resolution: int) -> GenerateCamParams:
    """The training cameras' widest ranges (after every relaxation step)."""
    return GenerateCamParams(radius_range=[3.5, 5.5], theta_range=[45, 105], phi_range=[-180, 180],
                             fovy_range=[0.16, 0.60], image_w=resolution, image_h=resolution)


@dataclass
class ToyImages:
    objects: list[ToyObject]
    rgba: np.ndarray  # [N, H, W, 4] uint8: premultiplied colour over black, alpha
    object_index: np.ndarray  # [N] int: row of `objects`
    azimuth: np.ndarray  # [N] float degrees

    def __len__(self) -> int:
        return int(self.rgba.shape[0])

    def caption(self, i: int, plain: bool = False) -> str:
        obj = self.objects[int(self.object_index[i])]
        return obj.caption(None if plain else view_of_azimuth(float(self.azimuth[i])))


@torch.no_grad()
def render_dataset(views_per_object: int, resolution: int = 64, seed: int = 0, splats: int = 3000) -> ToyImages:
    objects = all_objects()
    cams = OrbitCameraSampler(camera_params(resolution), torch.Generator().manual_seed(seed), batch=1)
    n = len(objects) * views_per_object
    rgba = np.zeros((n, resolution, resolution, 4), np.uint8)
    index, azimuth = np.zeros(n, np.int64), np.zeros(n, np.float32)
    black = torch.zeros(3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small ops: one thread is fastest, and robust to a busy machine
    k = 0
    with tqdm(total=n, desc="rendering the toy world", unit="view") as bar:
        for j, obj in enumerate(objects):
            model = object_splats(obj, splats, seed=j)
            for _ in range(views_per_object):
                spec = cams.draw_specs(1)[0]
                out = render(cams.camera(spec), model, black, backend="torch")
                rgb = out["render"].clamp(0, 1).permute(1, 2, 0)
                alpha = out["alpha"].clamp(0, 1).permute(1, 2, 0)
                rgba[k] = (torch.cat([rgb, alpha], -1).numpy() * 255 + 0.5).astype(np.uint8)
                index[k], azimuth[k] = j, spec["azimuth"]
                k += 1
                bar.update()
    torch.set_num_threads(threads)
    return ToyImages(objects, rgba, index, azimuth)


def cached_dataset(folder: Path, views_per_object: int, resolution: int = 64, seed: int = 0) -> ToyImages:
    """render_dataset, cached as an .npz in `folder` (keyed by its arguments and DATA_VERSION)."""
    path = Path(folder) / f"toy-images-v{DATA_VERSION}-{views_per_object}x{resolution}-s{seed}.npz"
    objects = all_objects()
    if not path.is_file():
        data = render_dataset(views_per_object, resolution, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, rgba=data.rgba, object_index=data.object_index, azimuth=data.azimuth)
        return data
    with np.load(path) as z:
        return ToyImages(objects, z["rgba"], z["object_index"], z["azimuth"])


def textured_backgrounds(n: int, size: tuple[int, int], gen: torch.Generator, cells: int = 4,
                         noise: float = 0.08) -> torch.Tensor:
    """[n, 3, H, W] smooth random colour fields (a `cells` x `cells` grid of random colours, bilinearly upsampled)
    with per-pixel noise of std `noise`: the blotchy backgrounds the toy prior's samples show."""
    grid = torch.rand(n, 3, cells, cells, generator=gen)
    field = F.interpolate(grid, size=size, mode="bilinear", align_corners=True)
    return (field + noise * torch.randn(n, 3, *size, generator=gen)).clamp(0, 1)


def composite(rgba: torch.Tensor, gen: torch.Generator, flip: bool = True, textured: float = 0.0) -> torch.Tensor:
    """uint8 [B, H, W, 4] -> float images [B, 3, H, W] in [0, 1] over random backgrounds, randomly flipped; with
    `textured` > 0 that fraction of the backgrounds are `textured_backgrounds` (the random stream is the same as
    without when it is 0)."""
    x = rgba.permute(0, 3, 1, 2).float() / 255.0
    rgb, alpha = x[:, :3], x[:, 3:]
    b = x.shape[0]
    u = torch.rand(b, generator=gen)
    bg = torch.rand(b, 3, generator=gen)
    bg[u < BG_WHITE] = 1.0
    bg[(u >= BG_WHITE) & (u < BG_WHITE + BG_BLACK)] = 0.0
    bg = bg[:, :, None, None].expand_as(rgb)
    if textured > 0:
        pick = torch.rand(b, generator=gen) < textured
        bg = torch.where(pick[:, None, None, None], textured_backgrounds(b, rgb.shape[-2:], gen), bg)
    images = rgb + (1 - alpha) * bg
    if flip:
        flips = torch.rand(b, generator=gen) < 0.5
        images[flips] = images[flips].flip(-1)
    return images.clamp(0, 1)
