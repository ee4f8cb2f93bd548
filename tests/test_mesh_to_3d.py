"""Mesh-to-3D (paper App. L): configs/mesh_restyle.yaml starts from configs/meshes/crate.obj, an axis-aligned box
with half extents (0.5, 0.35, 0.3) and vertex colours linear in z. The initial Gaussians must lie on that box's
analytic surface, scaled as documented (centred, farthest sample at radius 0.5), spread over its faces by area, with
the interpolated colours; and a short run from it goes end to end."""
from pathlib import Path

import numpy as np
import pytest

import form_path
import train
from arguments import load_config
from arguments.checks import check_config
from scene.initialization import initial_point_cloud

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "mesh_restyle.yaml"
HALF = np.array([0.5, 0.35, 0.3])  # the crate's half extents (configs/meshes/crate.obj)
# its vertex colours at z = -0.3 and +0.3, as 8-bit values (trimesh stores vertex colours as uint8)
BOTTOM, TOP = (np.round(np.array(c) * 255) / 255 for c in ((0.36, 0.22, 0.12), (0.62, 0.42, 0.24)))

pytestmark = pytest.mark.usefixtures("one_thread")


def check_on_the_crate(points: np.ndarray, colors: np.ndarray | None = None) -> None:
    """points [N, 3] lie on the box HALF * s for one scale s, the documented one (farthest sample at radius 0.5,
    so a little short of the corner at s |HALF|), with the faces' share of points matching their share of the area;
    colors [N, 3] (optional) interpolate BOTTOM -> TOP in z."""
    assert np.abs(points.mean(axis=0)).max() < 0.05  # centred
    on_box = (np.abs(points) / HALF).max(axis=1)  # [N]: the scale of the box (centred, HALF's shape) through each
    s = on_box.mean()
    np.testing.assert_allclose(on_box, s, rtol=1e-5)  # one box: every point on its surface
    assert np.linalg.norm(points, axis=1).max() == pytest.approx(0.5, abs=1e-6)
    assert 0.5 <= s * np.linalg.norm(HALF) < 0.5 * 1.05  # the farthest of a few hundred samples is near a corner
    ratio = np.abs(points) / (HALF * s)  # [N, 3]: one coordinate is 1 on the surface, the others <= 1
    face = ratio.argmax(axis=1)  # 0: the two faces normal to x, 1: to y, 2: to z
    areas = np.array([HALF[1] * HALF[2], HALF[0] * HALF[2], HALF[0] * HALF[1]])
    share = np.bincount(face, minlength=3) / len(points)
    tolerance = 4 * np.sqrt(areas / areas.sum() * (1 - areas / areas.sum()) / len(points))  # 4 binomial sigmas
    np.testing.assert_array_less(np.abs(share - areas / areas.sum()), tolerance)
    if colors is not None:
        t = (points[:, 2] / (HALF[2] * s) + 1) / 2  # 0 at the bottom, 1 at the top
        np.testing.assert_allclose(colors, BOTTOM + t[:, None] * (TOP - BOTTOM), atol=1e-5)


def test_example_config_is_valid_and_samples_the_crate(monkeypatch):
    monkeypatch.chdir(ROOT)  # the config's mesh path is relative to the checkout's root, where the scripts run
    cfg = load_config(CONFIG, ["GenerateCamParams.init_num_pts=2000"])
    check_config(cfg)
    c = cfg.GenerateCamParams
    assert c.init_shape == "file" and c.ref_image is None and (ROOT / c.init_path).is_file()
    assert (ROOT / c.init_path).stat().st_size < 4096  # a few KB at most
    cloud = initial_point_cloud(c, np.random.default_rng(0))
    assert cloud.points.shape == (2000, 3)
    check_on_the_crate(cloud.points, cloud.colors)


@pytest.mark.slow
def test_mesh_restyle_runs_end_to_end_from_the_crate(tmp_path, monkeypatch):
    """form_path.py + train.py of configs/mesh_restyle.yaml at toy size (tiny prior, CPU): the initial Gaussians both
    stages use are the crate's surface samples, and the run finishes."""
    from plyfile import PlyData

    overrides = ["GuidanceParams.model_key=tiny", "GuidanceParams.fp16=false", "device=cpu",
                 "PipelineParams.backend=torch", "GenerateCamParams.image_w=32", "GenerateCamParams.image_h=32",
                 "GenerateCamParams.init_num_pts=300", "GuidanceParams.C_batch_size=2",
                 "OptimizationParams.iterations=6", "OptimizationParams.warmup_iter=3",
                 "OptimizationParams.densify_from_iter=2", "OptimizationParams.densify_until_iter=5",
                 "OptimizationParams.densification_interval=2", "OptimizationParams.save_iterations=[3]",
                 "OptimizationParams.test_ratio=1", "OptimizationParams.video_frames=4",
                 "OptimizationParams.checkpoint_interval=0", "PTDParams.total_steps=4", "PTDParams.num_views=4",
                 "PTDParams.path_epochs=2", f"ModelParams.output_root={tmp_path}", "ModelParams.workspace=crate"]
    cfg = load_config(CONFIG, overrides)
    monkeypatch.chdir(ROOT)  # the config's mesh path is relative to the checkout's root, where the scripts run
    form_path.main(cfg)
    ply = train.main(cfg)
    vertex = PlyData.read(str(tmp_path / "crate" / "init_points3d.ply"))["vertex"]
    points = np.stack([vertex["x"], vertex["y"], vertex["z"]], axis=1).astype(np.float64)
    assert points.shape == (300, 3)
    check_on_the_crate(points)
    assert ply.is_file() and (tmp_path / "crate" / "train_done.json").is_file()
    assert (tmp_path / "crate" / "videos" / "6_iteration" / "video_rgb_6.mp4").stat().st_size > 0
