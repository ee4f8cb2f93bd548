"""Coloured surface samples of a mesh file (.obj/.glb/.ply via trimesh), e.g. SF3D's textured glb.

Faces are drawn with probability proportional to their area, points uniformly inside them (barycentric (1-u-v, u, v)
with the fold u + v > 1 -> (1-u, 1-v)). Colours: textured meshes interpolate the UVs and read the base-colour
texture bilinearly (u right, v up, wrapping; times the glTF baseColorFactor), otherwise vertex colours are
interpolated, otherwise face colours are taken, otherwise grey 0.5.
"""
from __future__ import annotations

import numpy as np

from scene.point_cloud import InitError, PointCloud, validate_point_cloud
from scene.rng import SeededRng


def load_meshes(path: str) -> list:
    """All triangle meshes of a file with their scene transforms applied; InitError when there are none."""
    import trimesh
    try:
        scene = trimesh.load(path, force="scene")
    except Exception as err:  # trimesh raises many types for corrupt input
        raise InitError(f"cannot read mesh file {path} ({type(err).__name__}: {err}); re-export it as "
                        ".obj/.glb/.ply") from None
    meshes = [g for g in scene.dump() if isinstance(g, trimesh.Trimesh) and len(g.faces) > 0]
    if not meshes:
        raise InitError(f"mesh file {path} has no faces; give a triangle mesh, or a .ply point cloud without faces")
    return meshes


def _texture_image(material) -> np.ndarray | None:
    """Base-colour texture [H, W, 3] in [0, 1] (SimpleMaterial.image or PBRMaterial.baseColorTexture)."""
    image = getattr(material, "baseColorTexture", None) or getattr(material, "image", None)
    if image is None:
        return None
    return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0


def bilinear_lookup(image: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Sample image [H, W, 3] at uv [M, 2] (u right, v up, wrapped to [0, 1)) bilinearly. Returns [M, 3]."""
    h, w = image.shape[:2]
    x = np.mod(uv[:, 0], 1.0) * (w - 1)
    y = (1.0 - np.mod(uv[:, 1], 1.0)) * (h - 1)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
    bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def _sample_colors(mesh, faces: np.ndarray, bary: np.ndarray) -> np.ndarray:
    """Colours [M, 3] of samples at barycentric coordinates bary [M, 3] in faces [M]."""
    visual = mesh.visual
    corner = mesh.faces[faces]  # [M, 3] vertex ids
    if visual.kind == "texture" and getattr(visual, "uv", None) is not None:
        image = _texture_image(visual.material)
        if image is not None:
            uv = (visual.uv[corner] * bary[..., None]).sum(axis=1)  # [M, 2]
            factor = getattr(visual.material, "baseColorFactor", None)
            scale = np.asarray(factor[:3], dtype=np.float64) / 255.0 if factor is not None else 1.0
            return bilinear_lookup(image, uv) * scale
        main = np.asarray(visual.material.main_color[:3], dtype=np.float64) / 255.0
        return np.broadcast_to(main, (faces.shape[0], 3)).copy()
    if visual.kind == "vertex":
        vc = np.asarray(visual.vertex_colors[:, :3], dtype=np.float64) / 255.0
        return (vc[corner] * bary[..., None]).sum(axis=1)
    if visual.kind == "face":
        return np.asarray(visual.face_colors[faces, :3], dtype=np.float64) / 255.0
    return np.full((faces.shape[0], 3), 0.5)


def mesh_points(path: str, num_pts: int, generator) -> PointCloud:
    """num_pts area-uniform surface samples of the mesh file with their colours (module docstring)."""
    if num_pts <= 0:
        raise InitError(f"init_num_pts must be positive to sample mesh {path}, got {num_pts}")
    meshes = load_meshes(path)
    rng = SeededRng(generator)
    areas = np.concatenate([m.area_faces for m in meshes])  # [F_total]
    if not np.isfinite(areas).all() or areas.sum() <= 0:
        raise InitError(f"mesh file {path} has no surface area (degenerate or non-finite faces)")
    cdf = np.cumsum(areas) / areas.sum()
    picks = np.minimum(np.searchsorted(cdf, rng.uniform(num_pts), side="right"), len(areas) - 1)
    uv = rng.uniform(num_pts, 2)
    fold = uv.sum(axis=1) > 1.0
    uv[fold] = 1.0 - uv[fold]
    bary = np.stack([1.0 - uv[:, 0] - uv[:, 1], uv[:, 0], uv[:, 1]], axis=1)  # [M, 3]
    starts = np.cumsum([0] + [len(m.faces) for m in meshes])
    points, colors = np.zeros((num_pts, 3)), np.zeros((num_pts, 3))
    for i, mesh in enumerate(meshes):
        sel = (picks >= starts[i]) & (picks < starts[i + 1])
        faces = picks[sel] - starts[i]
        tri = mesh.vertices[mesh.faces[faces]]  # [M_i, 3 corners, 3]
        points[sel] = (tri * bary[sel][..., None]).sum(axis=1)
        colors[sel] = _sample_colors(mesh, faces, bary[sel])
    return validate_point_cloud(points, colors, path)
