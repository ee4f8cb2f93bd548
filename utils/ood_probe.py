"""The out-of-distribution probe's model-side pieces, shared by probe_ood.py and the training monitor.

- `sample_prior_latents`: x_0^ref (or a held-out "generated" set) sampled from the prior for the prompt: DDIM with
  classifier-free guidance through the diffusers pipeline (GuidanceParams.guidance_scale and .negative, the CFG pair the
  guidance itself uses), decoded to images and re-encoded like a render, so that every set reaches the latent space
  through the same encoder. Cached on disk (`cached_prior_latents`), keyed by model, prompt, n, seed, resolution, steps.
- `encode_mean`: images -> latents with the VAE posterior MEAN (deterministic: the measurement draws nothing from the
  guidance's generator, whose stream the training step owns).
- `matching_losses`: Eq. 5 on a timestep grid: x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps, eps_pred = the network's
  conditional noise prediction (plain prompt, no CFG), compared with the STF estimate of the reference set
  (`guidance.stf.matching_loss`, eps space, per-sample RMS).
All randomness comes from explicit seeded CPU generators (same numbers on any device).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Sequence

import torch

from guidance.stf import matching_loss
from utils.general import atomic_path, stable_hash

# camera stream of the probe's renders (stage 2 draws with seed offset 0, stage 1 with 1): held-out views
PROBE_CAMERA_OFFSET = 2


def check_timesteps(timesteps: Sequence[int], what: str) -> None:
    """One-line error unless the grid is non-empty indices in [0, 999) (tau = i + 1 must stay below 1000)."""
    if not timesteps or any(not 0 <= int(t) < 999 for t in timesteps):
        raise ValueError(f"{what} must be timestep indices in [0, 999), got {list(timesteps)}")


@contextlib.contextmanager
def prior_only(unet: torch.nn.Module) -> Iterator[None]:
    """Every LoRA adapter of `unet` at weight 0 inside (the pretrained prior), the previous scalings restored after."""
    if not getattr(unet, "peft_config", None):
        yield
        return
    from guidance.ptd_utils import lora_scale

    with lora_scale(unet, 0.0, None):
        yield


def _ddim_pipeline(guidance):
    """A pipeline over the guidance's modules with its own DDIM scheduler (the guidance's scheduler is untouched)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    components = dict(guidance.pipe.components)
    components["scheduler"] = DDIMScheduler.from_config(guidance.pipe.scheduler.config)
    pipe = StableDiffusionPipeline(**components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def encode_mean(guidance, images: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """images [B, 3, H, W] in [0, 1] -> latents [B, 4, H/f, W/f] (posterior mean x scaling factor, fp32)."""
    vae = guidance.vae
    out = []
    for i in range(0, images.shape[0], batch):
        x = (2 * images[i:i + batch] - 1).to(guidance.device, guidance.dtype)
        out.append(vae.encode(x).latent_dist.mean.float() * vae.config.scaling_factor)
    return torch.cat(out)


@torch.no_grad()
def sample_prior_latents(guidance, n: int, seed: int, height: int, width: int, steps: int,
                         batch: int = 8) -> torch.Tensor:
    """n samples of the prior (all LoRA adapters at weight 0) for GuidanceParams.text -> latents [n, 4, h, w]."""
    gp = guidance.gp
    pipe = _ddim_pipeline(guidance)
    gen = torch.Generator().manual_seed(int(seed))
    images = []
    with prior_only(guidance.unet), torch.random.fork_rng(devices=[]):
        for start in range(0, n, batch):
            k = min(batch, n - start)
            noise = torch.randn((k, guidance.unet.config.in_channels, height // guidance.vae_scale_factor,
                                 width // guidance.vae_scale_factor), generator=gen)
            latents = pipe(prompt=gp.text, negative_prompt=gp.negative or None, num_images_per_prompt=k,
                           num_inference_steps=steps, guidance_scale=gp.guidance_scale, height=height, width=width,
                           latents=noise.to(guidance.device, guidance.dtype), output_type="latent").images
            images.append(guidance.decode_latents(latents.float()))
    return encode_mean(guidance, torch.cat(images))


def prior_sample_key(guidance, n: int, seed: int, height: int, width: int, steps: int) -> dict:
    """Everything a cached sample set depends on."""
    gp = guidance.gp
    return {"model": str(guidance.model_path), "prior_lora": gp.prior_lora, "prompt": gp.text,
            "negative": gp.negative, "guidance_scale": gp.guidance_scale, "n": int(n), "seed": int(seed),
            "height": int(height), "width": int(width), "steps": int(steps), "dtype": str(guidance.dtype),
            "format": "ptd-prior-samples-v1"}


def cached_prior_latents(folder: Path, guidance, n: int, seed: int, height: int, width: int, steps: int,
                         prefix: str = "refs") -> torch.Tensor:
    """`sample_prior_latents`, cached as <folder>/<prefix>_<hash>.pt (the hash of `prior_sample_key`)."""
    key = prior_sample_key(guidance, n, seed, height, width, steps)
    path = Path(folder) / f"{prefix}_{stable_hash(key)}.pt"
    if path.is_file():
        data = torch.load(path, map_location="cpu", weights_only=True)
        if data.get("key") == key:
            return data["latents"].to(guidance.device)
    latents = sample_prior_latents(guidance, n, seed, height, width, steps)
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
