"""Volume rendering of a radiance field (scene/nerf_model.py) under render()'s contract, in pure PyTorch.

Notation (Max 1995; NeRF, Mildenhall et al. 2020, Eq. 3). A pixel's ray is p(s) = o + s d with
d = A^-1 (x_n tan(FoVx/2), y_n tan(FoVy/2), 1), A the world-to-view rotation part, o the camera centre and
(x_n, y_n) the pixel centre's NDC (3DGS's ndc2Pix: x_n = (2 i + 1) / W - 1): s is then exactly the view-space z of
p(s), for any camera matrix (also stock's slightly non-orthonormal jittered ones). The ray's part inside the box
[-b, b]^3 is cut into intervals of world length delta (the field's marching step; the last one shorter); sample i sits
at s_i (the interval's middle, or a uniform jitter inside it for training renders) and
    tau_i   = sigma_i delta_i                          optical thickness
    alpha_i = 1 - exp(-tau_i)
    T_i     = exp(-sum_{j<i} tau_j)                    transmittance before sample i
    w_i     = alpha_i T_i
    C = sum_i w_i c_i + (1 - A) bg,   A = sum_i w_i = 1 - T_final,   D = sum_i w_i s_i
C is the render, A the alpha, D the depth (alpha-weighted view-space z, not normalised), as the rasterisers define
them. Samples outside the field's occupied cells are skipped: sigma = 0 there, the field is never evaluated.
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def camera_rays(camera, width: int, height: int, dtype: torch.dtype,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Origin [3] and directions [H*W, 3] (row-major pixels, not unit: their view-space z is 1) of a camera's pixel
    centres (module docstring)."""
    w2c = camera.w2c.detach().to(device=device, dtype=torch.float64)
    rot_inv = torch.linalg.inv(w2c[:3, :3])
    origin = -rot_inv @ w2c[:3, 3]
    xn = (2.0 * torch.arange(width, device=device, dtype=torch.float64) + 1.0) / width - 1.0
    yn = (2.0 * torch.arange(height, device=device, dtype=torch.float64) + 1.0) / height - 1.0
    yy, xx = torch.meshgrid(yn * math.tan(camera.FoVy / 2.0), xn * math.tan(camera.FoVx / 2.0), indexing="ij")
    d_view = torch.stack([xx, yy, torch.ones_like(xx)], -1).reshape(-1, 3)
    return origin.to(dtype), (d_view @ rot_inv.T).to(dtype)


def ray_box(origin: torch.Tensor, dirs: torch.Tensor, bound: float,
            near: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Entry and exit parameters s of rays o + s d [R, 3] through the box [-b, b]^3 (slab method); a ray that misses
    gets s_far = s_near. Entry is at least `near` (the camera's znear)."""
    safe = torch.where(dirs.abs() < 1e-12, torch.full_like(dirs, 1e-12), dirs)
    t0, t1 = (-bound - origin) / safe, (bound - origin) / safe
    s_near = torch.minimum(t0, t1).amax(dim=-1).clamp(min=near)
    s_far = torch.maximum(t0, t1).amin(dim=-1)
    return s_near, torch.maximum(s_far, s_near)


def ray_intervals(s_near: torch.Tensor, s_far: torch.Tensor, dir_norm: torch.Tensor, step: float, num: int,
                  jitter: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample positions s [R, N] and world lengths delta [R, N] of intervals of world length `step` from s_near to
    s_far (the last one cut at s_far, the ones after it of length 0). jitter [R, N] in [0, 1): position inside each
    interval (None: its middle)."""
    ds = (step / dir_norm)[:, None]  # [R, 1] the step in s
    k = torch.arange(num, device=s_near.device, dtype=s_near.dtype)
    lo = torch.minimum(s_near[:, None] + k * ds, s_far[:, None])
    hi = torch.minimum(lo + ds, s_far[:, None])
    frac = 0.5 if jitter is None else jitter
    return lo + frac * (hi - lo), (hi - lo) * dir_norm[:, None]


def composite(sigma: torch.Tensor, rgb: torch.Tensor, delta: torch.Tensor, z: torch.Tensor,
              bg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Front-to-back compositing (module docstring) of sigma [R, N], colours [R, N, 3], lengths delta [R, N] and view
    depths z [R, N] over bg [3]. Returns colour [R, 3], depth [R] (sum w z) and alpha [R] (sum w)."""
    tau = sigma * delta
    trans = torch.exp(-(torch.cumsum(tau, dim=-1) - tau))  # T_i, exclusive
    weights = (1.0 - torch.exp(-tau)) * trans
    acc = weights.sum(dim=-1)
    color = (weights[..., None] * rgb).sum(dim=-2) + (1.0 - acc)[:, None] * bg
    return color, (weights * z).sum(dim=-1), acc


def field_samples(field, points: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sigma [R, N] and colour [R, N, 3] of the field at points [R, N, 3], evaluated only where `valid` [R, N] and the
    field's occupancy grid (if any) says occupied; zero elsewhere."""
    flat = points.reshape(-1, 3)
    keep = valid.reshape(-1)
    if getattr(field, "occupied", None) is not None:
        keep = keep & field.occupied(flat)
    idx = keep.nonzero()[:, 0]
    sig, col = field.query(flat[idx])
    sigma = sig.new_zeros(flat.shape[0]).index_put((idx,), sig)
    rgb = col.new_zeros(flat.shape[0], 3).index_put((idx,), col)
    return sigma.reshape(valid.shape), rgb.reshape(*valid.shape, 3)


def render_volume(camera, field, bg_color: torch.Tensor, generator: Optional[torch.Generator] = None) -> dict:
    """render()'s dict for a radiance field (any object with bound, render_step, params.num_samples, query(x) ->
    (sigma, rgb), optionally occupied(x) -> bool). With a generator, sample positions are jittered inside their
    intervals (training renders); without, they sit in the middle (deterministic test renders). There are no
    Gaussians: radii, visibility_filter and viewspace_points have N = 0 rows (scales too, added by render())."""
    ref = field.planes if hasattr(field, "planes") else bg_color
    dtype, device = ref.dtype, ref.device
    w, h = int(camera.image_width), int(camera.image_height)
    origin, dirs = camera_rays(camera, w, h, dtype, device)
    s_near, s_far = ray_box(origin, dirs, field.bound, float(camera.znear))
    num = int(field.params.num_samples)
    jitter = None
    if generator is not None:
        jitter = torch.rand((dirs.shape[0], num), generator=generator, dtype=dtype,
                            device=generator.device).to(device)
    s, delta = ray_intervals(s_near, s_far, dirs.norm(dim=-1), field.render_step, num, jitter)
    points = origin + s[..., None] * dirs[:, None, :]  # [R, N, 3]
    sigma, rgb = field_samples(field, points, delta > 0)
    color, depth, acc = composite(sigma, rgb, delta, s, bg_color.to(device=device, dtype=dtype))
    return {"render": color.T.reshape(3, h, w), "depth": depth.reshape(1, h, w), "alpha": acc.reshape(1, h, w),
            "radii": torch.zeros(0, dtype=torch.int64, device=device),
            "viewspace_points": torch.zeros(0, 3, dtype=dtype, device=device, requires_grad=True),
            "visibility_filter": torch.zeros(0, dtype=torch.bool, device=device)}
