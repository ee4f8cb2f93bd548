"""Stage 2 of Path-Tracing Distillation: trace the path (paper §4.3, Eq. 8, Alg. 2).

    python train.py --opt configs/x.yaml [Section.key=value ...] [--resume | --overwrite]

Stock LucidDreamer's loop (4 views per iteration, ISM, TV losses on image and disparity, scale loss on the noised
scales, densification, lr schedules, camera relaxation, SH degree-up). PTD touches one thing: before each iteration's
UNet calls, the path LoRA formed by form_path.py is set to weight w(iter) (`PTDParams.mode: weighted`, Eq. 8) or to
the next stage-1 checkpoint (`checkpoints`, Eq. 7). With `mode: off` no LoRA is loaded: stock LucidDreamer, same seed.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from arguments import Config, RunError, load_config, parse_cli, run_dir, save_config
from evaluation.monitor import TrainingMonitor
from gaussian_renderer import disparity, render
from guidance.ptd_utils import PathTracer
from guidance.sd_utils import StableDiffusionGuidance
from scene import GaussianModel, OrbitCameraSampler, circle_cameras
from scene.mesh_export import MESH_FILES
from scene.nerf_io import MODEL_FILES, save_model
from scene.nerf_model import NeRFModel
from stages.mesh import export_run_mesh
from stages.reference_view import ReferenceView, load_reference_view, reference_step
from stages.run import (DONE_MARKER, background, check_path_metadata, configure_torch, describe_run, final_ply_path,
                        initial_model, lock_workspace, make_guidance, make_sampler, make_tracer, mark_finished,
                        run_entry, scene_extent, speed_switches, validate)
from utils.device import resolve_device
from utils.files import WriteError, atomic_path, remove_temporaries
from utils.image_io import image_grid, save_png, to_uint8, write_video
from utils.loss_utils import scale_loss, tv_loss
from utils.rng import rng_state, seed_everything, set_rng_state

# prune Gaussians whose opacity falls below this (stock)
MIN_OPACITY = 0.005
# screen-size pruning threshold in pixels, active after the first opacity reset (stock)
MAX_SCREEN_SIZE = 20
# SH degree goes up every this many iterations (stock)
SH_UP_INTERVAL = 500
# test views per orbit (stock: 8 azimuths, at the default polar and, with render_45, at 2/3 of it)
TEST_AZIMUTHS = 8
CHECKPOINT_DIR = "checkpoints"
STAGE2_OUTPUTS = ("point_cloud", "videos", "test_six_views", CHECKPOINT_DIR, DONE_MARKER, *MESH_FILES)


@dataclass
class TrainState:
    """Everything stage 2 carries from one iteration to the next (what a checkpoint saves, by name, plus the parts
    built once: the guidance, the outputs' schedule, the monitor)."""
    gaussians: GaussianModel | NeRFModel  # the 3D model (ModelParams.representation); "gaussians" in checkpoints
    guidance: StableDiffusionGuidance
    tracer: PathTracer | None  # None: PTD off, stock LucidDreamer
    sampler: OrbitCameraSampler
    gen: torch.Generator  # the training augmentations' stream (background, SH drop, scale noise, splits)
    bg: torch.Tensor  # [3] the run's background colour
    tests: set[int] = field(default_factory=set)  # iterations that save test views
    nonfinite_streak: int = 0  # iterations in a row skipped by the NaN guard
    monitor: TrainingMonitor = field(default_factory=TrainingMonitor)
    reference: ReferenceView | None = None  # image-to-3D's fixed view and picture (GenerateCamParams.ref_image)


def render_batch(cfg: Config, views, gaussians, bg: torch.Tensor, gen: torch.Generator) -> dict:
    """Render the iteration's views with LucidDreamer's training augmentations (background swap, SH-degree drop,
    scale noise), all drawn from `gen`. Returns stacked images/disparities/scales and the per-view packages.
    A NeRF takes the background swap; the SH drop and scale noise do not apply to it (their draws are still made),
    and its ray samples are jittered from `gen` instead."""
    m = cfg.ModelParams
    images, disps, scales, pkgs = [], [], [], []
    for view in views:
        u = torch.rand(4, generator=gen)  # background swap, SH-degree drop, scale noise, colour or black
        view_bg = bg
        if u[0] < m.bg_aug_ratio:  # stock: a random colour or black, each with probability 1/2
            view_bg = torch.rand(3, generator=gen).to(bg) if u[3] < 0.5 else torch.zeros_like(bg)
        sh_degree = 0 if u[1] < m.sh_deg_aug_ratio else None
        pkg = render(view, gaussians, view_bg, backend=cfg.PipelineParams.backend, sh_degree=sh_degree,
                     scale_noise=bool(u[2] < m.scale_aug_ratio), generator=gen,
                     depth_grad=cfg.PipelineParams.depth_grad)
        images.append(pkg["render"])
        disps.append(disparity(pkg["depth"], pkg["alpha"], view.focal_normalized))
        scales.append(pkg["scales"])
        pkgs.append(pkg)
    return {"images": torch.stack(images), "disparity": torch.stack(disps), "scales": torch.stack(scales),
            "pkgs": pkgs}


def densify(cfg: Config, iteration: int, gaussians, pkgs, gen: torch.Generator) -> None:
    """Densification statistics and the densify/prune/opacity-reset schedule of stock LucidDreamer."""
    o = cfg.OptimizationParams
    if getattr(gaussians, "is_radiance_field", False):  # NeRF: nothing to densify, prune or reset; its occupancy
        gaussians.step_occupancy(iteration)  # grid (empty-space skipping) is refreshed every occupancy_interval
        return
    if iteration >= o.densify_until_iter:
        return
    with torch.no_grad():
        for pkg in (pkgs if o.densify_stats == "all" else pkgs[-1:]):  # stock: the last view of the batch only
            grad = pkg["viewspace_points"].grad
            if grad is not None:
                gaussians.add_densification_stats(grad, pkg["visibility_filter"], pkg["radii"])
        if iteration > o.densify_from_iter and iteration % o.densification_interval == 0:
            size = MAX_SCREEN_SIZE if iteration > o.opacity_reset_interval else None
            # stock zeroes the screen radii when it appends clones, so its >20 px prune never fires: keep that
            gaussians.densify_and_prune(o.densify_grad_threshold, MIN_OPACITY, scene_extent(cfg), size, gen,
                                        screen_prune=False)
        if iteration % o.opacity_reset_interval == 0:
            gaussians.reset_opacity()


def is_finite_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> bool:
    """True when the loss and every gradient the optimiser would apply are finite."""
    if not torch.isfinite(loss).all():
        return False
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    return all(bool(torch.isfinite(g).all()) for g in grads)


def train_step(cfg: Config, iteration: int, state: TrainState) -> dict:
    """One stock iteration (+ the PTD weight). Returns scalars to log."""
    o, g = cfg.OptimizationParams, cfg.GuidanceParams
    gaussians, guidance, gen = state.gaussians, state.guidance, state.gen
    gaussians.update_learning_rate(iteration)
    if iteration % SH_UP_INTERVAL == 0:
        gaussians.oneup_sh_degree()
    state.sampler.relax(iteration, o)
    views = state.sampler.next_views(g.C_batch_size)
    weight = state.tracer.apply(guidance.unet, iteration) if state.tracer is not None else None
    batch = render_batch(cfg, views, gaussians, state.bg, gen)
    as_latent = bool(torch.rand((), generator=gen) < o.as_latent_ratio)
    inputs = batch["disparity"].repeat(1, 3, 1, 1) if as_latent else batch["images"]
    out = guidance.train_step(inputs, [v.delta_azimuth for v in views], iteration)
    loss_tv = tv_loss(batch["images"]) + tv_loss(batch["disparity"])
    # NeRF: no scales, no scale loss (its density is regularised by the TV losses and the ISM gradient alone)
    is_field = getattr(gaussians, "is_radiance_field", False)
    loss_scale = batch["scales"].new_zeros(()) if is_field else scale_loss(batch["scales"])
    loss = out["loss"] + o.lambda_tv * loss_tv + o.lambda_scale * loss_scale
    ref_logs = {}
    if state.reference is not None:  # image-to-3D: RGB + mask loss at the fixed front view (stages/reference_view.py)
        ref_loss, ref_logs = reference_step(cfg, state.reference, gaussians, state.bg)
        loss = loss + ref_loss
    loss.backward()
    # NaN guard: a non-finite guidance gradient (before its cleaning), loss or parameter gradient skips the whole
    # update (densification included)
    finite = out["finite"] and is_finite_step(loss, gaussians.optimizer)
    if finite:
        densify(cfg, iteration, gaussians, batch["pkgs"], gen)
        if iteration < o.iterations:  # stock applies no optimiser step at the last iteration
            gaussians.optimizer.step()
    gaussians.optimizer.zero_grad(set_to_none=True)
    if not gaussians.all_finite():
        raise RunError(f"the Gaussians' parameters became non-finite at iteration {iteration} (a finite but huge "
                       f"update); the last good checkpoint is kept in {run_dir(cfg) / CHECKPOINT_DIR}: lower the "
                       f"learning rates or lambda_guidance, then --resume")
    logs = {"loss/ism_mse": out["mse"].item(), "loss/tv": loss_tv.item(), "loss/scale": loss_scale.item(),
            "guidance/t_index": out["t_index"], "guidance/s_index": out["s_index"],
            "guidance/as_latent": float(as_latent), "scene/total_points": gaussians.num_points,
            "nonfinite/skipped": float(not finite), **ref_logs}
    if weight is not None:
        logs["ptd/weight"] = weight
    return logs


def test_iterations(cfg: Config) -> set[int]:
    """Stock's test iterations: 1, k * iterations // test_ratio for k = 1 .. test_ratio - 1, and the last."""
    o = cfg.OptimizationParams
    return {1, o.iterations, *(k * o.iterations // o.test_ratio for k in range(1, o.test_ratio))}


@torch.no_grad()
def view_images(cfg: Config, cam, gaussians, bg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A test render [3, H, W] and stock's depth picture of it [1, H, W]: the normalised disparity (the "depth" of
    stock's render, `gaussian_renderer.disparity`) divided by its maximum."""
    pkg = render(cam, gaussians, bg, backend=cfg.PipelineParams.backend)
    disp = disparity(pkg["depth"], pkg["alpha"], cam.focal_normalized)
    return pkg["render"], disp / disp.max().clamp(min=1e-8)


@torch.no_grad()
def save_test_views(cfg: Config, gaussians, iteration: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Stock's test views (8 azimuths at the default polar and, with render_45, 8 at 2/3 of it: 16) and their depth
    pictures, as render_view_<uid>.png and render_depth_<uid>.png. Returns them stacked: [N, 3, H, W], [N, 1, H, W]."""
    folder = run_dir(cfg) / "test_six_views" / f"{iteration}_iteration"  # stock's folder name (it holds 16)
    bg = background(cfg, device)
    images, depths = [], []
    c = cfg.GenerateCamParams
    for cam in circle_cameras(c, TEST_AZIMUTHS, c.render_45, device=device):
        image, depth = view_images(cfg, cam, gaussians, bg)
        save_png(image, folder / f"render_view_{cam.uid}.png")
        save_png(depth, folder / f"render_depth_{cam.uid}.png")
        images.append(image)
        depths.append(depth)
    return torch.stack(images), torch.stack(depths)


def log_test_views(writer, images: torch.Tensor, depths: torch.Tensor, iteration: int) -> None:
    """The test views and their depth pictures in TensorBoard (tags test/rgb, test/depth): one grid each, a row per
    orbit of TEST_AZIMUTHS views (the default polar, then 2/3 of it with render_45).

    Args:
        images: [N, 3, H, W] in [0, 1].
        depths: [N, 1, H, W] in [0, 1] (shown grey).
    """
    for tag, pictures in (("test/rgb", images), ("test/depth", depths)):
        grid = image_grid(pictures.detach().float().clamp(0, 1).cpu(), TEST_AZIMUTHS)  # [3, rows H, 8 W]
        writer.add_image(tag, grid, iteration)


@torch.no_grad()
def save_video(cfg: Config, gaussians, iteration: int, device: torch.device) -> Path:
    """Stock's 360-degree RGB and depth videos: video_frames views around the default polar, then (render_45) as many
    around 2/3 of it, one after the other in each file."""
    folder = run_dir(cfg) / "videos" / f"{iteration}_iteration"
    bg = background(cfg, device)
    c = cfg.GenerateCamParams
    rgb, depth = [], []
    for cam in circle_cameras(c, cfg.OptimizationParams.video_frames, c.render_45, device=device):
        image, depth_picture = view_images(cfg, cam, gaussians, bg)
        rgb.append(to_uint8(image))
        depth.append(to_uint8(depth_picture))
    fps = cfg.OptimizationParams.video_fps
    write_video(rgb, folder / f"video_rgb_{iteration}.mp4", fps)
    write_video(depth, folder / f"video_depth_{iteration}.mp4", fps)
    return folder / f"video_rgb_{iteration}.mp4"


def save_point_cloud(cfg: Config, gaussians, iteration: int) -> Path:
    path = run_dir(cfg) / "point_cloud" / f"iteration_{iteration}" / MODEL_FILES[cfg.ModelParams.representation]
    save_model(gaussians, path)  # a PLY, or a NeRF's nerf.safetensors
    return path


# ---------------------------------------------------------------------------------------------- checkpoints
def capture(state: TrainState, iteration: int) -> dict:
    """Everything an exact resume needs, by name."""
    return {"format": "ptd-train-v1", "iteration": iteration, "gaussians": state.gaussians.capture(),
            "sampler": state.sampler.state_dict(), "guidance": state.guidance.state_dict(),
            "aug_generator": state.gen.get_state(), "rng": rng_state(), "nonfinite_streak": state.nonfinite_streak,
            "tracer": state.tracer.state_dict() if state.tracer is not None else None}


def save_checkpoint(cfg: Config, state: TrainState, iteration: int, keep: int = 2) -> Path:
    folder = run_dir(cfg) / CHECKPOINT_DIR
    path = folder / f"iteration_{iteration:06d}.pt"
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(capture(state, iteration), tmp)
    for old in sorted(folder.glob("iteration_*.pt"))[:-keep]:
        old.unlink()
    return path


def restore(cfg: Config, state: TrainState) -> int:
    """Load the newest checkpoint into `state`; returns the iteration it was taken after."""
    ckpts = sorted((run_dir(cfg) / CHECKPOINT_DIR).glob("iteration_*.pt"))  # check_run_folder made sure of one
    try:  # weights_only: tensors and plain containers only, so a crafted file cannot run code
        ckpt = torch.load(ckpts[-1], map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any unpickling failure means a damaged (or foreign) file
        raise RunError(f"checkpoint {ckpts[-1]} is unreadable (truncated, or not written by train.py); delete it to "
                       f"resume from the one before") from None
    try:
        state.gaussians.restore(ckpt["gaussians"], cfg.OptimizationParams)
        state.sampler.load_state_dict(ckpt["sampler"])
        state.guidance.load_state_dict(ckpt["guidance"])
        state.gen.set_state(ckpt["aug_generator"])
        if state.tracer is not None:
            state.tracer.load_state_dict(ckpt["tracer"])
        set_rng_state(ckpt["rng"])
        state.nonfinite_streak = int(ckpt["nonfinite_streak"])
        return int(ckpt["iteration"])
    except (KeyError, TypeError) as err:
        raise RunError(f"checkpoint {ckpts[-1]} lacks {err} (written by another version of train.py?); delete it "
                       f"to resume from the one before, or start again with --overwrite") from None


def check_run_folder(cfg: Config, resume: bool, overwrite: bool) -> None:
    """Never overwrite a finished or partial stage-2 run silently (run with the workspace locked). Temporary files a
    killed run left behind are removed; empty output folders are not a run."""
    folder = run_dir(cfg)
    remove_temporaries(folder)
    existing = [folder / name for name in STAGE2_OUTPUTS
                if (folder / name).is_file() or ((folder / name).is_dir() and any((folder / name).iterdir()))]
    events = sorted(folder.glob("events.out.tfevents.*"))  # TensorBoard's: an overwritten run starts a clean log
    checkpoints = sorted((folder / CHECKPOINT_DIR).glob("iteration_*.pt"))
    if resume and not checkpoints:
        what = "was stopped before its first checkpoint" if existing else "has no stage-2 run"
        raise RunError(f"--resume: {folder} {what}: nothing to resume from; start again with --overwrite")
    if existing and not (resume or overwrite):
        fix = "--resume to continue it or --overwrite to start again" if checkpoints else \
            "--overwrite to start again (it has no checkpoint to resume from)"
        raise RunError(f"run folder {folder} already holds a stage-2 run; pass {fix}")
    if overwrite and not resume:
        discard_outputs(existing + events)


def discard_outputs(paths: list[Path]) -> None:
    """Delete a previous run's outputs all or nothing: each is first renamed to a temporary name (atomic; on a failure
    the renamed ones are put back and nothing is lost), then deleted; what cannot be deleted stays under a .tmp_ name
    that the next start removes."""
    moved: list[tuple[Path, Path]] = []
    try:
        for path in paths:
            aside = path.parent / f".tmp_{path.name}.discarded"
            os.replace(path, aside)
            moved.append((path, aside))
    except OSError as err:
        for path, aside in reversed(moved):
            os.replace(aside, path)
        raise RunError(f"--overwrite: cannot remove {err.filename} ({err.strerror}); nothing was deleted: fix its "
                       f"permissions or choose another ModelParams.workspace") from None
    for _, aside in moved:
        shutil.rmtree(aside, ignore_errors=True) if aside.is_dir() else aside.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- main
def setup(cfg: Config, device: torch.device) -> TrainState:
    # PTD reads stage 1's initial Gaussians; a workspace that reuses another run's path LoRA (PTDParams.path_lora)
    # builds them again: the path's metadata matched this config's init key, and the build is seeded (Point-E's and
    # SF3D's are not reproducible: they need the PLY)
    create = cfg.PTDParams.mode == "off" or cfg.GenerateCamParams.init_shape not in ("pointe", "sf3d")
    gaussians = initial_model(cfg, device, create=create)  # Gaussians or a NeRF (ModelParams.representation)
    gaussians.training_setup(cfg.OptimizationParams)
    guidance = make_guidance(cfg, device, compiled=speed_switches(cfg, device)[0])
    tracer = make_tracer(cfg, guidance)  # folds the path LoRA before the UNet is compiled
    if guidance.compiled_unet is not None:  # PipelineParams.compile: the UNet's graphs, before iteration 1
        c = cfg.GenerateCamParams
        seconds = guidance.warm_up(cfg.GuidanceParams.C_batch_size, c.image_h, c.image_w)
        print(f"stage 2: compile warm-up (UNet graphs of an iteration's shapes): {seconds:.1f} s", file=sys.stderr)
    seed_everything(cfg.seed)  # the loop's global stream starts alike in both arms, whatever the setup drew
    return TrainState(gaussians=gaussians, guidance=guidance, tracer=tracer, sampler=make_sampler(cfg, device),
                      gen=torch.Generator().manual_seed(cfg.seed), bg=background(cfg, device),
                      tests=test_iterations(cfg), reference=load_reference_view(cfg, device))


def prepare_run(cfg: Config, device: torch.device, resume: bool, overwrite: bool) -> None:
    """Every check before anything of stage 2 is written."""
    validate(cfg, device)
    if cfg.PTDParams.mode != "off":
        check_path_metadata(cfg)
    saved = run_dir(cfg) / "config.yaml"
    if resume and not saved.is_file():
        raise RunError(f"--resume: {run_dir(cfg)} holds no config.yaml of a stage-2 run; start without --resume")
    if resume and load_config(saved) != cfg:
        raise RunError(f"--resume: this config differs from the run's {saved}; resume with --opt {saved} --resume")


def write_outputs(cfg: Config, state: TrainState, iteration: int, device: torch.device, writer=None) -> None:
    """Test views (also into TensorBoard's `writer` when given), PLY and videos due at this iteration (each file
    written atomically)."""
    o = cfg.OptimizationParams
    with torch.no_grad():
        if iteration in state.tests:  # stock: test views and videos at the test iterations
            images, depths = save_test_views(cfg, state.gaussians, iteration, device)
            if writer is not None:
                log_test_views(writer, images, depths, iteration)
            if cfg.save_video:
                save_video(cfg, state.gaussians, iteration, device)
        if iteration in set(o.save_iterations) | {o.iterations}:
            save_point_cloud(cfg, state.gaussians, iteration)


def run_loop(cfg: Config, state: TrainState, start: int, device: torch.device, writer) -> None:
    o = cfg.OptimizationParams
    interrupted: list[bool] = []
    # Ctrl-C, and SIGTERM (what SLURM, Kubernetes and `kill` send before a pre-emption's SIGKILL): finish the
    # iteration, write a checkpoint, exit 130
    stops = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda *_: interrupted.append(True)) for sig in stops}
    bar = tqdm(range(start, o.iterations + 1), desc=f"stage 2 (PTD {cfg.PTDParams.mode})", initial=start - 1,
               total=o.iterations)
    try:
        for iteration in bar:
            tic = time.perf_counter()
            logs = train_step(cfg, iteration, state)
            logs["iter_time"] = time.perf_counter() - tic
            state.nonfinite_streak = state.nonfinite_streak + 1 if logs["nonfinite/skipped"] else 0
            for key, value in logs.items():
                writer.add_scalar(key, value, iteration)
            bar.set_postfix(points=logs["scene/total_points"], t=logs["guidance/t_index"],
                            w=f"{logs.get('ptd/weight', 0.0):.3f}")
            # metrics.jsonl: matching loss + CLIP (EvalParams), under the network this iteration used
            state.monitor(iteration, state.gaussians, state.guidance, logs.get("ptd/weight"), writer)
            if state.nonfinite_streak >= o.max_nonfinite_steps:
                raise RunError(f"{state.nonfinite_streak} iterations in a row had a non-finite loss or gradient "
                               f"(last: {iteration}) and were skipped; stopping. The last good checkpoint is kept in "
                               f"{run_dir(cfg) / CHECKPOINT_DIR}: lower the learning rates or lambda_guidance, then "
                               f"--resume")
            write_outputs(cfg, state, iteration, device, writer)
            if (o.checkpoint_interval > 0 and iteration % o.checkpoint_interval == 0) or interrupted:
                save_checkpoint(cfg, state, iteration)
            if interrupted:
                print(f"\ninterrupted after iteration {iteration} (checkpoint saved); resume with: python train.py "
                      f"--opt {run_dir(cfg) / 'config.yaml'} --resume", file=sys.stderr)
                raise KeyboardInterrupt
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        bar.close()


def main(cfg: Config, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Run stage 2; returns the final PLY path."""
    from torch.utils.tensorboard import SummaryWriter  # tensorboard's import is slow: only when a run starts

    device = resolve_device(cfg.device)
    prepare_run(cfg, device, resume, overwrite)
    with lock_workspace(cfg):  # no other stage writes this workspace meanwhile
        check_run_folder(cfg, resume, overwrite)
        configure_torch(cfg)
        state = setup(cfg, device)
        start = restore(cfg, state) + 1 if resume else 1
        state.monitor = TrainingMonitor.create(cfg, state.guidance, device, start=start)  # off: metrics_interval 0
        (run_dir(cfg) / DONE_MARKER).unlink(missing_ok=True)  # a resumed run is unfinished until it ends again
        ran = describe_run(cfg, state.guidance, device)
        print(f"stage 2: {ran}", file=sys.stderr)
        save_config(cfg, run_dir(cfg) / "config.yaml", comment=ran)
        writer = SummaryWriter(str(run_dir(cfg)))
        try:
            run_loop(cfg, state, start, device, writer)
        except OSError as err:  # disk full, size limit, removed folder: the last checkpoint is intact (atomic)
            what = str(err) if isinstance(err, WriteError) else f"could not write into {run_dir(cfg)} ({err})"
            has_checkpoint = any((run_dir(cfg) / CHECKPOINT_DIR).glob("iteration_*.pt"))
            fix = "rerun with --resume" if has_checkpoint else "rerun with --overwrite (no checkpoint was written yet)"
            raise RunError(f"{what}; free space or lift the limit, then {fix}") from None
        finally:
            writer.close()
        mark_finished(cfg)
        if cfg.save_mesh:  # after the marker: a failed export leaves a finished run that export_mesh.py can mesh
            export_run_mesh(cfg, state.gaussians)
    return final_ply_path(cfg)


def cli(argv=None) -> int:
    parser = argparse.ArgumentParser(description="PTD stage 2: trace the path (LucidDreamer ISM + path LoRA)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of the run")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing stage-2 run in the folder")
    cfg, args = parse_cli(argv, parser)
    def run() -> None:
        print(f"done: {main(cfg, resume=args.resume, overwrite=args.overwrite)}")
    return run_entry(run)


if __name__ == "__main__":
    sys.exit(cli())
