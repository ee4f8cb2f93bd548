"""Cameras: conventions (Z up, azimuth 0 = front = +Y), the random orbit sampler, relaxation, eval rig, video path."""
import dataclasses
import io
import math

import numpy as np
import pytest
import torch

from arguments import GenerateCamParams, OptimizationParams
from scene.cameras import (OrbitCameraSampler, circle_cameras, eval_rig_cameras, make_camera, orbit_camera,
                           wrap_degrees)


def pixel_of(cam, point):
    """Pixel (x, y) of a world point through the camera's full projection (3DGS ndc2Pix)."""
    p = torch.tensor([*point, 1.0], dtype=torch.float64) @ cam.full_proj_transform.double()
    ndc = p[:2] / p[3]
    return ((ndc[0] + 1) * cam.image_width - 1) / 2, ((ndc[1] + 1) * cam.image_height - 1) / 2


def test_azimuth_zero_is_front_on_plus_y_and_z_is_up():
    cam = orbit_camera(3.5, 90.0, 0.0, 0.55, 64, 64)
    np.testing.assert_allclose(cam.camera_center.numpy(), [0.0, 3.5, 0.0], atol=1e-6)
    side = orbit_camera(3.5, 90.0, 90.0, 0.55, 64, 64)
    np.testing.assert_allclose(side.camera_center.numpy(), [3.5, 0.0, 0.0], atol=1e-6)
    top = orbit_camera(3.5, 45.0, 0.0, 0.55, 64, 64)
    assert float(top.camera_center[2]) == pytest.approx(3.5 / math.sqrt(2), rel=1e-6)
    x0, y0 = pixel_of(cam, (0.0, 0.0, 0.0))
    assert (x0, y0) == (pytest.approx(31.5), pytest.approx(31.5))  # looks at the origin
    _, y_up = pixel_of(cam, (0.0, 0.0, 0.3))
    assert y_up < y0  # world +Z appears upwards in the image
    x_px, _ = pixel_of(cam, (0.3, 0.0, 0.0))
    assert x_px < x0  # seen from the front (+Y), world +X is on the viewer's left
    w2c = cam.w2c.double()
    assert float((w2c[:3, :3] @ torch.tensor([0.0, 0.2, 0.0]).double())[2] + w2c[2, 3]) < 3.5  # +Y side is nearer
    assert (cam.znear, cam.zfar) == (0.01, 100.0)


def test_projection_matrix_matches_focal_lengths():
    cam = make_camera((0.3, 2.5, 1.0), (0.05, -0.1, 0.2), (0.0, 0.0, 1.0), 0.5, 80, 60)
    f = 60 / (2 * math.tan(0.25))
    assert cam.FoVx == pytest.approx(2 * math.atan(80 / (2 * f)))
    w2c = cam.w2c.double()
    point = torch.tensor([0.1, 0.2, -0.3], dtype=torch.float64)
    pv = w2c[:3, :3] @ point + w2c[:3, 3]
    x, y = pixel_of(cam, point.tolist())
    assert float(x) == pytest.approx(f * float(pv[0] / pv[2]) + 39.5, abs=1e-4)
    assert float(y) == pytest.approx(f * float(pv[1] / pv[2]) + 29.5, abs=1e-4)
    rot = w2c[:3, :3]
    torch.testing.assert_close(rot @ rot.T, torch.eye(3, dtype=torch.float64), atol=1e-6, rtol=0)
    assert float(torch.det(rot)) == pytest.approx(1.0, abs=1e-6)


def test_eval_rig_gives_the_16_paper_views():
    cams = eval_rig_cameras(64, 64)
    assert len(cams) == 16
    expected_az = [-180.0 + 45.0 * k for k in range(8)]
    for i, cam in enumerate(cams):
        elev = 0.0 if i < 8 else 45.0
        az = expected_az[i % 8]
        assert cam.azimuth == pytest.approx(wrap_degrees(az)) and cam.polar == pytest.approx(90.0 - elev)
        assert cam.radius == 4.0 and cam.FoVy == pytest.approx(0.55)
        th, ph = math.radians(90.0 - elev), math.radians(az)
        np.testing.assert_allclose(cam.camera_center.numpy(), 4.0 * np.array(
            [math.sin(th) * math.sin(ph), math.sin(th) * math.cos(ph), math.cos(th)]), atol=1e-5)
    assert cams[4].azimuth == 0.0 and cams[0].azimuth == 180.0  # -180 wraps to 180: the back view


def test_circle_cameras_are_stocks_test_and_video_views():
    """Stock's GenerateCircleCameras: azimuths 360 k / size from 0 at the default polar, then at 2/3 of it."""
    p = GenerateCamParams(image_w=32, image_h=32)
    cams = circle_cameras(p, size=12)
    assert len(cams) == 24 and [c.uid for c in cams] == list(range(24))
    for k, cam in enumerate(cams):
        assert cam.polar == (90.0 if k < 12 else 60.0) and cam.radius == p.default_radius
        assert cam.FoVy == p.default_fovy and cam.azimuth == pytest.approx(wrap_degrees(30.0 * (k % 12)))
        assert float(cam.camera_center.norm()) == pytest.approx(p.default_radius, rel=1e-6)
    assert len(circle_cameras(p, size=8, render_45=False)) == 8


def sampler(seed=0, **overrides):
    return OrbitCameraSampler(GenerateCamParams(image_w=16, image_h=16, **overrides), np.random.default_rng(seed))


def test_sampler_respects_its_ranges():
    s = sampler(jitter_pose=False, rand_cam_gamma=1.0)
    fovs = []
    for _ in range(40):
        stack = s.sample_stack()
        assert len(stack) == 10 and len({c.FoVy for c in stack}) == 1  # one fov per stack
        fovs.append(stack[0].FoVy)
        for cam in stack:
            assert 5.2 <= cam.radius <= 5.5 and 45 <= cam.polar <= 105 and -180 <= cam.azimuth <= 180
            assert float(cam.camera_center.norm()) == pytest.approx(cam.radius, rel=1e-5)
            x, y = pixel_of(cam, (0.0, 0.0, 0.0))
            assert (float(x), float(y)) == (pytest.approx(7.5, abs=1e-3), pytest.approx(7.5, abs=1e-3))
            assert cam.delta_azimuth == pytest.approx(cam.azimuth) and cam.delta_radius == pytest.approx(
                cam.radius - 3.5)
    assert 0.32 <= min(fovs) and max(fovs) <= 0.60 and max(fovs) - min(fovs) > 0.1
    jittered = sampler(seed=1).sample_stack()
    for cam in jittered:  # centre jitter is U(-0.025, 0.025) per axis
        assert abs(float(cam.camera_center.norm()) - cam.radius) <= 0.025 * math.sqrt(3) + 1e-6


def test_next_views_pops_four_and_refills_with_a_new_stack():
    s = sampler(seed=2)
    views = s.next_views(4) + s.next_views(4) + s.next_views(4)
    assert len(s.stack) == 8  # 10 - 4 - 4 = 2 popped first, then 2 from a fresh stack
    first, second = {v.FoVy for v in views[:10]}, {v.FoVy for v in views[10:]}
    assert len(first) == 1 and len(second) == 1 and first != second
    centres = {tuple(v.camera_center.tolist()) for v in views[:10]}
    assert len(centres) == 10  # every view of a stack is used once


@pytest.mark.parametrize("make_gen", [lambda: np.random.default_rng(5), lambda: torch.Generator().manual_seed(5)])
def test_sampler_state_round_trip_reproduces_the_views(make_gen):
    a = OrbitCameraSampler(GenerateCamParams(image_w=16, image_h=16), make_gen())
    a.next_views(3)
    a.relax_step(OptimizationParams())
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)  # checkpoints store it with torch.save and load it with weights_only
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    expect = [v.camera_center for v in a.next_views(9)]
    b = OrbitCameraSampler(GenerateCamParams(image_w=16, image_h=16),
                           np.random.default_rng(99) if isinstance(make_gen(), np.random.Generator)
                           else torch.Generator().manual_seed(99))
    b.load_state_dict(state)
    got = [v.camera_center for v in b.next_views(9)]
    for x, y in zip(expect, got):
        assert torch.equal(x, y)
    assert b.fovy_range == a.fovy_range


def test_relaxation_schedule_and_end_points():
    opt = OptimizationParams()
    p = GenerateCamParams(theta_range=[60.0, 90.0], phi_range=[-90.0, 90.0])
    s = OrbitCameraSampler(p, np.random.default_rng(0))
    assert not s.relax(499, opt) and s.fovy_range == [0.32, 0.60]
    assert s.relax(500, opt)
    assert s.fovy_range == pytest.approx([0.24, 0.60])  # low x0.75, high x1.1 capped at 0.60
    assert s.radius_range == pytest.approx([5.2 * 0.95, 5.5 * 0.95])
    assert s.theta_range == pytest.approx([45.0, 105.0])  # 60/1.5 floored at 45, 90*1.5 capped at 105
    assert s.phi_range == pytest.approx([-135.0, 135.0])
    assert not s.relax(750, opt)
    for it in range(1000, 20001, 500):
        s.relax(it, opt)
    assert s.fovy_range == pytest.approx([0.16, 0.60])
    assert s.radius_range == pytest.approx([3.5, 5.0])
    assert s.theta_range == pytest.approx([45.0, 105.0]) and s.phi_range == pytest.approx([-180.0, 180.0])
    cams = s.sample_stack()
    assert all(3.5 <= c.radius <= 5.0 for c in cams)
    assert p.fovy_range == [0.32, 0.60]  # the config itself is not mutated


def test_sampler_needs_a_seeded_generator():
    with pytest.raises(TypeError, match="seeded"):
        OrbitCameraSampler(GenerateCamParams(), None)
    same = [sampler(seed=7).sample_stack()[0].camera_center for _ in range(2)]
    assert torch.equal(*same)


def test_camera_to_device_and_dtype():
    cam = orbit_camera(3.0, 80.0, 10.0, 0.5, 8, 8).to(dtype=torch.float64)
    assert cam.world_view_transform.dtype == torch.float64 and cam.camera_center.dtype == torch.float64
    assert dataclasses.replace(cam, uid=3).uid == 3
    assert cam.focal_normalized == pytest.approx(1 / (2 * math.tan(cam.FoVx / 2)))
