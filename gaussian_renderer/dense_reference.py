"""Dense twin of the tiled torch rasteriser: every pixel against every Gaussian, no tiles, no segmented sums.

Slow (memory H*W*N) and obviously right; the tests hold the tiled rasteriser to it. It shares only the projection
(gaussian_renderer/projection.py), which has its own closed-form and autograd-Jacobian tests. Compositing follows
the same definition (see torch_backend's docstring), written directly with a global depth sort and cumprod.
"""
from __future__ import annotations

from typing import Optional

import torch

from gaussian_renderer.projection import covariance_3d, gaussian_colors, project_gaussians
from gaussian_renderer.torch_backend import ALPHA_MAX, ALPHA_MIN, T_MIN, depth_feature


def render_dense(camera, means: torch.Tensor, features: Optional[torch.Tensor], opacities: torch.Tensor,
                 scales: torch.Tensor, rotations: torch.Tensor, bg_color: torch.Tensor, sh_degree: int,
                 scaling_modifier: float = 1.0, override_color: Optional[torch.Tensor] = None,
                 depth_grad: str = "alpha") -> dict:
    """Same inputs and outputs as torch_backend.render_torch."""
    width, height = int(camera.image_width), int(camera.image_height)
    viewspace = torch.zeros_like(means, requires_grad=True)
    proj = project_gaussians(means, covariance_3d(scales, rotations, scaling_modifier), camera, viewspace)
    colors = gaussian_colors(camera, means, features, sh_degree, override_color)
    order = torch.argsort(proj.depths.detach())
    order = order[proj.visible[order]]  # visible Gaussians, front to back  [M]

    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    pix = torch.stack([xs, ys], dim=-1).reshape(-1, 2).to(means)  # [HW, 2] pixel centres
    d = pix[:, None, :] - proj.means2d[order][None, :, :]  # [HW, M, 2]
    a, b, c = proj.conics[order].unbind(-1)  # [M]
    power = -0.5 * (a * d[..., 0] ** 2 + c * d[..., 1] ** 2) - b * d[..., 0] * d[..., 1]  # [HW, M]
    alpha = torch.clamp_max(opacities[order] * torch.exp(power), ALPHA_MAX)
    r = proj.radii[order].to(means)
    inside = (d[..., 0].abs() <= r) & (d[..., 1].abs() <= r)
    alpha = torch.where(inside & (alpha >= ALPHA_MIN), alpha, torch.zeros_like(alpha))

    ones = torch.ones_like(alpha[:, :1])
    trans = torch.cumprod(torch.cat([ones, 1.0 - alpha], dim=1), dim=1)  # [HW, M+1], trans[:, i] = T_i
    keep = (trans[:, 1:] >= T_MIN).detach()  # T_i (1 - a_i) >= 1e-4: i is composited
    weight = alpha * trans[:, :-1] * keep  # [HW, M]
    t_final = torch.prod(torch.where(keep, 1.0 - alpha, torch.ones_like(alpha)), dim=1)  # [HW]
    rgb = weight @ colors[order] + t_final[:, None] * bg_color.to(means)[None, :]  # [HW, 3]
    depth = weight @ depth_feature(proj.depths, depth_grad)[order]  # [HW]
    return {"render": rgb.T.reshape(3, height, width), "depth": depth.reshape(1, height, width),
            "alpha": (1.0 - t_final).reshape(1, height, width), "radii": proj.radii,
            "viewspace_points": viewspace, "visibility_filter": proj.visible}
