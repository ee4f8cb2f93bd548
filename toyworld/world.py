"""The toy world: analytic objects (shape x colour, optionally a coloured front), their captions and their Gaussians.

Every object sits at the origin of the Z-up world, about as large as the sphere initialisation (radius 0.5). Its
"front" faces +y, where the training cameras' azimuth 0 looks from (scene.cameras.orbit_position), so "front view"
captions show the front. Lighting is fixed and baked into the colours: shade = ambient + diffuse max(0, n . l).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch

SHAPES = ("sphere", "cube", "cone", "cylinder")
COLOURS = {"red": (0.86, 0.16, 0.14), "green": (0.18, 0.70, 0.22), "blue": (0.16, 0.32, 0.90),
           "yellow": (0.96, 0.84, 0.14)}
FRONT_COLOUR = ("purple", (0.55, 0.16, 0.78))  # the attribute seen only from the front half
VIEWS = ("front", "side", "back")
LIGHT_DIR = np.array([0.35, 0.55, 0.76]) / np.linalg.norm([0.35, 0.55, 0.76])  # towards the light
AMBIENT, DIFFUSE = 0.5, 0.5

# dimensions: sphere radius; cube half-edge; cone base radius and height; cylinder radius and height
SPHERE_R = 0.5
CUBE_H = 0.4
CONE_R, CONE_H = 0.5, 0.9
CYL_R, CYL_H = 0.26, 1.0
FRONT_Y = 0.1  # surface points with y > FRONT_Y * size carry the front colour


@dataclass(frozen=True)
class ToyObject:
    shape: str
    colour: str
    front: bool = False  # "with a purple front"

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"toy shape '{self.shape}' is not one of {SHAPES}")
        if self.colour not in COLOURS:
            raise ValueError(f"toy colour '{self.colour}' is not one of {tuple(COLOURS)}")

    @property
    def text(self) -> str:
        """The object's prompt, e.g. 'a red cube' or 'a red cube with a purple front'."""
        base = f"a {self.colour} {self.shape}"
        return f"{base} with a {FRONT_COLOUR[0]} front" if self.front else base

    def caption(self, view: str | None = None) -> str:
        """LucidDreamer's view-dependent caption: '{text}, {view} view' (view None: the plain text)."""
        return self.text if view is None else f"{self.text}, {view} view"


def all_objects(fronts: bool = True) -> list[ToyObject]:
    return [ToyObject(s, c, f) for s in SHAPES for c in COLOURS for f in ((False, True) if fronts else (False,))]


def parse_prompt(text: str) -> ToyObject:
    """The toy object a prompt names: 'a blue cone with a purple front, side view' -> ToyObject(cone, blue, True)."""
    low = text.lower()
    shapes = [s for s in SHAPES if re.search(rf"\b{s}\b", low)]
    colours = [c for c in COLOURS if re.search(rf"\b{c}\b", low)]
    if len(shapes) != 1 or len(colours) != 1:
        raise ValueError(f"prompt '{text}' does not name one toy shape {SHAPES} and one colour {tuple(COLOURS)}")
    return ToyObject(shapes[0], colours[0], f"{FRONT_COLOUR[0]} front" in low)


def view_of_azimuth(azimuth: float) -> str:
    """The nearest discrete view of an azimuth in degrees (front |az| < 45, back |az| > 135, else side)."""
    a = abs(math.remainder(azimuth, 360.0))
    return "front" if a < 45 else ("back" if a > 135 else "side")


# ------------------------------------------------------------------------------------------------ geometry
def inside(shape: str, points: np.ndarray) -> np.ndarray:
    """Analytic occupancy of a shape: points [N, 3] -> bool [N]."""
    x, y, z = points[:, 0], points[:, 1], points[:, 2]
    if shape == "sphere":
        return x * x + y * y + z * z <= SPHERE_R ** 2
    if shape == "cube":
        return np.max(np.abs(points), axis=1) <= CUBE_H
    if shape == "cone":  # apex up, base at z = -CONE_H/2
        h = z + CONE_H / 2
        return (h >= 0) & (h <= CONE_H) & (np.hypot(x, y) <= CONE_R * (1 - h / CONE_H))
    if shape == "cylinder":
        return (np.abs(z) <= CYL_H / 2) & (np.hypot(x, y) <= CYL_R)
    raise ValueError(f"toy shape '{shape}' is not one of {SHAPES}")


def volume(shape: str) -> float:
    return {"sphere": 4 / 3 * math.pi * SPHERE_R ** 3, "cube": (2 * CUBE_H) ** 3,
            "cone": math.pi * CONE_R ** 2 * CONE_H / 3, "cylinder": math.pi * CYL_R ** 2 * CYL_H}[shape]


def surface_samples(shape: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n area-uniform surface points of a shape and their outward unit normals: ([n, 3], [n, 3])."""
    if shape == "sphere":
        d = rng.normal(size=(n, 3))
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        return SPHERE_R * d, d
    if shape == "cube":
        face = rng.integers(0, 6, n)
        axis, sign = face // 2, np.where(face % 2 == 0, 1.0, -1.0)
        pts = rng.uniform(-CUBE_H, CUBE_H, (n, 3))
        pts[np.arange(n), axis] = sign * CUBE_H
        normals = np.zeros((n, 3))
        normals[np.arange(n), axis] = sign
        return pts, normals
    if shape == "cone":
        slant = math.hypot(CONE_R, CONE_H)
        side_area, base_area = math.pi * CONE_R * slant, math.pi * CONE_R ** 2
        on_side = rng.uniform(size=n) < side_area / (side_area + base_area)
        phi = rng.uniform(0, 2 * math.pi, n)
        rad = CONE_R * np.sqrt(rng.uniform(size=n))  # area-uniform on the side (and the base disc)
        z = np.where(on_side, CONE_H / 2 - CONE_H * rad / CONE_R, -CONE_H / 2)
        pts = np.stack([rad * np.cos(phi), rad * np.sin(phi), z], axis=1)
        side_n = np.stack([CONE_H * np.cos(phi), CONE_H * np.sin(phi), np.full(n, CONE_R)], axis=1) / slant
        normals = np.where(on_side[:, None], side_n, np.array([0.0, 0.0, -1.0]))
        return pts, normals
    if shape == "cylinder":
        side_area, cap_area = 2 * math.pi * CYL_R * CYL_H, 2 * math.pi * CYL_R ** 2
        on_side = rng.uniform(size=n) < side_area / (side_area + cap_area)
        phi = rng.uniform(0, 2 * math.pi, n)
        rad = np.where(on_side, CYL_R, CYL_R * np.sqrt(rng.uniform(size=n)))
        cap_sign = np.where(rng.uniform(size=n) < 0.5, 1.0, -1.0)
        z = np.where(on_side, rng.uniform(-CYL_H / 2, CYL_H / 2, n), cap_sign * CYL_H / 2)
        pts = np.stack([rad * np.cos(phi), rad * np.sin(phi), z], axis=1)
        side_n = np.stack([np.cos(phi), np.sin(phi), np.zeros(n)], axis=1)
        normals = np.where(on_side[:, None], side_n, np.stack([np.zeros(n), np.zeros(n), cap_sign], axis=1))
        return pts, normals
    raise ValueError(f"toy shape '{shape}' is not one of {SHAPES}")


def albedo(obj: ToyObject, points: np.ndarray) -> np.ndarray:
    """Surface colour before lighting: the object's colour, and the front colour on its +y part if it has one."""
    rgb = np.tile(np.array(COLOURS[obj.colour]), (points.shape[0], 1))
    if obj.front:
        size = np.max(np.abs(points)) if points.size else 1.0
        rgb[points[:, 1] > FRONT_Y * size] = FRONT_COLOUR[1]
    return rgb


def shade(albedo_rgb: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """Baked lighting: albedo x (AMBIENT + DIFFUSE max(0, n . l)), in [0, 1]."""
    lambert = np.clip(normals @ LIGHT_DIR, 0.0, None)
    return np.clip(albedo_rgb * (AMBIENT + DIFFUSE * lambert)[:, None], 0.0, 1.0)


@dataclass
class Splats:
    """Fixed Gaussians in the renderer's duck-typed model interface (get_xyz, get_features, ...), SH degree 0."""
    xyz: torch.Tensor  # [N, 3]
    rgb: torch.Tensor  # [N, 3] in [0, 1]
    scale: torch.Tensor  # [N, 3]
    opacity: torch.Tensor  # [N, 1]
    active_sh_degree: int = 0

    @property
    def get_xyz(self) -> torch.Tensor:
        return self.xyz

    @property
    def get_features(self) -> torch.Tensor:
        from scene.sh_utils import rgb_to_sh
        return rgb_to_sh(self.rgb)[:, None, :]

    @property
    def get_scaling(self) -> torch.Tensor:
        return self.scale

    @property
    def get_rotation(self) -> torch.Tensor:
        rot = torch.zeros(self.xyz.shape[0], 4, dtype=self.xyz.dtype, device=self.xyz.device)
        rot[:, 0] = 1.0
        return rot

    @property
    def get_opacity(self) -> torch.Tensor:
        return self.opacity


def object_splats(obj: ToyObject, n: int = 3000, seed: int = 0, device=None) -> Splats:
    """The object as n opaque isotropic Gaussians on its surface with baked lighting (seeded, deterministic)."""
    rng = np.random.default_rng(seed)
    pts, normals = surface_samples(obj.shape, n, rng)
    area_per_point = _surface_area(obj.shape) / n
    sigma = 0.75 * math.sqrt(area_per_point)
    rgb = shade(albedo(obj, pts), normals)
    as_t = lambda a: torch.tensor(a, dtype=torch.float32, device=device)  # noqa: E731
    return Splats(xyz=as_t(pts), rgb=as_t(rgb), scale=torch.full((n, 3), sigma, device=device),
                  opacity=torch.full((n, 1), 0.98, device=device))


def _surface_area(shape: str) -> float:
    return {"sphere": 4 * math.pi * SPHERE_R ** 2, "cube": 6 * (2 * CUBE_H) ** 2,
            "cone": math.pi * CONE_R * (CONE_R + math.hypot(CONE_R, CONE_H)),
            "cylinder": 2 * math.pi * CYL_R * (CYL_R + CYL_H)}[shape]
