"""Y-up export (scene/geometry.py's rotate_gaussians, export_ply.py) against exact identities: R then R^T is the
identity; the rotated model renders from the rotated cameras as the original from the original ones (SH degree 3,
anisotropic Gaussians); the SH rotation matrices are orthogonal and degree 1 turns like a vector; the script writes a
PLY that GaussianModel reads, and bad input is one line on stderr."""
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from plyfile import PlyData, PlyElement

from arguments import Config, run_dir, save_config
from gaussian_renderer import render
from scene import GaussianModel, make_camera
from scene.geometry import quat_to_rotmat, rotate_gaussians, sh_rotation_matrices, sphere_directions
from scene.mesh_export import Z_UP_TO_Y_UP
from scene.ply_io import gaussian_ply_attributes, read_gaussian_ply, write_gaussian_ply, write_point_cloud_ply
from scene.sh_utils import eval_sh
from stages.run import mark_finished

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


def random_rotation(gen: torch.Generator) -> torch.Tensor:
    """A random proper rotation [3, 3] float64."""
    return quat_to_rotmat(torch.nn.functional.normalize(torch.randn(4, generator=gen, dtype=F64), dim=0))


def random_model(n: int = 300, degree: int = 3, seed: int = 0, dtype=torch.float32) -> dict:
    """Raw parameters as GaussianModel stores them: anisotropic scales, random orientations, random SH."""
    g = torch.Generator().manual_seed(seed)
    k = (degree + 1) ** 2
    return {"xyz": (torch.rand(n, 3, generator=g, dtype=F64) - 0.5) * 1.2,
            "rot": torch.randn(n, 4, generator=g, dtype=F64),  # unnormalised, as stored
            "f_dc": torch.randn(n, 1, 3, generator=g, dtype=F64) * 0.5,
            "f_rest": torch.randn(n, k - 1, 3, generator=g, dtype=F64) * 0.3,
            "scale": torch.log(0.02 + 0.12 * torch.rand(n, 3, generator=g, dtype=F64)),
            "opacity": torch.randn(n, 1, generator=g, dtype=F64)}


def as_renderable(p: dict, degree: int = 3) -> SimpleNamespace:
    """What render() reads, from raw parameters (float32, as in training)."""
    f = {k: v.float() for k, v in p.items()}
    return SimpleNamespace(get_xyz=f["xyz"], get_features=torch.cat([f["f_dc"], f["f_rest"]], 1),
                           get_opacity=torch.sigmoid(f["opacity"]), get_scaling=torch.exp(f["scale"]),
                           get_rotation=torch.nn.functional.normalize(f["rot"], dim=-1), active_sh_degree=degree)


def turned(p: dict, rot: torch.Tensor) -> dict:
    xyz, q, rest = rotate_gaussians(p["xyz"], p["rot"], p["f_rest"], rot)
    return {**p, "xyz": xyz, "rot": q, "f_rest": rest}


# ---------------------------------------------------------------------------------------------- the math
def test_rotating_back_gives_the_input():
    gen = torch.Generator().manual_seed(1)
    p = random_model(50)
    for rot in [torch.from_numpy(Z_UP_TO_Y_UP), random_rotation(gen), random_rotation(gen)]:
        back = turned(turned(p, rot), rot.T)
        for key in ("xyz", "f_rest"):
            torch.testing.assert_close(back[key], p[key], rtol=0, atol=1e-12)
        # q and -q are one rotation: Z_UP_TO_Y_UP is a half turn (R^T = R, q_R q_R = -1), so it returns -q
        sign = torch.sign((back["rot"] * p["rot"]).sum(1, keepdim=True))
        torch.testing.assert_close(sign * back["rot"], p["rot"], rtol=0, atol=1e-12)
        once = turned(p, rot)
        torch.testing.assert_close(once["rot"].norm(dim=1), p["rot"].norm(dim=1))  # stored norms kept


def test_z_up_to_y_up_is_a_proper_rotation_taking_up_to_y():
    rot = torch.from_numpy(Z_UP_TO_Y_UP)
    torch.testing.assert_close(rot @ torch.tensor([0.0, 0.0, 1.0], dtype=F64), torch.tensor([0.0, 1.0, 0.0], dtype=F64))
    torch.testing.assert_close(rot @ rot.T, torch.eye(3, dtype=F64))
    assert torch.linalg.det(rot).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="proper 3x3 rotation"):  # a mirror is no rotation
        mirror = torch.diag(torch.tensor([1.0, 1.0, -1.0]))
        rotate_gaussians(torch.zeros(1, 3), torch.ones(1, 4), torch.zeros(1, 15, 3), mirror)


def test_sh_rotation_matrices_are_orthogonal_and_degree_one_turns_like_a_vector():
    gen = torch.Generator().manual_seed(2)
    rot = random_rotation(gen)
    for l, m in enumerate(sh_rotation_matrices(rot, 3), start=1):
        assert m.shape == (2 * l + 1, 2 * l + 1)
        torch.testing.assert_close(m @ m.T, torch.eye(2 * l + 1, dtype=F64), rtol=0, atol=1e-12)
    # eval_sh's degree-1 basis is C1 (-y, z, -x): coefficients k = P v of the linear function C1 v . d
    p = torch.tensor([[0.0, -1.0, 0.0], [0.0, 0.0, 1.0], [-1.0, 0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(sh_rotation_matrices(rot, 1)[0], p @ rot @ p.T, rtol=0, atol=1e-12)
    for a in (0.3, 1.0, math.pi / 2, 2.5):
        c, s = math.cos(a), math.sin(a)
        rz = torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=F64)
        closed = torch.tensor([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]], dtype=F64)  # (k1, k2, k3) = (-vy, vz, -vx)
        torch.testing.assert_close(sh_rotation_matrices(rz, 1)[0], closed, rtol=0, atol=1e-12)
        # Y_30 (m = 0, index 3 of its block) is unchanged by turns about z
        assert sh_rotation_matrices(rz, 3)[2][3, 3].item() == pytest.approx(1.0, abs=1e-12)


def test_colour_seen_along_d_is_seen_along_r_d():
    """c'(R d) = c(d) for every direction, all degrees together (the DC term is invariant)."""
    gen = torch.Generator().manual_seed(3)
    rot = random_rotation(gen)
    p = random_model(20)
    sh = torch.cat([p["f_dc"], p["f_rest"]], 1)  # [N, 16, 3]
    sh_turned = torch.cat([p["f_dc"], turned(p, rot)["f_rest"]], 1)
    dirs = sphere_directions(37)
    for d in dirs:
        torch.testing.assert_close(eval_sh(3, sh_turned, (rot @ d).expand(20, 3)), eval_sh(3, sh, d.expand(20, 3)),
                                   rtol=0, atol=1e-12)


def test_rotated_model_renders_from_rotated_cameras_as_before():
    """The torch rasteriser at 48x48, four cameras (one tilted): max |difference| < 1e-4; leaving the SH unrotated
    would show (so the check has teeth)."""
    gen = torch.Generator().manual_seed(4)
    p = random_model(300)
    bg = torch.tensor([0.2, 0.3, 0.4])
    views = [((0.0, 3.0, 0.4), (0.0, 0.0, 0.0), (0.0, 0.0, 1.0)),
             ((2.2, -1.5, 1.2), (0.1, -0.05, 0.1), (0.0, 0.0, 1.0)),
             ((-2.5, 0.5, -1.5), (0.0, 0.1, 0.0), (0.0, 0.0, 1.0)),
             ((1.0, 2.5, 1.0), (0.0, 0.0, 0.05), (0.3, -0.2, 1.0))]
    worst = 0.0
    for rot in [torch.from_numpy(Z_UP_TO_Y_UP), random_rotation(gen)]:
        q = turned(p, rot)
        stale_sh = {**q, "f_rest": p["f_rest"]}
        for eye, target, up in views:
            cam = make_camera(eye, target, up, 0.8, 48, 48)
            cam_r = make_camera(*(rot.numpy() @ np.array(v) for v in (eye, target, up)), 0.8, 48, 48)
            want = render(cam, as_renderable(p), bg, backend="torch")
            got = render(cam_r, as_renderable(q), bg, backend="torch")
            assert want["alpha"].mean() > 0.2  # the model fills a good part of the view
            worst = max(worst, (got["render"] - want["render"]).abs().max().item())
            torch.testing.assert_close(got["alpha"], want["alpha"], rtol=0, atol=1e-4)
            stale = render(cam_r, as_renderable(stale_sh), bg, backend="torch")["render"]
            assert (stale - want["render"]).abs().max() > 0.05
    print(f"max render difference {worst:.2e}")
    assert worst < 1e-4


# ---------------------------------------------------------------------------------------------- the script
def write_model(path: Path, p: dict) -> None:
    write_gaussian_ply(str(path), p["xyz"].numpy(), p["f_dc"][:, 0].numpy(), p["f_rest"].transpose(1, 2).numpy(),
                       p["opacity"][:, 0].numpy(), p["scale"].numpy(), p["rot"].numpy())


def run_script(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "export_ply.py"), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def test_export_ply_script_end_to_end(tmp_path):
    """A PLY file: <stem>_y_up.ply beside it, which GaussianModel.load_ply reads with the rotated parameters; a point
    cloud PLY (no Gaussians' properties): exit 1, one line on stderr."""
    p = random_model(40)
    write_model(tmp_path / "model.ply", p)
    done = run_script(tmp_path / "model.ply", "--y-up")
    assert done.returncode == 0, done.stderr
    assert "Y up" in done.stdout and "40 Gaussians" in done.stdout
    g = GaussianModel(sh_degree=3)
    g.load_ply(str(tmp_path / "model_y_up.ply"))
    q = turned({k: v.float().double() for k, v in p.items()}, torch.from_numpy(Z_UP_TO_Y_UP))
    torch.testing.assert_close(g.get_xyz.double(), p["xyz"].float().double() @ torch.from_numpy(Z_UP_TO_Y_UP).T)
    torch.testing.assert_close(g._rotation.double(), q["rot"].float().double())
    torch.testing.assert_close(g._features_rest.double(), q["f_rest"].float().double())
    for mine, theirs in [(g._features_dc, p["f_dc"]), (g._scaling, p["scale"]), (g._opacity, p["opacity"])]:
        assert torch.equal(mine, theirs.float())  # untouched
    assert g.max_sh_degree == 3

    write_point_cloud_ply(str(tmp_path / "points.ply"), np.zeros((5, 3)), np.ones((5, 3)))
    bad = run_script(tmp_path / "points.ply", "--y-up")
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1, bad.stderr
    assert "not in the 3DGS layout" in bad.stderr


def test_export_ply_run_folder_and_errors(tmp_path, capsys):
    """In-process (an interpreter start costs seconds): a finished run folder gives its final PLY and --out; then a
    missing path, a non-PLY file, an empty model, a corrupt file, --out onto the input: exit 1, one line each."""
    import export_ply
    p = random_model(10, degree=1)
    cfg = Config()
    cfg.ModelParams.output_root, cfg.ModelParams.workspace = str(tmp_path), "run"
    cfg.OptimizationParams.iterations = 7
    folder = run_dir(cfg)
    (folder / "point_cloud" / "iteration_7").mkdir(parents=True)
    write_model(folder / "point_cloud" / "iteration_7" / "point_cloud.ply", p)
    save_config(cfg, folder / "config.yaml")
    mark_finished(cfg)
    assert export_ply.cli([str(folder), "--y-up"]) == 0
    assert export_ply.cli([str(folder), "--y-up", "--out", str(tmp_path / "elsewhere.ply")]) == 0
    capsys.readouterr()
    for path in (folder / "point_cloud_y_up.ply", tmp_path / "elsewhere.ply"):
        data = read_gaussian_ply(str(path))
        assert data["sh_degree"] == 1
        np.testing.assert_allclose(data["xyz"], p["xyz"].float().numpy() @ Z_UP_TO_Y_UP.T, atol=1e-6)

    empty = tmp_path / "empty.ply"  # the header alone (write_gaussian_ply needs at least one Gaussian)
    records = np.empty(0, dtype=[(name, "<f4") for name in gaussian_ply_attributes(9)])
    PlyData([PlyElement.describe(records, "vertex")]).write(str(empty))
    (tmp_path / "corrupt.ply").write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 3\n")
    for args, message in [([tmp_path / "missing.ply"], "does not exist"),
                          ([folder / "config.yaml"], "is not a .ply file"),
                          ([empty], "holds no Gaussians"),
                          ([tmp_path / "corrupt.ply"], "cannot parse PLY file"),
                          ([empty, "--out", empty], "is the input PLY itself"),
                          ([folder / "point_cloud"], "is not a run folder")]:
        assert export_ply.cli([str(a) for a in [*args, "--y-up"]]) == 1, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and re.search(message, err), err
