"""Every check of a config's values, in one place, run by each entry point before it writes anything.

Pure: reads the config (and whether its input paths exist), imports nothing above `arguments/`. Each failure is a
one-line `ConfigError` naming the key and the fix. What depends on the machine (an installed rasteriser, a model in
the cache, a writable output folder) is checked by `stages.run.validate`, which calls `check_config` first.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

from arguments.errors import ConfigError
from arguments.params import Config, GuidanceParams
from utils.reference_image import ReferenceImageError, fit_to_size, load_reference

PTD_MODES = ("off", "weighted", "checkpoints")
DENSIFY_STATS = ("last", "all")
DEPTH_GRADS = ("alpha", "full")
DEVICE_TYPES = ("cpu", "cuda")  # gpu-only: the device kinds a run may name (a config value, not a placement)
SWITCHES = ("auto", "on", "off")  # PipelineParams.compile, PTDParams.fold_lora
# render sizes must divide by the VAE's downsampling factor (Stable Diffusion's and the tiny prior's: 8)
VAE_FACTOR = 8
# sizes refused before they become a MemoryError deep in a run
MAX_IMAGE_SIDE = 8192
MAX_INIT_POINTS = 50_000_000
MAX_SEED = 2 ** 32 - 1  # numpy's seed range; torch's generators take it too
REPRESENTATIONS = ("gaussians", "nerf")
DENSITY_ACTIVATIONS = ("softplus", "exp")
MAX_GRID_SIDE = 1024  # a NeRF grid side: 1024^3 cells of the occupancy grid are already 1 GiB of booleans


def check_guidance_params(gp: GuidanceParams) -> None:
    """Settings the guidance cannot run."""
    if not gp.text.strip():
        raise ConfigError("GuidanceParams.text is empty; set the prompt, e.g. GuidanceParams.text='a DSLR photo of a "
                          "hamburger'")
    if gp.xs_eta != 0:
        raise ConfigError(f"GuidanceParams.xs_eta={gp.xs_eta}: only the deterministic DDIM inversion (0, stock) is "
                          "implemented")
    if gp.xs_delta_t <= 0 or gp.xs_inv_steps <= 0:
        raise ConfigError("GuidanceParams.xs_delta_t and xs_inv_steps must be positive (stock: 200 and 5)")
    if len(gp.t_range) != 2 or not 0 <= gp.t_range[0] < gp.t_range[1] <= gp.max_t_range <= 1:
        raise ConfigError(f"GuidanceParams needs 0 <= t_range[0] < t_range[1] <= max_t_range <= 1, got t_range="
                          f"{list(gp.t_range)}, max_t_range={gp.max_t_range}")


def switch_on(value: str, device_type: str) -> bool:
    """An auto | on | off switch resolved for a device kind: auto is on for CUDA, off for CPU."""
    return value == "on" or (value == "auto" and device_type == "cuda")


def check_speed_switches(cfg: Config) -> None:
    """PipelineParams.compile and PTDParams.fold_lora: auto | on | off, and no compiled UNet over peft's branch."""
    for key, value in (("PipelineParams.compile", cfg.PipelineParams.compile),
                       ("PTDParams.fold_lora", cfg.PTDParams.fold_lora)):
        if value not in SWITCHES:
            raise ConfigError(f"{key} '{value}' is not auto, on or off (auto: on for CUDA, off for CPU)")
    if cfg.PipelineParams.compile == "on" and cfg.PTDParams.fold_lora == "off" and cfg.PTDParams.mode != "off":
        raise ConfigError("PipelineParams.compile=on needs PTDParams.fold_lora auto or on: peft's LoRA branch would "
                          "recompile the UNet at every weight change")


def check_timesteps(timesteps: Sequence[int], what: str) -> None:
    """A matching-loss grid: non-empty indices in [0, 999) (tau = i + 1 must stay below 1000)."""
    if not timesteps or any(not 0 <= int(t) < 999 for t in timesteps):
        raise ConfigError(f"{what} must be timestep indices in [0, 999), got {list(timesteps)}")


def check_eval_params(cfg: Config) -> None:
    e = cfg.EvalParams
    if e.metrics_interval < 0:
        raise ConfigError(f"EvalParams.metrics_interval must be >= 0 (0: off), got {e.metrics_interval}")
    check_timesteps(e.probe_timesteps, "EvalParams.probe_timesteps")
    if e.probe_refs not in ("prior", "current"):
        raise ConfigError(f"EvalParams.probe_refs '{e.probe_refs}' is not 'prior' (every LoRA at 0) or 'current' "
                          "(the guidance network of the iteration)")
    sizes = {k: getattr(e, k) for k in ("probe_num_refs", "probe_ddim_steps", "probe_num_views", "clip_azimuths",
                                        "clip_resolution")}
    if min(sizes.values()) < 1:
        raise ConfigError(f"EvalParams {', '.join(k for k, v in sizes.items() if v < 1)} must be >= 1")


def check_config(cfg: Config) -> None:
    """All value checks of a run's config."""
    check_guidance_params(cfg.GuidanceParams)
    if cfg.PTDParams.mode not in PTD_MODES:
        raise ConfigError(f"PTDParams.mode '{cfg.PTDParams.mode}' is not one of {', '.join(PTD_MODES)}")
    if cfg.OptimizationParams.densify_stats not in DENSIFY_STATS:
        raise ConfigError(f"OptimizationParams.densify_stats '{cfg.OptimizationParams.densify_stats}' is not "
                          f"'last' (stock) or 'all'")
    if cfg.PTDParams.checkpoints_from not in ("penultimate", "last"):
        raise ConfigError(f"PTDParams.checkpoints_from '{cfg.PTDParams.checkpoints_from}' is not 'penultimate' "
                          f"(paper) or 'last'")
    o = cfg.OptimizationParams
    if o.test_ratio < 1 or o.video_frames < 1:
        raise ConfigError(f"OptimizationParams.test_ratio and video_frames must be >= 1 (stock: 5 and 120), got "
                          f"{o.test_ratio} and {o.video_frames}")
    if cfg.PipelineParams.depth_grad not in DEPTH_GRADS:
        raise ConfigError(f"PipelineParams.depth_grad '{cfg.PipelineParams.depth_grad}' is not 'alpha' (stock) or "
                          f"'full'")
    if cfg.PipelineParams.depth_grad == "full" and cfg.PipelineParams.backend == "inria":
        raise ConfigError("PipelineParams.depth_grad=full is not available with backend inria (the fork "
                          "differentiates depth through alpha only); use backend torch or gsplat")
    if not 8 <= cfg.mesh_resolution <= 1024 or not 0 < cfg.mesh_threshold < float("inf"):
        raise ConfigError(f"mesh_resolution must be in 8..1024 and mesh_threshold a positive density, got "
                          f"{cfg.mesh_resolution} and {cfg.mesh_threshold}")
    c = cfg.GenerateCamParams
    if c.pose_convention not in ("stock", "exact"):
        raise ConfigError(f"GenerateCamParams.pose_convention '{c.pose_convention}' is not 'stock' or 'exact'")
    if c.init_shape == "file" and not (c.init_path and Path(c.init_path).is_file()):
        raise ConfigError(f"GenerateCamParams.init_path '{c.init_path}' is not a file; give a .ply/.obj/.glb file "
                          f"for init_shape=file")
    prior_lora = cfg.GuidanceParams.prior_lora
    if prior_lora and not Path(prior_lora).is_dir():
        raise ConfigError(f"GuidanceParams.prior_lora '{prior_lora}' is not a folder; give the folder written by "
                          f"form_path.py --images")
    lora_path = cfg.GuidanceParams.LoRA_path
    if lora_path and not (lora_path.endswith(".safetensors") and Path(lora_path).is_file()):
        raise ConfigError(f"GuidanceParams.LoRA_path '{lora_path}' is not a .safetensors file; give a lora_diffusion "
                          f"file (stock's, or path_lora/lora_diffusion.safetensors of form_path.py) or remove the key")
    check_eval_params(cfg)
    check_speed_switches(cfg)
    check_nerf_params(cfg)
    check_ranges(cfg)


def check_nerf_params(cfg: Config) -> None:
    """ModelParams.representation and, for nerf, NeRFParams (checked whatever the representation: a saved config
    stays loadable when the representation is switched)."""
    m, n = cfg.ModelParams, cfg.NeRFParams
    if m.representation not in REPRESENTATIONS:
        raise ConfigError(f"ModelParams.representation '{m.representation}' is not one of {', '.join(REPRESENTATIONS)}")
    if n.density_activation not in DENSITY_ACTIVATIONS:
        raise ConfigError(f"NeRFParams.density_activation '{n.density_activation}' is not one of "
                          f"{', '.join(DENSITY_ACTIVATIONS)}")
    _at_least({"NeRFParams.plane_resolution": n.plane_resolution, "NeRFParams.init_resolution": n.init_resolution},
              2)
    _at_least({"NeRFParams.plane_features": n.plane_features, "NeRFParams.hidden_dim": n.hidden_dim,
               "NeRFParams.num_samples": n.num_samples, "NeRFParams.occupancy_resolution": n.occupancy_resolution,
               "NeRFParams.occupancy_interval": n.occupancy_interval}, 1)
    _at_least({"NeRFParams.occupancy_threshold": n.occupancy_threshold, "NeRFParams.lr_planes": n.lr_planes,
               "NeRFParams.lr_mlp": n.lr_mlp}, 0)
    for key in ("bound", "density_bias_scale"):
        if not 0 < getattr(n, key) < math.inf:
            raise ConfigError(f"NeRFParams.{key} must be a positive number, got {getattr(n, key)}")
    for key in ("plane_resolution", "init_resolution", "occupancy_resolution"):
        if getattr(n, key) > MAX_GRID_SIDE:
            raise ConfigError(f"NeRFParams.{key} must be at most {MAX_GRID_SIDE}, got {getattr(n, key)}")
    check_reference_image(cfg)  # after the render size is checked: the picture is resized to it


def check_reference_image(cfg: Config) -> None:
    """Image-to-3D: the picture loads, has an alpha channel or a plain background to key out, and fits the render
    size (utils/reference_image.py states the rules); its loss weights are not negative; sf3d needs the picture."""
    c, o = cfg.GenerateCamParams, cfg.OptimizationParams
    if c.init_shape == "sf3d" and c.ref_image is None:
        raise ConfigError("GenerateCamParams.init_shape=sf3d makes the initial mesh from the reference picture; set "
                          "GenerateCamParams.ref_image=path/to/picture.png or choose another init_shape")
    if c.ref_image is None:
        return
    if o.lambda_ref_rgb < 0 or o.lambda_ref_mask < 0:
        raise ConfigError(f"OptimizationParams.lambda_ref_rgb and lambda_ref_mask must be >= 0 (1000 and 100), got "
                          f"{o.lambda_ref_rgb} and {o.lambda_ref_mask}")
    try:
        ref = fit_to_size(load_reference(c.ref_image), c.image_w, c.image_h)
    except ReferenceImageError as err:
        raise ConfigError(f"GenerateCamParams.ref_image {err}") from None
    if ref.mask.max() <= 0.5:
        raise ConfigError(f"GenerateCamParams.ref_image '{c.ref_image}': the object covers no pixel at the render "
                          f"size {c.image_w}x{c.image_h}; crop the picture closer around it")


def check_workspace(workspace: str) -> None:
    """The run folder <output_root>/<workspace> must be a folder of output_root: one plain folder name."""
    if workspace == "":
        raise ConfigError("ModelParams.workspace is empty: the run would write into output_root itself; set a folder "
                          "name, e.g. ModelParams.workspace=bagel")
    if os.path.isabs(workspace) or workspace.startswith(("/", "\\")):
        raise ConfigError(f"ModelParams.workspace '{workspace}' is an absolute path, which would ignore "
                          f"ModelParams.output_root; set output_root to the parent folder and workspace to one folder "
                          f"name")
    if any(sep in workspace for sep in {"/", "\\", os.sep, os.altsep or "/"}):
        raise ConfigError(f"ModelParams.workspace '{workspace}' has a path separator; it must be one folder name "
                          f"inside ModelParams.output_root (set output_root for the parent folder)")
    if workspace in (".", "..") or "\x00" in workspace:
        raise ConfigError(f"ModelParams.workspace {workspace!r} is not a folder name; give one such as bagel (runs go "
                          f"to <output_root>/<workspace>)")


def check_device(name: str) -> None:
    """`device`: auto, or a CPU/CUDA torch device string (whether CUDA is there is checked when the run starts)."""
    if name == "auto":
        return
    import torch  # here, not at the top: loading or checking a config needs no torch

    try:
        kind = torch.device(name).type
    except (RuntimeError, ValueError):
        kind = None
    if kind not in DEVICE_TYPES:
        raise ConfigError(f"device '{name}' is not a device this project runs on; use auto, cpu, cuda or cuda:N")


def _at_least(values: dict[str, int | float], low: int, what: str = "") -> None:
    for key, value in values.items():
        if value < low:
            raise ConfigError(f"{key} must be >= {low}{what}, got {value}")


def _probability(values: dict[str, float]) -> None:
    for key, value in values.items():
        if not 0 <= value <= 1:
            raise ConfigError(f"{key} is a probability: it must be in [0, 1], got {value}")


def _interval(key: str, bounds: Sequence[float], low: float, high: float | None, unit: str) -> None:
    """`bounds` is a pair [min, max] with low < min < max (and max < high)."""
    top = f" < {high:.4g}" if high is not None else ""
    need = f"[min, max] with {low:g} < min < max{top} {unit}"
    if len(bounds) != 2:
        raise ConfigError(f"{key} must be two numbers {need}, got {list(bounds)}")
    a, b = bounds
    if not (low < a < b and (high is None or b < high)):
        raise ConfigError(f"{key} must be {need}, got {list(bounds)}")


def check_ranges(cfg: Config) -> None:
    """Values a run would divide by, loop zero times over, or not fit in memory; each named by its key."""
    m, o, g, p = cfg.ModelParams, cfg.OptimizationParams, cfg.GuidanceParams, cfg.PTDParams
    check_workspace(m.workspace)
    check_device(cfg.device)
    for key, seed in (("seed", cfg.seed), ("GuidanceParams.noise_seed", g.noise_seed)):
        if not 0 <= seed <= MAX_SEED:
            raise ConfigError(f"{key} must be in [0, 2^32 - 1] = [0, {MAX_SEED}], got {seed}")
    if not 0 <= m.sh_degree <= 3:
        raise ConfigError(f"ModelParams.sh_degree must be 0, 1, 2 or 3 (stock: 0), got {m.sh_degree}")
    _at_least({"OptimizationParams.iterations": o.iterations}, 1, " (stock: 5000)")
    _at_least({"OptimizationParams.densification_interval": o.densification_interval}, 1, " (a divisor; stock: 100; "
              "densify_until_iter=0 turns densification off)")
    _at_least({"OptimizationParams.opacity_reset_interval": o.opacity_reset_interval}, 1, " (a divisor; stock: 300; "
              "densify_until_iter=0 turns the resets off)")
    _at_least({"OptimizationParams.scale_up_cameras_iter": o.scale_up_cameras_iter}, 0, " (0: no camera relaxation; "
              "stock: 500)")
    _at_least({"OptimizationParams.checkpoint_interval": o.checkpoint_interval}, 0, " (0: never)")
    _at_least({"OptimizationParams.video_fps": o.video_fps, "OptimizationParams.max_nonfinite_steps":
               o.max_nonfinite_steps}, 1)
    _at_least({"ModelParams.batch": m.batch, "GuidanceParams.C_batch_size": g.C_batch_size,
               "PTDParams.num_views": p.num_views, "PTDParams.lora_batch_size": p.lora_batch_size}, 1)
    _at_least({"GuidanceParams.delta_t": g.delta_t}, 0, " (stock: 80)")
    _at_least({"GuidanceParams.delta_t_start": g.delta_t_start}, 0, " (stock: 100)")
    _at_least({"PTDParams.path_epochs": p.path_epochs, "PTDParams.prior_epochs": p.prior_epochs,
               "PTDParams.total_steps": p.total_steps, "PTDParams.switch_interval": p.switch_interval,
               "PTDParams.lora_rank": p.lora_rank}, 1)
    _at_least({"PTDParams.checkpoint_interval": p.checkpoint_interval}, 0, " (0: only the last)")
    if not p.power > 0:
        raise ConfigError(f"PTDParams.power must be > 0 (paper: 0.3), got {p.power}")
    _probability({"ModelParams.bg_aug_ratio": m.bg_aug_ratio, "ModelParams.sh_deg_aug_ratio": m.sh_deg_aug_ratio,
                  "ModelParams.scale_aug_ratio": m.scale_aug_ratio,
                  "OptimizationParams.as_latent_ratio": o.as_latent_ratio})
    check_cameras(cfg)


def check_cameras(cfg: Config) -> None:
    """Render sizes, fields of view, camera distances and the initial point count."""
    c, g = cfg.GenerateCamParams, cfg.GuidanceParams
    for key, side in (("GenerateCamParams.image_w", c.image_w), ("GenerateCamParams.image_h", c.image_h)):
        if side < VAE_FACTOR or side % VAE_FACTOR:
            raise ConfigError(f"{key} must be a positive multiple of {VAE_FACTOR} (the VAE's downsampling factor; "
                              f"stock: 512), got {side}")
        if side > MAX_IMAGE_SIDE:
            gib = g.C_batch_size * 128 * c.image_w * c.image_h * 2 / 2 ** 30
            raise ConfigError(f"{key}={side} is above the limit of {MAX_IMAGE_SIDE} pixels a side (stock: 512, "
                              f"Stable Diffusion 2.1's size; at {c.image_w}x{c.image_h} one 128-channel activation of "
                              f"the VAE encoder is ~{gib:.1f} GiB for {g.C_batch_size} views, and attention grows with "
                              f"the square of the pixel count)")
    if cfg.EvalParams.clip_resolution > MAX_IMAGE_SIDE:
        raise ConfigError(f"EvalParams.clip_resolution must be at most {MAX_IMAGE_SIDE} pixels a side (paper: 512), "
                          f"got {cfg.EvalParams.clip_resolution}")
    _interval("GenerateCamParams.fovy_range", c.fovy_range, 0, math.pi, "radians")
    _interval("GenerateCamParams.max_fovy_range", c.max_fovy_range, 0, math.pi, "radians")
    if not 0 < c.default_fovy < math.pi:
        raise ConfigError(f"GenerateCamParams.default_fovy must be in (0, pi) radians (stock: 0.55), got "
                          f"{c.default_fovy}")
    for key, pair in (("GenerateCamParams.theta_range", c.theta_range), ("GenerateCamParams.max_theta_range",
                      c.max_theta_range), ("GenerateCamParams.phi_range", c.phi_range),
                      ("GenerateCamParams.max_phi_range", c.max_phi_range),
                      ("OptimizationParams.fovy_scale_up_factor", cfg.OptimizationParams.fovy_scale_up_factor)):
        if len(pair) != 2:
            raise ConfigError(f"{key} must be two numbers [low, high], got {list(pair)}")
    _interval("GenerateCamParams.radius_range", c.radius_range, 0, None, "(camera distances)")
    _interval("GenerateCamParams.max_radius_range", c.max_radius_range, 0, None, "(camera distances)")
    if not c.default_radius > 0:
        raise ConfigError(f"GenerateCamParams.default_radius must be > 0 (stock: 3.5), got {c.default_radius}")
    if c.init_num_pts < 1:
        raise ConfigError(f"GenerateCamParams.init_num_pts must be >= 1 (stock: 100_000), got {c.init_num_pts}")
    if c.init_num_pts > MAX_INIT_POINTS:
        floats = 14 + 3 * ((cfg.ModelParams.sh_degree + 1) ** 2 - 1)  # xyz, SH, opacity, scale, rotation
        gib = c.init_num_pts * floats * 4 * 4 / 2 ** 30  # fp32 parameter, gradient and two Adam moments
        raise ConfigError(f"GenerateCamParams.init_num_pts={c.init_num_pts} is above the limit of "
                          f"{MAX_INIT_POINTS:_} points: ~{gib:.0f} GiB of Gaussians, gradients and Adam state before "
                          f"densification adds more (stock: 100_000)")
