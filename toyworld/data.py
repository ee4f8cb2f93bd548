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
    """uint8 (or float in [0, 1]) [B, H, W, 4], colour premultiplied by alpha -> float images [B, 3, H, W] in [0, 1]
    over random backgrounds, randomly flipped; with
    `textured` > 0 that fraction of the backgrounds are `textured_backgrounds` (the random stream is the same as
    without when it is 0)."""
    x = rgba.permute(0, 3, 1, 2).float()
    x = x / 255.0 if rgba.dtype == torch.uint8 else x  # float RGBA: already in [0, 1]
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


def specks(images: torch.Tensor, gen: torch.Generator, count: int = 40) -> torch.Tensor:
    """`images` [B, 3, H, W] with up to `count` small round blobs each (Gaussian profile, sigma 0.5-2 px) of random
    colour and opacity laid over them, a random share of the `count` per image: the floaters and specks stage 2's
    models show."""
    b, _, h, w = images.shape
    centre = torch.rand(b, count, 2, generator=gen) * torch.tensor([h, w], dtype=torch.float32)
    sigma = 0.5 + 1.5 * torch.rand(b, count, generator=gen)
    colour = torch.rand(b, count, 3, generator=gen)
    present = torch.rand(b, count, generator=gen) < torch.rand(b, 1, generator=gen)
    opacity = torch.rand(b, count, generator=gen) * present
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    d2 = (yy - centre[..., 0, None, None]) ** 2 + (xx - centre[..., 1, None, None]) ** 2  # [B, count, H, W]
    a = opacity[..., None, None] * torch.exp(-d2 / (2 * sigma[..., None, None] ** 2))
    out = images
    for k in range(count):
        out = out * (1 - a[:, k, None]) + a[:, k, None] * colour[:, k, :, None, None]
    return out


def broad_composite(rgba: torch.Tensor, gen: torch.Generator, broad: float) -> torch.Tensor:
    """`composite`, with the share `broad` of the images widened beyond the world, for training the autoencoder:
    the object's colours mixed by a random 3x3 matrix (half the time a channel permutation: saturated magenta,
    cyan, ...; otherwise rows that are convex combinations: duller hues, greys), times a brightness 0.5-1.5, half of
    all backgrounds blotchy, then `specks` and pixel noise (std up to 0.08). An encoder
    that has seen only the world's four colours can map a purple, speckled render to green latents, and stage 2, whose
    gradient reaches the pixels through the encoder, then makes purple "green" objects (docs/toyworld.md).
    `broad` 0: `composite` exactly, with the same random stream."""
    if broad <= 0:
        return composite(rgba, gen)
    x = rgba.permute(0, 3, 1, 2).float() / 255.0
    rgb, alpha = x[:, :3], x[:, 3:]
    b = x.shape[0]
    pick = torch.rand(b, generator=gen) < broad
    mix = torch.rand(b, 3, 3, generator=gen)
    mix = mix / mix.sum(2, keepdim=True)  # convex rows: mixed, duller hues
    perm = torch.eye(3)[torch.rand(b, 3, generator=gen).argsort(dim=1)]  # channels swapped: saturated hues
    mix = torch.where((torch.rand(b, generator=gen) < 0.5)[:, None, None], perm, mix)
    mix = mix * (0.5 + torch.rand(b, 1, 1, generator=gen))
    mix = torch.where(pick[:, None, None], mix, torch.eye(3).expand(b, 3, 3))
    rgb = torch.minimum(torch.einsum("bij,bjhw->bihw", mix, rgb), alpha)  # premultiplied: colour <= alpha
    images = composite(torch.cat([rgb, alpha], 1).permute(0, 2, 3, 1), gen, textured=0.5)
    noisy = specks(images, gen) + 0.08 * torch.rand(b, 1, 1, 1, generator=gen) * torch.randn(images.shape,
                                                                                              generator=gen)
    return torch.where(pick[:, None, None, None], noisy.clamp(0, 1), images)
