"""Initial point clouds: sphere | point-cloud or mesh file | Point-E.

GaussianModel.create_from_pcd turns a PointCloud (scene/point_cloud.py) into Gaussians (log-scales from the kNN
distances, identity rotations, opacity 0.1, DC colour (rgb - 0.5) / Y_00).
"""
from __future__ import annotations

import os
import sys
import tempfile
from typing import Optional

import numpy as np

from scene.mesh_sampling import mesh_points
from scene.ply_io import PlyFormatError, read_ply, read_point_cloud_ply
from scene.point_cloud import InitError, PointCloud, validate_point_cloud
from scene.rng import SeededRng
from scene.sh_utils import SH_C0
from scene.stable_fast_3d import sf3d_mesh, sf3d_unavailable
from utils.reference_image import load_reference

SCENE_RADIUS = 0.5  # the sphere initialisation's radius; meshes are scaled to it
MESH_SUFFIXES = (".obj", ".glb", ".gltf", ".ply", ".off", ".stl")


def sphere_points(num_pts: int, generator, radius: float = SCENE_RADIUS) -> PointCloud:
    """Stock LucidDreamer's sphere: r ~ U[0, radius], polar ~ U[0, pi], azimuth ~ U[0, 2 pi] (so denser near the
    centre and the poles), colours SH2RGB(U[0, 1) / 255), i.e. grey 0.5 + < 0.0012."""
    rng = SeededRng(generator)
    theta = rng.uniform(num_pts) * np.pi
    phi = rng.uniform(num_pts) * 2.0 * np.pi
    r = rng.uniform(num_pts) * radius
    points = np.stack([r * np.sin(theta) * np.sin(phi), r * np.sin(theta) * np.cos(phi), r * np.cos(theta)], axis=1)
    colors = rng.uniform(num_pts, 3) / 255.0 * SH_C0 + 0.5
    return validate_point_cloud(points, colors, "sphere initialisation")


def normalize_to_scene(points: np.ndarray, radius: float = SCENE_RADIUS) -> np.ndarray:
    """Centre on the bounding-box centre and scale so that the farthest point lies at `radius`."""
    centre = 0.5 * (points.min(axis=0) + points.max(axis=0))
    extent = np.linalg.norm(points - centre, axis=1).max()
    return (points - centre) * (radius / extent if extent > 0 else 1.0)


def y_up_to_z_up(points: np.ndarray) -> np.ndarray:
    """glTF axes (Y up, +Z front) -> this project's (Z up, +Y front): (x, y, z) -> (-x, z, y), a rotation."""
    return np.stack([-points[:, 0], points[:, 2], points[:, 1]], axis=1)


def _is_point_cloud_ply(path: str) -> bool:
    ply = read_ply(path)
    faces = [e for e in ply.elements if e.name == "face"]
    return not faces or faces[0].count == 0


def load_file_points(path: str, num_pts: int, generator, normalize: Optional[bool] = None,
                     y_up: Optional[bool] = None) -> PointCloud:
    """A .ply point cloud (all its points, colours if present) or a mesh file (num_pts surface samples, colours
    from the texture or vertex colours; see mesh_points).

    Args:
        normalize: centre and scale to radius 0.5 (default: meshes yes, point clouds no: they are taken to be in
            scene coordinates already, e.g. a previous run's init_points3d.ply).
        y_up: rotate Y-up input to Z-up (default: yes for .glb/.gltf, whose standard is Y-up).
    """
    if not path or not os.path.isfile(path):
        raise InitError(f"initial model file not found: {path!r}; set GenerateCamParams.init_path to an existing "
                        ".ply/.obj/.glb file")
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in MESH_SUFFIXES:
        raise InitError(f"{path}: unsupported initial model type {suffix!r}; use one of {', '.join(MESH_SUFFIXES)}")
    try:
        if suffix == ".ply" and _is_point_cloud_ply(path):
            points, colors = read_point_cloud_ply(path)
            pcd = validate_point_cloud(points, colors, path)
            is_mesh = False
        else:
            pcd = mesh_points(path, num_pts, generator)
            is_mesh = True
    except PlyFormatError as err:
        raise InitError(str(err)) from None
    points = pcd.points
    if y_up if y_up is not None else suffix in (".glb", ".gltf"):
        points = y_up_to_z_up(points)
    if normalize if normalize is not None else is_mesh:
        points = normalize_to_scene(points)
    return PointCloud(points, pcd.colors)


def pointe_points(prompt: str, num_pts: int, generator, device=None) -> PointCloud:
    """Stock's Point-E initialisation: base40M-textvec + upsampler (4096 points) for `prompt`, flipped in y, lifted
    0.15 in z, each point replaced by num_pts // 5000 copies jittered in a 0.05 ball; grey colours (stock default).
    Needs the `point_e` package (and its checkpoints)."""
    try:
        from scene.pointe import sample_pointe
    except ImportError as err:
        raise InitError(f"init_shape 'pointe' needs the point_e package ({err}); install it with "
                        "`pip install git+https://github.com/openai/point-e` or use init_shape sphere|file") from None
    xyz = sample_pointe(prompt, device)  # [4096, 3]
    rng = SeededRng(generator)
    copies = max(1, int(num_pts / 5000))
    theta, phi = rng.uniform(copies) * np.pi, rng.uniform(copies) * 2 * np.pi
    r = rng.uniform(copies) * 0.05
    ball = np.stack([r * np.sin(theta) * np.sin(phi), r * np.sin(theta) * np.cos(phi), r * np.cos(theta)], axis=1)
    xyz = xyz * np.array([1.0, -1.0, 1.0]) + np.array([0.0, 0.0, 0.15])
    points = (xyz[:, None, :] + ball[None, :, :]).reshape(-1, 3)
    colors = rng.uniform(points.shape[0], 3) / 255.0 * SH_C0 + 0.5
    return validate_point_cloud(points, colors, "Point-E initialisation")


def sf3d_points(picture: str, num_pts: int, generator, device=None) -> PointCloud:
    """The paper's image-to-3D start (App. L): Stable Fast 3D's mesh of the picture, sampled like a mesh file (a glb:
    Y-up turned to Z-up, scaled to radius 0.5). Without sf3d or CUDA: one line on stderr, and stock's sphere."""
    reason = sf3d_unavailable(device)
    if reason is not None:
        print(f"init_shape sf3d: {reason}; starting from the sphere instead", file=sys.stderr)
        return sphere_points(num_pts, generator)
    ref = load_reference(picture)
    with tempfile.TemporaryDirectory(prefix="ptd_sf3d_") as folder:
        path = os.path.join(folder, "sf3d.glb")
        sf3d_mesh(ref.rgb, ref.mask, path, device)
        return load_file_points(path, num_pts, generator)


def initial_point_cloud(cam_params, generator, device=None) -> PointCloud:
    """Dispatch on GenerateCamParams.init_shape: sphere | file (init_path) | pointe (init_prompt) | sf3d
    (ref_image)."""
    shape = cam_params.init_shape
    if shape == "sphere":
        return sphere_points(int(cam_params.init_num_pts), generator)
    if shape == "file":
        return load_file_points(cam_params.init_path, int(cam_params.init_num_pts), generator)
    if shape == "pointe":
        return pointe_points(cam_params.init_prompt, int(cam_params.init_num_pts), generator, device)
    if shape == "sf3d":
        return sf3d_points(cam_params.ref_image, int(cam_params.init_num_pts), generator, device)
    raise InitError(f"unknown init_shape {shape!r}; use sphere, file (with init_path), pointe or sf3d (with "
                    f"ref_image)")
