"""The out-of-distribution measurement (paper §3, Eq. 5, App. G/H), shared by probe_ood.py, the training monitor and
evaluate.py --matching-loss.

- `cached_prior_latents`: x_0^ref (or a held-out "generated" set) sampled from the prior for the prompt
  (`StableDiffusionGuidance.sample_prior_latents`: DDIM with CFG, every LoRA at weight 0, re-encoded like a render),
  cached on disk, keyed by model, prompt, n, seed, resolution and steps.
- `matching_losses`: Eq. 5 on a timestep grid: x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps, eps_pred = the network's
  conditional noise prediction (plain prompt, no CFG) as the UNet is now (LoRA scale included), compared with the STF
  estimate of the reference set (`guidance.stf.matching_loss`, eps space, per-sample RMS).
- `probe_inputs` / `matching_loss_summary`: the fixed references and views of a run, and Eq. 5 of a model's renders.
All randomness comes from explicit seeded CPU generators (same numbers on any device); latents of renders are VAE
posterior MEANS (the measurement draws nothing from the guidance's generator, whose stream the training step owns).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from arguments import Config, run_dir
from gaussian_renderer import render_views
from guidance.stf import aggregate_by_timestep, matching_loss
from stages.run import make_sampler
from utils.files import atomic_path, stable_hash

# camera stream of the probe's renders (stage 2 draws with seed offset 0, stage 1 with 1): held-out views
PROBE_CAMERA_OFFSET = 2


def prior_sample_key(guidance, n: int, seed: int, height: int, width: int, steps: int) -> dict:
    """Everything a cached sample set depends on."""
    gp = guidance.gp
    return {"model": str(guidance.model_path), "prior_lora": gp.prior_lora, "prompt": gp.text,
            "negative": gp.negative, "guidance_scale": gp.guidance_scale, "n": int(n), "seed": int(seed),
            "height": int(height), "width": int(width), "steps": int(steps), "dtype": str(guidance.dtype),
            "format": "ptd-prior-samples-v1"}


def cached_prior_latents(folder: Path, guidance, n: int, seed: int, height: int, width: int, steps: int,
                         prefix: str = "refs") -> torch.Tensor:
    """`guidance.sample_prior_latents`, cached as <folder>/<prefix>_<hash>.pt (the hash of `prior_sample_key`)."""
    key = prior_sample_key(guidance, n, seed, height, width, steps)
    path = Path(folder) / f"{prefix}_{stable_hash(key)}.pt"
    if path.is_file():
        data = torch.load(path, map_location="cpu", weights_only=True)
        if data.get("key") == key:
            return data["latents"].to(guidance.device)
    latents = guidance.sample_prior_latents(n, seed, height, width, steps)
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save({"key": key, "latents": latents.cpu()}, tmp)
    return latents


@torch.no_grad()
def matching_losses(guidance, x0: torch.Tensor, ref_x0: torch.Tensor, timesteps: Sequence[int],
                    text_emb: torch.Tensor, seed: int, draws: int = 1, batch: int = 16) -> torch.Tensor:
    """Eq. 5 per sample on a timestep grid, under the guidance's UNet as it is now (LoRA scale included).

    Args:
        x0: [N, 4, h, w] clean latents (renders or generated images); ref_x0: [n, 4, h, w] the STF reference set.
        timesteps: sampled indices (the guidance's convention: abar = guidance.abar(i), UNet timestep tau(i)).
        text_emb: [1, 77, D] the prompt embedding of eps_pred (no CFG).
        seed: seeds the noise eps (a CPU generator: the same eps for every call with the same seed and shapes).
        draws: K noise draws per image and timestep.
    Returns:
        [T, N, K] per-sample losses (eps space, RMS over the latent's elements).
    """
    gen = torch.Generator().manual_seed(int(seed))
    n, out = x0.shape[0], []
    for t in timesteps:
        abar = guidance.abar(int(t)).float()
        alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        eps = torch.randn((draws, *x0.shape), generator=gen).to(x0)  # [K, N, 4, h, w]
        x_t = (alpha * x0.unsqueeze(0) + sigma * eps).reshape(draws * n, *x0.shape[1:])
        losses = []
        for i in range(0, x_t.shape[0], batch):
            xb = x_t[i:i + batch]
            pred = guidance.unet_eps(xb, int(t), text_emb.expand(xb.shape[0], -1, -1))
            losses.append(matching_loss(pred.float(), xb.float(), ref_x0.float(), alpha, sigma))
        out.append(torch.cat(losses).reshape(draws, n).T.cpu())  # [N, K]
    return torch.stack(out)


def probe_inputs(cfg: Config, guidance, device: torch.device, cache: Path | None = None) -> tuple[torch.Tensor, list]:
    """The matching loss's fixed inputs: the STF reference latents of the guidance's prior (cached in `cache`,
    default <run>/probe, as refs_<hash>.pt) and `probe_num_views` views from the probe's camera stream."""
    c, e = cfg.GenerateCamParams, cfg.EvalParams
    refs = cached_prior_latents(cache or run_dir(cfg) / "probe", guidance, e.probe_num_refs, cfg.seed, c.image_h,
                                c.image_w, e.probe_ddim_steps, "refs")
    views = make_sampler(cfg, device, seed_offset=PROBE_CAMERA_OFFSET).next_views(e.probe_num_views)
    return refs, views


@torch.no_grad()
def matching_loss_summary(cfg: Config, guidance, gaussians, refs: torch.Tensor, views: list,
                          bg: torch.Tensor) -> dict:
    """Eq. 5 of the renders of `gaussians` at `views` under the guidance's current network against the STF of
    `refs`: {"overall": {"mean", "std"}, "by_t": [...]} (`guidance.stf.aggregate_by_timestep`)."""
    e = cfg.EvalParams
    x0 = guidance.encode(render_views(views, gaussians, bg, cfg.PipelineParams.backend), mean=True)
    losses = matching_losses(guidance, x0, refs, e.probe_timesteps, guidance.embeddings["text"], cfg.seed)
    return aggregate_by_timestep(losses, list(e.probe_timesteps))
