"""The out-of-distribution measurement (paper §3, Eq. 5, App. G/H), shared by probe_ood.py, the training monitor and
evaluate.py --matching-loss.

- `cached_prior_latents`: x_0^ref (or a held-out "generated" set) sampled for the prompt
  (`StableDiffusionGuidance.sample_prior_latents`: DDIM with CFG, re-encoded like a render) from the prior (every LoRA
  at weight 0) or from the guidance network as it is now (`network="current"`, App. H), cached on disk (and/or in a
  memo), keyed by model, prompt, n, seed, resolution, steps and, for a network other than the prior, its
  `network_fingerprint`.
- `matching_losses` / `matching_losses_by_reading`: Eq. 5 on a timestep grid: x_t = sqrt(abar) x_0 + sqrt(1 - abar)
  eps, eps_pred = the network's conditional noise prediction (plain prompt, no CFG) as the UNet is now (LoRA scale
  included), compared with the STF estimate of the reference set (`guidance.stf.matching_loss`; default eps space,
  per-sample RMS), with the scored x_0 left out of the set (Eq. 11 as written) and/or included (Xu et al.'s STF).
- `probe_inputs` / `reference_latents` / `matching_loss_summary`: the references and views of a run (per
  EvalParams.probe_refs) and Eq. 5 of a model's renders (per EvalParams.probe_include_self).
All randomness comes from explicit seeded CPU generators (same numbers on any device); latents of renders are VAE
posterior MEANS (the measurement draws nothing from the guidance's generator, whose stream the training step owns).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import torch

from arguments import Config, run_dir
from gaussian_renderer import render_views
from guidance.lora_merge import lora_scalings
from guidance.stf import aggregate_by_timestep, matching_loss
from stages.run import make_sampler
from utils.files import atomic_path, stable_hash

# camera stream of the probe's renders (stage 2 draws with seed offset 0, stage 1 with 1): held-out views
PROBE_CAMERA_OFFSET = 2
# the two readings of the STF reference set, by name -> whether the scored x_0 joins it (guidance/stf.py)
READINGS = {"refs_only": False, "self_included": True}
# samples of networks other than the prior kept in a memo (the monitor's "current" references: one per LoRA weight)
MEMO_SIZE = 4


def noise_seed(seed: int) -> int:
    """The seed of the matching loss's noise draws for a run seeded `seed`: a stream of its own. The reference (and
    generated) samples start DDIM from torch.randn with `seed` (or seed + 1) itself; drawing eps from that same stream
    made the first images' eps equal some reference's x_T, which a DDIM sample stays correlated with, so the STF
    weights leaned toward that "twin" reference (measured on the toy prior: its weight 0.74 instead of ~0.03 at
    t = 950) and the loss came out biased upward."""
    return int(stable_hash({"stream": "matching-loss-noise", "seed": int(seed)}), 16) % (2 ** 63)


def reading_name(include_self: bool) -> str:
    """"self_included" (the scored x_0 in its own reference set) or "refs_only" (Eq. 11 as written)."""
    return "self_included" if include_self else "refs_only"


def network_fingerprint(unet) -> str | None:
    """What makes `unet` differ from the prior now: a hash of every LoRA (layer, adapter) with a non-zero scaling, that
    scaling and its factors' bytes; None when none contributes (the prior: weight 0 parks an adapter and merged
    weights are W0 again). A folded adapter (lora_merge.fold_lora) counts at its folded weight, so the same network
    has the same fingerprint folded or not. The prior LoRA of GuidanceParams.prior_lora is fused at load: part of
    the model key."""
    if not getattr(unet, "peft_config", None):
        return None
    digest, active, index, last = hashlib.sha256(), False, -1, None
    for layer, adapter, scaling in lora_scalings(unet):
        if layer is not last:
            index, last = index + 1, layer
        if scaling == 0.0:
            continue
        active = True
        digest.update(f"{index}:{adapter}:{float(scaling)!r}".encode())
        for factor in (layer.lora_A[adapter].weight, layer.lora_B[adapter].weight):
            digest.update(factor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16] if active else None


def prior_sample_key(guidance, n: int, seed: int, height: int, width: int, steps: int,
                     network: str | None = None) -> dict:
    """Everything a cached sample set depends on: the model, the LoRAs fused into it at load (path and file bytes,
    so a LoRA retrained in place is not mistaken for the old one), prompt, CFG, n, seed, size, steps and dtype;
    `network` (a `network_fingerprint`) only for a network other than the prior, so that the prior's key, and its
    cache file, stay what they were."""
    gp = guidance.gp
    key = {"model": str(guidance.model_path), "prior_lora": gp.prior_lora, "prompt": gp.text,
           "negative": gp.negative, "guidance_scale": gp.guidance_scale, "n": int(n), "seed": int(seed),
           "height": int(height), "width": int(width), "steps": int(steps), "dtype": str(guidance.dtype),
           "format": "ptd-prior-samples-v1"}
    if gp.LoRA_path:  # (added only when set: the key, and the cache file, of a plain prior stay what they were)
        key["LoRA_path"] = gp.LoRA_path
    for name, files in (getattr(guidance, "fused_lora_files", None) or {}).items():  # hashed when fused at load
        key[f"{name}_files"] = files
    if network is not None:
        key["network"] = network
    return key


def cached_prior_latents(folder: Path | None, guidance, n: int, seed: int, height: int, width: int, steps: int,
                         prefix: str = "refs", network: str = "prior", memo: dict | None = None,
                         persist_current: bool = True) -> torch.Tensor:
    """`guidance.sample_prior_latents`, cached as <folder>/<prefix>_<hash>.pt (the hash of `prior_sample_key`).

    network: "prior" (every LoRA at weight 0) or "current" (the UNet as it is now: the prior's key and file when no
        LoRA contributes, else a key with its `network_fingerprint`).
    memo: a dict kept by the caller, checked first and filled (the last MEMO_SIZE sets of non-prior networks).
    persist_current: also write a non-prior network's samples to `folder` (the monitor, whose weight changes at every
        record, keeps them in the memo only). folder None: no file at all.
    """
    if network not in ("prior", "current"):
        raise ValueError(f"network '{network}' is not 'prior' or 'current'")
    fingerprint = network_fingerprint(guidance.unet) if network == "current" else None
    key = prior_sample_key(guidance, n, seed, height, width, steps, fingerprint)
    name = f"{prefix}_{stable_hash(key)}"
    if memo is not None and name in memo:
        return memo[name]
    path = Path(folder) / f"{name}.pt" if folder is not None and (fingerprint is None or persist_current) else None
    latents = None
    if path is not None and path.is_file():
        data = torch.load(path, map_location="cpu", weights_only=True)
        if data.get("key") == key:
            latents = data["latents"].to(guidance.device)
    if latents is None:
        latents = guidance.sample_prior_latents(n, seed, height, width, steps,
                                                network="prior" if fingerprint is None else "current")
        if path is not None:
            with atomic_path(path, suffix=".pt") as tmp:
                torch.save({"key": key, "latents": latents.cpu()}, tmp)
    if memo is not None and fingerprint is not None:
        memo[name] = latents
        while len(memo) > MEMO_SIZE:
            memo.pop(next(iter(memo)))
    return latents


@torch.no_grad()
def matching_losses_by_reading(guidance, x0: torch.Tensor, ref_x0: torch.Tensor, timesteps: Sequence[int],
                               text_emb: torch.Tensor, seed: int, draws: int = 1, batch: int = 16,
                               readings: Sequence[bool] = (False, True), space: str = "eps",
                               normalize: bool = True) -> dict[bool, torch.Tensor]:
    """Eq. 5 per sample on a timestep grid, under the guidance's UNet as it is now (LoRA scale included), for each
    reading of the reference set from ONE set of noise draws and UNet calls.

    Args:
        x0: [N, 4, h, w] clean latents (renders or generated images); ref_x0: [n, 4, h, w] the STF reference set.
        timesteps: sampled indices (the guidance's convention: abar = guidance.abar(i), UNet timestep tau(i)).
        text_emb: [1, 77, D] the prompt embedding of eps_pred (no CFG).
        seed: the run's seed; the noise eps comes from a CPU generator seeded `noise_seed(seed)` (the same eps for
            every call with the same seed and shapes, and never a stream a reference sample started from).
        draws: K noise draws per image and timestep.
        readings: include_self values: False = references only (Eq. 11 as written), True = each x_0 also in its
            own reference set (Xu et al.'s STF).
        space, normalize: of `guidance.stf.matching_loss` ("eps", True: RMS in noise units; "score", False: the raw
            score-space L2 of Eq. 5).
    Returns:
        {include_self: [T, N, K] per-sample losses}.
    """
    gen = torch.Generator().manual_seed(noise_seed(seed))
    n, out = x0.shape[0], {r: [] for r in readings}
    for t in timesteps:
        abar = guidance.abar(int(t)).float()
        alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        eps = torch.randn((draws, *x0.shape), generator=gen).to(x0)  # [K, N, 4, h, w]
        x_t = (alpha * x0.unsqueeze(0) + sigma * eps).reshape(draws * n, *x0.shape[1:])
        own = x0.unsqueeze(0).expand(draws, *x0.shape).reshape(x_t.shape)  # row i of x_t was made from own[i]
        losses = {r: [] for r in readings}
        for i in range(0, x_t.shape[0], batch):
            xb = x_t[i:i + batch]
            pred = guidance.unet_eps(xb, int(t), text_emb.expand(xb.shape[0], -1, -1))
            for r in readings:
                losses[r].append(matching_loss(pred.float(), xb.float(), ref_x0.float(), alpha, sigma, space,
                                               normalize, own[i:i + batch].float() if r else None))
        for r in readings:
            out[r].append(torch.cat(losses[r]).reshape(draws, n).T.cpu())  # [N, K]
    return {r: torch.stack(v) for r, v in out.items()}


def matching_losses(guidance, x0: torch.Tensor, ref_x0: torch.Tensor, timesteps: Sequence[int],
                    text_emb: torch.Tensor, seed: int, draws: int = 1, batch: int = 16, include_self: bool = False,
                    space: str = "eps", normalize: bool = True) -> torch.Tensor:
    """Eq. 5 per sample on a timestep grid under one reading (`matching_losses_by_reading`): [T, N, K]."""
    include_self = bool(include_self)
    return matching_losses_by_reading(guidance, x0, ref_x0, timesteps, text_emb, seed, draws, batch, (include_self,),
                                      space, normalize)[include_self]


def reference_latents(cfg: Config, guidance, cache: Path | None = None, memo: dict | None = None,
                      persist_current: bool = True) -> torch.Tensor:
    """The STF reference latents x_0^ref: `probe_num_refs` samples (seed cfg.seed) of EvalParams.probe_refs, i.e. of
    the prior or of the guidance network as it is now (cached in `cache`, default <run>/probe, as refs_<hash>.pt;
    see `cached_prior_latents` for `memo` and `persist_current`)."""
    c, e = cfg.GenerateCamParams, cfg.EvalParams
    return cached_prior_latents(cache or run_dir(cfg) / "probe", guidance, e.probe_num_refs, cfg.seed, c.image_h,
                                c.image_w, e.probe_ddim_steps, "refs", e.probe_refs, memo, persist_current)


def probe_views(cfg: Config, device: torch.device) -> list:
    """`probe_num_views` views from the probe's camera stream (the same for every call with the same config)."""
    return make_sampler(cfg, device, seed_offset=PROBE_CAMERA_OFFSET).next_views(cfg.EvalParams.probe_num_views)


def probe_inputs(cfg: Config, guidance, device: torch.device, cache: Path | None = None) -> tuple[torch.Tensor, list]:
    """The matching loss's inputs: the STF reference latents of `reference_latents` (EvalParams.probe_refs, sampled
    from the network as it is at this call) and `probe_num_views` views from the probe's camera stream."""
    return reference_latents(cfg, guidance, cache), probe_views(cfg, device)


@torch.no_grad()
def matching_loss_summary(cfg: Config, guidance, gaussians, refs: torch.Tensor, views: list,
                          bg: torch.Tensor) -> dict:
    """Eq. 5 of the renders of `gaussians` at `views` under the guidance's current network against the STF of
    `refs` (with each render's own x_0 in its reference set when EvalParams.probe_include_self):
    {"overall": {"mean", "std"}, "by_t": [...]} (`guidance.stf.aggregate_by_timestep`)."""
    e = cfg.EvalParams
    x0 = guidance.encode(render_views(views, gaussians, bg, cfg.PipelineParams.backend), mean=True)
    losses = matching_losses(guidance, x0, refs, e.probe_timesteps, guidance.embeddings["text"], cfg.seed,
                             include_self=e.probe_include_self)
    return aggregate_by_timestep(losses, list(e.probe_timesteps))
