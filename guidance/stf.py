"""Stable Target Field (Xu, Tong, Jaakkola, ICLR 2023) score estimate and the matching loss (paper Eq. 5, Eq. 11).

Notation (paper §2-3, App. G):
    x_t = alpha_t x_0 + sigma_t eps              the noised sample, x_t [B, ...]
    x_0^ref(k), k = 1..n                         reference samples from the prior, ref_x0 [n, ...]
    p_{t|0}(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I)
    s_approx(x_t) = sum_k w_k grad log p_{t|0}(x_t | x_0^ref(k)),   w = softmax_k(-||x_t - alpha_t x0_k||^2 / (2 sigma_t^2))
                  = sum_k w_k * (-(x_t - alpha_t x0_k) / sigma_t^2)                                    (Eq. 11)
This is the exact score of the noised empirical distribution of the reference set. In eps space the same estimate is
eps_approx = -sigma_t s_approx, which is what a noise-prediction network eps(x_t, t) is trained to output.

Two readings of the reference set (the `self_x0` argument):
- references only (self_x0=None): Eq. 11 as the paper writes it, i = 1..n over samples of the prior. The scored x_0 is
  not among them, so as t -> 0 the weights pick the NEAREST reference and eps_approx = eps + alpha_t (x_0 - x0_nn) /
  sigma_t: even a network that returns the exact noise eps scores alpha_t ||x_0 - x0_nn|| / sigma_t there (~6.0 RMS
  at t = 50 and ~1.0 at t = 450 for N(0,1) latents and 32 references, tests/test_stf.py), a distance to the set.
- self included (self_x0 = the scored x_0): Xu et al.'s Stable Target Field, whose reference batch holds the scored
  sample itself. The set is {x0_1..x0_n, x_0}, w gains a column for x_0, and as t -> 0 eps_approx -> eps (the
  denoising target); in high dimension the x_0 term dominates the softmax at most t, so the loss approaches the
  network's denoising error ||eps_pred - eps||.

Matching loss (Eq. 5): E ||s_pretrain(x_t) - s_approx(x_t)||_2. The paper does not say in which space or norm its
3.234 vs 1.687 were computed; we report it in eps space (scores scaled by -sigma_t, so all timesteps weigh alike) as the
per-sample L2 norm, divided by sqrt(dim) so the number does not grow with resolution (an RMS), averaged over t ~ U.
`matching_loss(..., space="score", normalize=False)` gives the raw Eq. 5 quantity.
"""
from __future__ import annotations

from typing import Union

import torch

Scalar = Union[float, torch.Tensor]


def _per_sample(value: Scalar, x: torch.Tensor) -> torch.Tensor:
    """A float or [B] tensor -> [B, 1, ..., 1] broadcastable against x [B, ...]."""
    value = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    if value.ndim == 0:
        value = value.expand(x.shape[0])
    return value.reshape(-1, *([1] * (x.ndim - 1)))


def stf_weights(x_t: torch.Tensor, ref_x0: torch.Tensor, alpha_t: Scalar, sigma_t: Scalar,
                self_x0: torch.Tensor | None = None) -> torch.Tensor:
    """Posterior weights w[b, k] = softmax_k(-||x_t[b] - alpha_t x0_k||^2 / (2 sigma_t^2)), log-sum-exp stable.

    Args:
        x_t: [B, ...] noised samples; ref_x0: [n, ...] reference clean samples; alpha_t, sigma_t: floats or [B].
        self_x0: [B, ...] or None: each row's own clean sample, a reference of that row only (Xu et al.'s STF).
    Returns:
        [B, n] weights (self_x0 None) or [B, n + 1] with the own sample's weight in the last column; rows sum to 1.
    """
    a = _per_sample(alpha_t, x_t).reshape(-1, 1)  # [B, 1]
    s = _per_sample(sigma_t, x_t).reshape(-1, 1)  # [B, 1]
    xt = x_t.reshape(x_t.shape[0], -1)  # [B, D]
    x0 = ref_x0.reshape(ref_x0.shape[0], -1).to(x_t)  # [n, D]
    # ||x_t - a x0||^2 = |x_t|^2 - 2 a <x_t, x0> + a^2 |x0|^2, computed without a [B, n, D] tensor
    d2 = ((xt * xt).sum(1, keepdim=True) - 2 * a * (xt @ x0.T) + a ** 2 * (x0 * x0).sum(1)[None, :]).clamp_min(0)
    if self_x0 is not None:
        if self_x0.shape != x_t.shape:
            raise ValueError(f"self_x0 must have x_t's shape {list(x_t.shape)}, got {list(self_x0.shape)}")
        own = xt - a * self_x0.reshape(xt.shape).to(x_t)  # [B, D]: the row's own term, one per row
        d2 = torch.cat([d2, (own * own).sum(1, keepdim=True)], dim=1)  # [B, n + 1]
    return torch.softmax(-d2 / (2 * s ** 2), dim=1)


def stf_score(x_t: torch.Tensor, ref_x0: torch.Tensor, alpha_t: Scalar, sigma_t: Scalar,
              self_x0: torch.Tensor | None = None) -> torch.Tensor:
    """s_approx(x_t) of Eq. 11: sum_k w_k * (-(x_t - alpha_t x0_k) / sigma_t^2), same shape as x_t; the sum runs over
    the references, and also over the row's own x_0 when `self_x0` is given (see `stf_weights`)."""
    w = stf_weights(x_t, ref_x0, alpha_t, sigma_t, self_x0)  # [B, n] or [B, n + 1]
    n = ref_x0.shape[0]
    x0_hat = w[:, :n] @ ref_x0.reshape(n, -1).to(x_t)  # [B, D] posterior mean E[x0 | x_t]
    if self_x0 is not None:
        x0_hat = x0_hat + w[:, n:] * self_x0.reshape(x0_hat.shape).to(x_t)
    a, s = _per_sample(alpha_t, x_t), _per_sample(sigma_t, x_t)
    return -(x_t - a * x0_hat.reshape(x_t.shape)) / s ** 2


def stf_eps(x_t: torch.Tensor, ref_x0: torch.Tensor, alpha_t: Scalar, sigma_t: Scalar,
            self_x0: torch.Tensor | None = None) -> torch.Tensor:
    """eps_approx = -sigma_t s_approx(x_t): the noise a perfect denoiser of the reference set would predict (the set
    extended by each row's own x_0 when `self_x0` is given)."""
    return -_per_sample(sigma_t, x_t) * stf_score(x_t, ref_x0, alpha_t, sigma_t, self_x0)


def score_from_eps(eps: torch.Tensor, sigma_t: Scalar) -> torch.Tensor:
    """s = -eps / sigma_t (the score of a noise-prediction network)."""
    return -eps / _per_sample(sigma_t, eps)


def matching_loss(eps_pred: torch.Tensor, x_t: torch.Tensor, ref_x0: torch.Tensor, alpha_t: Scalar,
                  sigma_t: Scalar, space: str = "eps", normalize: bool = True,
                  self_x0: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample ||s_pretrain(x_t) - s_approx(x_t)||_2 of Eq. 5, returned as [B] (average it over x0, t, eps).

    Args:
        eps_pred: [B, ...] the network's noise prediction at x_t.
        space: "eps" compares -sigma_t s (noise units), "score" compares the scores themselves.
        normalize: divide the L2 norm by sqrt(number of elements per sample) (RMS).
        self_x0: [B, ...] the clean samples x_t was made from, to include each in its own reference set (Xu et al.'s
            STF); None: the references only (Eq. 11 as written).
    """
    if space == "eps":
        diff = eps_pred - stf_eps(x_t, ref_x0, alpha_t, sigma_t, self_x0)
    elif space == "score":
        diff = score_from_eps(eps_pred, sigma_t) - stf_score(x_t, ref_x0, alpha_t, sigma_t, self_x0)
    else:
        raise ValueError(f"matching_loss space '{space}' is not 'eps' or 'score'")
    norm = diff.reshape(diff.shape[0], -1).norm(dim=1)
    return norm / diff[0].numel() ** 0.5 if normalize else norm


# ----------------------------------------------------------------------------------------------------------------------
# reporting: per-timestep bins and overall (probe_ood.py, evaluation/monitor.py)
# ----------------------------------------------------------------------------------------------------------------------
def mean_std(values: torch.Tensor) -> tuple[float, float]:
    """(mean, sample std) of a 1-D tensor; std is 0 for a single value."""
    values = values.double().flatten()
    std = values.std(correction=1).item() if values.numel() > 1 else 0.0
    return values.mean().item(), std


def aggregate_by_timestep(losses: torch.Tensor, timesteps: list[int]) -> dict:
    """Summarise matching losses measured on a timestep grid.

    Args:
        losses: [T, N, K] per-sample matching losses: T timesteps (each its own bin), N images x_0, K noise draws.
        timesteps: the T timestep indices.
    Returns:
        {"by_t": [{"t", "mean", "std", "n"}] (mean +- std over the N*K samples at that t),
         "overall": {"mean", "std", "n"}} where overall is over the N images of each image's loss averaged over all
        timesteps and draws: with equal-width bins its mean is the t ~ U estimate of E_{x0, t, eps} (Eq. 5).
    """
    if losses.ndim != 3 or losses.shape[0] != len(timesteps):
        raise ValueError(f"losses must be [T, N, K] with T = {len(timesteps)} timesteps, got {list(losses.shape)}")
    by_t = []
    for t, row in zip(timesteps, losses):
        mean, std = mean_std(row)
        by_t.append({"t": int(t), "mean": mean, "std": std, "n": int(row.numel())})
    mean, std = mean_std(losses.double().mean(dim=(0, 2)))
    return {"by_t": by_t, "overall": {"mean": mean, "std": std, "n": int(losses.shape[1])}}
