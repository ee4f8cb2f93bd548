"""The start of a run, shared by form_path.py, train.py, probe_ood.py and the measurements: the checks before
anything is written, torch settings, the initial Gaussians (one per config, never stale), the guidance prior, the
camera sampler, the background, and the stage-1 path LoRA (where it lives, what it was made for, loading it)."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from arguments import Config, RunError, load_config, run_dir
from arguments.checks import check_config, switch_on
from gaussian_renderer import BackendUnavailableError, resolve_backend
from guidance import lora_merge
from guidance.lora_merge import folded_adapter
from guidance.lora_training import load_lora, read_lora_metadata, read_lora_state_dict
from guidance.ptd_utils import PathTracer
from guidance.sd_utils import StableDiffusionGuidance, resolve_model_key
from scene import GaussianModel, OrbitCameraSampler, initial_point_cloud
from scene.nerf_io import MODEL_FILES
from scene.nerf_model import NeRFModel
from utils.files import FolderBusy, WriteError, file_hash, lock_folder, stable_hash, write_json_atomic

INIT_PLY = "init_points3d.ply"
INIT_KEY = "init_points3d.json"
DONE_MARKER = "train_done.json"  # stage 2's completion marker, written last
LOCK_FILE = ".ptd.lock"  # held by the stage writing the workspace (holds its PID)
# the peft adapter name of the path LoRA, in both stages
PATH_ADAPTER = "ptd_path"

__all__ = ["INIT_PLY", "INIT_KEY", "PATH_ADAPTER", "configure_torch", "scene_extent", "init_key",
           "initial_gaussians", "initial_model", "make_guidance", "speed_switches", "make_sampler", "background",
           "path_lora_dir", "path_metadata",
           "check_path_metadata", "load_path_lora", "describe_run", "lock_workspace", "final_ply_path", "mark_finished",
           "finished_ply", "validate",
           "check_writable", "run_entry"]


def configure_torch(cfg: Config) -> None:
    """Process-wide torch settings of a run (called by the entry points, never at import)."""
    torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)


def scene_extent(cfg: Config) -> float:
    """LucidDreamer's spatial scale: the default camera radius (3.5), for lr scaling and densification."""
    return float(cfg.GenerateCamParams.default_radius)


def init_key(cfg: Config) -> dict:
    """Everything the initial Gaussians depend on: a cached init is reused only when all of it matches."""
    c = cfg.GenerateCamParams
    key = {"init_shape": c.init_shape, "init_num_pts": c.init_num_pts, "sh_degree": cfg.ModelParams.sh_degree,
           "seed": cfg.seed, "extent": scene_extent(cfg)}
    if c.init_shape == "file":
        key.update(init_path=str(c.init_path), init_file_hash=file_hash(c.init_path) if c.init_path and
                   Path(c.init_path).is_file() else None)
    if c.init_shape == "pointe":
        key["init_prompt"] = c.init_prompt
    if c.init_shape == "sf3d":  # SF3D's mesh of the picture (or the sphere when sf3d cannot run here)
        key.update(ref_image=str(c.ref_image), ref_image_hash=file_hash(c.ref_image) if c.ref_image and
                   Path(c.ref_image).is_file() else None)
    return key


def initial_gaussians(cfg: Config, device: torch.device, *, create: bool = True):
    """The run's initial Gaussians: loaded from <run>/init_points3d.ply when its key file matches this config, else
    built (seeded) and saved. Stock LucidDreamer reused any old init_points3d.ply (a stale-cache bug)."""
    folder = run_dir(cfg)
    ply, key_file = folder / INIT_PLY, folder / INIT_KEY
    key = init_key(cfg)
    gaussians = GaussianModel(cfg.ModelParams.sh_degree, device=device)
    if ply.is_file() and key_file.is_file() and json.loads(key_file.read_text()).get("key") == key:
        gaussians.load_ply(str(ply), sh_degree=cfg.ModelParams.sh_degree)
        gaussians.active_sh_degree = 0
        gaussians.spatial_lr_scale = scene_extent(cfg)
        return gaussians
    if not create:
        raise RunError(f"{ply} is missing or was made for another config; run form_path.py --opt CONFIG first")
    cloud = initial_point_cloud(cfg.GenerateCamParams, np.random.default_rng(cfg.seed), device=device)
    gaussians.create_from_pcd(cloud.points, cloud.colors, spatial_lr_scale=scene_extent(cfg))
    folder.mkdir(parents=True, exist_ok=True)
    gaussians.save_ply(str(ply))
    write_json_atomic(key_file, {"key": key, "hash": stable_hash(key), "ply_hash": file_hash(ply)})
    return gaussians


def initial_model(cfg: Config, device: torch.device, *, create: bool = True):
    """The run's initial 3D model: the initial Gaussians (initial_gaussians) or, with ModelParams.representation
    nerf, the radiance field whose density and colour start as those Gaussians' extinction and colour fields (the
    same shape and look, scene/nerf_model.py) with random features from cfg.seed. Both stages build the same one."""
    gaussians = initial_gaussians(cfg, device, create=create)
    if cfg.ModelParams.representation != "nerf":
        return gaussians
    return NeRFModel.from_gaussians(gaussians, cfg.NeRFParams, device=device, seed=cfg.seed)


def make_guidance(cfg: Config, device: torch.device, *, compiled: bool = False) -> StableDiffusionGuidance:
    """The guidance prior; compiled: its UNet calls as CUDA graphs (stage 2 passes speed_switches' choice)."""
    return StableDiffusionGuidance(cfg.GuidanceParams, device, warmup_iter=cfg.OptimizationParams.warmup_iter,
                                   compiled=compiled)


def speed_switches(cfg: Config, device: torch.device) -> tuple[bool, bool]:
    """(compile, fold): PipelineParams.compile and PTDParams.fold_lora resolved on `device` (auto: on for CUDA; the
    fold also wherever the UNet is compiled, since peft's branch would recompile it at every weight change)."""
    compiled = switch_on(cfg.PipelineParams.compile, device.type)
    fold = switch_on(cfg.PTDParams.fold_lora, device.type) or (compiled and cfg.PTDParams.fold_lora == "auto")
    if compiled and not fold and cfg.PTDParams.mode != "off":
        raise RunError(f"PipelineParams.compile={cfg.PipelineParams.compile} compiles the UNet on {device.type} but "
                       f"PTDParams.fold_lora=off keeps peft's branch, which recompiles at every weight change; set "
                       f"fold_lora auto or compile off")
    return compiled, fold


def make_sampler(cfg: Config, device: torch.device, seed_offset: int = 0):
    """LucidDreamer's training camera sampler on its own seeded generator (stage 1 and the probe use other
    streams, seed_offset 1 and 2, so that stage 2 draws the same cameras in every arm)."""
    return OrbitCameraSampler(cfg.GenerateCamParams, np.random.default_rng(cfg.seed + seed_offset),
                              batch=cfg.ModelParams.batch, device=device)


def background(cfg: Config, device: torch.device) -> torch.Tensor:
    value = 1.0 if cfg.ModelParams.white_background else 0.0
    return torch.full((3,), value, device=device)


# ---------------------------------------------------------------------------------------------- the path LoRA
def path_lora_dir(cfg: Config) -> Path:
    return Path(cfg.PTDParams.path_lora) if cfg.PTDParams.path_lora else run_dir(cfg) / "path_lora"


def path_metadata(cfg: Config) -> dict:
    """What a path LoRA is made for: stage 2 refuses a path formed for another prompt, prior or initial model."""
    meta = {"prompt": cfg.GuidanceParams.text, "base_model": cfg.GuidanceParams.model_key,
            "prior_lora": cfg.GuidanceParams.prior_lora, "LoRA_path": cfg.GuidanceParams.LoRA_path,
            "init_key_hash": stable_hash(init_key(cfg))}
    if cfg.ModelParams.representation != "gaussians":  # a NeRF's renders differ from the Gaussians': its own path
        meta.update(representation=cfg.ModelParams.representation,
                    nerf_params_hash=stable_hash(dataclasses.asdict(cfg.NeRFParams)))
    return meta


def check_path_metadata(cfg: Config) -> dict:
    """The path LoRA folder's metadata, after checking that the folder is complete and was formed for this config."""
    folder = path_lora_dir(cfg)
    info = read_lora_metadata(folder)
    for key, want in path_metadata(cfg).items():
        if info.get(key) != want:
            raise RunError(f"path LoRA {folder} was formed for {key}={info.get(key)!r}, this run has {want!r}; "
                           f"rerun form_path.py with this config or set PTDParams.path_lora")
    return info


def load_path_lora(cfg: Config, guidance) -> dict:
    """The one way the path LoRA of stage 1 enters the prior: checked against this config, loaded through diffusers
    as adapter PATH_ADAPTER (at weight 1, as trained), without moving the global random stream. Returns its
    metadata."""
    info = check_path_metadata(cfg)
    with torch.random.fork_rng(devices=[]):  # adapter creation draws random init weights: keep the global stream
        load_lora(guidance.pipe, path_lora_dir(cfg), PATH_ADAPTER)
    return info


def describe_run(cfg: Config, guidance, device: torch.device) -> str:
    """What runs, in one line: the rasteriser `backend: auto` chose, the prior (id and folder), its precision, the
    device. Printed at the start of a stage and written on top of the run's saved config."""
    renderer = "volume renderer (NeRF)" if cfg.ModelParams.representation == "nerf" else \
        f"rasteriser {resolve_backend(cfg.PipelineParams.backend, device)}"
    if renderer == "rasteriser torch" and cfg.PipelineParams.backend == "auto" and device.type == "cuda":
        renderer += (" (auto found neither LucidDreamer's diff_gaussian_rasterization nor gsplat: 15-30x slower; "
                     "README, 'CUDA rasterizers')")
    unet = "UNet eager" if getattr(guidance, "compiled_unet", None) is None else \
        f"UNet compiled{' (CUDA graphs)' if device.type == 'cuda' else ''}"
    if folded_adapter(guidance.unet) is not None:
        unet += ", path LoRA folded"
    model = cfg.GuidanceParams.model_key
    where = "" if str(guidance.model_path) == model else f" ({guidance.model_path})"
    return (f"ran with: {renderer}, prior {model}{where}, {str(guidance.dtype).replace('torch.', '')}, "
            f"device {device}, torch {torch.__version__}, {unet}")


# ---------------------------------------------------------------------------------------------- the workspace
@contextlib.contextmanager
def lock_workspace(cfg: Config) -> Iterator[None]:
    """The run folder's lock, held by a stage while it writes there (freed when the block ends or the process dies,
    however it dies): two stages on one workspace would mix their outputs. A busy workspace is a one-line RunError
    naming the holder's PID. A stage that stopped before writing anything leaves no folder and no lock file behind."""
    folder = run_dir(cfg)
    created = [] if folder.exists() else [folder, *[p for p in folder.parents if not p.exists()]]  # inner first
    try:
        handle = lock_folder(folder, LOCK_FILE)
    except FolderBusy as err:
        raise RunError(f"{err}: another form_path.py or train.py is writing this workspace; wait for it or set "
                       f"ModelParams.workspace to another name") from None
    try:
        with handle:
            yield
    finally:
        if [p.name for p in folder.iterdir()] == [LOCK_FILE]:  # nothing else was written
            (folder / LOCK_FILE).unlink(missing_ok=True)
            for path in created:  # the folders the lock made, innermost first
                path.rmdir()


# ---------------------------------------------------------------------------------------------- a finished run
def final_ply_path(cfg: Config) -> Path:
    """Where stage 2 writes its final model: <run>/point_cloud/iteration_<iterations>/point_cloud.ply (a NeRF run:
    nerf.safetensors there, scene/nerf_io.py)."""
    return (run_dir(cfg) / "point_cloud" / f"iteration_{cfg.OptimizationParams.iterations}" /
            MODEL_FILES[cfg.ModelParams.representation])


def mark_finished(cfg: Config) -> None:
    """Write <run>/train_done.json, the completion marker, last and atomically, once stage 2 has written everything."""
    write_json_atomic(run_dir(cfg) / DONE_MARKER, {"iterations": cfg.OptimizationParams.iterations,
                                                    "ply": str(final_ply_path(cfg).relative_to(run_dir(cfg)))})


def finished_ply(run: Path, cfg: Config) -> Path | None:
    """The final PLY of a FINISHED stage-2 run folder (its completion marker, or for runs from before the marker its
    final iteration's PLY), else None: a run killed after some intermediate save is not finished."""
    marker = run / DONE_MARKER
    if marker.is_file():
        try:
            info = json.loads(marker.read_text())
        except ValueError:
            return None
        ply = run / info.get("ply", "")
        return ply if info.get("iterations") == cfg.OptimizationParams.iterations and ply.is_file() else None
    ply = run / "point_cloud" / f"iteration_{cfg.OptimizationParams.iterations}" / "point_cloud.ply"
    return ply if ply.is_file() and cfg.ModelParams.representation == "gaussians" else None


def model_source(source: Path) -> tuple[Path, Config]:
    """The model a tool works on and its run's settings: a finished run folder's final PLY and config (the PLY
    train_done.json names), or a .ply file with the default settings. Anything else: a one-line RunError."""
    if source.is_file():
        if source.suffix.lower() == ".safetensors":  # a NeRF run's field (scene/nerf_io.py)
            cfg = Config()
            cfg.ModelParams.representation = "nerf"
            return source, cfg
        if source.suffix.lower() != ".ply":
            raise RunError(f"{source} is not a .ply file; pass a run folder (output/<workspace>), a 3DGS .ply or a "
                           f"NeRF run's nerf.safetensors")
        return source, Config()
    if not source.is_dir():
        raise RunError(f"{source} does not exist; pass a run folder (output/<workspace>) or a 3DGS .ply file")
    if not (source / "config.yaml").is_file():
        raise RunError(f"{source} is not a run folder (it has no config.yaml written by train.py); pass "
                       f"output/<workspace> or a 3DGS .ply file")
    cfg = load_config(source / "config.yaml")
    ply = finished_ply(source, cfg)
    if ply is None:
        raise RunError(f"run {source} has no finished stage-2 model (no train_done.json naming its final PLY): finish "
                       f"it with `python train.py --opt {source / 'config.yaml'} --resume`, or pass one of its "
                       f"point_cloud/iteration_N/point_cloud.ply files")
    return ply, cfg


# ---------------------------------------------------------------------------------------------- checks and CLI
def validate(cfg: Config, device: torch.device) -> None:
    """Every check that needs no heavy work, before anything is written: the config's values (arguments/checks.py),
    then what this machine must have (the rasteriser, the prior's files, a writable output folder)."""
    check_config(cfg)
    speed_switches(cfg, device)
    if cfg.ModelParams.representation == "gaussians":  # a NeRF is volume-rendered on any device
        resolve_backend(cfg.PipelineParams.backend, device)
    resolve_model_key(cfg.GuidanceParams.model_key)
    check_writable(run_dir(cfg))


def check_writable(folder: Path) -> None:
    """The run folder exists writable or can be created (checked without creating anything)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise RunError(f"output folder '{folder}' cannot be written ('{existing}' is not a writable folder); set "
                       f"ModelParams.output_root to a writable folder")


def run_entry(fn, *args, **kwargs) -> int:
    """Run an entry point for the command line: bad input becomes one line on stderr and exit code 1, Ctrl-C 130."""
    try:
        fn(*args, **kwargs)
    except KeyboardInterrupt:
        return 130
    except (ValueError, BackendUnavailableError, WriteError) as err:  # RunError, ConfigError, a failed write
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def make_tracer(cfg: Config, guidance) -> PathTracer | None:
    """Load the path LoRA of stage 1 into the prior and return the PathTracer (None when PTD is off)."""
    p = cfg.PTDParams
    if p.mode == "off":
        return None
    load_path_lora(cfg, guidance)
    checkpoints = []
    if p.mode == "checkpoints":
        checkpoints = [read_lora_state_dict(s) for s in path_checkpoints(cfg)]
    fold = speed_switches(cfg, guidance.device)[1]  # PTDParams.fold_lora: auto = on for CUDA
    return lora_merge.make_tracer(p.mode, guidance.unet, fold=fold, total_steps=p.total_steps,
                                  power=p.power, adapter_name=PATH_ADAPTER, checkpoints=checkpoints,
                                  switch_interval=p.switch_interval)


def path_checkpoints(cfg: Config) -> list[Path]:
    """The stage-1 checkpoint folders Eq. 7 traces, in the order stage 1 saved them: s^(1) .. s^(n-1) (the paper's
    path starts at the penultimate s^(n-1); s^(n) is the final path LoRA) or, with checkpoints_from=last, .. s^(n).
    Warns when the path is longer than total_steps (its first checkpoints would never be used)."""
    p, folder = cfg.PTDParams, path_lora_dir(cfg)
    steps = sorted((folder / "checkpoints").glob("step_*"))
    if p.checkpoints_from == "penultimate":
        steps = steps[:-1]
    if not steps:
        raise RunError(f"PTDParams.mode=checkpoints needs at least {2 if p.checkpoints_from == 'penultimate' else 1} "
                       f"checkpoints in {folder}/checkpoints (checkpoints_from={p.checkpoints_from}); lower "
                       f"PTDParams.checkpoint_interval and rerun form_path.py")
    if len(steps) * p.switch_interval > p.total_steps:
        used = -(-p.total_steps // p.switch_interval)
        warnings.warn(f"PTDParams: {len(steps)} checkpoints x switch_interval {p.switch_interval} > total_steps "
                      f"{p.total_steps}: s^(1) .. s^({len(steps) - used}) of the path are never traced; raise "
                      f"total_steps or lower switch_interval", stacklevel=2)
    return steps
