"""gsplat (nerfstudio, 1.5.x) backend: `gsplat.rasterization()` converted to this project's render() contract.

Conversions: viewmats = world-to-camera (column-vector convention, i.e. world_view_transform^T); K with
f = size / (2 tan(fov / 2)) and principal point (W/2, H/2) (gsplat puts pixel centres at +0.5, 3DGS at 0: the same
image); near plane 0.2 like 3DGS's culling; eps2d 0.3 = 3DGS's low-pass; render_mode "RGB+D", whose depth channel is
the un-normalised sum z a T we return ("ED" would divide by alpha). gsplat computes its own screen-space means, so
`viewspace_points.grad` is filled by a hook on meta["means2d"]: dL/d(pixel mean) times (W/2, H/2) = dL/d(NDC mean),
the unit of 3DGS's means2D gradient.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from gaussian_renderer.errors import BackendUnavailableError
from gaussian_renderer.projection import gaussian_colors
from gaussian_renderer.torch_backend import DEPTH_GRADS


def _intrinsics(camera, like: torch.Tensor) -> torch.Tensor:
    w, h = int(camera.image_width), int(camera.image_height)
    fx = w / (2.0 * math.tan(camera.FoVx * 0.5))
    fy = h / (2.0 * math.tan(camera.FoVy * 0.5))
    return like.new_tensor([[fx, 0.0, w / 2.0], [0.0, fy, h / 2.0], [0.0, 0.0, 1.0]])  # [3, 3]


def _fill_viewspace_grad(means2d: torch.Tensor, viewspace: torch.Tensor, width: int, height: int) -> None:
    """Route dL/dmeans2d (pixels, [1, N, 2]) into viewspace.grad[:, :2] in NDC units."""
    half = means2d.new_tensor([0.5 * width, 0.5 * height])

    def hook(grad: torch.Tensor) -> None:
        g = torch.zeros_like(viewspace)
        g[:, :2] = grad.reshape(-1, 2) * half
        viewspace.grad = g if viewspace.grad is None else viewspace.grad + g

    means2d.register_hook(hook)


def render_gsplat(camera, means: torch.Tensor, features: Optional[torch.Tensor], opacities: torch.Tensor,
                  scales: torch.Tensor, rotations: torch.Tensor, bg_color: torch.Tensor, sh_degree: int,
                  scaling_modifier: float = 1.0, override_color: Optional[torch.Tensor] = None,
                  depth_grad: str = "alpha") -> dict:
    """Same inputs and outputs as torch_backend.render_torch (CUDA tensors). depth_grad "full" is gsplat's own
    RGB+D mode; "alpha" renders z as a fourth colour channel held constant (detached), so that the depth image's
    gradient reaches the Gaussians only through their alpha, as in LucidDreamer's fork."""
    try:
        from gsplat import rasterization
    except ImportError as err:
        raise BackendUnavailableError(f"backend 'gsplat' is not importable ({err}); `pip install gsplat` "
                                      "or use PipelineParams.backend=torch") from err
    width, height = int(camera.image_width), int(camera.image_height)
    viewspace = torch.zeros_like(means, requires_grad=True)  # [N, 3]
    viewmat = camera.world_view_transform.to(means).T  # [4, 4] world -> camera
    backgrounds, mode = bg_color[None], "RGB+D"
    if override_color is not None:
        colors, degree = override_color.to(means), None  # [N, 3]
    else:
        colors, degree = features, sh_degree  # [N, K, 3]
    if depth_grad not in DEPTH_GRADS:
        raise ValueError(f"depth_grad '{depth_grad}' is not one of {', '.join(DEPTH_GRADS)}")
    if depth_grad == "alpha":  # z as a constant fourth colour channel
        z = (means @ viewmat[2, :3] + viewmat[2, 3]).detach()  # [N] view-space depth
        rgb = colors if degree is None else gaussian_colors(camera, means, features, sh_degree)
        colors, degree, mode = torch.cat([rgb, z[:, None]], dim=1), None, "RGB"  # [N, 4]
        backgrounds = torch.cat([bg_color, bg_color.new_zeros(1)])[None]
    rgbd, alphas, meta = rasterization(
        means=means, quats=rotations, scales=scales * scaling_modifier, opacities=opacities, colors=colors,
        viewmats=viewmat[None], Ks=_intrinsics(camera, means)[None], width=width, height=height,
        near_plane=0.2, eps2d=0.3, sh_degree=degree, packed=False, backgrounds=backgrounds,
        render_mode=mode, rasterize_mode="classic")
    radii = meta["radii"].reshape(means.shape[0], -1).max(dim=1).values.to(torch.int64)  # [N] ([C,N] or [C,N,2])
    if meta["means2d"].requires_grad:
        _fill_viewspace_grad(meta["means2d"], viewspace, width, height)
    rgbd = rgbd[0].permute(2, 0, 1)  # [4, H, W]
    return {"render": rgbd[:3], "depth": rgbd[3:4], "alpha": alphas[0].permute(2, 0, 1),
            "radii": radii, "viewspace_points": viewspace, "visibility_filter": radii > 0}
