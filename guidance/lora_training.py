"""Stage 1 of PTD ("forming the path"): fit a LoRA of the prior to cached latents by noise prediction (paper Eq. 6).

Shared by `form_path.py` (renders of the initial 3D model, Alg. 1) and the prior finetune on an image folder (paper
Fig. 7). Notation of Eq. 6: x_0 the cached latents of the views, y their view-dependent prompts, x_t = alpha_t x_0 +
sigma_t eps (`scheduler.add_noise`), eps_psi the prior with LoRA psi; psi minimises E_{t,eps,c} ||eps_psi(x_t, t, y) -
eps||^2 with t uniform over the training timesteps. For a v-prediction prior the target is the velocity
(`scheduler.get_velocity`) so that the LoRA learns in the prior's own parameterisation.

Files: a LoRA folder holds diffusers' `pytorch_lora_weights.safetensors` (with the peft adapter config in its header,
so `pipe.load_lora_weights(folder, adapter_name=...)` restores lora_alpha) and `ptd_path.json` (our metadata).
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from utils.files import atomic_folder, canonical_safetensors

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default LoRA file name
METADATA_NAME = "ptd_path.json"
TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")  # UNet attention projections (paper App. E)


# ----------------------------------------------------------------------------------------------------------------------
# adapter
# ----------------------------------------------------------------------------------------------------------------------
def lora_parameters(unet: torch.nn.Module, adapter_name: str) -> list[torch.nn.Parameter]:
    """The parameters of LoRA adapter `adapter_name` (peft names them '<module>.lora_A.<adapter>.weight')."""
    return [p for name, p in unet.named_parameters()
            if f".{adapter_name}." in f".{name}." and any(part.startswith("lora_") for part in name.split("."))]


def add_path_lora(unet: torch.nn.Module, rank: int = 4, alpha: float = 4.0,
                  adapter_name: str = "ptd_path") -> list[torch.nn.Parameter]:
    """Attach a fresh LoRA (paper App. E: rank 4 on the attention projections) and make only it trainable.

    `init_lora_weights="gaussian"` draws A ~ N(0, 1/r) and sets B = 0, so the UNet starts exactly at the prior
    (the s^(0) of the path). Every other parameter, other adapters included, is frozen. The LoRA parameters are
    kept in float32 even in a half-precision UNet (an AdamW step of lr 1e-4 would mostly round away in fp16); peft
    casts the layer input to their dtype and the sum back to the base layer's.

    Returns:
        the trainable LoRA parameters.
    """
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(TARGET_MODULES))
    unet.add_adapter(config, adapter_name=adapter_name)
    unet.requires_grad_(False)
    params = lora_parameters(unet, adapter_name)
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def lora_state_dict(unet: torch.nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """Detached CPU copy of the adapter's weights in peft's key layout (the format `PathTracer` checkpoints take)."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


# ----------------------------------------------------------------------------------------------------------------------
# Eq. 6
# ----------------------------------------------------------------------------------------------------------------------
def training_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the prior predicts at x_t: eps (epsilon), v = alpha_t eps - sigma_t x_0 (v_prediction) or x_0 (sample)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    if kind == "sample":
        return x0
    raise ValueError(f"unsupported scheduler prediction_type '{kind}' (epsilon, v_prediction or sample)")


def base_dtype(unet: torch.nn.Module) -> torch.dtype:
    """The dtype the UNet computes in: its first non-LoRA floating parameter's (the path LoRA is float32 in an fp16
    UNet, so `unet.dtype` alone can be either)."""
    return next(p.dtype for name, p in unet.named_parameters() if p.is_floating_point() and "lora_" not in name)


def _noisy(scheduler, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator):
    """x_t = alpha_t x_0 + sigma_t eps with eps drawn from `generator` (on its own device, then moved: seeds
    give the same noise on any device). Returns (x_t, t, target), all on x0's device."""
    noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0)  # [B,4,h,w]
    t = t.to(x0.device)
    return scheduler.add_noise(x0, noise, t), t, training_target(scheduler, x0, noise, t)


def _train_step(unet, scheduler, x0: torch.Tensor, emb: torch.Tensor, generator: torch.Generator,
                optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
                max_grad_norm: float | None) -> float:
    """One AdamW step on Eq. 6 for a batch x0 [B,4,h,w] with prompt embeddings emb [B,77,D]."""
    num_t = scheduler.config.num_train_timesteps
    t = torch.randint(0, num_t, (x0.shape[0],), generator=generator, device=generator.device)  # t ~ U{0..T-1}
    x_t, t, target = _noisy(scheduler, x0, t, generator)
    dtype = base_dtype(unet)  # latent math in x0's dtype (fp32), the UNet call in the UNet's (fp16 on a GPU)
    pred = unet(x_t.to(dtype), t, encoder_hidden_states=emb.to(dtype)).sample
    loss = F.mse_loss(pred.float(), target.float())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    return float(loss.detach())


def fit_lora(unet: torch.nn.Module, scheduler, latents: torch.Tensor, text_embeddings: torch.Tensor, *,
             epochs: int, batch_size: int = 4, lr: float = 1e-4, checkpoint_interval: int = 0,
             generator: torch.Generator | None = None,
             on_checkpoint: Callable[[int, dict[str, torch.Tensor]], None] | None = None, progress: bool = True,
             adapter_name: str = "ptd_path", weight_decay: float = 1e-2, max_grad_norm: float | None = None,
             max_steps: int | None = None, resume: Mapping | None = None) -> dict:
    """Fit the LoRA `adapter_name` of `unet` by paper Eq. 6 on cached latents (Alg. 1, lines 3-8).

    Args:
        latents: x_0 [N,4,h,w], already scaled by the VAE's scaling_factor.
        text_embeddings: y [N,77,D], the view-dependent prompt embedding of each latent.
        epochs: passes over the N latents (paper: 200 for the path LoRA, 400 for a prior finetune); one step is one
            batch, an epoch ceil(N / batch_size) steps, each epoch in a fresh random order.
        lr: AdamW learning rate on the LoRA parameters only (paper App. E: 1e-4).
        checkpoint_interval: K; every K steps (and at the last step) `on_checkpoint(step, lora_state_dict)` is called
            with a CPU copy of the adapter in peft's layout: these are the path points s^(1), ..., s^(n) of Eq. 7.
        generator: the only randomness (batch order, t, eps); default torch.Generator() seeded 0.
        max_steps: stop once this many steps of the whole run are done (default: all epochs).
        resume: the "state" of an earlier call's result (with the unet's LoRA as it was then): continues exactly
            where that run stopped, epochs counting the whole run.

    Returns:
        dict(losses=[one float per step of this call], step=steps done in the whole run, state=resume state).
    """
    from tqdm.auto import tqdm

    params = [p for p in lora_parameters(unet, adapter_name) if p.requires_grad]
    if not params:
        raise ValueError(f"UNet has no trainable parameters of LoRA adapter '{adapter_name}': call add_path_lora")
    n = latents.shape[0]
    if text_embeddings.shape[0] != n:
        raise ValueError(f"{n} latents but {text_embeddings.shape[0]} text embeddings: give one per latent")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(n / batch_size)
    run_total = epochs * steps_per_epoch
    total = run_total if max_steps is None else min(max_steps, run_total)
    step, perm = 0, None
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        generator.set_state(resume["generator"])
        step, perm = int(resume["step"]), resume["perm"]
    losses: list[float] = []
    was_training = unet.training
    unet.train()
    bar = tqdm(total=total, initial=step, disable=not progress, desc=f"LoRA {adapter_name}", leave=False)
    try:
        while step < total:
            offset = (step % steps_per_epoch) * batch_size
            if offset == 0:
                perm = torch.randperm(n, generator=generator, device=generator.device)
            idx = perm[offset:offset + batch_size].to(latents.device)
            losses.append(_train_step(unet, scheduler, latents[idx], text_embeddings[idx], generator, optimizer,
                                      params, max_grad_norm))
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if on_checkpoint is not None and checkpoint_interval > 0 and (
                    step % checkpoint_interval == 0 or step == run_total):
                on_checkpoint(step, lora_state_dict(unet, adapter_name))
    finally:
        bar.close()
        unet.train(was_training)
    state = {"step": step, "optimizer": optimizer.state_dict(), "generator": generator.get_state(), "perm": perm}
    return {"losses": losses, "step": step, "state": state}


@torch.no_grad()
def denoising_loss(unet: torch.nn.Module, scheduler, latents: torch.Tensor, embeddings: torch.Tensor, *,
                   timesteps: list[int] | torch.Tensor, generator: torch.Generator,
                   batch_size: int = 8) -> torch.Tensor:
    """Eq. 6 evaluated at fixed timesteps: mean ||eps_psi(x_t, t, y) - target||^2 over the N latents, per t.

    The noise comes from `generator` (one draw of [N,4,h,w] per timestep, in order): seed two generators alike to
    compare the base prior and the LoRA on the same x_t.

    Returns:
        [len(timesteps)] float32 on the CPU.
    """
    out, dtype = [], base_dtype(unet)
    for t in torch.as_tensor(timesteps).tolist():
        t_batch = torch.full((latents.shape[0],), int(t), dtype=torch.long)
        x_t, t_batch, target = _noisy(scheduler, latents, t_batch, generator)
        err = torch.zeros((), dtype=torch.float64)
        for i in range(0, latents.shape[0], batch_size):
            pred = unet(x_t[i:i + batch_size].to(dtype), t_batch[i:i + batch_size],
                        encoder_hidden_states=embeddings[i:i + batch_size].to(dtype)).sample
            err += (pred.float() - target[i:i + batch_size].float()).pow(2).sum().double().cpu()
        out.append(err / target.numel())
    return torch.stack(out).float()


# ----------------------------------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------------------------------
def _json_default(obj):
    if isinstance(obj, (set, frozenset, tuple)):
        return sorted(obj) if isinstance(obj, (set, frozenset)) else list(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if hasattr(obj, "value") and isinstance(obj.value, str):  # enums such as peft's PeftType
        return obj.value
    raise TypeError(f"LoRA metadata value of type {type(obj).__name__} is not JSON-serialisable: pass plain values")


def save_lora(folder: str | os.PathLike, unet: torch.nn.Module, adapter_name: str = "ptd_path",
              metadata: Mapping | None = None, state_dict: Mapping[str, torch.Tensor] | None = None,
              lora_diffusion: bool = False) -> Path:
    """Write the adapter as a diffusers LoRA folder (with its peft config) plus `ptd_path.json`, atomically.

    Args:
        metadata: JSON-serialisable facts for `ptd_path.json` (prompt, base model, init hash, steps, losses, ...);
            rank, lora_alpha, target modules and the adapter name are added.
        state_dict: weights to save in peft's layout (e.g. a checkpoint from `fit_lora`'s callback); default the
            adapter's current weights. The adapter config comes from `unet.peft_config[adapter_name]` either way.
        lora_diffusion: also write the same weights in lora_diffusion's layout (`lora_diffusion.safetensors`, what
            stock LucidDreamer's GuidanceParams.LoRA_path loads; guidance/lora_diffusion.py).
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    from guidance.hf_compat import require_lora_metadata

    require_lora_metadata("Saving a LoRA folder")
    folder = Path(folder)
    config = unet.peft_config[adapter_name]
    state = dict(state_dict) if state_dict is not None else lora_state_dict(unet, adapter_name)
    info = {"adapter_name": adapter_name, "rank": config.r, "lora_alpha": config.lora_alpha,
            "target_modules": config.target_modules, "weight_name": WEIGHT_NAME, **(metadata or {})}
    text = json.dumps(info, indent=2, default=_json_default)  # fail before writing anything
    adapter = config.to_dict()  # without it in the file, lora_alpha reloads as r
    if isinstance(adapter.get("target_modules"), set):  # peft keeps a set: sorted, the file's bytes are reproducible
        adapter["target_modules"] = sorted(adapter["target_modules"])
    with atomic_folder(folder) as tmp:
        StableDiffusionPipeline.save_lora_weights(
            tmp, unet_lora_layers=convert_state_dict_to_diffusers(state), weight_name=WEIGHT_NAME,
            unet_lora_adapter_metadata=adapter)
        canonical_safetensors(tmp / WEIGHT_NAME)  # the same bytes for the same run
        (tmp / METADATA_NAME).write_text(text)
        if lora_diffusion:
            from guidance.lora_diffusion import FILE_NAME, save_lora_diffusion
            save_lora_diffusion(tmp / FILE_NAME, unet, adapter_name, state)
    return folder


def _check_safetensors(path: Path, folder: Path) -> None:
    """Raise a one-line ValueError unless `path` is a complete safetensors file (header and every tensor present)."""
    fix = "rerun form_path.py to write it again"
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n)) if 8 + n <= size else None
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, TypeError, KeyError, AttributeError):
        raise ValueError(f"LoRA folder {folder}: {path.name} is unreadable or truncated; {fix}") from None
    if 8 + n + end > size:
        raise ValueError(f"LoRA folder {folder}: {path.name} is truncated ({size} of {8 + n + end} bytes); {fix}")


def read_lora_metadata(folder: str | os.PathLike) -> dict:
    """Check a LoRA folder written by `save_lora` and return its `ptd_path.json` (one-line ValueError if broken)."""
    folder = Path(folder)
    fix = "run form_path.py first or point PTDParams.path_lora at the folder it wrote"
    if not folder.is_dir():
        raise ValueError(f"LoRA folder {folder} does not exist; {fix}")
    weights, meta = folder / WEIGHT_NAME, folder / METADATA_NAME
    for path in (weights, meta):
        if not path.is_file():
            raise ValueError(f"LoRA folder {folder} lacks {path.name} (incomplete or not a PTD LoRA); {fix}")
    _check_safetensors(weights, folder)
    try:
        info = json.loads(meta.read_text())
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"LoRA folder {folder}: {METADATA_NAME} is not valid JSON (truncated?); {fix}") from None
    if not isinstance(info, dict):
        raise ValueError(f"LoRA folder {folder}: {METADATA_NAME} is not a JSON object; {fix}")
    return info


def read_lora_state_dict(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The UNet LoRA weights of a folder in peft's layout (e.g. path checkpoints for `PathTracer("checkpoints")`)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft

    read_lora_metadata(folder)
    state, _ = StableDiffusionPipeline.lora_state_dict(str(folder), weight_name=WEIGHT_NAME)
    prefix = "unet."
    return convert_unet_state_dict_to_peft({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})


def load_lora(pipe_or_unet, folder: str | os.PathLike, adapter_name: str = "ptd_path") -> dict:
    """Load a `save_lora` folder through diffusers' stock LoRA loader; returns its metadata.

    A pipeline goes through `pipe.load_lora_weights(folder, adapter_name=...)`, a bare UNet through the same
    classmethods. Afterwards the adapter's rank and lora_alpha are checked against `ptd_path.json`, which catches the
    silent failures of other formats (nothing loaded, or lora_alpha reloaded as r).
    """
    from diffusers import StableDiffusionPipeline

    from guidance.hf_compat import require_lora_metadata

    info = read_lora_metadata(folder)
    require_lora_metadata(f"Loading LoRA folder {folder}")
    if hasattr(pipe_or_unet, "load_lora_weights"):
        pipe_or_unet.load_lora_weights(str(folder), adapter_name=adapter_name, weight_name=WEIGHT_NAME)
        unet = pipe_or_unet.unet
    else:
        unet = pipe_or_unet
        state, alphas, meta = StableDiffusionPipeline.lora_state_dict(
            str(folder), weight_name=WEIGHT_NAME, return_lora_metadata=True)
        StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet, adapter_name=adapter_name, metadata=meta)
    config = getattr(unet, "peft_config", {}).get(adapter_name)
    if config is None or not lora_parameters(unet, adapter_name):
        raise ValueError(f"LoRA folder {folder} loaded no UNet weights into adapter '{adapter_name}'")
    if (config.r, float(config.lora_alpha)) != (info.get("rank"), float(info.get("lora_alpha", "nan"))):
        raise ValueError(f"LoRA folder {folder}: loaded r={config.r}, lora_alpha={config.lora_alpha} but "
                         f"{METADATA_NAME} says r={info.get('rank')}, lora_alpha={info.get('lora_alpha')}")
    return info
