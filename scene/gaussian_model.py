"""GaussianModel: the 3D Gaussians, their optimiser, learning-rate schedules, densification and I/O.

Stored (raw) parameters and activations (3DGS / LucidDreamer):
    _xyz [N, 3]                 mu                    (identity)
    _features_dc [N, 1, 3]      SH DC coefficients    (colour = max(0, SH(d) + 0.5), see scene/sh_utils.py)
    _features_rest [N, K-1, 3]  higher SH bands, K = (max_sh_degree + 1)^2
    _scaling [N, 3]             log s                 s = exp(_scaling)
    _rotation [N, 4]            q (w, x, y, z)        q / |q|
    _opacity [N, 1]             logit o               o = sigmoid(_opacity)
Stock LucidDreamer also registers a "background" colour with Adam, but never renders it, so it never gets a gradient
and never moves: it is left out here (the renders' background comes from the run's config and augmentation).
Densification rules and their thresholds are in scene/densification.py.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from torch import nn

from scene import densification
from scene.point_cloud import mean_sq_dist_knn, validate_point_cloud
from scene.ply_io import PlyFormatError, read_gaussian_ply, write_gaussian_ply
from scene.sh_utils import num_sh_bases, rgb_to_sh

PARAM_NAMES = ("xyz", "f_dc", "f_rest", "opacity", "scaling", "rotation")  # per-Gaussian optimiser groups
INIT_OPACITY = 0.1


def inverse_sigmoid(x: torch.Tensor) -> torch.Tensor:
    return torch.log(x / (1.0 - x))


def log_linear_lr(step: int, lr_init: float, lr_final: float, max_steps: int, delay_steps: int = 0,
                  delay_mult: float = 1.0) -> float:
    """3DGS schedule: lr(t) = exp((1 - t) log lr_init + t log lr_final), t = clip(step / max_steps, 0, 1), times an
    optional warm-up delay_mult + (1 - delay_mult) sin(pi/2 clip(step / delay_steps, 0, 1)) (off when
    delay_steps = 0, which is LucidDreamer's setting: its delay_mult therefore has no effect)."""
    if step < 0 or (lr_init == 0.0 and lr_final == 0.0):
        return 0.0
    delay = 1.0
    if delay_steps > 0:
        delay = delay_mult + (1.0 - delay_mult) * math.sin(0.5 * math.pi * min(max(step / delay_steps, 0.0), 1.0))
    t = min(max(step / max(max_steps, 1), 0.0), 1.0)
    return delay * math.exp(math.log(lr_init) * (1.0 - t) + math.log(lr_final) * t)


def _without_background_group(optimizer_state: dict) -> dict:
    """An Adam state dict without the "background" group that checkpoints written before 2026-11-30 carry (that
    parameter never had a gradient, so dropping it changes no update)."""
    groups = optimizer_state["param_groups"]
    drop = {i for g in groups if g.get("name") == "background" for i in g["params"]}
    if not drop:
        return optimizer_state
    return {"state": {i: v for i, v in optimizer_state["state"].items() if i not in drop},
            "param_groups": [g for g in groups if g.get("name") != "background"]}


class GaussianModel:
    def __init__(self, sh_degree: int = 0, device=None, dtype: torch.dtype = torch.float32):
        if not 0 <= sh_degree <= 3:
            raise ValueError(f"sh_degree must be in 0..3, got {sh_degree}")
        self.max_sh_degree = int(sh_degree)
        self.active_sh_degree = 0
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.dtype = dtype
        self.spatial_lr_scale = 0.0
        self.percent_dense = 0.0
        self.optimizer: Optional[torch.optim.Adam] = None
        self._training_args = None
        self._set_params({"xyz": self._zeros(0, 3), "f_dc": self._zeros(0, 1, 3),
                          "f_rest": self._zeros(0, num_sh_bases(sh_degree) - 1, 3), "opacity": self._zeros(0, 1),
                          "scaling": self._zeros(0, 3), "rotation": self._zeros(0, 4)})
        self._reset_stats()

    # ---- parameters and activations ----
    def _zeros(self, *shape: int) -> torch.Tensor:
        return torch.zeros(shape, device=self.device, dtype=self.dtype)

    def _set_params(self, tensors: dict) -> None:
        wrap = {k: v if isinstance(v, nn.Parameter) else nn.Parameter(v.detach().clone().requires_grad_(True))
                for k, v in tensors.items()}
        self._xyz, self._features_dc, self._features_rest = wrap["xyz"], wrap["f_dc"], wrap["f_rest"]
        self._opacity, self._scaling, self._rotation = wrap["opacity"], wrap["scaling"], wrap["rotation"]

    def _params(self) -> dict:
        return {"xyz": self._xyz, "f_dc": self._features_dc, "f_rest": self._features_rest,
                "opacity": self._opacity, "scaling": self._scaling, "rotation": self._rotation}

    def _reset_stats(self) -> None:
        n = self._xyz.shape[0]
        self.xyz_gradient_accum = self._zeros(n, 1)  # sum of |dL/d mean2D| over views where visible
        self.denom = self._zeros(n, 1)  # number of such views
        self.max_radii2D = self._zeros(n)  # largest screen radius since the last densification

    def all_finite(self) -> bool:
        """Every parameter finite (no NaN or inf anywhere)."""
        return all(bool(torch.isfinite(p).all()) for p in self._params().values())

    @property
    def num_points(self) -> int:
        return self._xyz.shape[0]

    @property
    def get_xyz(self) -> torch.Tensor:
        return self._xyz

    @property
    def get_features(self) -> torch.Tensor:
        """[N, K, 3] all SH coefficients (DC first)."""
        return torch.cat([self._features_dc, self._features_rest], dim=1)

    @property
    def get_scaling(self) -> torch.Tensor:
        return torch.exp(self._scaling)

    @property
    def get_rotation(self) -> torch.Tensor:
        return nn.functional.normalize(self._rotation, dim=-1)

    @property
    def get_opacity(self) -> torch.Tensor:
        return torch.sigmoid(self._opacity)

    def oneup_sh_degree(self) -> None:
        self.active_sh_degree = min(self.active_sh_degree + 1, self.max_sh_degree)

    # ---- construction ----
    def create_from_pcd(self, points, colors, spatial_lr_scale: float) -> None:
        """Gaussians at points [N, 3] with colours [N, 3] in [0, 1] (None: grey), e.g. a PointCloud's fields:
        isotropic log-scales log sqrt(mean squared distance to the 3 nearest neighbours), identity rotations,
        opacity 0.1, DC = (rgb - 0.5) / Y_00. spatial_lr_scale multiplies the position lr (LucidDreamer:
        default_radius)."""
        pcd = validate_point_cloud(np.asarray(points), None if colors is None else np.asarray(colors),
                                   "create_from_pcd")
        n = pcd.points.shape[0]
        xyz = torch.tensor(pcd.points, dtype=self.dtype, device=self.device)
        dc = rgb_to_sh(torch.tensor(pcd.colors, dtype=self.dtype, device=self.device))[:, None, :]
        dist2 = torch.tensor(mean_sq_dist_knn(pcd.points), dtype=self.dtype, device=self.device)
        rot = self._zeros(n, 4)
        rot[:, 0] = 1.0
        self._set_params({"xyz": xyz, "f_dc": dc, "f_rest": self._zeros(n, num_sh_bases(self.max_sh_degree) - 1, 3),
                          "opacity": inverse_sigmoid(torch.full((n, 1), INIT_OPACITY, dtype=self.dtype,
                                                                device=self.device)),
                          "scaling": torch.log(torch.sqrt(dist2))[:, None].repeat(1, 3), "rotation": rot})
        self.spatial_lr_scale = float(spatial_lr_scale)
        self.active_sh_degree = 0
        self._reset_stats()

    # ---- optimiser ----
    def training_setup(self, opt) -> None:
        """Adam (eps 1e-15) with one group per parameter; lrs from OptimizationParams (position x spatial_lr_scale,
        f_rest = feature_lr / 20)."""
        self._training_args = opt
        self.percent_dense = float(opt.percent_dense)
        self._reset_stats()
        lrs = {"xyz": opt.position_lr_init * self.spatial_lr_scale, "f_dc": opt.feature_lr,
               "f_rest": opt.feature_lr / 20.0, "opacity": opt.opacity_lr, "scaling": opt.scaling_lr,
               "rotation": opt.rotation_lr}
        params = self._params()
        groups = [{"params": [params[k]], "lr": lrs[k], "name": k} for k in lrs]
        self.optimizer = torch.optim.Adam(groups, lr=0.0, eps=1e-15)

    def learning_rates(self, iteration: int) -> dict:
        """Scheduled lrs at `iteration` (log-linear over opt.iterations) for xyz, f_dc, scaling and rotation."""
        o, n = self._training_args, int(self._training_args.iterations)
        return {"xyz": log_linear_lr(iteration, o.position_lr_init * self.spatial_lr_scale,
                                     o.position_lr_final * self.spatial_lr_scale, n),
                "f_dc": log_linear_lr(iteration, o.feature_lr, o.feature_lr_final, n),
                "scaling": log_linear_lr(iteration, o.scaling_lr, o.scaling_lr_final, n),
                "rotation": log_linear_lr(iteration, o.rotation_lr, o.rotation_lr_final, n)}

    def update_learning_rate(self, iteration: int) -> float:
        """Set the scheduled lrs; returns the position lr."""
        lrs = self.learning_rates(iteration)
        for group in self.optimizer.param_groups:
            if group["name"] in lrs:
                group["lr"] = lrs[group["name"]]
        return lrs["xyz"]

    def _swap_tensors(self, fn) -> None:
        """Replace every per-Gaussian parameter p by fn(name, p) (a plain tensor) and its Adam moments by
        fn(name, moment) (new rows of moments must come back as zeros), keeping the other optimiser state."""
        new = {}
        for name, old in self._params().items():
            param = nn.Parameter(fn(name, old.detach()).requires_grad_(True))
            if self.optimizer is not None:
                group = next(g for g in self.optimizer.param_groups if g["name"] == name)
                state = self.optimizer.state.pop(group["params"][0], None)
                if state:
                    state["exp_avg"] = fn(name, state["exp_avg"], moment=True)
                    state["exp_avg_sq"] = fn(name, state["exp_avg_sq"], moment=True)
                    self.optimizer.state[param] = state
                group["params"][0] = param
            new[name] = param
        self._set_params(new)

    def prune_points(self, mask: torch.Tensor) -> None:
        """Remove the Gaussians where mask [N] is True (parameters, Adam moments and statistics)."""
        keep = ~mask
        self._swap_tensors(lambda name, t, moment=False: t[keep])
        self.xyz_gradient_accum = self.xyz_gradient_accum[keep]
        self.denom = self.denom[keep]
        self.max_radii2D = self.max_radii2D[keep]

    def append_points(self, new: dict, parents: torch.Tensor) -> None:
        """Append Gaussians (raw tensors per PARAM_NAMES) with zero Adam moments; their statistics are copied
        from the parent indices [M] (so a clone of a screen-large Gaussian is pruned with it)."""
        self._swap_tensors(lambda name, t, moment=False: torch.cat(
            [t, torch.zeros_like(new[name]) if moment else new[name].to(t)], dim=0))
        self.xyz_gradient_accum = torch.cat([self.xyz_gradient_accum, self.xyz_gradient_accum[parents]])
        self.denom = torch.cat([self.denom, self.denom[parents]])
        self.max_radii2D = torch.cat([self.max_radii2D, self.max_radii2D[parents]])

    def reset_opacity(self) -> None:
        """Opacities to min(o, 0.01), with fresh Adam moments for them (3DGS)."""
        target = inverse_sigmoid(torch.clamp_max(self.get_opacity.detach(), 0.01))
        self._swap_tensors(lambda name, t, moment=False:
                           (torch.zeros_like(t) if moment else target) if name == "opacity" else t)

    # ---- densification (rules in scene/densification.py) ----
    def add_densification_stats(self, viewspace_grad: torch.Tensor, visibility_filter: torch.Tensor,
                                radii: Optional[torch.Tensor] = None) -> None:
        """Accumulate |dL/d mean2D| (norm of grad[:, :2]) and the view count for visible Gaussians, and their max
        screen radius. viewspace_grad: the render's viewspace_points.grad [N, 3] (or viewspace_points itself)."""
        densification.add_stats(self, viewspace_grad, visibility_filter, radii)

    def densify_and_prune(self, max_grad: float, min_opacity: float, extent: float,
                          max_screen_size: Optional[float], generator: Optional[torch.Generator] = None,
                          screen_prune: bool = True) -> dict:
        """Clone, split, then prune (see scene/densification.py). Returns counts {cloned, split, pruned}."""
        return densification.densify_and_prune(self, max_grad, min_opacity, extent, max_screen_size, generator,
                                               screen_prune)

    # ---- checkpoints and PLY ----
    def capture(self) -> dict:
        """Everything needed to resume, by name (parameters, Adam state, statistics, degrees)."""
        return {"format": "ptd-gaussians-v1", "max_sh_degree": self.max_sh_degree,
                "active_sh_degree": self.active_sh_degree, "spatial_lr_scale": self.spatial_lr_scale,
                "percent_dense": self.percent_dense,
                "params": {k: v.detach().clone() for k, v in self._params().items()},
                "xyz_gradient_accum": self.xyz_gradient_accum.clone(), "denom": self.denom.clone(),
                "max_radii2D": self.max_radii2D.clone(),
                "optimizer": None if self.optimizer is None else self.optimizer.state_dict()}

    def restore(self, state: dict, training_args=None) -> None:
        """Inverse of capture(). The optimiser is rebuilt (from training_args, else the last training_setup's) and
        its state loaded when the checkpoint has one."""
        need = ("max_sh_degree", "active_sh_degree", "spatial_lr_scale", "params", "xyz_gradient_accum", "denom",
                "max_radii2D", "optimizer")
        missing = [k for k in need if k not in state] + [f"params.{k}" for k in PARAM_NAMES
                                                          if k not in state.get("params", {})]
        if missing:
            raise ValueError(f"Gaussian checkpoint lacks {', '.join(missing)}; was it written by capture()?")
        self.max_sh_degree = int(state["max_sh_degree"])
        self.active_sh_degree = int(state["active_sh_degree"])
        self.spatial_lr_scale = float(state["spatial_lr_scale"])
        self._set_params({k: state["params"][k].to(self.device, self.dtype) for k in PARAM_NAMES})
        args = training_args if training_args is not None else self._training_args
        if args is not None:
            self.training_setup(args)
            if state["optimizer"] is not None:
                self.optimizer.load_state_dict(_without_background_group(state["optimizer"]))
        self.percent_dense = float(state.get("percent_dense", self.percent_dense))
        for key in ("xyz_gradient_accum", "denom", "max_radii2D"):
            setattr(self, key, state[key].to(self.device, self.dtype).clone())

    def save_ply(self, path: str) -> None:
        """Standard 3DGS PLY (scene/ply_io.py), written atomically."""
        p = {k: v.detach().cpu().numpy() for k, v in self._params().items()}
        write_gaussian_ply(path, p["xyz"], p["f_dc"][:, 0, :], p["f_rest"].transpose(0, 2, 1), p["opacity"][:, 0],
                           p["scaling"], p["rotation"])

    def load_ply(self, path: str, sh_degree: Optional[int] = None) -> None:
        """Load a 3DGS PLY. Without sh_degree the model takes the file's degree (max and active, as stock); with it,
        the higher SH bands are zero-padded or cut to that degree and the active degree is min(file's, sh_degree).
        The optimiser is dropped (call training_setup). Nothing changes when the file is rejected."""
        data = read_gaussian_ply(path)
        for key in ("xyz", "scale", "rot", "opacity"):
            if not np.isfinite(data[key]).all():
                raise PlyFormatError(f"PLY file {path} has NaN or infinite '{key}' values; it cannot be rendered")
        if data["xyz"].shape[0] == 0:
            raise PlyFormatError(f"PLY file {path} holds no Gaussians")
        degree = data["sh_degree"] if sh_degree is None else int(sh_degree)
        if not 0 <= degree <= 3:
            raise ValueError(f"sh_degree must be in 0..3, got {degree}")

        def t(a: np.ndarray) -> torch.Tensor:
            return torch.tensor(a, device=self.device, dtype=self.dtype)
        rest = t(data["f_rest"]).transpose(1, 2)[:, :num_sh_bases(degree) - 1]  # [N, K-1, 3]
        pad = num_sh_bases(degree) - 1 - rest.shape[1]
        rest = torch.cat([rest, rest.new_zeros(rest.shape[0], pad, 3)], dim=1)
        self._set_params({"xyz": t(data["xyz"]), "f_dc": t(data["f_dc"])[:, None, :], "f_rest": rest,
                          "opacity": t(data["opacity"])[:, None], "scaling": t(data["scale"]),
                          "rotation": t(data["rot"])})
        self.max_sh_degree = degree
        self.active_sh_degree = min(int(data["sh_degree"]), degree)
        self.optimizer = None
        self._reset_stats()
