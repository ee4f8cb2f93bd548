"""render(): one contract over three rasterisers (torch reference on any device | gsplat | inria, CUDA only).

Returned dict (every backend, same keys, shapes and conventions):
    render            [3, H, W]  colour composited over bg_color: sum_i c_i a_i T_i + T_final bg
    depth             [1, H, W]  sum_i z_i a_i T_i, view-space z, NOT normalised by alpha
    alpha             [1, H, W]  accumulated opacity 1 - T_final (LucidDreamer's fork returns T_final and calls it
                                 "alpha"; converted here)
    radii             [N] int    screen radius in pixels, 0 for culled Gaussians
    viewspace_points  [N, 3]     zeros with requires_grad; after backward, .grad[:, :2] = dL/d(mean in NDC), the
                                 screen-space positional gradient 3DGS densification thresholds
    visibility_filter [N] bool   radii > 0
    scales            [N, 3]     the (possibly noised) activated scales used for this render (for the scale loss)
A radiance field (ModelParams.representation: nerf) gives the same dict with N = 0 (gaussian_renderer/volume.py).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from gaussian_renderer.errors import BackendUnavailableError

BACKENDS = ("auto", "torch", "gsplat", "inria")
SCALE_NOISE_STD = math.sqrt(0.2) / 4.0  # LucidDreamer: s + N(0, 1) sqrt(0.2) s / 4


def _importable(module: str) -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def resolve_backend(backend: str, device: torch.device) -> str:
    """Name of the backend that will run: auto = inria, else gsplat, else torch, by what is importable and
    whether the Gaussians live on a CUDA device (CPU tensors always take torch)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown render backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    on_cuda = device.type == "cuda"
    if backend == "auto":
        if on_cuda and _importable("diff_gaussian_rasterization"):
            return "inria"
        if on_cuda and _importable("gsplat"):
            return "gsplat"
        return "torch"
    if backend in ("gsplat", "inria") and not on_cuda:
        raise BackendUnavailableError(
            f"backend {backend!r} needs the Gaussians on a CUDA device (they are on {device.type}); "
            "use PipelineParams.backend=torch (or auto) on CPU")
    return backend


def noisy_scales(scales: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """LucidDreamer's render-time scale augmentation: max(0, s + eps sqrt(0.2) s / 4), eps ~ N(0, 1)."""
    eps = torch.randn(scales.shape, generator=generator, dtype=scales.dtype,
                      device=generator.device if generator is not None else scales.device).to(scales.device)
    return torch.clamp(scales + eps * SCALE_NOISE_STD * scales, min=0.0)


def render(camera, gaussians, bg_color: torch.Tensor, *, backend: str = "auto", scaling_modifier: float = 1.0,
           override_color: Optional[torch.Tensor] = None, sh_degree: Optional[int] = None,
           scale_noise: bool = False, generator: Optional[torch.Generator] = None, tile_size: int = 8,
           depth_grad: str = "alpha") -> dict:
    """Render `gaussians` (a GaussianModel, or any object with get_xyz, get_features, get_opacity, get_scaling,
    get_rotation, active_sh_degree) from `camera` (scene.cameras.Camera) over bg_color [3].

    Args:
        backend: auto | torch | gsplat | inria (see resolve_backend).
        scaling_modifier: multiplies every scale (3DGS viewer option).
        override_color: [N, 3] RGB used instead of the SH colours.
        sh_degree: SH degree to evaluate (default: gaussians.active_sh_degree); 0 = LucidDreamer's SH-degree drop.
        scale_noise: apply LucidDreamer's scale noise (training renders; off for test renders).
        generator: torch.Generator of the scale noise (reproducible runs).
        tile_size: tile edge in pixels of the torch backend. Any size gives the same image; 8 (not 3DGS's 16) is
            2-3x faster on CPU because less of each tile falls outside a Gaussian's screen box.
        depth_grad: "alpha" (LucidDreamer's fork, the default): the depth image's gradient reaches the Gaussians only
            through their alpha, each z_i held constant; "full": also through z_i (torch and gsplat only).
    Returns:
        dict, see the module docstring.

    A radiance field (a model with `is_radiance_field`, scene/nerf_model.py) is volume-rendered instead
    (gaussian_renderer/volume.py): same keys, shapes, dtypes and conventions, with N = 0 rows for the per-Gaussian
    outputs. The Gaussian-only options (backend, scaling_modifier, override_color, sh_degree, scale_noise, tile_size,
    depth_grad) do not apply to it; `generator` jitters its samples (training renders).
    """
    if getattr(gaussians, "is_radiance_field", False):
        from gaussian_renderer.volume import render_volume
        if bg_color.shape != (3,):
            raise ValueError(f"bg_color must have shape [3], got {list(bg_color.shape)}")
        out = render_volume(camera, gaussians, bg_color, generator)
        out["scales"] = out["viewspace_points"].new_zeros(0, 3)
        return out
    means = gaussians.get_xyz  # [N, 3]
    name = resolve_backend(backend, means.device)
    if bg_color.shape != (3,):
        raise ValueError(f"bg_color must have shape [3], got {list(bg_color.shape)}")
    degree = gaussians.active_sh_degree if sh_degree is None else int(sh_degree)
    scales = gaussians.get_scaling  # [N, 3]
    if scale_noise:
        scales = noisy_scales(scales, generator)
    args = dict(camera=camera, means=means, features=gaussians.get_features, opacities=gaussians.get_opacity[:, 0],
                scales=scales, rotations=gaussians.get_rotation, bg_color=bg_color.to(means), sh_degree=degree,
                scaling_modifier=scaling_modifier, override_color=override_color, depth_grad=depth_grad)
    if name == "torch":
        from gaussian_renderer.torch_backend import render_torch
        out = render_torch(**args, tile_size=tile_size)
    elif name == "gsplat":
        from gaussian_renderer.gsplat_backend import render_gsplat
        out = render_gsplat(**args)
    else:
        from gaussian_renderer.inria_backend import render_inria
        out = render_inria(**args)
    out["scales"] = scales
    return out


@torch.no_grad()
def render_views(cameras, gaussians, bg_color: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Plain renders of `cameras` (no augmentation, no gradients), stacked: [N, 3, H, W] in [0, 1]. The one helper
    behind every "render these views" of the project (stage 1's renders, the probe, the monitor, CLIP's rig)."""
    return torch.stack([render(cam, gaussians, bg_color, backend=backend)["render"] for cam in cameras]).clamp(0, 1)


def disparity(depth: torch.Tensor, alpha: torch.Tensor, focal: float) -> torch.Tensor:
    """LucidDreamer's normalised disparity, the geometry image encoded instead of RGB for as_latent_ratio of steps.

        T    = 1 - alpha                          (transmittance; the fork's "alpha")
        disp = focal / (depth + 10 T + 1e-5)      (empty pixels get a large pseudo-depth, i.e. small disparity)
        d0   = min(disp over pixels with T <= 0.1), or min(disp) if there are none
        out  = clamp((disp - d0) / (max(disp) - d0), 0, 1)
    with depth the un-normalised sum z a T and focal = 1 / (2 tan(FoVx / 2)) (camera.focal_normalized). Minimum and
    maximum are taken per image (over the last three dimensions). The denominator is floored at 1e-12 (stock divides
    by zero on a constant image).

    Args:
        depth, alpha: [..., 1, H, W] (e.g. [1, H, W] from render(), or a stack [B, 1, H, W]).
    Returns:
        same shape, in [0, 1].
    """
    trans = 1.0 - alpha
    disp = focal / (depth + 10.0 * trans + 1e-5)
    dims = (-3, -2, -1)
    solid_min = torch.where(trans <= 0.1, disp, torch.full_like(disp, math.inf)).amin(dim=dims, keepdim=True)
    d0 = torch.where(torch.isinf(solid_min), disp.amin(dim=dims, keepdim=True), solid_min)
    span = (disp.amax(dim=dims, keepdim=True) - d0).clamp(min=1e-12)
    return torch.clamp((disp - d0) / span, 0.0, 1.0)


__all__ = ["render", "render_views", "disparity", "resolve_backend", "noisy_scales", "BackendUnavailableError",
           "BACKENDS"]
