"""The NeRF representation (ModelParams.representation: nerf): volume rendering against closed forms, gradcheck, the
render() contract beside the Gaussians, initial shapes, the occupancy grid, files and meshes; then both stages end
to end (PTD at weight 0 = vanilla byte for byte, exact resume, every tool on a NeRF run)."""
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from arguments import ConfigError, load_config
from arguments.checks import check_config
from arguments.params import NeRFParams
from gaussian_renderer import render
from gaussian_renderer.volume import camera_rays, composite, render_volume
from scene import GaussianModel, make_camera, orbit_camera
from scene.initialization import sphere_points
from scene.nerf_io import load_model, nerf_mesh
from scene.nerf_model import NeRFModel, marching_step

ROOT = Path(__file__).resolve().parents[1]
SMOKE_NERF = ROOT / "configs" / "smoke_nerf.yaml"


class SlabField:
    """An analytic field: density sigma_k and colour c_k for y in (lo_k, hi_k), zero elsewhere (slabs across the box
    along y; a camera on +y sees them front to back in list order)."""

    def __init__(self, slabs, bound=1.0, num_samples=64, dtype=torch.float64):
        self.slabs, self.bound = slabs, bound
        self.params = NeRFParams(bound=bound, num_samples=num_samples)
        self.render_step = marching_step(bound, num_samples)
        self.planes = torch.zeros(1, dtype=dtype)  # dtype/device of the render

    def query(self, x):
        sigma, rgb = x.new_zeros(len(x)), x.new_zeros(len(x), 3)
        for lo, hi, s, c in self.slabs:
            inside = (x[:, 1] > lo) & (x[:, 1] < hi)
            sigma = torch.where(inside, torch.full_like(sigma, s), sigma)
            rgb = torch.where(inside[:, None], x.new_tensor(c).expand(len(x), 3), rgb)
        return sigma, rgb


def front_camera(size=5, fovy=0.3, radius=3.0):
    """On the +y axis at `radius`, looking at the origin (azimuth 0 = front), square image of odd size (a centre
    pixel on the optical axis)."""
    return orbit_camera(radius, 90.0, 0.0, fovy, size, size)


def view_slopes(cam):
    """k = |d| for each pixel's ray direction d of view-space z 1: sqrt(1 + x_v^2 + y_v^2), x_v = x_n tan(FoVx/2)."""
    n = cam.image_width
    xn = (2.0 * torch.arange(n, dtype=torch.float64) + 1.0) / n - 1.0
    yv, xv = torch.meshgrid(xn * math.tan(cam.FoVy / 2), xn * math.tan(cam.FoVx / 2), indexing="ij")
    return torch.sqrt(1.0 + xv ** 2 + yv ** 2)


@pytest.mark.parametrize("num_samples", [7, 64])
def test_constant_density_slab_alpha_is_one_minus_exp(num_samples):
    # density 1.3 in the whole box: each ray crosses it from the face y = 1 to y = -1 (narrow fov), a chord of 2 k
    sigma, colour, bg = 1.3, (0.9, 0.2, 0.1), torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64)
    field = SlabField([(-1.0, 1.0, sigma, colour)], num_samples=num_samples)
    cam = front_camera(size=7)
    out = render_volume(cam, field, bg)
    alpha = 1.0 - torch.exp(-sigma * 2.0 * view_slopes(cam))  # alpha = 1 - exp(-sigma d)
    torch.testing.assert_close(out["alpha"][0], alpha, atol=1e-10, rtol=0)
    expect = alpha[None] * torch.tensor(colour, dtype=torch.float64)[:, None, None] + (1 - alpha[None]) * bg[:, None,
                                                                                                           None]
    torch.testing.assert_close(out["render"], expect, atol=1e-10, rtol=0)


def slab_depth(s0, length, tau):
    """int_{s0}^{s0+L} s (tau/L) exp(-(tau/L)(s - s0)) ds = s0 (1 - e^-tau) + (L/tau)(1 - e^-tau) - L e^-tau."""
    return s0 * (1 - math.exp(-tau)) + (length / tau) * (1 - math.exp(-tau)) - length * math.exp(-tau)


def test_two_slabs_colour_and_depth_closed_form():
    # camera at y = 3: view depth s = 3 - y on every ray; a front slab y in (0.4, 0.8) and a back one in (-0.6, -0.1)
    s1, c1, s2, c2 = 2.0, (1.0, 0.0, 0.0), 3.0, (0.0, 0.0, 1.0)
    bg = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    field = SlabField([(0.4, 0.8, s1, c1), (-0.6, -0.1, s2, c2)], num_samples=4096)
    cam = front_camera(size=5)
    out = render_volume(cam, field, bg)
    k = view_slopes(cam)
    for (i, j) in [(2, 2), (0, 0), (1, 4)]:
        kk = float(k[i, j])
        tau1, tau2 = s1 * 0.4 * kk, s2 * 0.5 * kk  # optical thickness: density x world length
        t1, t2 = math.exp(-tau1), math.exp(-tau2)
        colour = (1 - t1) * np.array(c1) + t1 * (1 - t2) * np.array(c2) + t1 * t2 * bg.numpy()
        depth = slab_depth(3 - 0.8, 0.4, tau1) + t1 * slab_depth(3 + 0.1, 0.5, tau2)
        np.testing.assert_allclose(out["render"][:, i, j].numpy(), colour, atol=3e-3)
        assert abs(float(out["alpha"][0, i, j]) - (1 - t1 * t2)) < 3e-3
        assert abs(float(out["depth"][0, i, j]) - depth) < 3e-3


def test_composite_is_front_to_back_alpha_blending():
    """composite() against the sequential over-operator C <- C + T a c, T <- T (1 - a) (Porter-Duff, front to back)."""
    gen = torch.Generator().manual_seed(0)
    sigma, delta = torch.rand(3, 6, generator=gen, dtype=torch.float64) * 4, torch.rand(3, 6, generator=gen,
                                                                                          dtype=torch.float64)
    rgb, z = torch.rand(3, 6, 3, generator=gen, dtype=torch.float64), torch.rand(3, 6, generator=gen).double()
    bg = torch.tensor([0.3, 0.6, 0.9], dtype=torch.float64)
    colour, depth, alpha = composite(sigma, rgb, delta, z, bg)
    c, d, trans = torch.zeros(3, 3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), torch.ones(3).double()
    for i in range(6):
        a = 1 - torch.exp(-sigma[:, i] * delta[:, i])
        c, d, trans = c + (trans * a)[:, None] * rgb[:, i], d + trans * a * z[:, i], trans * (1 - a)
    torch.testing.assert_close(colour, c + trans[:, None] * bg)
    torch.testing.assert_close(depth, d)
    torch.testing.assert_close(alpha, 1 - trans)


def test_rays_follow_the_camera_matrices_even_for_stock_jitter():
    """camera_rays' o + s d lands on its pixel centre under the rasterisers' full projection, at view z = s, also for
    stock's non-orthonormal jittered matrices."""
    cam = make_camera((0.3, 3.2, 0.9), (0.05, -0.04, 0.02), (0.01, 0.02, 1.0), 0.5, 6, 4, convention="stock")
    origin, dirs = camera_rays(cam, 6, 4, torch.float64, torch.device("cpu"))
    pts = origin + 2.5 * dirs  # [24, 3] at s = 2.5
    hom = torch.cat([pts, torch.ones(24, 1, dtype=torch.float64)], 1)
    view = hom @ cam.world_view_transform.double()
    clip = hom @ cam.full_proj_transform.double()
    ndc = clip[:, :2] / clip[:, 3:]
    pix = ((ndc + 1) * torch.tensor([6.0, 4.0], dtype=torch.float64) - 1) / 2  # 3DGS's ndc2Pix
    yy, xx = torch.meshgrid(torch.arange(4.0), torch.arange(6.0), indexing="ij")
    torch.testing.assert_close(pix, torch.stack([xx, yy], -1).reshape(-1, 2).double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(view[:, 2], torch.full((24,), 2.5, dtype=torch.float64))


def small_field(dtype=torch.float64, seed=0):
    params = NeRFParams(plane_resolution=4, plane_features=2, hidden_dim=4, num_samples=8, init_resolution=4,
                        occupancy_resolution=2)
    model = NeRFModel(params, dtype=dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # a non-zero output layer and a bias that makes the box semi-transparent
        model.w2.copy_(torch.randn(4, 4, generator=gen, dtype=torch.float64))
        model.density_bias.copy_(torch.randn(1, 4, 4, 4, generator=gen, dtype=torch.float64))
    return model


def test_gradcheck_of_the_renderer_float64():
    from torch.func import functional_call
    model = small_field()
    cam = front_camera(size=3, fovy=0.6).to(dtype=torch.float64)
    bg = torch.tensor([0.2, 0.4, 0.6], dtype=torch.float64)
    names = ["planes", "w1", "b1", "w2", "b2"]

    class Swapped:  # the model with its parameters replaced by the gradcheck inputs
        def __init__(self, values):
            self.values = dict(zip(names, values))
            self.bound, self.render_step, self.params, self.planes = model.bound, model.render_step, model.params, \
                model.planes

        def query(self, x):
            return functional_call(model, self.values, (x,))

    def fn(*values):
        out = render_volume(cam, Swapped(values), bg)
        return out["render"], out["depth"], out["alpha"]
    inputs = tuple(getattr(model, n).detach().clone().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)


def sphere_models(num=2000, seed=0):
    cloud = sphere_points(num, np.random.default_rng(seed))
    gaussians = GaussianModel(0)
    gaussians.create_from_pcd(cloud.points, cloud.colors, 3.5)
    return gaussians, NeRFModel.from_point_cloud(cloud.points, cloud.colors, NeRFParams(), seed=seed)


def test_render_dict_matches_the_gaussians_keys_shapes_dtypes():
    gaussians, nerf = sphere_models(500)
    cam = orbit_camera(3.5, 70.0, 30.0, 0.55, 40, 32)
    a, b = render(cam, gaussians, torch.ones(3), backend="torch"), render(cam, nerf, torch.ones(3))
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].device == b[key].device, key
        assert a[key].shape[1:] == b[key].shape[1:] and (key in ("render", "depth", "alpha")) == \
            (a[key].shape == b[key].shape), key
    assert b["radii"].shape == (0,) and b["viewspace_points"].requires_grad and b["scales"].shape == (0, 3)
    (b["render"].sum() + b["depth"].sum()).backward()
    assert b["viewspace_points"].grad is None or b["viewspace_points"].grad.numel() == 0
    assert nerf.w2.grad.abs().sum() > 0  # the loss reaches the field


def silhouette(out):
    return out["alpha"][0].detach() > 0.5


@pytest.mark.parametrize("shape", ["sphere", "box"])
def test_initial_field_has_the_initial_points_shape(shape):
    """The NeRF's initial silhouette against the Gaussians' made from the same points (IoU over three views), and the
    colour of the points."""
    rng = np.random.default_rng(0)
    if shape == "sphere":
        cloud = sphere_points(2000, rng)
        points, colors = cloud.points, cloud.colors
    else:  # an elongated red box (a file's shape: anything but the blob)
        points = rng.uniform(-1, 1, (3000, 3)) * np.array([0.6, 0.15, 0.3])
        colors = np.tile([0.9, 0.1, 0.1], (3000, 1))
    gaussians = GaussianModel(0)
    gaussians.create_from_pcd(points, colors, 3.5)
    nerf = NeRFModel.from_point_cloud(points, colors, NeRFParams(), seed=0)
    for azimuth in (0.0, 90.0, 225.0):
        cam = orbit_camera(3.5, 80.0, azimuth, 0.55, 40, 40)
        g, n = render(cam, gaussians, torch.ones(3), backend="torch"), render(cam, nerf, torch.ones(3))
        sg, sn = silhouette(g), silhouette(n)
        assert float((sg & sn).sum() / (sg | sn).sum()) > 0.85, azimuth
        alpha = n["alpha"].detach()
        own = ((n["render"].detach() - (1 - alpha)) / alpha.clamp(min=1e-6))[:, sn]  # un-composited from white
        np.testing.assert_allclose(own.mean(dim=1).numpy(), colors.mean(0), atol=0.03)


def test_occupancy_grid_skips_empty_space_without_changing_the_render():
    _, nerf = sphere_models(2000)
    frac = nerf.num_points / nerf.occupancy.numel()
    assert 0.05 < frac < 0.4  # the sphere of radius 0.5 (+ one dilated cell) in the box [-1, 1]^3: 0.065 .. 0.15
    cam = orbit_camera(3.5, 90.0, 20.0, 0.55, 32, 32)
    calls = []
    plain_query = nerf.query
    nerf.query = lambda x: calls.append(len(x)) or plain_query(x)
    skipped = render(cam, nerf, torch.ones(3))
    nerf.occupancy.fill_(True)
    full = render(cam, nerf, torch.ones(3))
    assert calls[0] < 0.5 * calls[1]  # far fewer field evaluations
    for key, scale in (("render", 1.0), ("alpha", 1.0), ("depth", 4.5)):  # depth: alpha x z, z < 4.5 in the box
        # each skipped sample has tau < occupancy_threshold = 0.01: a ray loses little of its opacity
        torch.testing.assert_close(skipped[key], full[key], atol=0.02 * scale, rtol=0)
    nerf.query = plain_query
    assert nerf.refresh_occupancy() == nerf.num_points == round(frac * nerf.occupancy.numel())
    with torch.no_grad():  # a field emptied everywhere: the refresh frees every cell
        nerf.density_bias.fill_(-30.0)
    assert nerf.refresh_occupancy() == 0 and float(render(cam, nerf, torch.ones(3))["alpha"].detach().max()) == 0.0


def test_save_load_and_checkpoint_round_trip(tmp_path):
    model = small_field(torch.float32, seed=3)
    model.refresh_occupancy()
    model.training_setup()
    cam = front_camera(size=9, fovy=0.6)
    out = render(cam, model, torch.ones(3))
    out["render"].sum().backward()
    model.optimizer.step()
    path = tmp_path / "point_cloud" / "iteration_1" / "nerf.safetensors"
    path.parent.mkdir(parents=True)
    model.save(str(path))
    loaded = load_model(path)
    assert isinstance(loaded, NeRFModel) and loaded.params == model.params
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    state = model.capture()
    again = NeRFModel(model.params, seed=99)
    again.restore(state)
    assert torch.equal(again.planes, model.planes) and torch.equal(again.occupancy, model.occupancy)
    moments = [m.optimizer.state_dict()["state"][0]["exp_avg"] for m in (again, model)]
    assert torch.equal(*moments) and moments[0].abs().sum() > 0
    with pytest.raises(ValueError, match="other NeRFParams"):
        NeRFModel(replace(model.params, hidden_dim=5)).restore(state)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="bad.safetensors is not a readable NeRF file") as err:
        load_model(tmp_path / "bad.safetensors")
    assert "\n" not in str(err.value)


def test_mesh_of_the_density_field_is_the_initial_sphere():
    _, nerf = sphere_models(20000)
    mesh = nerf_mesh(nerf, resolution=48, threshold=0.5)
    radii = np.linalg.norm(mesh.vertices, axis=1)
    assert mesh.is_watertight and 0.46 < np.median(radii) < 0.56 and radii.max() < 0.6  # sphere of radius 0.5
    assert abs(mesh.volume - 4 / 3 * math.pi * np.median(radii) ** 3) < 0.15 * mesh.volume


def test_toy_scorer_scales_a_field_about_the_origin():
    from toyworld.score import Scaled, scale_aligned_iou, score_cameras, views
    _, nerf = sphere_models(2000)
    cams = score_cameras(32)[:4]
    best, scale = scale_aligned_iou(nerf, nerf, cams)
    assert best == pytest.approx(1.0) and scale == pytest.approx(1.0, abs=0.1)
    _, small = views(Scaled(nerf, 0.5), cams)
    _, plain = views(nerf, cams)
    assert 0.15 < float((small > 0.5).sum() / (plain > 0.5).sum()) < 0.4  # area ~ 0.5^2


@pytest.mark.parametrize("override, message", [
    ("ModelParams.representation=mesh", "ModelParams.representation 'mesh' is not one of gaussians, nerf"),
    ("NeRFParams.density_activation=relu", "NeRFParams.density_activation 'relu' is not one of softplus, exp"),
    ("NeRFParams.num_samples=0", "NeRFParams.num_samples must be >= 1"),
    ("NeRFParams.bound=0", "NeRFParams.bound must be a positive number"),
    ("NeRFParams.plane_resolution=4096", "NeRFParams.plane_resolution must be at most 1024"),
])
def test_bad_nerf_settings_are_one_line_errors(override, message):
    cfg = load_config(SMOKE_NERF, [override])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as err:
        check_config(cfg)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="NeRFParams.hidden_dmi"):
        load_config(SMOKE_NERF, ["NeRFParams.hidden_dmi=3"])


# ---------------------------------------------------------------------------------------------- end to end
def nerf_cfg(tmp_path, *overrides, workspace="run"):
    from test_end_to_end import TINY_RUN
    return load_config(SMOKE_NERF, [*TINY_RUN, "NeRFParams.occupancy_interval=2", "NeRFParams.plane_resolution=32",
                                    f"ModelParams.output_root={tmp_path}", f"ModelParams.workspace={workspace}",
                                    *overrides])


def final_model(cfg) -> bytes:
    from stages.run import final_ply_path
    path = final_ply_path(cfg)
    assert path.name == "nerf.safetensors"
    return path.read_bytes()


@pytest.mark.slow
def test_nerf_ptd_at_weight_zero_is_byte_identical_to_vanilla(tmp_path, monkeypatch):
    import form_path
    import train
    from guidance.ptd_utils import PathTracer

    form_path.main(nerf_cfg(tmp_path, "PTDParams.mode=weighted", workspace="ptd"))
    monkeypatch.setattr(PathTracer, "weight_at", lambda self, step: 0.0)
    ptd = nerf_cfg(tmp_path, "PTDParams.mode=weighted", workspace="ptd")
    train.main(ptd)
    vanilla = nerf_cfg(tmp_path, "PTDParams.mode=off", workspace="vanilla")
    train.main(vanilla)
    assert final_model(ptd) == final_model(vanilla)
    trained = load_model(tmp_path / "vanilla" / "point_cloud" / "iteration_8" / "nerf.safetensors")
    initial = NeRFModel(vanilla.NeRFParams, seed=vanilla.seed)  # the same random start (the seed's generator)
    assert not torch.equal(trained.planes, initial.planes) and trained.w2.abs().sum() > 0  # stage 2 trained it


@pytest.mark.slow
def test_nerf_exact_resume(tmp_path):
    import train
    from test_end_to_end import crash_train_at

    a = nerf_cfg(tmp_path, "PTDParams.mode=off", workspace="a")
    train.main(a)
    c = nerf_cfg(tmp_path, "PTDParams.mode=off", workspace="c")
    crash_train_at(7, c)
    assert sorted(p.name for p in (tmp_path / "c" / "checkpoints").glob("*.pt")) == \
        ["iteration_000003.pt", "iteration_000006.pt"]
    train.main(c, resume=True)
    assert final_model(c) == final_model(a)


@pytest.mark.slow
def test_nerf_both_stages_and_the_tools_end_to_end(tmp_path):
    """form_path.py + train.py on the NeRF smoke config (32 px, 8 iterations), then evaluate, the probe, the mesh
    export and the toy-world scorer on the run."""
    import json

    import evaluate
    import export_mesh
    from evaluation.clip import load_scorer, rig_images
    import form_path
    import probe_ood
    import train

    cfg = nerf_cfg(tmp_path, "PTDParams.mode=weighted", "save_mesh=true", "mesh_resolution=48")
    form_path.main(cfg)
    final = train.main(cfg)
    run = tmp_path / "run"
    assert final == run / "point_cloud" / "iteration_8" / "nerf.safetensors" and final.is_file()
    assert (run / "point_cloud" / "iteration_4" / "nerf.safetensors").is_file()
    assert (run / "videos" / "8_iteration" / "video_rgb_8.mp4").stat().st_size > 0
    assert len(list((run / "test_six_views" / "8_iteration").glob("render_view_*.png"))) == 16
    assert (run / "mesh.glb").is_file() and (run / "config.yaml").read_text().startswith(
        "# ran with: volume renderer (NeRF)")
    assert json.loads((run / "train_done.json").read_text())["ply"] == "point_cloud/iteration_8/nerf.safetensors"
    assert evaluate.cli([str(run), "--clip-models", "tiny", "--resolution", "32", "--device", "cpu"]) == 0
    row = json.loads((run / "clip_scores.json").read_text())["rows"][0]
    images = rig_images(load_model(final), torch.ones(3), 32, "torch")  # the direct computation from the file
    direct = load_scorer("tiny", None).similarity(images, cfg.GuidanceParams.text).double().mean().item()
    assert row["views"] == 16 and row["scores"]["tiny"]["mean"] == pytest.approx(direct, abs=1e-6)
    assert export_mesh.cli([str(run), "--resolution", "32", "--out", str(tmp_path / "mesh")]) == 0
    assert (tmp_path / "mesh" / "mesh.obj").stat().st_size > 0
    assert probe_ood.cli(["--opt", str(run / "config.yaml"), "--num-generated", "2", "--timesteps", "50,450"]) == 0
    assert list((run / "probe").glob("matching_loss_prior.json"))
