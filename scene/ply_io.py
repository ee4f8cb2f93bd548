"""PLY files: Gaussians in the standard 3DGS layout, and plain coloured point clouds.

3DGS layout (one `vertex` element, binary little endian, float32 properties, in this order):
    x y z nx ny nz f_dc_0..2 f_rest_0..(3(K-1)-1) opacity scale_0..2 rot_0..3
f_dc are the DC SH coefficients per channel; f_rest are channel-major (all of red's K-1 higher coefficients, then
green's, then blue's); opacity is the logit, scales are logs, rot is the (w, x, y, z) quaternion, unnormalised.
Normals are written as zeros. Writes are atomic: a temporary file in the target folder, then os.replace.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
from plyfile import PlyData, PlyElement

from utils.files import atomic_path

SH_BASES = {1: 0, 4: 1, 9: 2, 16: 3}  # bases per channel -> degree


class PlyFormatError(ValueError):
    """A PLY file is missing, unreadable, or lacks what the caller needs."""


def gaussian_ply_attributes(n_rest: int) -> list[str]:
    """Property names of the 3DGS layout with n_rest = 3 (K - 1) f_rest values."""
    return (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
            + [f"f_rest_{i}" for i in range(n_rest)] + ["opacity", "scale_0", "scale_1", "scale_2"]
            + [f"rot_{i}" for i in range(4)])


def atomic_write_ply(path: str, element: PlyElement) -> None:
    """Write a binary little-endian PLY with one element to `path` atomically (nothing half-written on failure)."""
    with atomic_path(path, suffix=".ply") as tmp, open(tmp, "wb") as f:
        PlyData([element], byte_order="<").write(f)


def write_gaussian_ply(path: str, xyz: np.ndarray, f_dc: np.ndarray, f_rest: np.ndarray, opacity: np.ndarray,
                       scale: np.ndarray, rot: np.ndarray) -> None:
    """xyz [N, 3], f_dc [N, 3], f_rest [N, 3, K-1] (channel, basis), opacity [N] logits, scale [N, 3] logs,
    rot [N, 4]. Values are stored as float32."""
    n = xyz.shape[0]
    rest = np.asarray(f_rest).reshape(n, -1)  # channel-major flattening
    cols = [xyz, np.zeros((n, 3)), f_dc, rest, np.asarray(opacity).reshape(n, 1), scale, rot]
    data = np.concatenate([np.asarray(c, dtype=np.float32).reshape(n, -1) for c in cols], axis=1)  # [N, F]
    names = gaussian_ply_attributes(rest.shape[1])
    records = np.empty(n, dtype=[(name, "<f4") for name in names])
    for i, name in enumerate(names):
        records[name] = data[:, i]
    atomic_write_ply(path, PlyElement.describe(records, "vertex"))


def read_ply(path: str) -> PlyData:
    """Parse a PLY file, turning every failure into a one-line PlyFormatError."""
    if not os.path.isfile(path):
        raise PlyFormatError(f"PLY file not found: {path}; check the path")
    try:
        return PlyData.read(path)
    except Exception as err:  # plyfile raises several types for corrupt input
        raise PlyFormatError(f"cannot parse PLY file {path} ({type(err).__name__}: {err}); "
                             "re-export it as a valid PLY") from None


def _vertex(ply: PlyData, path: str):
    if "vertex" not in [e.name for e in ply.elements]:
        raise PlyFormatError(f"PLY file {path} has no 'vertex' element; it is not a point cloud or 3DGS file")
    return ply["vertex"]


def read_gaussian_ply(path: str) -> dict[str, np.ndarray]:
    """Read a 3DGS-layout PLY (any property order, extra properties ignored).

    Returns float32 arrays: xyz [N, 3], f_dc [N, 3], f_rest [N, 3, K-1], opacity [N], scale [N, 3], rot [N, 4],
    and sh_degree (int) inferred from the number of f_rest properties.
    """
    v = _vertex(read_ply(path), path)
    names = [p.name for p in v.properties]
    rest = sorted((n for n in names if n.startswith("f_rest_")), key=lambda n: int(n.split("_")[-1]))
    need = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2",
            "rot_0", "rot_1", "rot_2", "rot_3"]
    missing = [n for n in need if n not in names]
    if missing:
        raise PlyFormatError(f"PLY file {path} is not in the 3DGS layout (missing {', '.join(missing)}); "
                             "point clouds go to the initialisation (init_shape=file) instead")
    bases = len(rest) // 3 + 1
    if len(rest) % 3 or bases not in SH_BASES:
        raise PlyFormatError(f"PLY file {path} has {len(rest)} f_rest properties; expected 0, 9, 24 or 45")

    def cols(keys: list[str]) -> np.ndarray:
        return np.stack([np.asarray(v[k], dtype=np.float32) for k in keys], axis=1) if keys else \
            np.zeros((v.count, 0), dtype=np.float32)

    out = {"xyz": cols(["x", "y", "z"]), "f_dc": cols(["f_dc_0", "f_dc_1", "f_dc_2"]),
           "f_rest": cols(rest).reshape(v.count, 3, bases - 1), "opacity": cols(["opacity"])[:, 0],
           "scale": cols([f"scale_{i}" for i in range(3)]), "rot": cols([f"rot_{i}" for i in range(4)])}
    out["sh_degree"] = SH_BASES[bases]
    return out


def read_point_cloud_ply(path: str) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Points [N, 3] float64 and colours [N, 3] in [0, 1] (None when the file has no red/green/blue).
    Integer colours are divided by their type's maximum (255 for uchar)."""
    v = _vertex(read_ply(path), path)
    names = [p.name for p in v.properties]
    if not all(k in names for k in ("x", "y", "z")):
        raise PlyFormatError(f"PLY file {path} has no x/y/z vertex properties")
    points = np.stack([np.asarray(v[k], dtype=np.float64) for k in ("x", "y", "z")], axis=1)
    if not all(k in names for k in ("red", "green", "blue")):
        return points, None
    raw = [np.asarray(v[k]) for k in ("red", "green", "blue")]
    if np.issubdtype(raw[0].dtype, np.integer):
        colors = np.stack(raw, axis=1).astype(np.float64) / np.iinfo(raw[0].dtype).max
    else:
        colors = np.stack(raw, axis=1).astype(np.float64)
    return points, np.clip(colors, 0.0, 1.0)


def write_point_cloud_ply(path: str, points: np.ndarray, colors: np.ndarray) -> None:
    """x y z nx ny nz red green blue (uchar colours), as stock's init_points3d.ply; atomic."""
    n = points.shape[0]
    records = np.empty(n, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("nx", "<f4"), ("ny", "<f4"),
                                 ("nz", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    for i, k in enumerate("xyz"):
        records[k] = points[:, i]
    for k in ("nx", "ny", "nz"):
        records[k] = 0.0
    rgb = np.clip(np.round(np.asarray(colors) * 255.0), 0, 255).astype(np.uint8)
    for i, k in enumerate(("red", "green", "blue")):
        records[k] = rgb[:, i]
    atomic_write_ply(path, PlyElement.describe(records, "vertex"))
