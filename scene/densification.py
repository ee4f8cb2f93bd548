"""Adaptive density control of 3DGS with LucidDreamer's thresholds (free functions on a GaussianModel).

Statistics (per Gaussian, since the last densification): g = sum over views where visible of |dL/d mean2D|
(NDC units, viewspace_points.grad[:, :2]) divided by the number of those views; max screen radius.
Rules at each densification step (train loop: every densification_interval iterations in
(densify_from_iter, densify_until_iter); LucidDreamer: max_grad 7.5e-4, extent = default_radius 3.5,
percent_dense 0.003, min_opacity 0.005, max_screen_size 20 px once iteration > opacity_reset_interval, else None):
    clone  g >= max_grad and max(s) <= percent_dense * extent      copy (same parameters)
    split  g >= max_grad and max(s) >  percent_dense * extent      2 children at mu + R eps, eps ~ N(0, diag(s^2)),
                                                                    scales s / (0.8 * 2) = s / 1.6; parent removed
    prune  o < min_opacity, or (max_screen_size given) max screen radius > max_screen_size or
           max(s) > 0.1 * extent                                    (after cloning and splitting)
Clones are not split (their g counts as 0, as stock). Statistics are reset afterwards.
Stock zeroes the screen radii when it appends clones, before the prune, which makes its screen-size rule a no-op;
here clones and children inherit their parent's radius and the rule is applied (screen_prune=False = stock).
"""
from __future__ import annotations

from typing import Optional

import torch

from scene.geometry import quat_to_rotmat

SPLIT_CHILDREN = 2
SPLIT_SHRINK = 0.8 * SPLIT_CHILDREN  # children scales are s / 1.6
BIG_WORLD_FRACTION = 0.1  # prune max(s) > 0.1 * extent


def add_stats(model, viewspace_grad: torch.Tensor, visibility_filter: torch.Tensor,
              radii: Optional[torch.Tensor] = None) -> None:
    """See GaussianModel.add_densification_stats."""
    grad = viewspace_grad
    if viewspace_grad.requires_grad:
        grad = viewspace_grad.grad
        if grad is None:
            raise ValueError("viewspace_points has no .grad yet; call add_densification_stats after backward()")
    vis = visibility_filter
    model.xyz_gradient_accum[vis] += torch.norm(grad[vis, :2], dim=-1, keepdim=True).to(model.dtype)
    model.denom[vis] += 1
    if radii is not None:
        model.max_radii2D[vis] = torch.maximum(model.max_radii2D[vis], radii[vis].to(model.dtype))


def densify_and_clone(model, selected: torch.Tensor) -> int:
    """Append copies of the Gaussians where selected [N] is True."""
    idx = selected.nonzero().squeeze(1)
    if idx.numel():
        model.append_points({k: p.detach()[idx] for k, p in model._params().items()}, parents=idx)
    return int(idx.numel())


def densify_and_split(model, selected: torch.Tensor, generator: Optional[torch.Generator] = None) -> int:
    """Replace each selected Gaussian (selected [N'] over the first N' Gaussians) by 2 smaller children."""
    idx = selected.nonzero().squeeze(1)
    if idx.numel() == 0:
        return 0
    p = {k: v.detach() for k, v in model._params().items()}
    parents = idx.repeat(SPLIT_CHILDREN)  # [2M] a b c a b c, as stock's repeat
    stds = torch.exp(p["scaling"][parents])  # [2M, 3]
    eps = torch.randn(stds.shape, generator=generator, dtype=stds.dtype,
                      device=generator.device if generator is not None else stds.device).to(stds.device)
    rot = quat_to_rotmat(torch.nn.functional.normalize(p["rotation"][parents], dim=-1))  # [2M, 3, 3]
    new = {k: v[parents] for k, v in p.items()}
    new["xyz"] = (rot @ (eps * stds)[..., None])[..., 0] + p["xyz"][parents]
    new["scaling"] = torch.log(stds / SPLIT_SHRINK)
    model.append_points(new, parents=parents)
    drop = torch.zeros(model.num_points, dtype=torch.bool, device=selected.device)
    drop[idx] = True  # the parents; the children sit at the end
    model.prune_points(drop)
    return int(idx.numel())


def densify_and_prune(model, max_grad: float, min_opacity: float, extent: float, max_screen_size: Optional[float],
                      generator: Optional[torch.Generator] = None, screen_prune: bool = True) -> dict:
    """Clone, split, prune, reset statistics (module docstring). Returns counts {cloned, split, pruned}."""
    grads = (model.xyz_gradient_accum / model.denom)[:, 0]
    grads[grads.isnan()] = 0.0
    with torch.no_grad():
        big = model.get_scaling.max(dim=1).values > model.percent_dense * extent
        selected = grads >= max_grad
        n0 = model.num_points
        cloned = densify_and_clone(model, selected & ~big)
        split = densify_and_split(model, (selected & big)[:n0], generator)
        prune = model.get_opacity[:, 0] < min_opacity
        if max_screen_size:
            prune |= model.get_scaling.max(dim=1).values > BIG_WORLD_FRACTION * extent
            if screen_prune:
                prune |= model.max_radii2D > max_screen_size
        pruned = int(prune.sum())
        model.prune_points(prune)
    model._reset_stats()
    return {"cloned": cloned, "split": split, "pruned": pruned}
