"""`mode: off` is stock LucidDreamer: background augmentation, the depth image's gradient, jittered camera poses, test
outputs, and the Eq. 7 path (paper parity), each against stock's own formulas (EnVision-Research/LucidDreamer 2ecf093,
re-derived here from its scene/dataset_readers.py, scene/cameras.py, gaussian_renderer/__init__.py and train.py)."""
import numpy as np
import pytest
import torch

import train
from stages.run import path_checkpoints
from arguments import load_config
from gaussian_renderer import disparity, render
from gaussian_renderer.dense_reference import render_dense
from scene import GaussianModel, OrbitCameraSampler, orbit_camera
from scene.cameras import make_camera
from test_end_to_end import SMOKE


# ---------------------------------------------------------------------------------------------- 1. background
def test_background_augmentation_is_stocks_colour_or_black(monkeypatch):
    """Stock: with probability bg_aug_ratio a random colour or black (1/2 each), else the run's background."""
    cfg = load_config(SMOKE, ["ModelParams.bg_aug_ratio=0.66"])
    seen = []

    def fake_render(view, gaussians, bg, **kwargs):
        seen.append(bg.clone())
        z = torch.zeros(1, 2, 2)
        return {"render": torch.zeros(3, 2, 2), "depth": z, "alpha": z, "scales": torch.zeros(1, 3)}
    monkeypatch.setattr(train, "render", fake_render)
    view = orbit_camera(3.5, 90.0, 0.0, 0.5, 2, 2)
    white = torch.ones(3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(1000):
        train.render_batch(cfg, [view, view, view], None, white, gen)
    bgs = torch.stack(seen)
    n = len(bgs)
    is_white, is_black = (bgs == 1).all(1), (bgs == 0).all(1)
    fractions = [float(x.sum()) / n for x in (is_white, is_black, ~(is_white | is_black))]
    assert fractions == pytest.approx([0.34, 0.33, 0.33], abs=0.02)  # 3000 draws: 3 sigma ~ 0.026 of 1, 0.009 here


# ---------------------------------------------------------------------------------------------- 2. depth gradient
def one_gaussian(depth_grad: str, renderer):
    """One Gaussian in front of the camera: (d sum(depth)/d mean, d sum(alpha)/d mean, z, sum(alpha), dz/d mean)."""
    model = GaussianModel(0, dtype=torch.float64)
    model.create_from_pcd(np.array([[0.1, 0.2, -0.1]]), np.array([[0.3, 0.6, 0.9]]), 1.0)
    with torch.no_grad():
        model._scaling.fill_(np.log(0.15))
        model._opacity.fill_(2.0)
    cam = orbit_camera(2.0, 80.0, 20.0, 0.8, 24, 24).to(dtype=torch.float64)
    args = dict(camera=cam, means=model.get_xyz, features=model.get_features, opacities=model.get_opacity[:, 0],
                scales=model.get_scaling, rotations=model.get_rotation, bg_color=torch.zeros(3, dtype=torch.float64),
                sh_degree=0)
    out = renderer(**args, depth_grad=depth_grad)
    g_depth, = torch.autograd.grad(out["depth"].sum(), model._xyz)
    out = renderer(**args, depth_grad=depth_grad)
    g_alpha, = torch.autograd.grad(out["alpha"].sum(), model._xyz)
    z = float(cam.w2c[2, :3].double() @ model.get_xyz[0].detach() + cam.w2c[2, 3])
    return g_depth, g_alpha, z, float(out["alpha"].sum().detach()), cam.w2c[2, :3].double()


@pytest.mark.parametrize("which", ["torch_backend", "dense_twin"])
def test_depth_gradient_goes_through_alpha_only_as_in_the_fork(which):
    """One Gaussian: depth = a z. Fork ("alpha"): d sum(depth)/d mu = z d sum(a)/d mu; "full" adds sum(a) dz/d mu."""
    renderer = _dispatch_torch if which == "torch_backend" else render_dense
    g_depth, g_alpha, z, alpha_sum, dz = one_gaussian("alpha", renderer)
    torch.testing.assert_close(g_depth, z * g_alpha, rtol=1e-9, atol=1e-12)
    g_full, _, _, _, _ = one_gaussian("full", renderer)
    torch.testing.assert_close(g_full, z * g_alpha + alpha_sum * dz[None], rtol=1e-9, atol=1e-12)
    assert (g_full - g_depth).abs().max() > 1e-3  # the two options differ


def _dispatch_torch(camera, means, features, opacities, scales, rotations, bg_color, sh_degree, depth_grad):
    """render() of the torch backend on raw tensors (a model-like object over them)."""
    class Params:
        get_xyz, get_features, get_opacity = means, features, opacities[:, None]
        get_scaling, get_rotation, active_sh_degree = scales, rotations, sh_degree
    return render(camera, Params, bg_color, backend="torch", depth_grad=depth_grad)


# ---------------------------------------------------------------------------------------------- 3. camera poses
def stock_view(center: np.ndarray, target: np.ndarray, up_noise: np.ndarray):
    """Stock's world_view_transform and camera_center for one jittered pose (float32 like stock): rand_poses' lookat,
    GenerateRandomCameras' R/T, Camera's getWorld2View2 and inverse()[3, :3]."""
    c, t, noise = (torch.tensor(v, dtype=torch.float32)[None] for v in (center, target, up_noise))
    forward = torch.nn.functional.normalize(c - t, dim=-1)
    up = torch.tensor([[0.0, 0.0, 1.0]])
    right = torch.nn.functional.normalize(torch.cross(forward, up, dim=-1), dim=-1)
    up = torch.nn.functional.normalize(torch.cross(right, forward, dim=-1) + noise, dim=-1)
    pose = torch.eye(4)
    pose[:3, :3] = torch.stack((-right[0], up[0], forward[0]), dim=-1)
    pose[:3, 3] = c[0]
    matrix = np.linalg.inv(pose.numpy())
    rot = -np.transpose(matrix[:3, :3])
    rot[:, 0] = -rot[:, 0]
    rt = np.zeros((4, 4))
    rt[:3, :3], rt[:3, 3], rt[3, 3] = rot.transpose(), -matrix[:3, 3], 1.0
    rt = np.linalg.inv(np.linalg.inv(rt))  # getWorld2View2 goes through the camera-to-world matrix and back
    wvt = torch.tensor(rt, dtype=torch.float32).transpose(0, 1)
    return wvt, wvt.inverse()[3, :3], right[0].numpy()


def test_jittered_pose_is_stocks_matrix():
    rng = np.random.default_rng(3)
    for _ in range(20):
        center = rng.normal(size=3) * 3.0 + np.array([0.0, 0.0, 1.0])
        target, noise = rng.normal(size=3) * 0.05, rng.normal(size=3) * 0.01
        f = (center - target) / np.linalg.norm(center - target)
        r = np.cross(f, [0.0, 0.0, 1.0])
        r /= np.linalg.norm(r)
        up = np.cross(r, f) + noise  # what the sampler hands make_camera: r x f + the up jitter
        cam = make_camera(center, target, up, 0.5, 16, 16, convention="stock")
        wvt, centre, right = stock_view(center, target, noise)
        torch.testing.assert_close(cam.world_view_transform, wvt, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cam.camera_center, centre, rtol=1e-5, atol=1e-5)
        # the centre stock's matrix implies: the eye reflected across the plane through the origin normal to r
        expected = center - 2 * np.dot(right, center) * right
        np.testing.assert_allclose(cam.camera_center.numpy(), expected, atol=2e-3)  # up to the non-orthonormal u


def test_stock_and_exact_agree_without_jitter_and_differ_with_it():
    base = ["GenerateCamParams.image_w=16", "GenerateCamParams.image_h=16"]
    for jitter, same in (("false", True), ("true", False)):
        cams = {}
        for convention in ("stock", "exact"):
            cfg = load_config(SMOKE, [*base, f"GenerateCamParams.jitter_pose={jitter}",
                                      f"GenerateCamParams.pose_convention={convention}"])
            sampler = OrbitCameraSampler(cfg.GenerateCamParams, np.random.default_rng(0), batch=10)
            cams[convention] = sampler.next_views(10)
        for a, b in zip(cams["stock"], cams["exact"]):
            assert (a.azimuth, a.polar, a.radius, a.FoVy) == (b.azimuth, b.polar, b.radius, b.FoVy)  # same draws
            close = torch.allclose(a.world_view_transform, b.world_view_transform, atol=1e-5)
            assert close == same
    moved = [float((a.camera_center - b.camera_center).norm()) for a, b in zip(cams["stock"], cams["exact"])]
    assert 0.0 < max(moved) < 1.0  # jittered stock centres leave the sampled eye by up to a few tenths


# ---------------------------------------------------------------------------------------------- 4. test outputs
def test_test_iterations_are_stocks():
    for iterations, ratio in ((5000, 5), (120, 2), (8, 1), (7, 3)):
        cfg = load_config(SMOKE, [f"OptimizationParams.iterations={iterations}",
                                  f"OptimizationParams.test_ratio={ratio}"])
        stock = [1] + [k * iterations // ratio for k in range(1, ratio)] + [iterations]  # stock train.py
        assert train.test_iterations(cfg) == set(stock)


def test_depth_picture_is_stocks_normalised_disparity():
    cfg = load_config(SMOKE, ["PipelineParams.backend=torch"])
    model = GaussianModel(0)
    model.create_from_pcd(np.random.default_rng(0).uniform(-0.4, 0.4, (60, 3)), None, 1.0)
    cam = orbit_camera(3.5, 90.0, 30.0, 0.55, 24, 24)
    image, depth = train.view_images(cfg, cam, model, torch.ones(3))
    pkg = render(cam, model, torch.ones(3), backend="torch")
    disp = disparity(pkg["depth"], pkg["alpha"], cam.focal_normalized)  # stock render()'s "depth"
    torch.testing.assert_close(depth, disp / disp.max())
    assert depth.shape == (1, 24, 24) and float(depth.max()) == 1.0
    # near things are bright (disparity), not dark: the centre pixel sees the cloud, a corner sees the background
    assert float(depth[0, 12, 12]) > float(depth[0, 0, 0])


# ---------------------------------------------------------------------------------------------- 6. Eq. 7 path
def test_checkpoint_path_starts_at_the_penultimate(tmp_path):
    lora = tmp_path / "path_lora"
    for step in (2, 4, 6):
        (lora / "checkpoints" / f"step_{step:06d}").mkdir(parents=True)
    over = [f"PTDParams.path_lora={lora}", "PTDParams.total_steps=40", "PTDParams.switch_interval=10"]
    paper = path_checkpoints(load_config(SMOKE, over))
    assert [p.name for p in paper] == ["step_000002", "step_000004"]  # s^(1), s^(2): s^(n) = s^(3) is left out
    last = path_checkpoints(load_config(SMOKE, [*over, "PTDParams.checkpoints_from=last"]))
    assert [p.name for p in last] == ["step_000002", "step_000004", "step_000006"]
    with pytest.warns(UserWarning, match=r"s\^\(1\) .. s\^\(1\) of the path are never traced"):
        path_checkpoints(load_config(SMOKE, [*over, "PTDParams.checkpoints_from=last",
                                                   "PTDParams.switch_interval=20"]))  # 3 x 20 > 40
    for step in (4, 6):
        (lora / "checkpoints" / f"step_{step:06d}").rmdir()
    with pytest.raises(ValueError, match="needs at least 2 checkpoints"):
        path_checkpoints(load_config(SMOKE, over))
