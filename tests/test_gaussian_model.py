"""GaussianModel: initial values, PLY I/O, checkpoints, lr schedules, densification rules, bad input."""
import copy
import math
import os

import numpy as np
import pytest
import torch
from plyfile import PlyData, PlyElement

from arguments import OptimizationParams
from gaussian_renderer import render
from scene import GaussianModel, InitError, PlyFormatError, orbit_camera
from scene.gaussian_model import log_linear_lr
from scene.ply_io import gaussian_ply_attributes
from scene.sh_utils import SH_C0


def model_with_points(n=50, degree=0, seed=0, dtype=torch.float32):
    rng = np.random.default_rng(seed)
    m = GaussianModel(degree, dtype=dtype)
    m.create_from_pcd(rng.uniform(-0.5, 0.5, (n, 3)), rng.uniform(0, 1, (n, 3)), spatial_lr_scale=3.5)
    return m


def randomize(m, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m._params().values():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return m


def test_create_from_pcd_initial_values():
    rng = np.random.default_rng(0)
    pts, cols = rng.uniform(-0.5, 0.5, (40, 3)), rng.uniform(0, 1, (40, 3))
    m = GaussianModel(2)
    m.create_from_pcd(pts, cols, spatial_lr_scale=3.5)
    d2 = ((pts[:, None] - pts[None]) ** 2).sum(-1)  # brute force: mean squared distance to the 3 nearest others
    expect = np.sqrt(np.sort(d2, axis=1)[:, 1:4].mean(axis=1))
    np.testing.assert_allclose(m.get_scaling.detach().numpy(), np.repeat(expect[:, None], 3, 1), rtol=1e-5)
    np.testing.assert_allclose(m.get_opacity.detach().numpy(), 0.1, rtol=1e-6)
    assert torch.equal(m.get_rotation, torch.tensor([[1.0, 0, 0, 0]]).expand(40, 4))
    np.testing.assert_allclose(m._features_dc.detach().numpy()[:, 0], (cols - 0.5) / SH_C0, rtol=1e-5, atol=1e-6)
    assert m._features_rest.shape == (40, 8, 3) and float(m._features_rest.detach().abs().sum()) == 0
    assert m.get_features.shape == (40, 9, 3) and m.active_sh_degree == 0 and m.spatial_lr_scale == 3.5
    duplicate = GaussianModel(0)
    duplicate.create_from_pcd(np.zeros((5, 3)), None, 1.0)  # coincident points: simple-knn's floor 1e-7
    np.testing.assert_allclose(duplicate.get_scaling.detach().numpy(), math.sqrt(1e-7), rtol=1e-5)


def test_device_and_dtype_follow_the_constructor():
    m = model_with_points(10, dtype=torch.float64)
    assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in m._params().values())
    m.training_setup(OptimizationParams())
    assert m.xyz_gradient_accum.dtype == torch.float64


@pytest.mark.parametrize("degree", [0, 3])
def test_ply_round_trip_is_bit_exact(tmp_path, degree):
    m = randomize(model_with_points(30, degree))
    m.active_sh_degree = degree
    path = tmp_path / "out" / "point_cloud.ply"
    m.save_ply(str(path))
    assert os.listdir(path.parent) == ["point_cloud.ply"]  # no temporary file left behind
    ply = PlyData.read(str(path))
    assert [p.name for p in ply["vertex"].properties] == gaussian_ply_attributes(3 * (degree + 1) ** 2 - 3)
    assert ply.text is False and ply.byte_order == "<"
    back = GaussianModel(0)
    back.load_ply(str(path))
    for k, v in m._params().items():
        assert torch.equal(back._params()[k], v.detach()), k
    assert back.max_sh_degree == degree and back.active_sh_degree == degree


def test_load_ply_to_another_sh_degree(tmp_path):
    m = randomize(model_with_points(8, degree=1))
    m.save_ply(str(tmp_path / "d1.ply"))
    up = GaussianModel(0)
    up.load_ply(str(tmp_path / "d1.ply"), sh_degree=3)
    assert up.max_sh_degree == 3 and up.active_sh_degree == 1 and up._features_rest.shape == (8, 15, 3)
    assert torch.equal(up._features_rest[:, :3], m._features_rest.detach())
    assert float(up._features_rest[:, 3:].detach().abs().sum()) == 0
    down = GaussianModel(0)
    down.load_ply(str(tmp_path / "d1.ply"), sh_degree=0)
    assert down.get_features.shape == (8, 1, 3) and down.active_sh_degree == 0


def test_a_ply_written_elsewhere_loads(tmp_path):
    """A degree-1 3DGS file written by hand (property order shuffled, an extra property) loads correctly."""
    n = 7
    rng = np.random.default_rng(3)
    names = ["x", "y", "z", "nx", "ny", "nz"] + [f"f_dc_{i}" for i in range(3)] + [f"f_rest_{i}" for i in range(9)] \
        + ["opacity"] + [f"scale_{i}" for i in range(3)] + [f"rot_{i}" for i in range(4)] + ["extra"]
    values = {k: rng.normal(size=n).astype(np.float32) for k in names}
    order = list(reversed(names))
    rec = np.empty(n, dtype=[(k, "<f4") for k in order])
    for k in order:
        rec[k] = values[k]
    path = str(tmp_path / "viewer.ply")
    PlyData([PlyElement.describe(rec, "vertex")], byte_order="<").write(path)
    m = GaussianModel(0)
    m.load_ply(path)
    assert m.max_sh_degree == 1
    np.testing.assert_array_equal(m._xyz.detach().numpy(), np.stack([values[k] for k in "xyz"], 1))
    rest = np.stack([values[f"f_rest_{i}"] for i in range(9)], 1).reshape(n, 3, 3)  # channel-major
    np.testing.assert_array_equal(m._features_rest.detach().numpy(), rest.transpose(0, 2, 1))
    np.testing.assert_array_equal(m._opacity.detach().numpy()[:, 0], values["opacity"])
    np.testing.assert_array_equal(m._rotation.detach().numpy(), np.stack([values[f"rot_{i}"] for i in range(4)], 1))


def test_bad_ply_files_fail_in_one_line_and_change_nothing(tmp_path):
    m = model_with_points(5)
    before = m._xyz.detach().clone()
    corrupt = tmp_path / "corrupt.ply"
    corrupt.write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 10\nproperty float x\nend_header\n\x00")
    points_only = tmp_path / "points.ply"
    rec = np.zeros(3, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4")])
    PlyData([PlyElement.describe(rec, "vertex")]).write(str(points_only))
    nan_file = tmp_path / "nan.ply"
    good = randomize(model_with_points(4))
    with torch.no_grad():
        good._xyz[0, 0] = float("nan")
    good.save_ply(str(nan_file))
    cases = [(tmp_path / "missing.ply", "not found"), (corrupt, "cannot parse"), (points_only, "3DGS layout"),
             (nan_file, "NaN")]
    for path, words in cases:
        with pytest.raises(PlyFormatError, match=words) as err:
            m.load_ply(str(path))
        assert "\n" not in str(err.value) and str(path) in str(err.value)
        assert torch.equal(m._xyz.detach(), before)


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    m = model_with_points(5)
    path = tmp_path / "pc.ply"
    m.save_ply(str(path))
    old = path.read_bytes()

    def boom(self, stream):
        stream.write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(PlyData, "write", boom)
    with pytest.raises(OSError):
        randomize(m).save_ply(str(path))
    assert path.read_bytes() == old and os.listdir(tmp_path) == ["pc.ply"]


def test_bad_points_are_rejected():
    for pts, words in [(np.zeros((0, 3)), "empty"), (np.array([[0.0, np.nan, 0.0], [1, 1, 1]]), "NaN"),
                       (np.zeros((4, 2)), "shape")]:
        with pytest.raises(InitError, match=words):
            GaussianModel(0).create_from_pcd(pts, None, 1.0)


def test_learning_rate_schedules_are_log_linear():
    opt = OptimizationParams(iterations=1000)
    m = model_with_points(10)
    m.training_setup(opt)
    lrs = {g["name"]: g["lr"] for g in m.optimizer.param_groups}
    assert lrs["xyz"] == pytest.approx(1.6e-4 * 3.5) and lrs["f_rest"] == pytest.approx(5e-3 / 20)
    assert lrs["opacity"] == 0.05 and set(lrs) == {"xyz", "f_dc", "f_rest", "opacity", "scaling", "rotation"}
    assert m.optimizer.defaults["eps"] == 1e-15
    assert m.update_learning_rate(0) == pytest.approx(1.6e-4 * 3.5)
    assert m.update_learning_rate(1000) == pytest.approx(1.6e-6 * 3.5)
    assert m.update_learning_rate(500) == pytest.approx(math.sqrt(1.6e-4 * 1.6e-6) * 3.5)
    now = {g["name"]: g["lr"] for g in m.optimizer.param_groups}
    assert now["f_dc"] == pytest.approx(math.sqrt(5e-3 * 3e-3)) and now["scaling"] == pytest.approx(math.sqrt(5e-6))
    assert now["rotation"] == pytest.approx(math.sqrt(1e-3 * 2e-4)) and now["opacity"] == 0.05
    assert log_linear_lr(5000, 1.0, 0.01, 1000) == pytest.approx(0.01)  # held after the last step
    assert log_linear_lr(0, 1.0, 0.01, 1000, delay_steps=100, delay_mult=0.01) == pytest.approx(0.01)


def one_adam_step(m):
    cam = orbit_camera(2.0, 80.0, 10.0, 0.6, 16, 16)
    out = render(cam, m, torch.full((3,), 0.5))
    (out["render"].mean() + out["alpha"].mean()).backward()
    m.add_densification_stats(out["viewspace_points"], out["visibility_filter"], out["radii"])
    m.optimizer.step()
    m.optimizer.zero_grad(set_to_none=True)


def nested_equal(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(nested_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(nested_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_capture_restore_round_trip(tmp_path):
    opt = OptimizationParams()
    m = randomize(model_with_points(20, degree=1))
    m.training_setup(opt)
    m.oneup_sh_degree()
    one_adam_step(m)
    state = m.capture()
    assert set(state) >= {"params", "optimizer", "xyz_gradient_accum", "denom", "max_radii2D",
                          "active_sh_degree", "spatial_lr_scale"}
    assert float(state["denom"].sum()) > 0 and state["optimizer"]["state"]
    torch.save(state, tmp_path / "ckpt.pt")
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)  # plain tensors and containers only
    fresh = GaussianModel(0)
    fresh.restore(loaded, opt)
    assert nested_equal(fresh.capture(), state)
    one_adam_step(fresh)  # the restored optimiser keeps training the restored parameters
    assert not torch.equal(fresh._xyz.detach(), state["params"]["xyz"])
    old = copy.deepcopy(state)  # a checkpoint from before the background parameter went: one more Adam group
    old["optimizer"]["param_groups"].append(dict(old["optimizer"]["param_groups"][0], params=[6], name="background"))
    old["optimizer"]["state"][6] = {k: v.clone() if v.ndim == 0 else v[0, :3].clone()
                                    for k, v in old["optimizer"]["state"][0].items()}
    older = GaussianModel(0)
    older.restore(old, opt)
    assert nested_equal(older.capture(), state)
    with pytest.raises(ValueError, match="lacks denom"):
        GaussianModel(0).restore({k: v for k, v in state.items() if k != "denom"})


def test_reset_opacity_caps_at_001_and_clears_its_moments():
    m = randomize(model_with_points(10))
    m.training_setup(OptimizationParams())
    one_adam_step(m)
    old = m.get_opacity.detach().clone()
    xyz_state = m.optimizer.state[m._xyz]["exp_avg"].clone()
    m.reset_opacity()
    torch.testing.assert_close(m.get_opacity.detach(), torch.clamp_max(old, 0.01))
    assert float(m.optimizer.state[m._opacity]["exp_avg"].abs().sum()) == 0
    assert torch.equal(m.optimizer.state[m._xyz]["exp_avg"], xyz_state)


def constructed_case():
    """Six Gaussians, each chosen for one rule (extent 3.5: clone/split at max scale 0.0105, world prune > 0.35)."""
    m = GaussianModel(0)
    xyz = torch.arange(6, dtype=torch.float32)[:, None] * torch.tensor([1.0, 0.0, 0.0])
    scales = torch.tensor([0.005, 0.05, 0.005, 0.005, 0.005, 0.5])[:, None].repeat(1, 3)
    opac = torch.tensor([0.5, 0.5, 0.5, 0.001, 0.5, 0.5])
    m._set_params({"xyz": xyz, "f_dc": torch.arange(6.0)[:, None, None].repeat(1, 1, 3),
                   "f_rest": torch.zeros(6, 0, 3), "opacity": torch.logit(opac)[:, None],
                   "scaling": scales.log(), "rotation": torch.tensor([[0.0, 0, 0, 1.0]]).repeat(6, 1)})
    m.training_setup(OptimizationParams())
    grads = torch.tensor([1e-3, 1e-3, 1e-4, 0.0, 0.0, 0.0])  # per-view |dL/d mean2D|, threshold 7.5e-4
    for _ in range(2):
        vs = torch.zeros(6, 3)
        vs[:, 0], vs[:, 2] = grads, 5.0  # the z component must be ignored
        m.add_densification_stats(vs, torch.ones(6, dtype=torch.bool), torch.tensor([3, 3, 3, 3, 25, 3]))
    return m


def test_densify_and_prune_changes_exactly_the_selected_gaussians():
    m = constructed_case()
    torch.testing.assert_close(m.xyz_gradient_accum[:, 0] / m.denom[:, 0], torch.tensor([1e-3, 1e-3, 1e-4, 0, 0, 0]))
    counts = m.densify_and_prune(7.5e-4, 0.005, 3.5, 20, generator=torch.Generator().manual_seed(0))
    assert counts == {"cloned": 1, "split": 1, "pruned": 3}
    ids = m._features_dc[:, 0, 0].detach().tolist()  # the DC colour carries the original index
    assert ids == [0.0, 2.0, 0.0, 1.0, 1.0]  # kept 0 and 2, the clone of 0, two children of 1
    assert torch.equal(m._xyz[2].detach(), torch.tensor([0.0, 0.0, 0.0]))  # the clone is an exact copy
    torch.testing.assert_close(m.get_scaling[3:].detach(), torch.full((2, 3), 0.05 / 1.6))
    assert float((m._xyz[3:].detach() - torch.tensor([1.0, 0, 0])).norm(dim=1).max()) < 0.05 * 5
    assert not torch.equal(m._xyz[3], m._xyz[4])
    assert float(m.denom.abs().sum()) == 0 and float(m.max_radii2D.sum()) == 0  # statistics reset
    assert all(m.optimizer.param_groups[i]["params"][0].shape[0] == 5 for i in range(6))


def test_without_screen_size_only_opacity_prunes():
    m = constructed_case()
    counts = m.densify_and_prune(7.5e-4, 0.005, 3.5, None, generator=torch.Generator().manual_seed(0))
    assert counts["pruned"] == 1
    assert sorted(m._features_dc[:, 0, 0].detach().tolist()) == [0.0, 0.0, 1.0, 1.0, 2.0, 4.0, 5.0]
    stock = constructed_case()  # screen_prune=False: stock's effective behaviour (its radii were zeroed)
    stock.densify_and_prune(7.5e-4, 0.005, 3.5, 20, generator=torch.Generator().manual_seed(0), screen_prune=False)
    assert 4.0 in stock._features_dc[:, 0, 0].tolist() and 5.0 not in stock._features_dc[:, 0, 0].tolist()


def test_densification_keeps_adam_moments_of_survivors():
    m = randomize(model_with_points(30))
    m.training_setup(OptimizationParams())
    one_adam_step(m)
    before = m.optimizer.state[m._xyz]["exp_avg"].clone()
    keep = torch.ones(30, dtype=torch.bool)
    keep[::3] = False
    m.prune_points(~keep)
    assert torch.equal(m.optimizer.state[m._xyz]["exp_avg"], before[keep])
    one_adam_step(m)  # the optimiser still works after surgery
    assert m.num_points == 20


def test_add_densification_stats_needs_a_gradient():
    m = model_with_points(4)
    m.training_setup(OptimizationParams())
    with pytest.raises(ValueError, match="after backward"):
        m.add_densification_stats(torch.zeros(4, 3, requires_grad=True), torch.ones(4, dtype=torch.bool))
