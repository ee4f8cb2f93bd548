"""Stage 1 of Path-Tracing Distillation: form the path (paper §4.2, Eq. 6, Alg. 1).

    python form_path.py --opt configs/x.yaml [Section.key=value ...]
        initial Gaussians -> <run>/init_points3d.ply; N renders from the training camera distribution, encoded once;
        a LoRA on the prior fitted to them -> <run>/path_lora/ (+ path_lora/checkpoints/step_K: s^(1..n) of Eq. 7),
        each in diffusers' LoRA format and in lora_diffusion's (lora_diffusion.safetensors, for stock LucidDreamer's
        LoRA_path), and a report of the denoising loss of the prior vs the LoRA on those renders
        (path_lora/denoising_loss.png).
    python form_path.py --opt configs/x.yaml --images DIR --prompt TEXT [--out FOLDER]
        the prior-finetune LoRA of paper Fig. 7 on a folder of images (PTDParams.prior_epochs), loadable as
        GuidanceParams.prior_lora in both stages.
"""
from __future__ import annotations

import argparse
import math
import shutil
import sys
from pathlib import Path

import torch

from arguments import Config, RunError, parse_cli, run_dir, save_config
from evaluation.plots import plot_denoising_report
from gaussian_renderer import render_views
from guidance.lora_merge import load_adapter_weights, scale
from guidance.lora_training import METADATA_NAME, add_path_lora, denoising_loss, fit_lora, lora_state_dict, save_lora
from stages.run import (PATH_ADAPTER, background, configure_torch, describe_run, init_key, initial_model,
                        lock_workspace, make_guidance, make_sampler, path_lora_dir, path_metadata, run_entry, validate)
from utils.device import resolve_device
from utils.files import atomic_path, remove_temporaries, stable_hash, write_json_atomic
from utils.rng import seed_everything

# timesteps at which the prior and the path LoRA are compared on the renders
REPORT_TIMESTEPS = (50, 100, 200, 300, 400, 500, 600, 700, 800, 900)


def stage1_views(cfg: Config, gaussians, device: torch.device) -> tuple[torch.Tensor, list[float]]:
    """N views of the initial model from the training camera distribution -> (images [N,3,H,W], azimuths)."""
    sampler = make_sampler(cfg, device, seed_offset=1)  # its own stream: stage 2's cameras stay as in vanilla
    views = sampler.next_views(cfg.PTDParams.num_views)
    images = render_views(views, gaussians, background(cfg, device), cfg.PipelineParams.backend)
    return images, [v.delta_azimuth for v in views]


def fit_and_save(cfg: Config, guidance, latents, embeddings, out_dir: Path, epochs: int, metadata: dict,
                 resume: bool = False) -> dict:
    """Fit the path LoRA (Eq. 6) with checkpoints every K steps, then save it with its metadata.

    The fit runs in chunks of K steps; after each chunk its full state (LoRA weights, AdamW, generator, batch order)
    is written atomically beside the output, so `--resume` continues exactly where a killed run stopped."""
    p = cfg.PTDParams
    unet = guidance.unet
    add_path_lora(unet, rank=p.lora_rank, alpha=p.lora_alpha, adapter_name=PATH_ADAPTER)
    ckpt_dir = out_dir.parent / f".{out_dir.name}.checkpoints_tmp"
    state_path = out_dir.parent / f".{out_dir.name}.resume.pt"
    key = stable_hash({"metadata": metadata, "epochs": epochs, "ptd": vars(p), "latents": list(latents.shape)})
    fit_state, losses = None, []
    if resume and state_path.is_file():
        try:  # weights_only: tensors and plain containers only, so a crafted file cannot run code
            saved = torch.load(state_path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - any unpickling failure means a damaged (or foreign) file
            raise RunError(f"--resume: {state_path} is unreadable (truncated, or not written by form_path.py); "
                           f"delete it and rerun without --resume") from None
        if not isinstance(saved, dict) or saved.get("key") != key:
            raise RunError(f"--resume: {state_path} belongs to another stage-1 config; rerun without --resume")
        load_adapter_weights(unet, saved["lora"], PATH_ADAPTER)
        fit_state, losses = saved["fit"], saved["losses"]
        print(f"stage 1: resuming the LoRA fit at step {fit_state['step']}")
    else:
        shutil.rmtree(ckpt_dir, ignore_errors=True)

    def on_checkpoint(step: int, state: dict) -> None:
        save_lora(ckpt_dir / f"step_{step:06d}", unet, PATH_ADAPTER, {**metadata, "step": step}, state_dict=state,
                  lora_diffusion=True)  # also stock LucidDreamer's layout

    total = epochs * math.ceil(latents.shape[0] / p.lora_batch_size)
    chunk = p.checkpoint_interval if p.checkpoint_interval > 0 else total
    generator = torch.Generator(device=latents.device).manual_seed(cfg.seed)
    step = fit_state["step"] if fit_state else 0
    while step < total:
        result = fit_lora(unet, guidance.pipe.scheduler, latents, embeddings, epochs=epochs,
                          batch_size=p.lora_batch_size, lr=p.lora_lr, checkpoint_interval=p.checkpoint_interval,
                          generator=generator, on_checkpoint=on_checkpoint, adapter_name=PATH_ADAPTER,
                          max_steps=min(total, (step // chunk + 1) * chunk), resume=fit_state)
        fit_state, step = result["state"], result["step"]
        losses += result["losses"]
        with atomic_path(state_path, suffix=".pt") as tmp:
            torch.save({"key": key, "lora": lora_state_dict(unet, PATH_ADAPTER), "fit": fit_state,
                        "losses": losses}, tmp)
    meta = {**metadata, "steps": step, "epochs": epochs, "losses": losses}
    save_lora(out_dir, unet, PATH_ADAPTER, meta, lora_diffusion=True)  # + lora_diffusion.safetensors for stock
    if ckpt_dir.is_dir():
        shutil.move(str(ckpt_dir), str(out_dir / "checkpoints"))
    state_path.unlink(missing_ok=True)
    return meta


def loss_report(guidance, latents, embeddings, seed: int) -> dict:
    """Denoising loss (Eq. 6) of the prior (LoRA weight 0) and of the path LoRA (weight 1) on the same x_t."""
    report = {"timesteps": list(REPORT_TIMESTEPS)}
    for name, weight in (("prior", 0.0), ("path_lora", 1.0)):
        with scale(guidance.unet, weight, PATH_ADAPTER):
            gen = torch.Generator(device=latents.device).manual_seed(seed)
            report[name] = denoising_loss(guidance.unet, guidance.pipe.scheduler, latents, embeddings,
                                          timesteps=list(REPORT_TIMESTEPS), generator=gen).tolist()
    report["prior_mean"] = sum(report["prior"]) / len(REPORT_TIMESTEPS)
    report["path_lora_mean"] = sum(report["path_lora"]) / len(REPORT_TIMESTEPS)
    return report


def print_report(report: dict) -> None:
    print("denoising loss on the renders (Eq. 6), prior vs path LoRA:")
    print(f"{'t':>5} {'prior':>10} {'path LoRA':>10}")
    for t, a, b in zip(report["timesteps"], report["prior"], report["path_lora"]):
        print(f"{t:>5} {a:>10.5f} {b:>10.5f}")
    print(f"{'mean':>5} {report['prior_mean']:>10.5f} {report['path_lora_mean']:>10.5f}")


def start_run(cfg: Config) -> torch.device:
    """Device, every check before anything is written, torch settings and the seed: the start of both modes."""
    device = resolve_device(cfg.device)
    validate(cfg, device)
    configure_torch(cfg)
    seed_everything(cfg.seed)
    return device


def check_output_folder(out_dir: Path, overwrite: bool, what: str, fix: str) -> None:
    """An existing LoRA folder is replaced only with --overwrite, and only when form_path.py wrote it (its
    ptd_path.json): a user's own folder is never deleted."""
    if out_dir.exists() and not overwrite:
        raise RunError(f"{what} {out_dir} exists; pass --overwrite to fit it again")
    if out_dir.exists() and not (out_dir / METADATA_NAME).is_file():
        raise RunError(f"{out_dir} exists and is not a LoRA folder written by form_path.py (no {METADATA_NAME}); "
                       f"{fix}")


def form_path(cfg: Config, overwrite: bool = False, resume: bool = False) -> Path:
    """Stage 1 on the renders of the initial 3D model; returns the path LoRA folder."""
    out_dir = path_lora_dir(cfg)
    check_output_folder(out_dir, overwrite, "path LoRA", "point PTDParams.path_lora at a new folder")
    device = start_run(cfg)
    with lock_workspace(cfg):  # no other stage writes this workspace meanwhile
        remove_temporaries(run_dir(cfg))  # what a killed stage left half-written
        gaussians = initial_model(cfg, device)  # Gaussians or a NeRF (ModelParams.representation)
        guidance = make_guidance(cfg, device)
        ran = describe_run(cfg, guidance, device)
        print(f"stage 1: {ran}")
        images, azimuths = stage1_views(cfg, gaussians, device)
        latents = guidance.encode(images)  # once: the latents are cached for all epochs
        embeddings = guidance.view_embeddings(azimuths)
        print(f"stage 1: {len(azimuths)} renders -> latents {list(latents.shape)}; fitting the path LoRA "
              f"({cfg.PTDParams.path_epochs} epochs)")
        metadata = {**path_metadata(cfg), "init_key": init_key(cfg), "num_views": len(azimuths), "kind": "path"}
        meta = fit_and_save(cfg, guidance, latents, embeddings, out_dir, cfg.PTDParams.path_epochs, metadata,
                            resume)
        report = loss_report(guidance, latents, embeddings, cfg.seed)
        write_json_atomic(out_dir / "denoising_loss.json", report)
        plot_denoising_report(report, out_dir / "denoising_loss.png",
                              f"{cfg.GuidanceParams.text[:60]} ({meta['steps']} steps)")
        print_report(report)
        save_config(cfg, run_dir(cfg) / "config_form_path.yaml", comment=ran)
    return out_dir


def load_image_folder(folder: Path, size: tuple[int, int], device: torch.device) -> torch.Tensor:
    """All images of a folder, resized to (H, W) -> [N, 3, H, W] in [0, 1]."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if not folder.is_dir():
        raise RunError(f"image folder '{folder}' does not exist; pass --images DIR with .png/.jpg files")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if not files:
        raise RunError(f"image folder '{folder}' holds no .png/.jpg/.webp images")
    images = []
    for path in files:
        try:
            img = Image.open(path).convert("RGB").resize((size[1], size[0]), Image.BICUBIC)
        except (UnidentifiedImageError, OSError):
            raise RunError(f"image '{path}' is not a readable image; remove or replace it") from None
        images.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255.0)
    return torch.stack(images).to(device)


def prior_finetune(cfg: Config, images_dir: Path, prompt: str, out_dir: Path, overwrite: bool = False) -> Path:
    """The prior-finetune LoRA (paper Fig. 7): Eq. 6 on a folder of images with one prompt."""
    if not prompt.strip():
        raise RunError("--prompt is empty; give the text that describes the images")
    check_output_folder(out_dir, overwrite, "prior LoRA", "pass --out with a new folder")
    device = start_run(cfg)
    c = cfg.GenerateCamParams
    images = load_image_folder(images_dir, (c.image_h, c.image_w), device)
    guidance = make_guidance(cfg, device)
    latents = guidance.encode(images)
    embeddings = guidance.text_embeddings(prompt).expand(latents.shape[0], -1, -1).contiguous()
    metadata = {"prompt": prompt, "base_model": cfg.GuidanceParams.model_key, "kind": "prior",
                "images": str(images_dir), "num_images": int(latents.shape[0]),
                "images_hash": stable_hash(sorted(p.name for p in images_dir.iterdir()))}
    fit_and_save(cfg, guidance, latents, embeddings, out_dir, cfg.PTDParams.prior_epochs, metadata)
    print(f"prior-finetune LoRA saved to {out_dir}; use it with GuidanceParams.prior_lora={out_dir}")
    return out_dir


def main(cfg: Config, *, overwrite: bool = False, images: str | None = None, prompt: str | None = None,
         out: str | None = None, resume: bool = False) -> Path:
    if images is not None:
        out_dir = Path(out) if out else run_dir(cfg) / "prior_lora"
        return prior_finetune(cfg, Path(images), prompt or cfg.GuidanceParams.text, out_dir, overwrite)
    return form_path(cfg, overwrite, resume)


def cli(argv=None) -> int:
    parser = argparse.ArgumentParser(description="PTD stage 1: form the path (fit the path LoRA on renders)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing path LoRA")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted LoRA fit")
    parser.add_argument("--images", default=None, help="fit the prior-finetune LoRA on this image folder instead")
    parser.add_argument("--prompt", default=None, help="prompt of the --images folder (default GuidanceParams.text)")
    parser.add_argument("--out", default=None, help="output folder of the --images LoRA (default <run>/prior_lora)")
    cfg, args = parse_cli(argv, parser)
    return run_entry(main, cfg, overwrite=args.overwrite, images=args.images, prompt=args.prompt, out=args.out,
                     resume=args.resume)


if __name__ == "__main__":
    sys.exit(cli())
