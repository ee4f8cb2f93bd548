"""inria backend: `diff_gaussian_rasterization` as built from submodules/ (LucidDreamer's fork of graphdeco's).

The fork returns (color [3, H, W], radii [N], depth_alpha [2, H, W]) with depth_alpha[0] = sum z a T (not divided
by alpha) and depth_alpha[1] = the final transmittance T, which the fork calls "alpha". This project's alpha is the
accumulated opacity, so alpha = 1 - depth_alpha[1]. viewspace_points is passed as the rasteriser's means2D, whose
gradient the CUDA backward writes in NDC units.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from gaussian_renderer.errors import BackendUnavailableError


def render_inria(camera, means: torch.Tensor, features: Optional[torch.Tensor], opacities: torch.Tensor,
                 scales: torch.Tensor, rotations: torch.Tensor, bg_color: torch.Tensor, sh_degree: int,
                 scaling_modifier: float = 1.0, override_color: Optional[torch.Tensor] = None,
                 depth_grad: str = "alpha") -> dict:
    """Same inputs and outputs as torch_backend.render_torch (CUDA float32 tensors). The fork sends the depth
    image's gradient through alpha only: depth_grad "full" is not available here."""
    if depth_grad != "alpha":
        raise BackendUnavailableError("backend 'inria' (LucidDreamer's fork) differentiates the depth image through "
                                      "alpha only; use PipelineParams.depth_grad=alpha or backend torch/gsplat")
    try:
        from diff_gaussian_rasterization import GaussianRasterizationSettings, GaussianRasterizer
    except ImportError as err:
        raise BackendUnavailableError(
            f"backend 'inria' is not importable ({err}); build it with `git submodule update --init --recursive && "
            "pip install submodules/diff-gaussian-rasterization` or use PipelineParams.backend=torch") from err
    viewspace = torch.zeros_like(means, requires_grad=True)  # [N, 3]
    settings = dict(image_height=int(camera.image_height), image_width=int(camera.image_width),
                    tanfovx=math.tan(camera.FoVx * 0.5), tanfovy=math.tan(camera.FoVy * 0.5), bg=bg_color,
                    scale_modifier=float(scaling_modifier), viewmatrix=camera.world_view_transform.to(means),
                    projmatrix=camera.full_proj_transform.to(means), sh_degree=int(sh_degree),
                    campos=camera.camera_center.to(means), prefiltered=False, debug=False)
    fields = GaussianRasterizationSettings._fields  # graphdeco versions differ in `debug` (and later extras)
    rasterizer = GaussianRasterizer(GaussianRasterizationSettings(**{k: v for k, v in settings.items()
                                                                     if k in fields}))
    out = rasterizer(means3D=means, means2D=viewspace,
                     shs=None if override_color is not None else features,
                     colors_precomp=override_color.to(means) if override_color is not None else None,
                     opacities=opacities[:, None], scales=scales, rotations=rotations, cov3D_precomp=None)
    if len(out) != 3:
        raise BackendUnavailableError(
            "backend 'inria' needs LucidDreamer's fork of diff-gaussian-rasterization (returns color, radii, "
            "depth_alpha); build submodules/diff-gaussian-rasterization from this repository")
    color, radii, depth_alpha = out
    return {"render": color, "depth": depth_alpha[0:1], "alpha": 1.0 - depth_alpha[1:2],
            "radii": radii.to(torch.int64), "viewspace_points": viewspace, "visibility_filter": radii > 0}
