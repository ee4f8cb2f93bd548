"""Initial point clouds: stock sphere, .ply point clouds, textured / vertex-coloured meshes, Point-E gate, bad input."""
import importlib.util

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image
from plyfile import PlyData, PlyElement

from arguments import GenerateCamParams
from scene import GaussianModel, InitError, initial_point_cloud
from scene.initialization import load_file_points, normalize_to_scene, sphere_points
from scene.point_cloud import mean_sq_dist_knn
from scene.ply_io import write_point_cloud_ply


def test_sphere_is_seeded_and_within_radius():
    a = sphere_points(5000, np.random.default_rng(0))
    b = sphere_points(5000, np.random.default_rng(0))
    c = sphere_points(5000, np.random.default_rng(1))
    assert np.array_equal(a.points, b.points) and not np.array_equal(a.points, c.points)
    r = np.linalg.norm(a.points, axis=1)
    assert r.max() <= 0.5 and r.max() > 0.49 and abs(np.median(r) - 0.25) < 0.02  # radius ~ U[0, 0.5]
    assert np.all(np.abs(a.colors - 0.5) < 0.0012)  # stock's grey
    assert np.abs(a.points.mean(axis=0)).max() < 0.02


def test_knn_matches_brute_force():
    pts = np.random.default_rng(2).normal(size=(60, 3))
    d2 = ((pts[:, None] - pts[None]) ** 2).sum(-1)
    np.testing.assert_allclose(mean_sq_dist_knn(pts), np.sort(d2, axis=1)[:, 1:4].mean(1), rtol=1e-12)
    assert mean_sq_dist_knn(pts[:2]).shape == (2,) and mean_sq_dist_knn(pts[:1])[0] == 1e-7


def write_cloud(path, pts, rgb=None):
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")] + ([("red", "u1"), ("green", "u1"), ("blue", "u1")]
                                                           if rgb is not None else [])
    rec = np.empty(len(pts), dtype=fields)
    for i, k in enumerate("xyz"):
        rec[k] = pts[:, i]
    if rgb is not None:
        for i, k in enumerate(("red", "green", "blue")):
            rec[k] = rgb[:, i]
    PlyData([PlyElement.describe(rec, "vertex")]).write(str(path))


def test_point_cloud_files_with_and_without_colours(tmp_path):
    pts = np.random.default_rng(3).uniform(-2, 2, (50, 3)).astype(np.float32)
    rgb = np.random.default_rng(4).integers(0, 256, (50, 3)).astype(np.uint8)
    write_cloud(tmp_path / "c.ply", pts, rgb)
    write_cloud(tmp_path / "g.ply", pts)
    colored = load_file_points(str(tmp_path / "c.ply"), 10, np.random.default_rng(0))
    np.testing.assert_array_equal(colored.points, pts.astype(np.float64))  # all points, not normalised
    np.testing.assert_allclose(colored.colors, rgb / 255.0)
    grey = load_file_points(str(tmp_path / "g.ply"), 10, np.random.default_rng(0))
    assert np.all(grey.colors == 0.5)
    write_point_cloud_ply(str(tmp_path / "own.ply"), pts, rgb / 255.0)  # stock's init_points3d.ply layout
    np.testing.assert_allclose(load_file_points(str(tmp_path / "own.ply"), 1, 0).colors, rgb / 255.0)


def quad_mesh(visual):
    """A 2 x 1 quad in the z = 0 plane; u runs along x."""
    v = np.array([[0, 0, 0], [2, 0, 0], [2, 1, 0], [0, 1, 0]], dtype=float)
    return trimesh.Trimesh(v, np.array([[0, 1, 2], [0, 2, 3]]), visual=visual, process=False)


def half_red_half_blue():
    img = np.zeros((8, 16, 3), np.uint8)
    img[:, :8] = [255, 0, 0]
    img[:, 8:] = [0, 0, 255]
    return Image.fromarray(img)


@pytest.mark.parametrize("suffix", [".glb", ".obj"])
def test_textured_mesh_colours_come_from_the_texture(tmp_path, suffix):
    from trimesh.visual.material import PBRMaterial, SimpleMaterial
    uv = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], dtype=float)
    material = (PBRMaterial(baseColorTexture=half_red_half_blue(), baseColorFactor=[255, 255, 255, 255])
                if suffix == ".glb" else SimpleMaterial(image=half_red_half_blue(), diffuse=[255, 255, 255, 255]))
    path = tmp_path / f"quad{suffix}"
    quad_mesh(trimesh.visual.TextureVisuals(uv=uv, material=material)).export(str(path))
    pcd = load_file_points(str(path), 3000, np.random.default_rng(0))
    assert pcd.points.shape == (3000, 3)
    # normalised: bounding-box centre at the origin, farthest point at radius ~0.5
    assert np.abs(0.5 * (pcd.points.min(0) + pcd.points.max(0))).max() < 1e-2
    assert 0.49 < np.linalg.norm(pcd.points, axis=1).max() <= 0.5 + 1e-9
    # u (mesh x) -> scene x for .obj; for .glb (Y up) the mesh x becomes scene -x and the quad's plane z=0 -> y=0
    u_axis = pcd.points[:, 0] if suffix == ".obj" else -pcd.points[:, 0]
    if suffix == ".glb":
        assert np.abs(pcd.points[:, 1]).max() < 1e-9
    left, right = u_axis < -0.05, u_axis > 0.05
    np.testing.assert_allclose(pcd.colors[left].mean(0), [1, 0, 0], atol=0.02)
    np.testing.assert_allclose(pcd.colors[right].mean(0), [0, 0, 1], atol=0.02)
    model = GaussianModel(0)
    model.create_from_pcd(pcd.points, pcd.colors, 3.5)
    assert model.num_points == 3000 and torch.isfinite(model.get_scaling).all()


def test_vertex_coloured_mesh(tmp_path):
    colors = np.array([[255, 0, 0, 255], [0, 255, 0, 255], [0, 0, 255, 255], [255, 255, 255, 255]], np.uint8)
    path = tmp_path / "colored.ply"
    quad_mesh(trimesh.visual.ColorVisuals(vertex_colors=colors)).export(str(path))
    pcd = load_file_points(str(path), 2000, np.random.default_rng(1), normalize=False)
    # barycentric interpolation of the corner colours: near vertex 1 (2, 0, 0) the colour is green
    near = np.linalg.norm(pcd.points - [2, 0, 0], axis=1) < 0.15
    assert near.sum() > 3 and np.all(pcd.colors[near, 1] > 0.8)
    expect = np.clip(0.5 * pcd.points[:, :1] * [-1, 1, 0] + [1, 0, 0], 0, 1)  # on edge y = 0: red -> green in x
    edge = pcd.points[:, 1] < 0.02
    np.testing.assert_allclose(pcd.colors[edge, :2], expect[edge, :2], atol=0.05)


def test_initial_point_cloud_dispatch(tmp_path):
    pcd = initial_point_cloud(GenerateCamParams(init_num_pts=123), np.random.default_rng(0))
    assert pcd.points.shape == (123, 3)
    write_cloud(tmp_path / "c.ply", np.ones((4, 3), np.float32))
    p = GenerateCamParams(init_shape="file", init_path=str(tmp_path / "c.ply"))
    assert initial_point_cloud(p, 0).points.shape == (4, 3)
    with pytest.raises(InitError, match="unknown init_shape 'cube'"):
        initial_point_cloud(GenerateCamParams(init_shape="cube"), 0)


@pytest.mark.skipif(importlib.util.find_spec("point_e") is not None, reason="point_e is installed")
def test_pointe_without_the_package_is_a_clear_error():
    with pytest.raises(InitError, match="needs the point_e package.*pip install") as err:
        initial_point_cloud(GenerateCamParams(init_shape="pointe", init_prompt="a cat"), 0)
    assert "\n" not in str(err.value)


def test_bad_files_fail_in_one_line(tmp_path):
    (tmp_path / "garbage.glb").write_bytes(b"\x00\x01 this is not a glb")
    (tmp_path / "garbage.ply").write_bytes(b"not a ply at all")
    (tmp_path / "points_only.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\n")
    write_cloud(tmp_path / "empty.ply", np.zeros((0, 3), np.float32))
    write_cloud(tmp_path / "nan.ply", np.array([[0, 0, 0], [np.nan, 1, 1]], np.float32))
    (tmp_path / "model.fbx").write_text("x")
    cases = [("missing.obj", "not found"), ("garbage.glb", "cannot read mesh"), ("garbage.ply", "cannot parse"),
             ("points_only.obj", "no faces"), ("empty.ply", "empty"), ("nan.ply", "NaN"),
             ("model.fbx", "unsupported")]
    for name, words in cases:
        with pytest.raises(InitError, match=words) as err:
            load_file_points(str(tmp_path / name), 100, np.random.default_rng(0))
        assert "\n" not in str(err.value)
    with pytest.raises(InitError, match="init_path"):
        initial_point_cloud(GenerateCamParams(init_shape="file", init_path=None), 0)


def test_normalize_to_scene():
    pts = np.array([[1.0, 1.0, 1.0], [3.0, 5.0, 1.0], [2.0, 3.0, 4.0]])
    out = normalize_to_scene(pts)
    assert np.allclose(0.5 * (out.min(0) + out.max(0)), 0) and np.isclose(np.linalg.norm(out, axis=1).max(), 0.5)
