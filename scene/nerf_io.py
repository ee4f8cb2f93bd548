"""A run's 3D model on disk, whichever the representation, and the NeRF's mesh.

Stage 2 saves its model in <run>/point_cloud/iteration_N/: `point_cloud.ply` (Gaussians, a standard 3DGS PLY) or
`nerf.safetensors` (ModelParams.representation nerf: the field's weights and buffers, its NeRFParams in the file's
metadata, so the file alone rebuilds it). `load_model` tells them apart by suffix.

The NeRF's mesh is the level set of the opacity field a(x) = 1 - exp(-sigma(x) L), L = MESH_SLAB = 0.25 world units:
the opacity of a slab of thickness L (half the initial sphere's radius) and density sigma(x), a number in [0, 1] like
the Gaussians' opacity field of scene/mesh_export.py. `threshold` 0.5 puts the surface where sigma = ln 2 / L = 2.8;
the initial sphere's then lies near the Gaussians' level set D = 0.5 (median radius 0.45 vs their 0.45 from 2k
points, 0.52 vs 0.48 from 20k). Sampled on a grid over the field's box, meshed by the same marching cubes (closed
cavities filled), coloured by the field at the vertices.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import trimesh

from scene.gaussian_model import GaussianModel
from scene.mesh_export import MeshExportError, check_mesh_settings, fill_cavities, marching_cubes, write_mesh
from scene.nerf_model import QUERY_CHUNK, NeRFModel

MODEL_FILES = {"gaussians": "point_cloud.ply", "nerf": "nerf.safetensors"}
MESH_SLAB = 0.25  # world length L of the NeRF mesh's opacity field a(x) = 1 - exp(-sigma(x) L)


def load_model(path: str | Path, device=None):
    """The 3D model in `path`: a NeRFModel for a .safetensors file, else a GaussianModel of the PLY (its own SH
    degree). Errors are one-line ValueErrors naming the file."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        return NeRFModel.load(str(path), device=device)
    model = GaussianModel(device=device)
    model.load_ply(str(path))
    return model


def save_model(model, path: str | Path) -> None:
    """Write `model` atomically to `path` (PLY for Gaussians, safetensors for a NeRF)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    model.save(str(path)) if getattr(model, "is_radiance_field", False) else model.save_ply(str(path))


@torch.no_grad()
def nerf_mesh(model: NeRFModel, resolution: int = 256, threshold: float = 0.5, fill: bool = True) -> trimesh.Trimesh:
    """The mesh of {x : 1 - exp(-sigma(x) L) = threshold} over the field's box (module docstring), `resolution`
    grid points a side, with the field's colours at the vertices."""
    check_mesh_settings(resolution, threshold)
    if not threshold < 1.0:
        raise MeshExportError(f"a NeRF's opacity field stays below 1: the threshold must be in (0, 1), got "
                              f"{threshold:g}")
    b = model.bound
    axis = torch.linspace(-b, b, resolution, device=model.device, dtype=model.planes.dtype)
    xx, yy, zz = torch.meshgrid(axis, axis, axis, indexing="ij")  # grid point (a, b, c) at lo + voxel (a, b, c)
    sigma = model.density_at(torch.stack([xx, yy, zz], -1).reshape(-1, 3))
    opacity = (1.0 - torch.exp(-sigma * MESH_SLAB)).reshape(resolution, resolution, resolution)
    grid = opacity.double().cpu().numpy()
    lo, voxel = np.full(3, -b), 2.0 * b / (resolution - 1)
    verts, faces = marching_cubes(fill_cavities(grid, threshold) if fill else grid, lo, voxel, threshold)
    pts = torch.as_tensor(verts, device=model.device, dtype=model.planes.dtype)
    rgb = torch.cat([model.query(pts[i:i + QUERY_CHUNK])[1] for i in range(0, len(pts), QUERY_CHUNK)])
    rgba = np.concatenate([np.round(rgb.cpu().numpy() * 255), np.full((len(verts), 1), 255)], 1).astype(np.uint8)
    return trimesh.Trimesh(verts, faces, vertex_colors=rgba, process=False)


def export_nerf_mesh(model: NeRFModel, folder: str | Path, resolution: int = 256, threshold: float = 0.5,
                     y_up: bool = False) -> tuple[trimesh.Trimesh, list[Path]]:
    """nerf_mesh + write_mesh (mesh.glb and mesh.obj in `folder`), as export_model_mesh does for Gaussians."""
    mesh = nerf_mesh(model, resolution, threshold)
    return mesh, write_mesh(mesh, folder, y_up)
