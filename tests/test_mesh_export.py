"""Mesh export (scene/mesh_export.py, export_mesh.py, train.py's save_mesh) against analytic references: the level set
of one Gaussian is an ellipsoid of known volume; solids filled with Gaussians mesh to their own volume and silhouettes
(the paper's 16 evaluation cameras, rays against the analytic shape); a hollow shell meshes to its outer surface."""
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from plyfile import PlyData, PlyElement
from scipy.special import ndtr

from arguments import Config, RunError, load_config, run_dir, save_config
from scene import GaussianModel, eval_rig_cameras
from scene import mesh_export as me
from scene.geometry import quat_to_rotmat
from scene.ply_io import gaussian_ply_attributes, write_gaussian_ply
from scene.sh_utils import rgb_to_sh
from stages.mesh import export_run_mesh
from stages.run import mark_finished

ROOT = Path(__file__).resolve().parents[1]
# many small tensor ops: one thread is as fast alone and does not stall when other jobs share the cores
pytestmark = pytest.mark.usefixtures("one_thread")
TAU = 0.5
IDENTITY = (1.0, 0.0, 0.0, 0.0)


# ---------------------------------------------------------------------------------------------- references
def lattice(inside, spacing: float, half: float) -> torch.Tensor:
    """Cell centres of a cubic lattice inside the shape: each stands for a cell of volume spacing^3."""
    ax = torch.arange(-half, half - 1e-9, spacing) + spacing / 2
    points = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)
    return points[inside(points)]


def solid(points: torch.Tensor, spacing: float, sigma: float, tau: float = TAU) -> dict:
    """Isotropic Gaussians on a lattice: inside, the field is o (2 pi)^{3/2} sigma^3 / spacing^3 (a Gaussian sum over
    a lattice finer than sigma / 0.7 is flat to 1e-4); o makes it 2 tau, so the surface sits where the blurred solid
    falls to half, i.e. on the shape's own boundary (less a curvature shift of ~sigma^2 / R)."""
    n = len(points)
    opacity = 2 * tau * spacing ** 3 / ((2 * math.pi) ** 1.5 * sigma ** 3)
    return {"xyz": points, "scales": torch.full((n, 3), sigma), "rotations": torch.tensor([IDENTITY]).repeat(n, 1),
            "opacity": torch.full((n,), opacity), "colors": torch.full((n, 3), 0.5)}


def pixel_rays(cam) -> tuple[np.ndarray, np.ndarray]:
    """World origin [3] and unit directions [H, W, 3] through the pixel centres (3DGS's pixel = ((ndc + 1) W - 1) / 2,
    OpenCV camera axes)."""
    w, h = cam.image_width, cam.image_height
    ndc_x = (2 * np.arange(w) + 1) / w - 1
    ndc_y = (2 * np.arange(h) + 1) / h - 1
    x, y = np.meshgrid(ndc_x * math.tan(cam.FoVx / 2), ndc_y * math.tan(cam.FoVy / 2))
    d_cam = np.stack([x, y, np.ones_like(x)], -1)
    w2c = cam.w2c.double().numpy()
    d = d_cam @ w2c[:3, :3]  # R^T d for each pixel
    return cam.camera_center.double().numpy(), d / np.linalg.norm(d, axis=-1, keepdims=True)


def ball_silhouette(cam, radius: float) -> np.ndarray:
    """Pixels whose ray passes within `radius` of the origin (in front of the camera)."""
    o, d = pixel_rays(cam)
    t = -(d @ o)  # closest approach along the ray
    closest = o + t[..., None] * d
    return (np.linalg.norm(closest, axis=-1) < radius) & (t > 0)


def box_silhouette(cam, half: float) -> np.ndarray:
    """Pixels whose ray enters the cube [-half, half]^3 (slab test)."""
    o, d = pixel_rays(cam)
    with np.errstate(divide="ignore"):
        inv = 1.0 / d
    t1, t2 = (-half - o) * inv, (half - o) * inv
    near, far = np.minimum(t1, t2).max(-1), np.maximum(t1, t2).min(-1)
    return (near < far) & (far > 0)


def blurred_box(x: np.ndarray, half: float, sigma: float) -> np.ndarray:
    """The cube's indicator blurred by N(0, sigma^2 I), which separates by axis: prod_k Phi((a - x_k) / sigma) -
    Phi((-a - x_k) / sigma). A lattice-aligned cube of Gaussians has the field 2 tau times this (cells tile the cube
    exactly), so its level set is {blurred_box >= 1/2}. x [..., 3] -> [...]."""
    return np.prod(ndtr((half - x) / sigma) - ndtr((-half - x) / sigma), -1)


def blurred_box_silhouette(cam, half: float, sigma: float) -> np.ndarray:
    """Pixels whose ray reaches blurred_box >= 1/2. Along a ray the blurred box is log-concave (a product of
    log-concave factors of an affine t), so its maximum is found by ternary search inside the box grown by 6 sigma."""
    o, d = pixel_rays(cam)
    grow = half + 6 * sigma
    with np.errstate(divide="ignore"):
        inv = 1.0 / d
    t1, t2 = (-grow - o) * inv, (grow - o) * inv
    lo, hi = np.minimum(t1, t2).max(-1), np.maximum(t1, t2).min(-1)
    hit = lo < hi
    lo, hi = np.where(hit, lo, 0.0), np.where(hit, hi, 1.0)
    for _ in range(40):  # the interval shrinks by (2/3)^40 ~ 1e-7
        m1, m2 = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        left_lower = blurred_box(o + m1[..., None] * d, half, sigma) < blurred_box(o + m2[..., None] * d, half, sigma)
        lo, hi = np.where(left_lower, m1, lo), np.where(left_lower, hi, m2)
    return hit & (blurred_box(o + lo[..., None] * d, half, sigma) >= 0.5)


def blurred_box_volume(half: float, sigma: float, step: float = 0.002) -> float:
    """Volume of {blurred_box >= 1/2} = {f(x) f(y) f(z) >= 1/2}, f the blurred interval: f falls with |z|, so over
    each (x, y) of a midpoint grid on one octant the set holds |z| <= f^-1(1 / (2 f(x) f(y)))."""
    x = np.arange(step / 2, half + 6 * sigma, step)
    f = ndtr((half - x) / sigma) - ndtr((-half - x) / sigma)  # falling
    need = 0.5 / np.maximum(f[:, None] * f[None, :], 1e-300)
    z = np.interp(-need, -f, x, left=0.0)  # f^-1, 0 where even z = 0 falls short
    return 8 * float(z.sum()) * step ** 2


def mesh_silhouette(mesh: trimesh.Trimesh, cam) -> np.ndarray:
    """Rasterise the mesh's triangles (coverage of pixel centres by edge functions) through the camera's own
    full_proj_transform. [H, W] bool."""
    w, h = cam.image_width, cam.image_height
    verts = np.c_[mesh.vertices, np.ones(len(mesh.vertices))] @ cam.full_proj_transform.double().numpy()
    assert (verts[:, 3] > 0).all(), "the mesh must lie in front of the camera"
    uv = ((verts[:, :2] / verts[:, 3:] + 1) * [w, h] - 1) / 2  # [V, 2] pixel coordinates
    tri = uv[mesh.faces]  # [F, 3, 2]
    lo = np.clip(np.ceil(tri.min(1)), 0, [w - 1, h - 1]).astype(int)
    hi = np.clip(np.floor(tri.max(1)), -1, [w - 1, h - 1]).astype(int)
    mask = np.zeros((h, w), bool)
    span = (hi - lo).max(1)
    for size in np.unique(span[span >= 0]):
        sel = span == size
        oy, ox = np.mgrid[0:size + 1, 0:size + 1]
        px, py = lo[sel, 0, None] + ox.ravel(), lo[sel, 1, None] + oy.ravel()  # [f, (size+1)^2]
        a, b, c = (tri[sel, k, :, None] for k in range(3))

        def edge(p, q):
            return (q[:, 0] - p[:, 0]) * (py - p[:, 1]) - (q[:, 1] - p[:, 1]) * (px - p[:, 0])
        e = np.stack([edge(a, b), edge(b, c), edge(c, a)])
        inside = ((e >= 0).all(0) | (e <= 0).all(0)) & (px <= hi[sel, 0, None]) & (py <= hi[sel, 1, None])
        mask[py[inside], px[inside]] = True
    return mask


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.fixture(scope="module")
def rig():
    return eval_rig_cameras(width=96, height=96)  # the paper's 16 views: 8 azimuths x elevations 0 and 45


# ---------------------------------------------------------------------------------------------- the field
def test_splat_field_matches_the_dense_twin():
    """Random anisotropic, rotated Gaussians: the windowed, chunked splat equals the dense sum (no cutoff) once the
    cutoff is wide, and stays within the cutoff's bound sum_i w_i exp(-cutoff^2 / 2) at the default 3 sigma; a budget
    smaller than one window (sliced windows) changes nothing."""
    gen = torch.Generator().manual_seed(0)
    n = 40
    xyz = torch.rand(n, 3, generator=gen)
    scales = torch.rand(n, 3, generator=gen) * 0.12 + 0.02
    rot = torch.nn.functional.normalize(torch.randn(n, 4, generator=gen), dim=-1)
    weights = torch.rand(n, 4, generator=gen)
    ext, cov_inv = me.axis_extents(scales, rot), me.inverse_covariances(scales, rot)
    lo, hi = me.grid_bounds(xyz, ext, weights[:, 0])
    voxel, shape = me.grid_shape(lo, hi, 20)
    idx = torch.stack(torch.meshgrid(*[torch.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    dense = me.field_at(torch.as_tensor(lo, dtype=torch.float32) + idx * voxel, xyz, cov_inv, weights)  # [M, 4]
    for cutoff, budget, tol in [(7.0, me.DEFAULT_BUDGET, 1e-5), (7.0, 2000, 1e-5),
                                (3.0, me.DEFAULT_BUDGET, float(weights.sum(0).max()) * math.exp(-4.5))]:
        fast = me.splat_field(xyz, cov_inv, ext, weights, lo, voxel, shape, cutoff, budget).reshape(4, -1).T
        assert (fast - dense).abs().max() <= tol + 1e-4 * float(dense.max()), (cutoff, budget)  # float32 sums
    # Sigma^-1 really is the inverse of R S^2 R^T
    r = quat_to_rotmat(rot)
    sigma = r @ torch.diag_embed(scales ** 2) @ r.transpose(1, 2)
    torch.testing.assert_close(sigma @ cov_inv, torch.eye(3).expand(n, 3, 3), atol=1e-4, rtol=0)


def test_one_gaussian_meshes_as_its_ellipsoid():
    """The level set o exp(-m/2) = tau of one rotated, anisotropic Gaussian is the ellipsoid m = 2 ln(o / tau):
    volume 4/3 pi s1 s2 s3 (2 ln(o / tau))^{3/2}. Tolerance 1.5% at resolution 64 (measured -0.5%: marching cubes
    cuts the corners of a convex surface)."""
    s = torch.tensor([[0.30, 0.15, 0.08]])
    q = torch.nn.functional.normalize(torch.tensor([[0.9, 0.3, -0.2, 0.4]]), dim=-1)
    o, tau = 0.9, 0.3
    mesh = me.gaussians_mesh(torch.tensor([[0.1, -0.2, 0.3]]), s, q, torch.tensor([o]), torch.ones(1, 3) * 0.5,
                             resolution=64, threshold=tau)
    expected = 4 / 3 * math.pi * float(s.prod()) * (2 * math.log(o / tau)) ** 1.5
    assert mesh.is_watertight and mesh.volume > 0  # closed, faces outward
    assert abs(mesh.volume / expected - 1) < 0.015, (mesh.volume, expected)
    # its principal axis: the vertices' spread is largest along R e_1
    axis = quat_to_rotmat(q)[0, :, 0].numpy()
    centred = mesh.vertices - mesh.vertices.mean(0)
    assert abs(np.linalg.svd(centred, full_matrices=False)[2][0] @ axis) > 0.99


# ---------------------------------------------------------------------------------------------- solids
SPACING, SIGMA = 0.08, 0.7 * 0.08  # sigma >= 0.7 spacing: the lattice sum is flat inside to 1e-4


def test_ball_mesh_has_the_balls_volume_and_silhouettes(rig):
    """Gaussians filling a ball (r = 1) on a lattice: the mesh is one closed surface, its volume is 4/3 pi within 2%
    (measured -0.7%: the blurred ball's half level lies at r = 0.9969, -0.94%, and the lattice's staircase adds a
    little), and its silhouette in each of the 16 evaluation views covers the analytic disc with IoU >= 0.98
    (measured >= 0.990)."""
    g = solid(lattice(lambda p: p.norm(dim=1) < 1.0, SPACING, 1.0), SPACING, SIGMA)
    mesh = me.gaussians_mesh(**g, resolution=48, threshold=TAU)
    assert mesh.is_watertight and len(mesh.split(only_watertight=False)) == 1
    assert abs(mesh.volume / (4 / 3 * math.pi) - 1) < 0.02, mesh.volume
    ious = [iou(mesh_silhouette(mesh, cam), ball_silhouette(cam, 1.0)) for cam in rig]
    assert min(ious) >= 0.98, ious


def test_cube_mesh_has_the_cubes_volume_and_silhouettes(rig):
    """Gaussians filling a cube (side 1.2): the blur rounds its edges over ~sigma, so the half level holds 2.1% less
    than the cube (blurred_box_volume) and its silhouettes lose a rim at the edges (IoU 0.90-0.93 against the sharp
    cube). The mesh: one closed surface; volume within 4% of the cube's and 1% of the blurred cube's (measured -2.2%
    and -0.1%); silhouettes IoU >= 0.98 against the blurred cube's in all 16 views (measured >= 0.99) and >= 0.88
    against the sharp cube's."""
    half = 0.6
    g = solid(lattice(lambda p: (p.abs() < half).all(1), SPACING, half), SPACING, SIGMA)
    mesh = me.gaussians_mesh(**g, resolution=48, threshold=TAU)
    assert mesh.is_watertight and len(mesh.split(only_watertight=False)) == 1
    assert abs(mesh.volume / (2 * half) ** 3 - 1) < 0.04, mesh.volume
    assert abs(mesh.volume / blurred_box_volume(half, SIGMA) - 1) < 0.01, mesh.volume
    for cam in rig:
        silhouette = mesh_silhouette(mesh, cam)
        assert iou(silhouette, blurred_box_silhouette(cam, half, SIGMA)) >= 0.98, cam.uid
        assert iou(silhouette, box_silhouette(cam, half)) >= 0.88, cam.uid


def test_silhouette_rasteriser_against_exact_meshes(rig):
    """The test's own rasteriser: an exact box mesh gives the analytic box silhouette, a fine icosphere (inscribed,
    0.05% smaller) the ball's."""
    box = trimesh.creation.box(extents=(1.2, 1.2, 1.2))
    ball = trimesh.creation.icosphere(subdivisions=5, radius=1.0)
    for cam in rig[::3]:
        assert iou(mesh_silhouette(box, cam), box_silhouette(cam, 0.6)) > 0.995
        assert iou(mesh_silhouette(ball, cam), ball_silhouette(cam, 1.0)) > 0.99


def test_hollow_shell_meshes_as_its_outer_surface():
    """Gaussians on the unit sphere only (as trained models are: a surface layer): the field across the layer is
    o (2 pi sigma^2 / a) exp(-r^2 / 2 sigma^2) (a = area per Gaussian), so the level tau lies at r = sigma
    sqrt(2 ln(2 pi o sigma^2 / (a tau))) on both sides. With cavities filled the mesh is the outer sphere alone;
    without, the shell (outer minus inner ball). Tolerances 3% and 5% (measured -0.6% and +1.2%; curvature shifts the
    planar offset by ~sigma^2 / R)."""
    n = 3000
    k = np.arange(n) + 0.5
    polar, azimuth = np.arccos(1 - 2 * k / n), math.pi * (1 + 5 ** 0.5) * k  # Fibonacci sphere: even spacing
    xyz = torch.tensor(np.stack([np.cos(azimuth) * np.sin(polar), np.sin(azimuth) * np.sin(polar), np.cos(polar)], 1),
                       dtype=torch.float32)
    area, sigma, o = 4 * math.pi / n, 0.065, 0.5
    offset = sigma * math.sqrt(2 * math.log(2 * math.pi * o * sigma ** 2 / (area * TAU)))
    g = {"xyz": xyz, "scales": torch.full((n, 3), sigma), "rotations": torch.tensor([IDENTITY]).repeat(n, 1),
         "opacity": torch.full((n,), o), "colors": torch.rand(n, 3)}
    outer = me.gaussians_mesh(**g, resolution=48, threshold=TAU)
    assert outer.is_watertight and len(outer.split(only_watertight=False)) == 1
    assert abs(outer.volume / (4 / 3 * math.pi * (1 + offset) ** 3) - 1) < 0.03
    shell = me.gaussians_mesh(**g, resolution=48, threshold=TAU, fill=False)
    assert len(shell.split(only_watertight=False)) == 2
    expected = 4 / 3 * math.pi * ((1 + offset) ** 3 - (1 - offset) ** 3)
    assert abs(shell.volume / expected - 1) < 0.05, (shell.volume, expected)


def test_vertex_colours_come_from_the_nearby_gaussians():
    """A ball red for x > 0 and blue for x < 0: vertices farther than 3 sigma from the seam take the side's colour
    (Eq. 2: the opacity-weighted mean of the Gaussians' DC colours), those in between blend."""
    g = solid(lattice(lambda p: p.norm(dim=1) < 1.0, 0.1, 1.0), 0.1, 0.07)
    red = (g["xyz"][:, 0] > 0)[:, None].float()
    g["colors"] = red * torch.tensor([1.0, 0.0, 0.0]) + (1 - red) * torch.tensor([0.0, 0.0, 1.0])
    mesh = me.gaussians_mesh(**g, resolution=40, threshold=TAU)
    rgba = mesh.visual.vertex_colors.astype(int)
    x = mesh.vertices[:, 0]
    assert (rgba[x > 0.21, 0] >= 250).all() and (rgba[x > 0.21, 2] <= 5).all()
    assert (rgba[x < -0.21, 2] >= 250).all() and (rgba[x < -0.21, 0] <= 5).all()
    assert (rgba[:, 1] == 0).all() and (rgba[:, 3] == 255).all()
    # and from a model, the SH DC colour clip(Y_00 k + 0.5, 0, 1)
    rgb = torch.tensor([[0.2, 0.5, 0.9]])
    torch.testing.assert_close(me.dc_colors(rgb_to_sh(rgb)), rgb)


def test_y_up_is_a_rotation_to_gltf_axes_and_files_round_trip(tmp_path):
    """--y-up: up (+Z) becomes +Y, the front (+Y) faces +Z, handedness kept (det +1, so faces stay outward); the GLB
    and OBJ hold the same vertices, faces and colours as the mesh."""
    m = me.Z_UP_TO_Y_UP
    assert np.allclose(m @ [0, 0, 1], [0, 1, 0]) and np.allclose(m @ [0, 1, 0], [0, 0, 1])
    assert np.isclose(np.linalg.det(m), 1.0)
    g = solid(lattice(lambda p: (p.abs() < 0.3).all(1) & (p[:, 2] > -0.1), 0.1, 0.3), 0.1, 0.07)
    g["colors"] = torch.rand(len(g["xyz"]), 3, generator=torch.Generator().manual_seed(1))
    mesh = me.gaussians_mesh(**g, resolution=24, threshold=TAU)
    for y_up in (False, True):
        folder = tmp_path / str(y_up)
        paths = me.write_mesh(mesh, folder, y_up=y_up)
        assert [p.name for p in paths] == ["mesh.glb", "mesh.obj"] and not list(folder.glob(".tmp_*"))
        want = me.z_up_to_y_up(mesh.vertices) if y_up else mesh.vertices
        for path in paths:
            back = trimesh.load(path, force="mesh", process=False)
            assert np.allclose(back.vertices, want, atol=1e-5) and (back.faces == mesh.faces).all()
            assert (back.visual.vertex_colors == mesh.visual.vertex_colors).all()
            assert back.volume > 0
    assert np.isclose(trimesh.load(tmp_path / "True" / "mesh.glb", force="mesh").bounds[1, 1], mesh.bounds[1, 2])


def test_no_surface_is_a_one_line_error():
    one = {"xyz": torch.zeros(1, 3), "scales": torch.full((1, 3), 0.1),
           "rotations": torch.tensor([IDENTITY]), "colors": torch.ones(1, 3)}
    with pytest.raises(me.MeshExportError, match="no Gaussians"):
        me.gaussians_mesh(**{k: v[:0] for k, v in one.items()}, opacity=torch.zeros(0))
    with pytest.raises(me.MeshExportError, match="transparent.*export a trained model"):
        me.gaussians_mesh(**one, opacity=torch.tensor([1e-4]))
    with pytest.raises(me.MeshExportError, match=r"never reaches the threshold 0.5 \(its maximum is 0\.2\d+\): lower"):
        me.gaussians_mesh(**one, opacity=torch.tensor([0.3]), resolution=16)
    for bad in ({"resolution": 4}, {"threshold": 0.0}, {"threshold": float("nan")}):
        with pytest.raises(me.MeshExportError):
            me.gaussians_mesh(**one, opacity=torch.tensor([0.9]), **bad)


# ---------------------------------------------------------------------------------------------- the entry points
def write_model(path: Path, g: dict) -> None:
    """The Gaussians as a 3DGS PLY (raw parameters: logit opacity, log scales); none: the header alone."""
    if len(g["xyz"]) == 0:
        records = np.empty(0, dtype=[(name, "<f4") for name in gaussian_ply_attributes(0)])
        PlyData([PlyElement.describe(records, "vertex")]).write(str(path))
        return
    o = g["opacity"].clamp(1e-7, 1 - 1e-7)
    write_gaussian_ply(str(path), g["xyz"].numpy(), rgb_to_sh(g["colors"]).numpy(), np.zeros((len(o), 3, 0)),
                       torch.log(o / (1 - o)).numpy(), torch.log(g["scales"]).numpy(), g["rotations"].numpy())


def finished_run(tmp_path: Path, g: dict) -> tuple[Config, Path]:
    """A run folder as train.py leaves it: config.yaml, the final PLY, the completion marker."""
    cfg = Config()
    cfg.ModelParams.output_root, cfg.ModelParams.workspace = str(tmp_path), "run"
    cfg.OptimizationParams.iterations, cfg.mesh_resolution = 7, 32
    folder = run_dir(cfg)
    ply = folder / "point_cloud" / "iteration_7" / "point_cloud.ply"
    ply.parent.mkdir(parents=True)
    write_model(ply, g)
    save_config(cfg, folder / "config.yaml")
    mark_finished(cfg)
    return cfg, folder


def run_script(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "export_mesh.py"), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_export_mesh_script_end_to_end(tmp_path):
    """The script on a finished run folder: its final PLY, its config's resolution, --y-up and --out; then an
    all-transparent model: one line on stderr, exit 1."""
    g = solid(lattice(lambda p: p.norm(dim=1) < 0.5, 0.1, 0.5), 0.1, 0.07)
    g["xyz"] = g["xyz"] + torch.tensor([0.2, 0.4, 0.6])  # off centre, so that the rotation shows
    _, folder = finished_run(tmp_path, g)
    done = run_script(folder, "--y-up", "--out", tmp_path / "mesh")
    assert done.returncode == 0, done.stderr
    assert "resolution 32" in done.stdout and "Y up" in done.stdout
    mesh = trimesh.load(tmp_path / "mesh" / "mesh.glb", force="mesh")
    assert mesh.is_watertight and abs(mesh.volume / (4 / 3 * math.pi * 0.5 ** 3) - 1) < 0.1
    assert np.allclose(mesh.bounds.mean(0), [-0.2, 0.6, 0.4], atol=0.02)  # (x, y, z) -> (-x, z, y)
    assert (tmp_path / "mesh" / "mesh.obj").is_file()

    clear = tmp_path / "clear.ply"
    write_model(clear, {**g, "opacity": torch.full_like(g["opacity"], 1e-4)})
    bad = run_script(clear)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1, bad.stderr
    assert "Gaussians are transparent" in bad.stderr and "export a trained model" in bad.stderr


def test_export_mesh_errors_are_one_line(tmp_path, capsys):
    """The same CLI in-process (an interpreter start costs seconds): an empty model, an unfinished run, a folder that
    is no run, a missing path, a bad resolution: exit 1 with one line naming the problem and the fix."""
    import export_mesh
    g = solid(lattice(lambda p: p.norm(dim=1) < 0.3, 0.1, 0.3), 0.1, 0.07)
    empty = tmp_path / "empty.ply"
    write_model(empty, {k: v[:0] for k, v in g.items()})
    _, unfinished = finished_run(tmp_path, g)
    (unfinished / "train_done.json").unlink()
    (unfinished / "point_cloud" / "iteration_7").rename(unfinished / "point_cloud" / "iteration_3")
    for args, message in [([empty], "holds no Gaussians: there is nothing to mesh; pass a trained model"),
                          ([unfinished], "no finished stage-2 model.*--resume"),
                          ([tmp_path / "missing"], "does not exist"),
                          ([tmp_path / "run" / "point_cloud"], "is not a run folder"),
                          ([unfinished / "config.yaml"], "is not a .ply file"),
                          ([unfinished / "point_cloud" / "iteration_3" / "point_cloud.ply", "--resolution", "4"],
                           "outside 8..1024")]:
        assert export_mesh.cli([str(a) for a in args]) == 1, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and re.search(message, err), err


def test_save_mesh_writes_the_run_mesh(tmp_path):
    """train.py with save_mesh: true calls export_run_mesh(cfg, gaussians) once the run is marked finished: the
    files land in the run folder at the config's resolution; a model without a surface is a RunError that says how
    to export again."""
    g = solid(lattice(lambda p: p.norm(dim=1) < 0.5, 0.1, 0.5), 0.1, 0.07)
    cfg, folder = finished_run(tmp_path, g)
    cfg.save_mesh = True
    gaussians = GaussianModel()
    gaussians.load_ply(str(folder / "point_cloud" / "iteration_7" / "point_cloud.ply"))
    mesh, paths = export_run_mesh(cfg, gaussians)
    assert paths == [folder / "mesh.glb", folder / "mesh.obj"]
    assert mesh.is_watertight and abs(mesh.volume / (4 / 3 * math.pi * 0.5 ** 3) - 1) < 0.1
    cfg.mesh_threshold = 1e3
    with pytest.raises(RunError, match="export_mesh.py"):
        export_run_mesh(cfg, gaussians)


def test_train_with_save_mesh_ends_with_the_mesh(tmp_path, monkeypatch):
    """train.main with save_mesh: true (the iterations left out: test_end_to_end runs them) writes mesh.glb and
    mesh.obj into the run folder after its completion marker, the same mesh export_mesh.py makes of the final PLY;
    with save_mesh: false it writes none."""
    import export_mesh
    import train
    monkeypatch.setattr(train, "run_loop", lambda cfg, state, start, device, writer: train.save_point_cloud(
        cfg, state.gaussians, cfg.OptimizationParams.iterations))
    small = ["PTDParams.mode=off", "save_video=false", "GenerateCamParams.init_num_pts=300",
             "GenerateCamParams.image_w=32", "GenerateCamParams.image_h=32", "mesh_resolution=32",
             "mesh_threshold=0.05"]  # the initial Gaussians' opacity is 0.1: their field stays near it
    folders = {}
    for save in (True, False):
        cfg = load_config(ROOT / "configs" / "smoke.yaml",
                          [*small, f"ModelParams.output_root={tmp_path / str(save)}", f"save_mesh={str(save).lower()}"])
        train.main(cfg)
        folders[save] = run_dir(cfg)
        assert [(run_dir(cfg) / name).is_file() for name in me.MESH_FILES] == [save, save]
    mesh = trimesh.load(folders[True] / "mesh.obj", process=False)
    export_mesh.main(folders[True], out=tmp_path / "again")
    again = trimesh.load(tmp_path / "again" / "mesh.obj", process=False)
    assert np.allclose(mesh.vertices, again.vertices) and (mesh.faces == again.faces).all()
