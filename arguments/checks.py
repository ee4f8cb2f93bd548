"""Every check of a config's values, in one place, run by each entry point before it writes anything.

Pure: reads the config (and whether its input paths exist), imports nothing above `arguments/`. Each failure is a
one-line `ConfigError` naming the key and the fix. What depends on the machine (an installed rasteriser, a model in
the cache, a writable output folder) is checked by `stages.run.validate`, which calls `check_config` first.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from arguments.errors import ConfigError
from arguments.params import Config, GuidanceParams

PTD_MODES = ("off", "weighted", "checkpoints")
DENSIFY_STATS = ("last", "all")
DEPTH_GRADS = ("alpha", "full")


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
    if not 0 <= gp.t_range[0] < gp.t_range[1] <= gp.max_t_range <= 1:
        raise ConfigError(f"GuidanceParams needs 0 <= t_range[0] < t_range[1] <= max_t_range <= 1, got t_range="
                          f"{list(gp.t_range)}, max_t_range={gp.max_t_range}")


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
