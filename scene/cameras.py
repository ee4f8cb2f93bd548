"""Cameras: a small dataclass, LucidDreamer's random orbit sampler, the paper's evaluation rig and a video path.

Conventions (LucidDreamer's): world Z is up. An orbit position at radius r, polar angle theta (degrees from +Z) and
azimuth phi (degrees) is
    eye = (r sin(theta) sin(phi), r sin(theta) cos(phi), r cos(theta)),
so azimuth 0 puts the camera on the +Y axis looking towards -Y: "front" is +Y, azimuth 90 is +X, +-180 is -Y.
The camera frame is OpenCV's (x right, y down, z forward), matrices are stored transposed (row-vector convention:
p_view = [p, 1] @ world_view_transform) as 3DGS's rasterisers expect. fov in radians; znear 0.01, zfar 100.
fovy spans image_height; fovx = 2 atan(W / (2 f)) with f = H / (2 tan(fovy / 2)) (stock: identical for square images).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from scene.rng import SeededRng

ZNEAR, ZFAR = 0.01, 100.0


@dataclass
class Camera:
    world_view_transform: torch.Tensor  # [4, 4] world -> view, transposed (row-vector convention)
    projection_matrix: torch.Tensor  # [4, 4] view -> clip, transposed
    full_proj_transform: torch.Tensor  # [4, 4] world_view_transform @ projection_matrix
    camera_center: torch.Tensor  # [3] world position of the eye
    FoVx: float  # radians
    FoVy: float  # radians
    image_width: int
    image_height: int
    znear: float = ZNEAR
    zfar: float = ZFAR
    polar: float = 90.0  # degrees from +Z (sampling metadata, before jitter)
    azimuth: float = 0.0  # degrees in (-180, 180], 0 = front (+Y)
    radius: float = 0.0  # orbit radius (before jitter)
    delta_polar: float = 0.0  # polar - default_polar
    delta_azimuth: float = 0.0  # azimuth - default_azimuth, wrapped to (-180, 180]: drives the view-dependent prompt
    delta_radius: float = 0.0  # radius - default_radius
    uid: int = 0

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "Camera":
        """Copy with the matrices on `device` / in `dtype`."""
        def mv(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype)
        return replace(self, world_view_transform=mv(self.world_view_transform),
                       projection_matrix=mv(self.projection_matrix),
                       full_proj_transform=mv(self.full_proj_transform), camera_center=mv(self.camera_center))

    @property
    def w2c(self) -> torch.Tensor:
        """[4, 4] world-to-camera matrix in the column-vector convention (OpenCV axes)."""
        return self.world_view_transform.T

    @property
    def focal_normalized(self) -> float:
        """LucidDreamer's disparity focal 1 / (2 tan(FoVx / 2)) (image width = 1)."""
        return 1.0 / (2.0 * math.tan(self.FoVx / 2.0))


def wrap_degrees(angle: float) -> float:
    """Wrap to (-180, 180]."""
    a = math.fmod(angle, 360.0)
    if a > 180.0:
        a -= 360.0
    elif a <= -180.0:
        a += 360.0
    return a


def orbit_position(radius: float, polar_deg: float, azimuth_deg: float) -> np.ndarray:
    """Eye position on the Z-up orbit sphere (module docstring). [3] float64."""
    th, ph = math.radians(polar_deg), math.radians(azimuth_deg)
    return radius * np.array([math.sin(th) * math.sin(ph), math.sin(th) * math.cos(ph), math.cos(th)])


def projection_matrix(znear: float, zfar: float, fovx: float, fovy: float) -> np.ndarray:
    """Perspective matrix (column-vector convention) mapping view z in [znear, zfar] to depth [0, 1], w = z."""
    tx, ty = math.tan(fovx / 2.0), math.tan(fovy / 2.0)
    p = np.zeros((4, 4))
    p[0, 0], p[1, 1] = 1.0 / tx, 1.0 / ty
    p[2, 2] = zfar / (zfar - znear)
    p[2, 3] = -zfar * znear / (zfar - znear)
    p[3, 2] = 1.0
    return p


def look_at_w2c(eye: np.ndarray, target: np.ndarray, up: np.ndarray) -> np.ndarray:
    """World-to-camera [4, 4] (column-vector convention) with OpenCV axes: z towards the target, y down."""
    z = target - eye
    z = z / np.linalg.norm(z)
    x = np.cross(z, up)
    if np.linalg.norm(x) < 1e-8:  # looking along the up vector: any perpendicular will do
        x = np.cross(z, np.array([0.0, 1.0, 0.0]) if abs(z[1]) < 0.9 else np.array([1.0, 0.0, 0.0]))
    x = x / np.linalg.norm(x)
    y = np.cross(z, x)
    w2c = np.eye(4)
    w2c[:3, :3] = np.stack([x, y, z])
    w2c[:3, 3] = -w2c[:3, :3] @ eye
    return w2c


def stock_w2c(eye: np.ndarray, target: np.ndarray, up: np.ndarray) -> np.ndarray:
    """Stock LucidDreamer's world-to-camera matrix (column-vector convention) of a jittered pose, as its
    rand_poses + GenerateRandomCameras + getWorld2View2 build it (scene/dataset_readers.py):
        f = normalise(eye - target), r = normalise(f x Z), u = normalise(up)   (up: r x f + the up jitter)
        pose = [[-r, u, f], eye] (columns), M = pose^-1, R = -M_3x3^T with its first column negated, T = -M_3x1
        w2c = [[R^T, T], [0, 1]]
    Without jitter this is look_at_w2c's matrix. With it, the rotation rows (-r, -u, -f) are not orthonormal (u is
    not perpendicular to f) and T's first component has the wrong sign for the rotation: the effective camera centre
    is eye - 2 (r . eye) r (for orthonormal axes), off the jittered eye by up to a few tenths of a unit."""
    f = eye - target
    f = f / np.linalg.norm(f)
    r = np.cross(f, np.array([0.0, 0.0, 1.0]))
    r = r / max(np.linalg.norm(r), 1e-20)
    u = up / max(np.linalg.norm(up), 1e-20)
    pose = np.eye(4)
    pose[:3, :3] = np.stack([-r, u, f], axis=1)
    pose[:3, 3] = eye
    m = np.linalg.inv(pose)
    rot = -m[:3, :3].T
    rot[:, 0] = -rot[:, 0]
    w2c = np.eye(4)
    w2c[:3, :3] = rot.T
    w2c[:3, 3] = -m[:3, 3]
    return w2c


# how make_camera turns (eye, target, up) into a view: stock (LucidDreamer's matrices, see stock_w2c) | exact
POSE_CONVENTIONS = ("stock", "exact")


def make_camera(eye: Sequence[float], target: Sequence[float], up: Sequence[float], fovy: float, width: int,
                height: int, *, polar: float = 90.0, azimuth: float = 0.0, radius: float = 0.0,
                defaults: tuple[float, float, float] = (90.0, 0.0, 3.5), uid: int = 0, device=None,
                convention: str = "exact") -> Camera:
    """Camera at `eye` looking at `target`. defaults = (default_polar, default_azimuth, default_radius) for deltas.
    convention "exact": an orthonormal look-at view from `eye`; "stock": stock LucidDreamer's matrix for the same
    inputs (`stock_w2c`), whose camera centre is taken from the matrix, as stock's Camera does."""
    eye, target, up = (np.asarray(v, dtype=np.float64) for v in (eye, target, up))
    focal = height / (2.0 * math.tan(fovy / 2.0))
    fovx = 2.0 * math.atan(width / (2.0 * focal))
    if convention not in POSE_CONVENTIONS:
        raise ValueError(f"pose convention '{convention}' is not one of {', '.join(POSE_CONVENTIONS)}")
    w2c = stock_w2c(eye, target, up) if convention == "stock" else look_at_w2c(eye, target, up)
    centre = np.linalg.inv(w2c)[:3, 3] if convention == "stock" else eye
    proj = projection_matrix(ZNEAR, ZFAR, fovx, fovy)
    view_t = torch.tensor(w2c.T, dtype=torch.float32, device=device)
    proj_t = torch.tensor(proj.T, dtype=torch.float32, device=device)
    return Camera(
        world_view_transform=view_t, projection_matrix=proj_t,
        full_proj_transform=torch.tensor(w2c.T @ proj.T, dtype=torch.float32, device=device),
        camera_center=torch.tensor(centre, dtype=torch.float32, device=device),
        FoVx=fovx, FoVy=fovy, image_width=int(width), image_height=int(height),
        polar=float(polar), azimuth=wrap_degrees(azimuth), radius=float(radius),
        delta_polar=float(polar - defaults[0]), delta_azimuth=wrap_degrees(azimuth - defaults[1]),
        delta_radius=float(radius - defaults[2]), uid=uid)


def orbit_camera(radius: float, polar: float, azimuth: float, fovy: float, width: int, height: int,
                 defaults: tuple[float, float, float] = (90.0, 0.0, 3.5), uid: int = 0, device=None) -> Camera:
    """Un-jittered camera on the orbit sphere looking at the origin, Z up."""
    eye = orbit_position(radius, polar, azimuth)
    return make_camera(eye, (0.0, 0.0, 0.0), (0.0, 0.0, 1.0), fovy, width, height, polar=polar, azimuth=azimuth,
                       radius=radius, defaults=defaults, uid=uid, device=device)


def eval_rig_cameras(width: int = 512, height: int = 512, radius: float = 4.0, fovy: float = 0.55,
                     elevations: Iterable[float] = (0.0, 45.0), n_azimuths: int = 8, device=None) -> list[Camera]:
    """The paper's CLIP-evaluation views: for each elevation (degrees above the horizon), n_azimuths azimuths from
    -180 in 360/n steps (8 -> -180, -135, ..., 135); 2 x 8 = 16 views at radius 4."""
    cams = []
    for elev in elevations:
        for k in range(n_azimuths):
            az = -180.0 + k * 360.0 / n_azimuths
            cams.append(orbit_camera(radius, 90.0 - elev, az, fovy, width, height, uid=len(cams), device=device))
    return cams


def circle_cameras(cam_params, size: int = 8, render_45: bool = True, device=None) -> list[Camera]:
    """Stock LucidDreamer's circle views (GenerateCircleCameras): `size` azimuths 360 k / size (from 0, the front) at
    default_polar, then, with render_45, as many at default_polar * 2 // 3 (60 for 90); default radius and fov.
    uids 0..size-1, then size..2 size-1. Stock's test views are size 8; its videos size 120 (240 frames)."""
    p = cam_params
    defaults = (p.default_polar, p.default_azimuth, p.default_radius)
    polars = [p.default_polar] + ([(2 * p.default_polar) // 3] if render_45 else [])
    return [orbit_camera(p.default_radius, polar, 360.0 * k / size, p.default_fovy, p.image_w, p.image_h,
                         defaults=defaults, uid=i * size + k, device=device)
            for i, polar in enumerate(polars) for k in range(size)]


def _signed_range(u: np.ndarray, s: np.ndarray, lo: float, hi: float, gamma: float = 1.0) -> np.ndarray:
    """Stock gen_random_pos: mid +- u^gamma * half-width, sign - where s > 0.5 (gamma 1: uniform on [lo, hi])."""
    sign = np.where(s > 0.5, -1.0, 1.0)
    return (lo + hi) * 0.5 + sign * u ** gamma * (hi - lo) * 0.5


class OrbitCameraSampler:
    """LucidDreamer's training cameras: stacks of `batch` random orbit views sharing one fov; views are popped at
    random (`next_views(C_batch_size)`), a new stack is drawn when one runs out. Ranges relax on a schedule
    (`relax`). All randomness comes from the given generator; `state_dict()` captures ranges, stack and RNG."""

    def __init__(self, cam_params, generator, batch: int = 10, device=None):
        self.p = cam_params
        self.rng = SeededRng(generator)
        self.batch = int(batch)
        self.device = device
        self.radius_range = [float(v) for v in cam_params.radius_range]
        self.theta_range = [float(v) for v in cam_params.theta_range]
        self.phi_range = [float(v) for v in cam_params.phi_range]
        self.fovy_range = [float(v) for v in cam_params.fovy_range]
        self.stack: list[dict] = []

    def _defaults(self) -> tuple[float, float, float]:
        return (float(self.p.default_polar), float(self.p.default_azimuth), float(self.p.default_radius))

    def draw_specs(self, n: int) -> list[dict]:
        """n random view specifications (eye, target, up, fovy and sampling metadata) with one shared fovy.

        Stock draws: radius, polar and azimuth by _signed_range (rand_cam_gamma on the angles only); with jitter_pose
        the eye moves by U(-jitter_center/2, +jitter_center/2) per axis, the target (origin) by N(0, jitter_target^2)
        and the view's up vector by N(0, jitter_up^2); fovy ~ U(fovy_range) once per stack. The view is built from
        them by GenerateCamParams.pose_convention: stock's matrices (default) or the exact look-at (make_camera)."""
        p, rng = self.p, self.rng
        gamma = float(p.rand_cam_gamma)
        radius = _signed_range(rng.uniform(n), rng.uniform(n), *self.radius_range)
        theta = _signed_range(rng.uniform(n), rng.uniform(n), *self.theta_range, gamma)
        phi = _signed_range(rng.uniform(n), rng.uniform(n), *self.phi_range, gamma)
        eyes = np.stack([orbit_position(r, t, f) for r, t, f in zip(radius, theta, phi)])  # [n, 3]
        targets = np.zeros((n, 3))
        up_noise = np.zeros((n, 3))
        if p.jitter_pose:
            eyes = eyes + rng.uniform(n, 3) * p.jitter_center - p.jitter_center / 2.0
            targets = rng.normal(n, 3) * p.jitter_target
            up_noise = rng.normal(n, 3) * p.jitter_up
        fovy = float(rng.uniform(1)[0] * (self.fovy_range[1] - self.fovy_range[0]) + self.fovy_range[0])
        specs = []
        for i in range(n):
            fwd = targets[i] - eyes[i]
            fwd = fwd / np.linalg.norm(fwd)
            right = np.cross(fwd, [0.0, 0.0, 1.0])
            right = right / max(np.linalg.norm(right), 1e-12)
            up = np.cross(right, fwd) + up_noise[i]  # jittered world-up of the view
            specs.append({"eye": eyes[i].tolist(), "target": targets[i].tolist(), "up": up.tolist(), "fovy": fovy,
                          "polar": float(theta[i]), "azimuth": float(phi[i]), "radius": float(radius[i])})
        return specs

    def camera(self, spec: dict, uid: int = 0) -> Camera:
        return make_camera(spec["eye"], spec["target"], spec["up"], spec["fovy"], self.p.image_w, self.p.image_h,
                           polar=spec["polar"], azimuth=spec["azimuth"], radius=spec["radius"],
                           defaults=self._defaults(), uid=uid, device=self.device,
                           convention=self.p.pose_convention)

    def sample_stack(self) -> list[Camera]:
        """A fresh stack of `batch` cameras (does not touch the stack used by next_views)."""
        return [self.camera(s, i) for i, s in enumerate(self.draw_specs(self.batch))]

    def next_views(self, n: int) -> list[Camera]:
        """Pop n views at random from the current stack, drawing a new stack whenever it is empty."""
        views = []
        for _ in range(n):
            if not self.stack:
                self.stack = self.draw_specs(self.batch)
            views.append(self.camera(self.stack.pop(self.rng.integers(len(self.stack))), len(views)))
        return views

    def relax(self, iteration: int, opt) -> bool:
        """Apply relax_step at iteration scale_up_cameras_iter and every that many iterations after."""
        every = int(opt.scale_up_cameras_iter)
        if every > 0 and iteration >= every and iteration % every == 0:
            self.relax_step(opt)
            return True
        return False

    def relax_step(self, opt) -> None:
        """One widening step (stock): fovy low x f0 floored at max_fovy[0], high x f1 capped at max_fovy[1]; radius
        bounds x scale_up_factor floored at max_radius_range; polar bounds / and x phi_scale_up_factor, azimuth
        bounds x phi_scale_up_factor, clipped to max_theta_range / max_phi_range."""
        p, k = self.p, float(opt.phi_scale_up_factor)
        f0, f1 = (float(v) for v in opt.fovy_scale_up_factor)
        s = float(opt.scale_up_factor)
        self.fovy_range = [max(p.max_fovy_range[0], self.fovy_range[0] * f0),
                           min(p.max_fovy_range[1], self.fovy_range[1] * f1)]
        self.radius_range = [max(p.max_radius_range[0], self.radius_range[0] * s),
                             max(p.max_radius_range[1], self.radius_range[1] * s)]
        self.theta_range = [max(p.max_theta_range[0], self.theta_range[0] / k),
                            min(p.max_theta_range[1], self.theta_range[1] * k)]
        self.phi_range = [max(p.max_phi_range[0], self.phi_range[0] * k),
                          min(p.max_phi_range[1], self.phi_range[1] * k)]

    def state_dict(self) -> dict:
        return {"radius_range": list(self.radius_range), "theta_range": list(self.theta_range),
                "phi_range": list(self.phi_range), "fovy_range": list(self.fovy_range),
                "stack": [dict(s) for s in self.stack], "rng": self.rng.get_state()}

    def load_state_dict(self, state: dict) -> None:
        for key in ("radius_range", "theta_range", "phi_range", "fovy_range"):
            setattr(self, key, [float(v) for v in state[key]])
        self.stack = [dict(s) for s in state["stack"]]
        self.rng.set_state(state["rng"])
