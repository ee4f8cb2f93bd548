"""Regularisers of the stock LucidDreamer loop."""
from __future__ import annotations

import torch


def tv_loss(x: torch.Tensor) -> torch.Tensor:
    """Total variation of a batch x [B, C, H, W] as stock LucidDreamer computes it:

    TV = 2 / B * ( sum (x[h+1] - x[h])^2 / (C (H-1) W) + sum (x[w+1] - x[w])^2 / (C H (W-1)) ).
    """
    b, c, h, w = x.shape
    tv_h = (x[:, :, 1:, :] - x[:, :, :-1, :]).pow(2).sum() / (c * (h - 1) * w)
    tv_w = (x[:, :, :, 1:] - x[:, :, :, :-1]).pow(2).sum() / (c * h * (w - 1))
    return 2 * (tv_h + tv_w) / b


def scale_loss(scales: torch.Tensor) -> torch.Tensor:
    """Mean of the (noised) activated scales [..., 3]: stock's loss_scale = mean over axes, then over Gaussians."""
    return scales.mean(dim=-1).mean()
