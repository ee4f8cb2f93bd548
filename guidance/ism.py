"""Interval Score Matching (ISM) and Score Distillation Sampling (SDS): the math, as small pure functions.

Notation (paper symbol -> name here)
- x_0 (latent of a rendered view)            -> x0            [B, 4, h, w]
- x_t = sqrt(abar_t) x_0 + sqrt(1-abar_t) eps -> x_t
- abar_t (alphas_cumprod at timestep t)       -> abar_t        float, 0-dim tensor, or [B]
- eps_phi(x_t, t, y) (noise prediction)       -> pred_eps_t
- eps_phi(x_s, s, empty) (the ISM target)     -> target_eps_s
- w(t) = sqrt((1 - abar_t) / abar_t)          -> ism_weight(abar_t)
- lambda (LucidDreamer's lambda_guidance)     -> lambda_guidance
Equations: our paper's Eq. (2) is SDS, Eq. (4) is ISM; LucidDreamer (arXiv 2311.11284) Sec. 3 derives ISM from
DDIM inversion (its "x_s by DDIM inversion, then one interval step s -> t"). Stock code: EnVision-Research/LucidDreamer
guidance/sd_utils.py `train_step` (see the shared reference page).

Timestep convention (ONE for the whole project)
- A *timestep* tau is an integer in [0, num_train_timesteps - 1]; it is both the UNet's timestep argument and the
  row of the scheduler's `alphas_cumprod`: abar(tau) = alphas_cumprod[tau]. Every weight, noising, DDIM move and UNet
  call of an iteration uses this one pair.
- The annealing schedule samples an *index* i exactly as stock LucidDreamer does (ind_t ~ randint[20, 980) at
  iteration 0, ind_s = max(ind_t - delta, 0)). Stock maps the index through the DDIM scheduler's timesteps after
  `set_timesteps(1000)`, flipped; with SD 2.1-base's `steps_offset=1` and "leading" spacing that table is
  tau = i + 1 (`timestep_from_index`). Stock then uses tau everywhere: the UNet gets tau, `add_noise` and its DDIM step
  read alphas_cumprod[tau], and w(t) reads alphas_cumprod[tau]. We do the same, so an index 0 is timestep 1 ("x0 is
  first noised to t=1"), and the largest sampled index (979) is timestep 980. An index whose timestep would reach
  num_train_timesteps (i = 999 with offset 1) has no alphas_cumprod row: the guidance rejects such configurations.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch


def _bcast(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`value` as a tensor on `like`'s device and dtype, shaped to broadcast over a batch ([B] -> [B, 1, 1, 1])."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if value.ndim == 1 and like.ndim > 1:
        value = value.reshape(-1, *([1] * (like.ndim - 1)))
    return value


def timestep_from_index(index: int, steps_offset: int = 1) -> int:
    """tau = i + steps_offset: stock LucidDreamer's flipped DDIM table at 1000 "leading" steps (module docstring)."""
    return int(index) + int(steps_offset)


def add_noise(x0: torch.Tensor, eps: torch.Tensor, abar_t: float | torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (DDPM forward marginal; our paper Sec. 3, "x_t = alpha_t x_0 +
    sigma_t eps"). Shapes: x0, eps [B, C, h, w]."""
    a = _bcast(abar_t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def predict_x0(x: torch.Tensor, eps: torch.Tensor, abar: float | torch.Tensor) -> torch.Tensor:
    """x0_hat = (x - sqrt(1 - abar) eps) / sqrt(abar) (DDIM Eq. 12's "predicted x_0"; LucidDreamer Sec. 3)."""
    a = _bcast(abar, x)
    return (x - (1 - a).sqrt() * eps) / a.sqrt()


def ddim_step(x: torch.Tensor, eps: torch.Tensor, abar_from: float | torch.Tensor,
              abar_to: float | torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM move (eta = 0) between two noise levels, in either direction.

    x0_hat = (x - sqrt(1-abar_from) eps) / sqrt(abar_from);  x_to = sqrt(abar_to) x0_hat + sqrt(1-abar_to) eps.
    abar_to < abar_from adds noise (DDIM inversion, LucidDreamer's x_s -> x_t), abar_to > abar_from denoises.
    Shapes: x, eps [B, C, h, w] -> [B, C, h, w].
    """
    return add_noise(predict_x0(x, eps, abar_from), eps, abar_to)


def inversion_timesteps(s: int, xs_delta_t: int, xs_inv_steps: int) -> list[int]:
    """Index chain of the DDIM inversion x_0 -> x_s (stock LucidDreamer "Step 1: sample x_s with larger steps").

    The chain starts at i_0 = max(s - xs_delta_t * xs_inv_steps, 0) (x_0 is noised there directly with the guidance
    noise: index 0 = timestep 1 by default), climbs in strides of xs_delta_t and clips its last stride to land on s.
    One UNet call happens at every element but the last. s = 0 gives [0] (no inversion call): stock makes one UNet call
    there anyway and then a zero-length DDIM step (an identity), whose output it discards; we skip both.
    Example: s=450, 200, 5 -> [0, 200, 400, 450].
    """
    if xs_delta_t <= 0 or xs_inv_steps <= 0:
        raise ValueError(f"xs_delta_t ({xs_delta_t}) and xs_inv_steps ({xs_inv_steps}) must be positive")
    s = int(s)
    chain = [max(s - xs_delta_t * xs_inv_steps, 0)]
    while chain[-1] < s:
        chain.append(min(chain[-1] + xs_delta_t, s))
    return chain


def ddim_walk(x: torch.Tensor, chain: Sequence[int], eps_fn: Callable[[torch.Tensor, int], torch.Tensor],
              abar_fn: Callable[[int], float | torch.Tensor]) -> torch.Tensor:
    """Run `ddim_step` along an index chain (increasing: inversion; decreasing: denoising); returns x at chain[-1].

    eps_fn(x_i, i) is evaluated at every index but the last (one UNet call each). Each step's output goes through
    nan_to_num, as stock LucidDreamer's signed DDIM step does (a no-op on finite values).
    """
    for i_from, i_to in zip(chain[:-1], chain[1:]):
        x = torch.nan_to_num(ddim_step(x, eps_fn(x, i_from), abar_fn(i_from), abar_fn(i_to)))
    return x


def ism_weight(abar_t: float | torch.Tensor) -> float | torch.Tensor:
    """w(t) = sqrt((1 - abar_t) / abar_t), stock LucidDreamer's weight for ISM and for its SDS mode."""
    return ((1 - abar_t) / abar_t) ** 0.5


def ism_grad(pred_eps_t: torch.Tensor, target_eps_s: torch.Tensor, abar_t: float | torch.Tensor,
             lambda_guidance: float) -> torch.Tensor:
    """Latent gradient of ISM: lambda * w(t) (eps_phi(x_t, t, y) - eps_phi(x_s, s, empty)) (our paper Eq. 4).

    pred_eps_t: CFG prediction at x_t; target_eps_s: the unconditional (inverse-prompt) prediction at x_s, i.e. the
    first UNet output of the s -> t inversion step. Shapes [B, 4, h, w].
    """
    w = ism_weight(_bcast(abar_t, pred_eps_t))
    return w * (pred_eps_t - target_eps_s) * lambda_guidance


def sds_grad(pred_eps_t: torch.Tensor, eps: torch.Tensor, abar_t: float | torch.Tensor,
             lambda_guidance: float) -> torch.Tensor:
    """Latent gradient of SDS: lambda * w(t) (eps_phi(x_t, t, y) - eps) (our paper Eq. 2; DreamFusion).

    w(t) = sqrt((1 - abar_t) / abar_t), as stock LucidDreamer's `sds` mode (same line as its ISM), NOT DreamFusion's
    w(t) = 1 - abar_t; it keeps the two modes comparable at equal lambda_guidance.
    """
    return ism_grad(pred_eps_t, eps, abar_t, lambda_guidance)


def classifier_free_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: eps_uncond + scale (eps_cond - eps_uncond) (Ho & Salimans 2022).

    In ISM the unconditional branch is the NEGATIVE-prompt prediction (stock LucidDreamer)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def v_to_eps(v: torch.Tensor, x_t: torch.Tensor, abar_t: float | torch.Tensor) -> torch.Tensor:
    """eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t, for v-prediction priors (Salimans & Ho 2022, v = sqrt(abar) eps
    - sqrt(1-abar) x_0). Shapes [B, C, h, w]."""
    a = _bcast(abar_t, x_t)
    return a.sqrt() * v + (1 - a).sqrt() * x_t


def warm_up_rate(iteration: int, warmup_iter: int) -> float:
    """r = 1 - min(iteration / warmup_iter, 1): 1 at iteration 0, 0 from warmup_iter on (stock train.py)."""
    if warmup_iter <= 0:
        return 0.0
    return 1.0 - min(iteration / warmup_iter, 1.0)


def interval_delta(rate: float, delta_t: int, delta_t_start: int, annealing: bool = True,
                   round_up: bool = False) -> int:
    """Interval t - s: delta = delta_t + r (delta_t_start - delta_t), truncated to int (stock `train_step`).

    round_up=True rounds the annealed part up, as stock's Perp-Neg `train_step_perpneg` does. annealing=False: delta_t.
    """
    if not annealing:
        return int(delta_t)
    extra = rate * (delta_t_start - delta_t)
    return int(delta_t + (math.ceil(extra) if round_up else extra))


def timestep_bounds(rate: float, t_range: Sequence[float], max_t_range: float,
                    num_train_timesteps: int = 1000) -> tuple[int, int]:
    """[low, high) of the sampled index ind_t: low = int(N t_range[0]), high = int(N t_range[1]) + int(warmup r),
    warmup = int(N (max_t_range - t_range[1])). Defaults: [20, 980) at r = 1, [20, 500) at r = 0 (stock)."""
    n = num_train_timesteps
    min_step, max_step = int(n * t_range[0]), int(n * t_range[1])
    warmup_step = int(n * (max_t_range - t_range[1]))
    return min_step, max_step + int(warmup_step * rate)


def view_interpolation(azimuth: float) -> tuple[bool, float]:
    """(front_half, r) of stock LucidDreamer's view-prompt interpolation at an azimuth in degrees (0 = front).

    front_half (-90 <= az < 90): r = 1 - |az|/90 blends front (r) -> side (1 - r); otherwise r = 1 - (|az| - 90)/90
    blends side (r) -> back (1 - r). Azimuths outside [-180, 180) are wrapped first (180 -> -180: back either way).
    """
    az = (float(azimuth) + 180.0) % 360.0 - 180.0
    if -90.0 <= az < 90.0:
        return True, (1 - az / 90 if az >= 0 else 1 + az / 90)
    return False, (1 - (az - 90) / 90 if az >= 0 else 1 + (az + 90) / 90)


def view_prompt_weights(azimuth: float) -> tuple[float, float, float]:
    """Weights (front, side, back) of the "{text}, {front|side|back} view" embeddings (stock train.py):
    emb(az) = w_front e_front + w_side e_side + w_back e_back, see `view_interpolation`.
    Examples: 0 -> (1, 0, 0); +-45 -> (.5, .5, 0); +-90 -> (0, 1, 0); 180 -> (0, 0, 1)."""
    front_half, r = view_interpolation(azimuth)
    return (r, 1 - r, 0.0) if front_half else (0.0, r, 1 - r)


class SpecifyGradient(torch.autograd.Function):
    """Inject a given gradient into a tensor: forward returns a dummy 0-dim zero, backward returns grad x upstream.

    `loss = SpecifyGradient.apply(latents, grad)`; `(k * loss).backward()` adds k * grad to latents.grad, so the
    ISM/SDS gradient flows through the VAE encoder into the renderer. The dummy's value (0) carries no meaning.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(grad)
        return torch.zeros((), device=tensor.device, dtype=tensor.dtype)

    @staticmethod
    def backward(ctx, upstream: torch.Tensor) -> tuple[torch.Tensor, None]:
        (grad,) = ctx.saved_tensors
        return grad * upstream, None
