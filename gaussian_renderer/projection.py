"""EWA projection of 3D Gaussians to screen space, shared by the torch rasteriser and its dense twin.

Notation (3DGS, Zwicker et al. 2001 "EWA splatting"):
    Sigma   = R S S^T R^T                      3D covariance from unit quaternion q -> R and scales S = diag(s)
    t       = W mu + w                         view-space mean (OpenCV camera: x right, y down, z forward)
    J       = [[f_x/t_z, 0, -f_x t_x/t_z^2],   Jacobian of the perspective map at t, with t_x/t_z and t_y/t_z
               [0, f_y/t_z, -f_y t_y/t_z^2]]   clamped to 1.3 tan(fov/2) (3DGS: keeps far off-screen splats sane)
    Sigma'  = J W Sigma W^T J^T + 0.3 I        2D covariance in pixels; +0.3 px^2 is the low-pass filter
    conic   = Sigma'^-1                        stored as (a, b, c) for [[a, b], [b, c]]
    r       = ceil(3 sqrt(lambda_max(Sigma'))) screen radius in pixels ("radii")
Pixel (i, j) has its centre at coordinates (i, j); the principal point of a centred projection is ((W-1)/2, (H-1)/2),
as in 3DGS's ndc2Pix.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from scene.geometry import quat_to_rotmat
from scene.sh_utils import eval_sh

NEAR_CULL = 0.2  # 3DGS culls Gaussians whose view-space depth is <= 0.2
LOW_PASS = 0.3  # px^2 added to the 2D covariance diagonal


@dataclass
class Projected:
    """Screen-space Gaussians. N = number of input Gaussians; entries of culled ones are meaningless."""
    means2d: torch.Tensor  # [N, 2] pixels (x, y)
    conics: torch.Tensor  # [N, 3] (a, b, c) of the inverse 2D covariance
    depths: torch.Tensor  # [N] view-space z
    radii: torch.Tensor  # [N] int64 pixels, 0 where culled
    px_lo: torch.Tensor  # [N, 2] int64 first covered pixel (x, y), clamped to the image
    px_hi: torch.Tensor  # [N, 2] int64 last covered pixel (x, y), clamped to the image
    visible: torch.Tensor  # [N] bool
    eig_max: torch.Tensor  # [N] lambda of the radius: an upper bound of the 2D covariance's largest eigenvalue (px^2)


def covariance_3d(scales: torch.Tensor, quats: torch.Tensor, modifier: float = 1.0) -> torch.Tensor:
    """Sigma = (R S)(R S)^T. scales [N, 3] (activated), quats [N, 4] (any norm) -> [N, 3, 3]."""
    q = quats / quats.norm(dim=-1, keepdim=True)
    m = quat_to_rotmat(q) * (scales * modifier)[:, None, :]  # R @ diag(s)
    return m @ m.transpose(1, 2)


def focal_lengths(camera) -> tuple[float, float]:
    """Pixel focal lengths f = size / (2 tan(fov / 2))."""
    fx = camera.image_width / (2.0 * math.tan(camera.FoVx * 0.5))
    fy = camera.image_height / (2.0 * math.tan(camera.FoVy * 0.5))
    return fx, fy


def _ewa_cov2d(t: torch.Tensor, cov3d: torch.Tensor, rot: torch.Tensor, camera) -> torch.Tensor:
    """J W Sigma W^T J^T [N, 2, 2] for view-space means t [N, 3] and world->view rotation W = rot [3, 3]
    (t_x/t_z, t_y/t_z clamped to 1.3 tan(fov/2) inside J; depths <= NEAR_CULL replaced by 1, they are culled)."""
    fx, fy = focal_lengths(camera)
    tz = t[:, 2]
    safe_z = torch.where(tz > NEAR_CULL, tz, torch.ones_like(tz))
    lim_x = 1.3 * math.tan(camera.FoVx * 0.5)
    lim_y = 1.3 * math.tan(camera.FoVy * 0.5)
    tx = (t[:, 0] / safe_z).clamp(-lim_x, lim_x) * safe_z
    ty = (t[:, 1] / safe_z).clamp(-lim_y, lim_y) * safe_z
    zeros = torch.zeros_like(tz)
    jac = torch.stack([
        torch.stack([fx / safe_z, zeros, -fx * tx / safe_z ** 2], dim=-1),
        torch.stack([zeros, fy / safe_z, -fy * ty / safe_z ** 2], dim=-1),
    ], dim=1)  # [N, 2, 3]
    jw = jac @ rot  # [N, 2, 3]
    return jw @ cov3d @ jw.transpose(1, 2)


def project_gaussians(means: torch.Tensor, cov3d: torch.Tensor, camera,
                      viewspace_points: Optional[torch.Tensor] = None) -> Projected:
    """Project N Gaussians with the camera (3DGS conventions, see module docstring).

    `viewspace_points` [N, 3] (zeros) is added to the pixel means scaled by (W/2, H/2), so that its gradient is
    dL/d(mean in NDC), the quantity 3DGS's densification thresholds are calibrated for.
    """
    width, height = int(camera.image_width), int(camera.image_height)
    view = camera.world_view_transform.to(means)  # [4, 4], row-vector convention: p_view = [p, 1] @ view
    proj = camera.full_proj_transform.to(means)  # [4, 4]
    ones = torch.ones_like(means[:, :1])
    p_hom = torch.cat([means, ones], dim=1)  # [N, 4]
    t = p_hom @ view[:, :3]  # [N, 3] view space
    clip = p_hom @ proj  # [N, 4]
    ndc = clip[:, :2] / (clip[:, 3:4] + 1e-7)
    # ndc2Pix: ((v + 1) * S - 1) / 2
    sizes = means.new_tensor([width, height])
    means2d = ((ndc + 1.0) * sizes - 1.0) * 0.5  # [N, 2]
    if viewspace_points is not None:
        means2d = means2d + viewspace_points[:, :2] * (0.5 * sizes)

    tz = t[:, 2]
    cov2d = _ewa_cov2d(t, cov3d, view[:3, :3].T, camera)  # [N, 2, 2]
    a = cov2d[:, 0, 0] + LOW_PASS
    b = cov2d[:, 0, 1]
    c = cov2d[:, 1, 1] + LOW_PASS
    det = a * c - b * b
    ok = (tz > NEAR_CULL) & (det > 0)
    safe_det = torch.where(ok, det, torch.ones_like(det))
    conics = torch.stack([c / safe_det, -b / safe_det, a / safe_det], dim=-1)  # [N, 3]

    radii, px_lo, px_hi, visible, lam = _screen_extent(means2d.detach(), a.detach(), c.detach(), det.detach(), ok,
                                                       width, height)
    return Projected(means2d, conics, tz, radii, px_lo, px_hi, visible, lam)


def _screen_extent(means2d: torch.Tensor, a: torch.Tensor, c: torch.Tensor, det: torch.Tensor, ok: torch.Tensor,
                   width: int, height: int) -> tuple[torch.Tensor, ...]:
    """radii = ceil(3 sqrt(lambda_max)) with 3DGS's lambda = mid + sqrt(max(0.1, mid^2 - det)); the covered pixels
    (square box of half-width r, clamped to the image); visible = in front, non-degenerate and on screen."""
    mid = 0.5 * (a + c)
    lam = mid + torch.sqrt(torch.clamp(mid * mid - det, min=0.1))
    radii = torch.ceil(3.0 * torch.sqrt(lam.clamp(min=0))).to(torch.int64)  # [N]
    r = radii.to(means2d.dtype)[:, None]
    finite = torch.isfinite(means2d).all(dim=1)
    m2 = torch.where(finite[:, None], means2d, torch.zeros_like(means2d))
    lo = torch.ceil(m2 - r).clamp(min=-1, max=1 << 30).to(torch.int64)  # [N, 2]
    hi = torch.floor(m2 + r).clamp(min=-1, max=1 << 30).to(torch.int64)
    px_lo = torch.maximum(lo, torch.zeros_like(lo))
    px_hi = torch.minimum(hi, torch.tensor([width - 1, height - 1], device=means2d.device))
    visible = ok & finite & (px_lo <= px_hi).all(dim=1)
    return torch.where(visible, radii, torch.zeros_like(radii)), px_lo, px_hi, visible, lam


def gaussian_colors(camera, means: torch.Tensor, features: Optional[torch.Tensor], sh_degree: int,
                    override_color: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-Gaussian RGB [N, 3]: override_color if given, else max(0, SH(d) + 0.5), d = normalise(mu - camera centre)."""
    if override_color is not None:
        return override_color.to(means)
    centre = camera.camera_center.to(means)
    dirs = means - centre
    dirs = dirs / dirs.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return torch.clamp_min(eval_sh(sh_degree, features, dirs) + 0.5, 0.0)
