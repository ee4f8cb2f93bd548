"""Mesh export: the Gaussians' opacity field sampled on a grid, its level set by marching cubes, vertex colours.

Notation (3DGS): Gaussian i has mean mu_i, covariance Sigma_i = R_i S_i^2 R_i^T (S_i = diag(s_i), R_i the rotation of
the unit quaternion q_i), opacity o_i and view-independent colour c_i = clip(Y_00 k_00,i + 0.5, 0, 1) (its SH DC
term). With d = x - mu_i the opacity field and the colour field are

    D(x) = sum_i o_i exp(-1/2 d^T Sigma_i^-1 d)                                  (1)
    c(x) = sum_i o_i c_i exp(-1/2 d^T Sigma_i^-1 d) / D(x)                        (2)

and the mesh is the level set {x : D(x) = tau}, tau the threshold. A single Gaussian's level set is the ellipsoid
d^T Sigma^-1 d = 2 ln(o / tau); a solid filled with Gaussians has its surface where D falls to half its inside value.
Each Gaussian is evaluated at the grid points of the axis-aligned box of its `cutoff`-sigma ellipsoid (what is left
out is below o_i exp(-cutoff^2 / 2) per Gaussian), in slices of at most `budget` kernel values: memory stays bounded.
`field_at` is the dense twin of `splat_field` (every Gaussian at every point) that the tests compare against.
Coordinates are the world's (Z up); `z_up_to_y_up` turns them to glTF's convention.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
import trimesh
from scipy import ndimage
from skimage import measure

from scene.geometry import quat_to_rotmat
from scene.sh_utils import SH_C0
from utils.files import atomic_path

MESH_FILES = ("mesh.glb", "mesh.obj")
# Gaussians fainter than this set no bounding box (stock's pruning level: a trained model holds none)
MIN_BOX_OPACITY = 0.005
# grid resolutions accepted: below 8 nothing is left of a shape; the grid takes 16 bytes a point (density + colour,
# float32): 270 MB at 256, 2 GB at 512, 17 GB at 1024
MIN_RESOLUTION, MAX_RESOLUTION = 8, 1024
# kernel values evaluated at once (~100 MB of temporaries at 4 field channels)
DEFAULT_BUDGET = 1 << 21


class MeshExportError(ValueError):
    """The Gaussians give no mesh (none, all transparent, no surface at the threshold) or a setting is out of range;
    one line naming the problem and the fix."""


def check_mesh_settings(resolution: int, threshold: float) -> None:
    if not MIN_RESOLUTION <= int(resolution) <= MAX_RESOLUTION:
        raise MeshExportError(f"mesh resolution {resolution} is outside {MIN_RESOLUTION}..{MAX_RESOLUTION}; "
                              f"256 is a good default")
    if not 0.0 < float(threshold) < float("inf"):
        raise MeshExportError(f"mesh threshold {threshold} must be a positive number (the opacity-field level of "
                              f"the surface; 0.5 is a good default)")


def inverse_covariances(scales: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Sigma^-1 = R S^-2 R^T. scales [N, 3] (s, not log s), rotations [N, 4] unit (w, x, y, z) -> [N, 3, 3]."""
    rot = quat_to_rotmat(rotations)
    return (rot / scales[:, None, :] ** 2) @ rot.transpose(1, 2)


def axis_extents(scales: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """The standard deviation of each Gaussian along the world axes, sqrt(diag Sigma) [N, 3]: the cutoff-sigma
    ellipsoid fits in the box mu +- cutoff * sqrt(diag Sigma)."""
    rot = quat_to_rotmat(rotations)
    return torch.sqrt(((rot * scales[:, None, :]) ** 2).sum(-1))


def grid_bounds(xyz: torch.Tensor, extents: torch.Tensor, opacity: torch.Tensor,
                cutoff: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """The box (lo [3], hi [3]) holding the cutoff-sigma boxes of the Gaussians with opacity >= MIN_BOX_OPACITY."""
    keep = opacity >= MIN_BOX_OPACITY
    if not bool(keep.any()):
        raise MeshExportError(f"all {len(opacity)} Gaussians are transparent (the largest opacity is "
                              f"{float(opacity.max()):.3g} < {MIN_BOX_OPACITY}): there is no surface to mesh; "
                              f"export a trained model")
    lo = (xyz[keep] - cutoff * extents[keep]).amin(0)
    hi = (xyz[keep] + cutoff * extents[keep]).amax(0)
    return lo.double().cpu().numpy(), hi.double().cpu().numpy()


def grid_shape(lo: np.ndarray, hi: np.ndarray, resolution: int) -> tuple[float, tuple[int, int, int]]:
    """Cubic voxels with `resolution` grid points along the longest side of the box: (voxel size, shape)."""
    voxel = float(max(hi - lo)) / (resolution - 1)
    if not voxel > 0:
        raise MeshExportError("the Gaussians span an empty box (a single point of zero size); nothing to mesh")
    shape = tuple(int(np.floor((h - l) / voxel + 1e-9)) + 1 for l, h in zip(lo, hi))
    return voxel, shape


def splat_field(xyz: torch.Tensor, cov_inv: torch.Tensor, extents: torch.Tensor, weights: torch.Tensor,
                lo: np.ndarray, voxel: float, shape: tuple[int, int, int], cutoff: float = 3.0,
                budget: int = DEFAULT_BUDGET) -> torch.Tensor:
    """sum_i weights_i exp(-1/2 d^T Sigma_i^-1 d) at the grid points lo + voxel * (a, b, c): Eq. (1) with weights
    o_i, the numerator of Eq. (2) with weights o_i c_i.

    Args:
        xyz: [N, 3] means; cov_inv: [N, 3, 3]; extents: [N, 3] sqrt(diag Sigma); weights: [N, C].
        lo, voxel, shape: the grid (grid_bounds, grid_shape).
        cutoff: each Gaussian is evaluated at the grid points of the box mu +- cutoff * extents (its window).
        budget: kernel values evaluated at once (bounds the memory of the temporaries).
    Returns:
        [C, X, Y, Z] on xyz's device.
    """
    dev, dt = xyz.device, xyz.dtype
    lo_t = torch.as_tensor(lo, device=dev, dtype=dt)
    first = torch.ceil((xyz - cutoff * extents - lo_t) / voxel).long().clamp(min=0)  # [N, 3] window start
    last = torch.minimum(torch.floor((xyz + cutoff * extents - lo_t) / voxel).long(),
                         torch.tensor(shape, device=dev) - 1)  # [N, 3] inclusive
    size = last - first + 1  # [N, 3]
    ids = torch.nonzero((size > 0).all(1))[:, 0]
    field = torch.zeros(int(np.prod(shape)), weights.shape[1], device=dev, dtype=dt)
    if len(ids) == 0:
        return field.T.reshape(-1, *shape)
    # Gaussians with windows of one size share one set of offsets: no padding, no masks
    sizes, group = torch.unique(size[ids], dim=0, return_inverse=True)
    members = torch.split(ids[torch.argsort(group)], torch.bincount(group, minlength=len(sizes)).tolist())
    for window, idx in zip(sizes.tolist(), members):
        per = max(1, budget // int(np.prod(window)))
        for s in range(0, len(idx), per):
            i = idx[s:s + per]
            _splat_window(field, xyz[i], cov_inv[i], weights[i], first[i], window, lo_t, voxel, shape, budget)
    return field.T.reshape(-1, *shape)


def _splat_window(field: torch.Tensor, xyz, cov_inv, weights, first, window: list[int], lo_t, voxel: float, shape,
                  budget: int) -> None:
    """Add K Gaussians' kernels over windows of one size [3] to `field` [X*Y*Z, C].

    With b = lo + v first - mu (the window's corner) and k the offset in the window, the exponent
    (b + v k)^T A (b + v k), A = Sigma^-1, splits into per-Gaussian terms times per-offset terms, one matrix product:
        b^T A b + 2 v (A b) . k + v^2 sum_jl A_jl k_j k_l."""
    dev, dt = xyz.device, xyz.dtype
    axes = [torch.arange(w, device=dev) for w in window]
    k = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)  # [P, 3] offsets
    kf = k.to(dt)
    per_offset = torch.cat([torch.ones_like(kf[:, :1]), kf, kf ** 2, kf[:, [0]] * kf[:, [1]],
                            kf[:, [0]] * kf[:, [2]], kf[:, [1]] * kf[:, [2]]], 1)  # [P, 10]
    b = lo_t + first.to(dt) * voxel - xyz  # [K, 3]
    a = cov_inv
    ab = (a @ b[:, :, None])[..., 0]  # [K, 3]
    per_gaussian = torch.cat([(ab * b).sum(1, keepdim=True), 2 * voxel * ab,
                              voxel ** 2 * torch.stack([a[:, 0, 0], a[:, 1, 1], a[:, 2, 2], 2 * a[:, 0, 1],
                                                        2 * a[:, 0, 2], 2 * a[:, 1, 2]], 1)], 1)  # [K, 10]
    base = (first[:, 0] * shape[1] + first[:, 1]) * shape[2] + first[:, 2]  # [K] flat index of the corner
    k_flat = (k[:, 0] * shape[1] + k[:, 1]) * shape[2] + k[:, 2]  # [P]
    step = max(1, budget // len(xyz))  # a window larger than the budget is walked in slices
    for s in range(0, len(k), step):
        kernel = torch.exp(-0.5 * (per_gaussian @ per_offset[s:s + step].T))  # [K, p]
        flat = base[:, None] + k_flat[None, s:s + step]  # [K, p]
        values = kernel[:, :, None] * weights[:, None, :]  # [K, p, C]
        field.index_add_(0, flat.reshape(-1), values.reshape(-1, weights.shape[1]))


def field_at(points: torch.Tensor, xyz: torch.Tensor, cov_inv: torch.Tensor, weights: torch.Tensor,
             chunk: int = 4096) -> torch.Tensor:
    """The dense twin of splat_field: every Gaussian at every point, no cutoff. points [M, 3] -> [M, C]."""
    out = []
    for s in range(0, len(points), chunk):
        d = points[s:s + chunk, None, :] - xyz[None]  # [m, N, 3]
        kernel = torch.exp(-0.5 * torch.einsum("mni,nij,mnj->mn", d, cov_inv, d))
        out.append(kernel @ weights)
    return torch.cat(out) if out else points.new_zeros(0, weights.shape[1])


def fill_cavities(density: np.ndarray, threshold: float) -> np.ndarray:
    """Raise the field above the threshold in the closed cavities of {D >= tau} (regions not 26-connected to the
    grid's border): a model made of a surface layer of Gaussians, as trained ones are, then meshes as its outer
    surface only, not as a shell with a hidden inner wall."""
    inside = density >= threshold
    filled = ndimage.binary_fill_holes(inside, structure=np.ones((3, 3, 3), dtype=bool))
    out = density.copy()
    out[filled & ~inside] = 2.0 * threshold
    return out


def marching_cubes(density: np.ndarray, lo: np.ndarray, voxel: float,
                   threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The level set {D = tau} of a grid (grid point (a, b, c) at lo + voxel (a, b, c)) as a closed triangle mesh with
    outward faces: the grid is padded with a layer of zeros so that surfaces reaching its border close there.
    Returns vertices [V, 3] (world) and faces [F, 3]."""
    peak = float(density.max()) if density.size else 0.0
    if not peak >= threshold:
        raise MeshExportError(f"the opacity field never reaches the threshold {threshold:g} (its maximum is "
                              f"{peak:.3g}): lower the threshold below that, e.g. to {peak / 2:.2g} (--threshold or "
                              f"mesh_threshold)")
    padded = np.pad(density, 1)
    verts, faces, _, _ = measure.marching_cubes(padded, level=threshold, spacing=(voxel,) * 3,
                                                gradient_direction="ascent", allow_degenerate=False)
    return verts + (np.asarray(lo) - voxel), faces


def vertex_colors(vertices: np.ndarray, color_sum: np.ndarray, density: np.ndarray, lo: np.ndarray,
                  voxel: float) -> np.ndarray:
    """Eq. (2) at the vertices: trilinear interpolation of its numerator [3, X, Y, Z] and denominator [X, Y, Z].
    Returns [V, 3] in [0, 1]."""
    coords = ((vertices - lo) / voxel).T  # [3, V] grid coordinates
    num = np.stack([ndimage.map_coordinates(c, coords, order=1, mode="nearest") for c in color_sum], 1)
    den = ndimage.map_coordinates(density, coords, order=1, mode="nearest")[:, None]
    return np.clip(num / np.maximum(den, 1e-12), 0.0, 1.0)


def gaussians_mesh(xyz: torch.Tensor, scales: torch.Tensor, rotations: torch.Tensor, opacity: torch.Tensor,
                   colors: torch.Tensor, resolution: int = 256, threshold: float = 0.5, cutoff: float = 3.0,
                   bounds: Optional[tuple[np.ndarray, np.ndarray]] = None, fill: bool = True,
                   budget: int = DEFAULT_BUDGET) -> trimesh.Trimesh:
    """The mesh of the Gaussians' level set D = threshold (Eq. 1) with vertex colours (Eq. 2).

    Args:
        xyz [N, 3], scales [N, 3] (s), rotations [N, 4] (unit quaternions), opacity [N] in [0, 1], colors [N, 3] in
        [0, 1] (e.g. the SH DC colour, `dc_colors`).
        resolution: grid points along the longest side of the box; threshold: tau.
        bounds: (lo, hi) of the grid; default: the Gaussians' boxes (`grid_bounds`).
        fill: mesh the outer surface only (`fill_cavities`).
    """
    check_mesh_settings(resolution, threshold)
    if len(xyz) == 0:
        raise MeshExportError("the model holds no Gaussians: there is nothing to mesh; export a trained model")
    extents = axis_extents(scales, rotations)
    lo, hi = grid_bounds(xyz, extents, opacity, cutoff) if bounds is None else map(np.asarray, bounds)
    voxel, shape = grid_shape(lo, hi, resolution)
    weights = torch.cat([opacity[:, None], opacity[:, None] * colors], 1)  # [N, 4]
    grid = splat_field(xyz, inverse_covariances(scales, rotations), extents, weights, lo, voxel, shape, cutoff,
                       budget).cpu().numpy()
    density = fill_cavities(grid[0], threshold) if fill else grid[0]
    verts, faces = marching_cubes(density, lo, voxel, threshold)
    rgb = vertex_colors(verts, grid[1:], grid[0], lo, voxel)
    rgba = np.concatenate([np.round(rgb * 255), np.full((len(rgb), 1), 255)], 1).astype(np.uint8)
    return trimesh.Trimesh(verts, faces, vertex_colors=rgba, process=False)


def dc_colors(f_dc: torch.Tensor) -> torch.Tensor:
    """The view-independent colour of SH DC coefficients [N, 3]: clip(Y_00 k_00 + 0.5, 0, 1)."""
    return (SH_C0 * f_dc + 0.5).clamp(0.0, 1.0)


def model_mesh(gaussians, resolution: int = 256, threshold: float = 0.5, **kwargs) -> trimesh.Trimesh:
    """gaussians_mesh of a GaussianModel (its activated parameters)."""
    with torch.no_grad():
        return gaussians_mesh(gaussians.get_xyz, gaussians.get_scaling, gaussians.get_rotation,
                              gaussians.get_opacity[:, 0], dc_colors(gaussians.get_features[:, 0, :]), resolution,
                              threshold, **kwargs)


# our world is Z up with the front facing +Y; glTF's is Y up with the front facing +Z: (x, y, z) -> (-x, z, y),
# a proper rotation (det +1), so faces keep their outward orientation
Z_UP_TO_Y_UP = np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])


def z_up_to_y_up(vertices: np.ndarray) -> np.ndarray:
    """World (Z up, front +Y) -> glTF (Y up, front +Z). [V, 3] -> [V, 3]."""
    return np.asarray(vertices) @ Z_UP_TO_Y_UP.T


def write_mesh(mesh: trimesh.Trimesh, folder: str | Path, y_up: bool = False) -> list[Path]:
    """Write <folder>/mesh.glb and <folder>/mesh.obj (vertex colours), each atomically; y_up: rotate to glTF's
    Y-up convention first. Returns the paths."""
    if y_up:
        mesh = trimesh.Trimesh(z_up_to_y_up(mesh.vertices), mesh.faces, vertex_colors=mesh.visual.vertex_colors,
                               process=False)
    paths = [Path(folder) / name for name in MESH_FILES]
    for path in paths:
        data = mesh.export(file_type=path.suffix[1:])  # bytes (glb) or str (obj), written by us: atomic
        with atomic_path(path) as tmp:
            tmp.write_bytes(data if isinstance(data, bytes) else data.encode())
    return paths


def export_model_mesh(gaussians, folder: str | Path, resolution: int = 256, threshold: float = 0.5,
                      y_up: bool = False) -> tuple[trimesh.Trimesh, list[Path]]:
    """The one way a model becomes mesh files (export_mesh.py and train.py's save_mesh): model_mesh + write_mesh."""
    mesh = model_mesh(gaussians, resolution, threshold)
    return mesh, write_mesh(mesh, folder, y_up)
