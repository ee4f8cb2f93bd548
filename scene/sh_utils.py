"""Real spherical harmonics up to degree 3, the colour model of 3D Gaussian splatting.

Notation: a Gaussian's colour in direction d (unit vector from the camera centre to the Gaussian's mean) is

    c(d) = max(0, sum_{l<=L} sum_m k_{lm} Y_{lm}(d) + 0.5)

with Y_{lm} the real SH basis functions (constants below are the standard normalisation factors, e.g.
Y_00 = 1 / (2 sqrt(pi)) = 0.28209...). The +0.5 offset means "all coefficients zero" is mid-grey, and
RGB -> DC coefficient is k_00 = (rgb - 0.5) / Y_00.
"""
from __future__ import annotations

import torch

SH_C0 = 0.28209479177387814  # 1 / (2 sqrt(pi))
SH_C1 = 0.4886025119029199  # sqrt(3 / (4 pi))
SH_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
SH_C3 = (-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154,
         -0.4570457994644658, 1.445305721320277, -0.5900435899266435)


def num_sh_bases(degree: int) -> int:
    """(degree + 1)^2 coefficients per colour channel."""
    return (degree + 1) ** 2


def rgb_to_sh(rgb: torch.Tensor) -> torch.Tensor:
    """DC coefficient of a constant colour: k_00 = (rgb - 0.5) / Y_00."""
    return (rgb - 0.5) / SH_C0


def eval_sh(degree: int, sh: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """Evaluate sum_lm k_lm Y_lm(d) (no +0.5 offset, no clamp).

    Args:
        degree: active degree L in 0..3; coefficients beyond (L+1)^2 are ignored.
        sh: [..., K, C] coefficients, K >= (L+1)^2 (3DGS layout: basis index before channel).
        dirs: [..., 3] unit directions.
    Returns:
        [..., C]
    """
    if not 0 <= degree <= 3:
        raise ValueError(f"SH degree must be in 0..3, got {degree}")
    if sh.shape[-2] < num_sh_bases(degree):
        raise ValueError(f"SH degree {degree} needs {num_sh_bases(degree)} coefficients, got {sh.shape[-2]}")
    out = SH_C0 * sh[..., 0, :]
    if degree == 0:
        return out
    x, y, z = dirs[..., 0:1], dirs[..., 1:2], dirs[..., 2:3]
    out = out - SH_C1 * y * sh[..., 1, :] + SH_C1 * z * sh[..., 2, :] - SH_C1 * x * sh[..., 3, :]
    if degree == 1:
        return out
    xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
    out = (out + SH_C2[0] * xy * sh[..., 4, :] + SH_C2[1] * yz * sh[..., 5, :]
           + SH_C2[2] * (2.0 * zz - xx - yy) * sh[..., 6, :]
           + SH_C2[3] * xz * sh[..., 7, :] + SH_C2[4] * (xx - yy) * sh[..., 8, :])
    if degree == 2:
        return out
    return (out + SH_C3[0] * y * (3.0 * xx - yy) * sh[..., 9, :]
            + SH_C3[1] * xy * z * sh[..., 10, :]
            + SH_C3[2] * y * (4.0 * zz - xx - yy) * sh[..., 11, :]
            + SH_C3[3] * z * (2.0 * zz - 3.0 * xx - 3.0 * yy) * sh[..., 12, :]
            + SH_C3[4] * x * (4.0 * zz - xx - yy) * sh[..., 13, :]
            + SH_C3[5] * z * (xx - yy) * sh[..., 14, :]
            + SH_C3[6] * x * (xx - 3.0 * yy) * sh[..., 15, :])
