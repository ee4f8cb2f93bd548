"""Rotations of the Gaussians (shared by densification and the renderers)."""
from __future__ import annotations

import torch

from scene.sh_utils import eval_sh, num_sh_bases


def quat_to_rotmat(q: torch.Tensor) -> torch.Tensor:
    """Unit quaternion (w, x, y, z) [N, 4] -> rotation matrix [N, 3, 3]."""
    w, x, y, z = q.unbind(-1)
    rows = (
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    )
    return torch.stack(rows, dim=-1).reshape(q.shape[:-1] + (3, 3))


# ---------------------------------------------------------------------------------------------- rotating a model
def quat_multiply(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hamilton product a b of (w, x, y, z) quaternions [..., 4] (broadcast): the rotation of b, then that of a
    (quat_to_rotmat(a b) = quat_to_rotmat(a) quat_to_rotmat(b)). |a b| = |a| |b|."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([aw * bw - ax * bx - ay * by - az * bz,
                        aw * bx + ax * bw + ay * bz - az * by,
                        aw * by - ax * bz + ay * bw + az * bx,
                        aw * bz + ax * by - ay * bx + az * bw], dim=-1)


def rotmat_to_quat(rot: torch.Tensor) -> torch.Tensor:
    """Rotation matrix [3, 3] (det +1) -> unit quaternion (w, x, y, z) [4] with w >= 0; quat_to_rotmat inverts it.

    The products P_ij = 4 q_i q_j are linear in the matrix entries (diagonal: 1 +- r00 +- r11 +- r22, off-diagonal:
    sums and differences of r_jk and r_kj); q is the row of the largest q_i^2 divided by 2 |q_i| (Shepperd's method:
    the four 4 q_i^2 sum to 4, so the divisor is at least 2)."""
    r = rot
    t = r[0, 0] + r[1, 1] + r[2, 2]
    products = torch.stack([
        torch.stack([1 + t, r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]]),
        torch.stack([r[2, 1] - r[1, 2], 1 + 2 * r[0, 0] - t, r[1, 0] + r[0, 1], r[0, 2] + r[2, 0]]),
        torch.stack([r[0, 2] - r[2, 0], r[1, 0] + r[0, 1], 1 + 2 * r[1, 1] - t, r[2, 1] + r[1, 2]]),
        torch.stack([r[1, 0] - r[0, 1], r[0, 2] + r[2, 0], r[2, 1] + r[1, 2], 1 + 2 * r[2, 2] - t])])  # [4, 4]
    i = int(torch.argmax(torch.diagonal(products)))
    q = products[i] / (2 * torch.sqrt(products[i, i]))
    q = q if q[0] >= 0 else -q  # q and -q are one rotation: w >= 0 makes q_(R^T) q_R = 1 unless R is a half turn
    return q / q.norm()


def sphere_directions(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """n unit vectors spread evenly over the sphere (a Fibonacci lattice) [n, 3]."""
    k = torch.arange(n, dtype=dtype) + 0.5
    z = 1 - 2 * k / n
    phi = k * torch.pi * (3 - 5 ** 0.5)  # the golden angle
    rho = torch.sqrt(1 - z * z)
    return torch.stack([rho * torch.cos(phi), rho * torch.sin(phi), z], dim=-1)


def sh_basis(degree: int, dirs: torch.Tensor) -> torch.Tensor:
    """The project's real SH basis Y_k(d), k < (degree + 1)^2, in eval_sh's order and signs: [n, 3] -> [n, K]."""
    k = num_sh_bases(degree)
    return eval_sh(degree, torch.eye(k, dtype=dirs.dtype).expand(len(dirs), k, k), dirs)


def sh_rotation_matrices(rot: torch.Tensor, degree: int, n_dirs: int = 128) -> list[torch.Tensor]:
    """M_l for l = 1..degree, [2l+1, 2l+1] float64 each: the degree-l coefficients k_l of a colour c(d) become
    k'_l = M_l k_l, so that c'(R d) = c(d): the colour seen along d before the rotation is seen along R d after it.

    Each degree's functions span a rotation-invariant space, so Y_l(R^T d) = Y_l(d) M_l exactly for one matrix M_l
    (Y_l a row of the 2l+1 basis values): solved by least squares over n_dirs directions (any generic set of at least
    2l+1 gives the exact matrix; the basis is orthonormal, so M_l is orthogonal). Then
    c'(d) = sum k'_l . Y_l(d) = sum k_l . Y_l(R^T d) = c(R^T d)."""
    rot = torch.as_tensor(rot).detach().to("cpu", torch.float64)
    dirs = sphere_directions(n_dirs)
    before, after = sh_basis(degree, dirs), sh_basis(degree, dirs @ rot)  # rows d @ R = (R^T d)^T
    out = []
    for l in range(1, degree + 1):
        block = slice(l * l, (l + 1) ** 2)
        out.append(torch.linalg.lstsq(before[:, block], after[:, block]).solution)
    return out


def rotate_gaussians(xyz: torch.Tensor, rotation_quats: torch.Tensor, sh_rest: torch.Tensor,
                     rot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A model turned rigidly by the rotation R about the origin: it renders from the camera (R eye, R target, R up)
    as it did from (eye, target, up). Opacities, scales and the SH DC term are unchanged.

        mu'  = R mu                     positions
        q'   = q_R q                    orientations, so Sigma' = R Sigma R^T (q_R the quaternion of R)
        k'_l = M_l k_l, l = 1..3        view-dependent colour: c'(R d) = c(d) (sh_rotation_matrices)

    Args:
        xyz: [N, 3] positions. rotation_quats: [N, 4] (w, x, y, z), normalised or not (their norms are kept).
        sh_rest: [N, K-1, C] SH coefficients without the DC term, basis before channel (GaussianModel's
            _features_rest), K = (degree + 1)^2 in 1, 4, 9, 16.
        rot: [3, 3] proper rotation (R^T R = I, det R = +1), e.g. Z up -> Y up (export_ply.py).
    Returns:
        (xyz' [N, 3], rotation_quats' [N, 4], sh_rest' [N, K-1, C]) in the inputs' dtype and device.
    """
    rot = torch.as_tensor(rot, dtype=torch.float64)
    if rot.shape != (3, 3) or not torch.allclose(rot @ rot.T, torch.eye(3, dtype=torch.float64), atol=1e-6) \
            or abs(float(torch.linalg.det(rot)) - 1) > 1e-6:
        raise ValueError(f"rotate_gaussians needs a proper 3x3 rotation (R^T R = I, det +1), got {rot.tolist()}")
    bases = sh_rest.shape[1] + 1
    degree = {1: 0, 4: 1, 9: 2, 16: 3}.get(bases)
    if degree is None:
        raise ValueError(f"sh_rest has {bases - 1} coefficients per channel; expected 0, 3, 8 or 15")
    xyz_out = xyz @ rot.to(xyz).T
    quats_out = quat_multiply(rotmat_to_quat(rot).to(rotation_quats), rotation_quats)
    blocks = [torch.einsum("ij,njc->nic", m.to(sh_rest), sh_rest[:, l * l - 1:(l + 1) ** 2 - 1])
              for l, m in enumerate(sh_rotation_matrices(rot, degree), start=1)]
    sh_out = torch.cat(blocks, dim=1) if blocks else sh_rest.clone()
    return xyz_out, quats_out, sh_out
