"""Perp-Neg view guidance (Armandpour et al. 2023, https://perp-neg.github.io) as stock LucidDreamer applies it.

Notation: eps_u = negative-prompt (unconditional) prediction, eps_0 = view-interpolated positive prediction,
eps_k (k = 1, 2) = predictions for the two "other view" prompts, d_k = eps_k - eps_u, w_k their (negative) weights.
  eps = eps_u + scale (d_0 + sum_k w_k perp(d_k, d_0)),  perp(x, y) = x - <x, y> / max(|y|^2, 1e-6) y  (per sample).
Weights per azimuth follow stock train.py `get_pos_neg_text_embeddings`: negative_w = -2, front decay 2, side decay 10.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from guidance.ism import view_interpolation

# stock skips weights this small instead of multiplying by them
_WEIGHT_EPS = 1e-4


def perpneg_view(azimuth: float, negative_w: float, front_decay_factor: float,
                 side_decay_factor: float) -> tuple[tuple[float, float, float], tuple[str, str], tuple[float, float]]:
    """Prompts and weights of one view.

    Returns ((w_front, w_side, w_back) of the positive embedding, names of the two negative view prompts, their
    weights). Front half (|az| < 90, r = 1 - |az|/90): negatives (front, side) with weights
    (0 if r > 0.8 else e^{-r front_decay} negative_w, 0 if r < 0.2 else e^{-(1-r) side_decay} negative_w).
    Back half (r = 1 - (|az| - 90)/90): negatives (side, front) with weights
    (0 if r > 0.8 else e^{-r side_decay} negative_w / 2, negative_w).
    """
    front_half, r = view_interpolation(azimuth)
    if front_half:
        front_w = 0.0 if r > 0.8 else math.exp(-r * front_decay_factor) * negative_w
        side_w = 0.0 if r < 0.2 else math.exp(-(1 - r) * side_decay_factor) * negative_w
        return (r, 1 - r, 0.0), ("front", "side"), (front_w, side_w)
    side_w = 0.0 if r > 0.8 else math.exp(-r * side_decay_factor) * negative_w / 2
    return (0.0, r, 1 - r), ("side", "front"), (side_w, negative_w)


def perpendicular_component(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """perp(x, y) = x - <x, y> / max(|y|^2, 1e-6) y, per sample. Shapes [B, ...] -> [B, ...]."""
    dims = tuple(range(1, x.ndim))
    coef = (x * y).sum(dims, keepdim=True) / (y * y).sum(dims, keepdim=True).clamp_min(1e-6)
    return x - coef * y


def perpneg_cfg(eps_uncond: torch.Tensor, eps_pos: torch.Tensor, eps_negs: Sequence[torch.Tensor],
                neg_weights: torch.Tensor, scale: float) -> torch.Tensor:
    """eps_u + scale (d_0 + sum_k w_k perp(d_k, d_0)) with d = eps - eps_u.

    eps_uncond, eps_pos: [B, 4, h, w]; eps_negs: K tensors [B, 4, h, w]; neg_weights: [K, B].
    """
    main = eps_pos - eps_uncond
    extra = torch.zeros_like(main)
    for eps_k, w_k in zip(eps_negs, neg_weights):
        w_k = w_k.to(main).reshape(-1, *([1] * (main.ndim - 1)))
        term = w_k * perpendicular_component(eps_k - eps_uncond, main)
        extra = extra + torch.where(w_k.abs() > _WEIGHT_EPS, term, torch.zeros_like(term))
    return eps_uncond + scale * (extra + main)
