"""NeRFModel: a tri-plane radiance field (density + view-independent colour) with an occupancy grid; the 3D model
of ModelParams.representation=nerf (paper §6.2), volume-rendered by gaussian_renderer/volume.py.

Notation (x in the box [-b, b]^3, u = x / b in [-1, 1]^3; threestudio's implicit volume with its hash grid replaced
by three feature planes, EG3D/TensoRF-style, which run fast in pure PyTorch):
    f(x)     = [P_xy(u_x, u_y), P_xz(u_x, u_z), P_yz(u_y, u_z)]     bilinear samples of three planes [C, R, R] -> [3C]
    h(x)     = W2 relu(W1 f + b1) + b2                              [4]: raw density, raw colour
    sigma(x) = act(h_0 + beta(x))                                   act = softplus | exp; beta the shape bias
    c(x)     = sigmoid(h_1:4 + gamma(x))                            gamma the initial colour in logit space
beta and gamma are fixed trilinear grids of the initial Gaussians' own extinction and colour fields (`shape_grids`):
threestudio's pre-activation "blob" density bias with the blob replaced by the initial shape (sphere, mesh file,
Point-E: whatever init_points3d.ply holds). W2 starts at zero, so the initial field IS that shape and renders like the
Gaussians; the rest starts small and random from the run's seed (its own generator: the global stream is untouched).
Colour ignores the view direction (no view-dependent term: the Gaussians' SH degree is 0 in the stock configs too).

Empty-space skipping: a boolean occupancy grid of G^3 cells over the box; a cell is occupied while the peak density of
its 2^3 stratified points times the marching step exceeds `occupancy_threshold` (nerfacc's rule, threestudio's 0.01),
dilated by one cell. The renderer evaluates the field only at samples in occupied cells (the others count as empty).
It is refreshed every `occupancy_interval` iterations (what replaces the Gaussians' densification and pruning).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from arguments.params import NeRFParams
from scene.sh_utils import SH_C0

FORMAT = "ptd-nerf-v1"
QUERY_CHUNK = 1 << 16  # points per field evaluation in the occupancy refresh and the mesh grid (bounded memory)


def marching_step(bound: float, num_samples: int) -> float:
    """World length of one ray sample: the box diagonal 2 sqrt(3) b split into num_samples intervals."""
    return 2.0 * math.sqrt(3.0) * bound / num_samples


def activate_density(raw: torch.Tensor, activation: str) -> torch.Tensor:
    """sigma = softplus(raw) = log(1 + e^raw) (threestudio's default) or exp(raw)."""
    return F.softplus(raw) if activation == "softplus" else torch.exp(raw)


def plane_features(planes: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """f(x) of the module docstring: planes [3, C, R, R] (xy, xz, yz; row = second axis), u [P, 3] in [-1, 1] ->
    [P, 3C], bilinear with grid points at the plane's corners (align_corners)."""
    grid = torch.stack([u[:, [0, 1]], u[:, [0, 2]], u[:, [1, 2]]])[:, None]  # [3, 1, P, 2] (x -> W, y -> H)
    feats = F.grid_sample(planes, grid, mode="bilinear", padding_mode="border", align_corners=True)  # [3, C, 1, P]
    return feats[:, :, 0].permute(2, 0, 1).reshape(u.shape[0], 3 * planes.shape[1])


def sample_grid(volume: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Trilinear samples of volume [K, R, R, R] (indexed [k, z, y, x], grid points at u = -1 .. 1) at u [P, 3] ->
    [P, K]."""
    out = F.grid_sample(volume[None], u[None, None, None], mode="bilinear", padding_mode="border",
                        align_corners=True)  # [1, K, 1, 1, P]
    return out[0, :, 0, 0].T


def gaussian_extinction(opacity: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Peak density c_i of the 3D density c_i exp(-|x - mu_i|^2 / (2 s_i^2)) whose line integral through the centre,
    c_i s_i sqrt(2 pi), is the optical thickness -ln(1 - o_i) of a Gaussian of opacity o_i: so that 1 - exp(-tau) seen
    through it is o_i, as the rasteriser composites it. opacity [N], scales [N] -> [N]."""
    return -torch.log1p(-opacity.clamp(max=1.0 - 1e-6)) / (scales * math.sqrt(2.0 * math.pi))


def shape_grids(xyz: torch.Tensor, scales: torch.Tensor, opacity: torch.Tensor, colors: torch.Tensor,
                resolution: int, bound: float, scale: float, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed bias grids (beta [R, R, R], gamma [3, R, R, R], indexed z, y, x) on R grid points a side over the
    box: the initial Gaussians' own extinction field, so that the initial render is theirs. With isotropic scales s_i
    (their geometric mean), c_i = gaussian_extinction(o_i, s_i) and K_i(x) = exp(-|x - mu_i|^2 / (2 s_i^2)):
        sigma_0(g) = sum_i c_i K_i(g)                         beta(g)  = act^-1(sigma_0(g)), clipped to [-scale, scale]
        rgb_0(g)   = sum_i c_i rgb_i K_i(g) / sigma_0(g)       gamma(g) = logit(rgb_0(g)) (0.5 grey where empty)
    summed over each Gaussian's 3-sigma window (scene/mesh_export.splat_field). act^-1 of softplus is
    log(e^sigma - 1), of exp is log(sigma)."""
    from scene.mesh_export import inverse_covariances, splat_field
    iso = scales.prod(dim=1).pow(1.0 / 3.0)  # [N]
    c = gaussian_extinction(opacity, iso)
    ones = torch.zeros(len(xyz), 4, dtype=xyz.dtype, device=xyz.device)
    ones[:, 0] = 1.0
    grid = splat_field(xyz, inverse_covariances(iso[:, None].expand(-1, 3), ones), iso[:, None].expand(-1, 3),
                       torch.cat([c[:, None], c[:, None] * colors], 1), np.full(3, -bound), 2.0 * bound /
                       (resolution - 1), (resolution,) * 3).double()  # [4, X, Y, Z]
    grid = grid.permute(0, 3, 2, 1)  # -> [4, Z, Y, X]
    sigma = grid[0].clamp(min=1e-12)
    raw = torch.log(torch.expm1(sigma.clamp(max=30.0))) if activation == "softplus" else torch.log(sigma)
    rgb = torch.where(grid[0] > 1e-8, grid[1:] / sigma, torch.full_like(grid[1:], 0.5))
    return raw.clamp(-scale, scale), torch.logit(rgb.clamp(0.01, 0.99))


class NeRFModel(nn.Module):
    """The radiance field. Build with `NeRFModel.from_point_cloud` (a run's initial model) or `NeRFModel.load`."""

    is_radiance_field = True  # render() volume-renders models that say so (gaussian_renderer/volume.py)

    def __init__(self, params: NeRFParams, device=None, dtype: torch.dtype = torch.float32, seed: int = 0):
        super().__init__()
        self.params = params
        device = torch.device("cpu") if device is None else torch.device(device)
        gen = torch.Generator().manual_seed(int(seed))
        c, r, h, s = params.plane_features, params.plane_resolution, params.hidden_dim, params.init_resolution

        def rand(*shape: int, std: float) -> nn.Parameter:
            return nn.Parameter((torch.randn(shape, generator=gen, dtype=torch.float64) * std).to(device, dtype))
        self.planes = rand(3, c, r, r, std=0.1)  # [3, C, R, R]
        self.w1 = rand(h, 3 * c, std=math.sqrt(2.0 / (3 * c)))  # He init of the ReLU layer
        self.b1 = nn.Parameter(torch.zeros(h, device=device, dtype=dtype))
        self.w2 = nn.Parameter(torch.zeros(4, h, device=device, dtype=dtype))  # zero: the initial field is the bias
        self.b2 = nn.Parameter(torch.zeros(4, device=device, dtype=dtype))
        self.register_buffer("density_bias", torch.full((1, s, s, s), -params.density_bias_scale, device=device,
                                                        dtype=dtype))
        self.register_buffer("color_bias", torch.zeros(3, s, s, s, device=device, dtype=dtype))
        g = params.occupancy_resolution
        self.register_buffer("occupancy", torch.ones(g, g, g, dtype=torch.bool, device=device))  # [z, y, x]
        self.optimizer: Optional[torch.optim.Adam] = None

    # ---- construction and the field ----
    @classmethod
    def from_gaussians(cls, gaussians, params: NeRFParams, device=None, seed: int = 0) -> "NeRFModel":
        """The field whose biases are the initial Gaussians' extinction and colour fields (shape_grids; any object
        with get_xyz, get_scaling, get_opacity and get_features, e.g. a GaussianModel), occupancy refreshed."""
        with torch.no_grad():
            xyz = gaussians.get_xyz.detach().double().cpu()
            colors = (SH_C0 * gaussians.get_features[:, 0, :].detach().double().cpu() + 0.5).clamp(0.0, 1.0)
            beta, gamma = shape_grids(xyz, gaussians.get_scaling.detach().double().cpu(),
                                      gaussians.get_opacity[:, 0].detach().double().cpu(), colors,
                                      params.init_resolution, params.bound, params.density_bias_scale,
                                      params.density_activation)
        model = cls(params, device=device, seed=seed)
        model.density_bias.copy_(beta[None])
        model.color_bias.copy_(gamma)
        model.refresh_occupancy()
        return model

    @classmethod
    def from_point_cloud(cls, points, colors, params: NeRFParams, device=None, seed: int = 0) -> "NeRFModel":
        """from_gaussians of the Gaussians GaussianModel.create_from_pcd makes of points [N, 3], colours [N, 3]."""
        from scene.gaussian_model import GaussianModel
        gaussians = GaussianModel(0)
        gaussians.create_from_pcd(np.asarray(points), np.asarray(colors), spatial_lr_scale=1.0)
        return cls.from_gaussians(gaussians, params, device=device, seed=seed)

    @property
    def bound(self) -> float:
        return float(self.params.bound)

    @property
    def render_step(self) -> float:
        return marching_step(self.params.bound, self.params.num_samples)

    @property
    def device(self) -> torch.device:
        return self.planes.device

    def query(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sigma [P] and colour [P, 3] in [0, 1] at world points x [P, 3] (module docstring)."""
        u = (x / self.bound).to(self.planes.dtype)
        hidden = F.relu(F.linear(plane_features(self.planes, u), self.w1, self.b1))
        h = F.linear(hidden, self.w2, self.b2)  # [P, 4]
        bias = torch.cat([sample_grid(self.density_bias, u), sample_grid(self.color_bias, u)], dim=1)
        h = h + bias
        return activate_density(h[:, 0], self.params.density_activation), torch.sigmoid(h[:, 1:])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """= query(x) (so that torch.func.functional_call can swap the parameters)."""
        return self.query(x)

    def occupied(self, x: torch.Tensor) -> torch.Tensor:
        """Whether world points x [P, 3] lie in occupied cells of the occupancy grid: bool [P]."""
        g = self.occupancy.shape[0]
        idx = ((x / self.bound + 1.0) * 0.5 * g).floor().long().clamp(0, g - 1)
        return self.occupancy[idx[:, 2], idx[:, 1], idx[:, 0]]

    @torch.no_grad()
    def density_at(self, x: torch.Tensor) -> torch.Tensor:
        """sigma at points x [P, 3] in chunks of QUERY_CHUNK (no gradients) -> [P]."""
        return torch.cat([self.query(x[i:i + QUERY_CHUNK])[0] for i in range(0, len(x), QUERY_CHUNK)])

    @torch.no_grad()
    def refresh_occupancy(self) -> int:
        """Recompute the occupancy grid (module docstring). Returns the number of occupied cells."""
        g, b = self.occupancy.shape[0], self.bound
        cell = 2.0 * b / g
        axis = -b + cell * (torch.arange(2 * g, device=self.device, dtype=self.planes.dtype) + 0.5) / 2.0
        zz, yy, xx = torch.meshgrid(axis, axis, axis, indexing="ij")  # 2G points a side: 2^3 per cell
        sigma = self.density_at(torch.stack([xx, yy, zz], -1).reshape(-1, 3)).reshape(1, 1, 2 * g, 2 * g, 2 * g)
        peak = F.max_pool3d(sigma, 2, 2)  # [1, 1, G, G, G]
        occ = F.max_pool3d((peak * self.render_step > self.params.occupancy_threshold).float(), 3, 1, 1)
        self.occupancy.copy_(occ[0, 0] > 0)
        return int(self.occupancy.sum())

    # ---- what train.py calls on any 3D model ----
    @property
    def num_points(self) -> int:
        """Occupied cells of the occupancy grid (logged where the Gaussians log their count)."""
        return int(self.occupancy.sum())

    def all_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.parameters())

    def training_setup(self, opt=None) -> None:
        """Adam over the planes (lr_planes) and the MLP (lr_mlp), betas (0.9, 0.99), eps 1e-15 (threestudio's).
        `opt` (OptimizationParams) is accepted for the Gaussians' signature: the lrs come from NeRFParams."""
        groups = [{"params": [self.planes], "lr": self.params.lr_planes, "name": "planes"},
                  {"params": [self.w1, self.b1, self.w2, self.b2], "lr": self.params.lr_mlp, "name": "mlp"}]
        self.optimizer = torch.optim.Adam(groups, lr=0.0, betas=(0.9, 0.99), eps=1e-15)

    def update_learning_rate(self, iteration: int) -> None:
        """Constant lrs (threestudio's NeRF has no schedule): nothing to do."""

    def oneup_sh_degree(self) -> None:
        """No spherical harmonics: colour is view-independent."""

    def step_occupancy(self, iteration: int) -> None:
        """Refresh the occupancy grid every occupancy_interval iterations (the NeRF's densification/pruning)."""
        if iteration % self.params.occupancy_interval == 0:
            self.refresh_occupancy()

    # ---- checkpoints and files ----
    def capture(self) -> dict:
        """Everything an exact resume needs, by name: settings, parameters and buffers, Adam state."""
        return {"format": FORMAT, "params": asdict(self.params),
                "state": {k: v.detach().clone() for k, v in self.state_dict().items()},
                "optimizer": None if self.optimizer is None else self.optimizer.state_dict()}

    def restore(self, state: dict, training_args=None) -> None:
        """Inverse of capture(); the optimiser is rebuilt and its state loaded."""
        if state.get("format") != FORMAT:
            raise ValueError(f"not a NeRF checkpoint (format {state.get('format')!r}, want {FORMAT!r}); was it "
                             f"written by a Gaussian run?")
        if state["params"] != asdict(self.params):
            raise ValueError("the NeRF checkpoint was written with other NeRFParams; resume with the run's config")
        self.load_state_dict(state["state"])
        self.training_setup(training_args)
        if state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])

    def save(self, path: str) -> None:
        """Weights and buffers as safetensors (atomically), with the NeRFParams in the file's metadata."""
        from safetensors.torch import save_file

        from utils.files import atomic_path, canonical_safetensors
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic_path(path, suffix=".safetensors") as tmp:
            save_file(tensors, str(tmp), metadata={"format": FORMAT, "nerf_params": json.dumps(asdict(self.params))})
            canonical_safetensors(tmp)  # the same bytes for the same run (the library's metadata order varies)

    @classmethod
    def load(cls, path: str, device=None) -> "NeRFModel":
        """A field written by save(); its NeRFParams come from the file."""
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for damaged files
            raise ValueError(f"{path} is not a readable NeRF file ({type(err).__name__}); pass the nerf.safetensors "
                             f"a NeRF run wrote") from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a NeRF file written by this project (format {meta.get('format')!r})")
        model = cls(NeRFParams(**json.loads(meta["nerf_params"])), device=device)
        model.load_state_dict(tensors)
        return model
