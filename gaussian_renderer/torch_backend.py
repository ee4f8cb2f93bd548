"""Pure-PyTorch tiled Gaussian rasteriser: the CPU path and the reference for the CUDA backends.

Per pixel p and depth-sorted Gaussians i (3DGS, Kerbl et al. 2023, Eq. 2-3):
    power_i = -1/2 d^T conic_i d,  d = p - mu'_i                 (d in pixels)
    a_i     = min(0.99, o_i exp(power_i)),  skipped (a_i = 0) when a_i < 1/255 or p lies outside the Gaussian's
              square screen box |d_x|, |d_y| <= r_i (its "3-sigma extent"; 3DGS cuts at the tiles the box touches)
    T_i     = prod_{j<i} (1 - a_j)                                (transmittance in front of i)
    stop    before the first i with T_i (1 - a_i) < 1e-4          (3DGS early termination)
    C       = sum_i c_i a_i T_i + T_final bg,   D = sum_i z_i a_i T_i,   alpha = 1 - T_final
Tiling: the image is cut into `tile` x `tile` tiles (default 8: the same result as 3DGS's 16, faster on CPU); a tile
composites exactly the Gaussians whose screen box overlaps it, so the result equals the dense
every-pixel-every-Gaussian sum (`render_dense`) up to rounding.
Everything is batched: (tile, Gaussian) pairs are generated with repeat_interleave and sorted by (tile, depth); then
all tiles walk their lists together in depth rounds of B Gaussians ([tiles, B, tile*tile] tensors; B doubles from
FIRST_ROUND to MAX_ROUND), carrying each pixel's transmittance; a tile leaves once all its pixels stopped, which is
where early termination saves most of the work. Within a round T_i comes from a cumulative sum of log(1 - a).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from gaussian_renderer.projection import Projected, covariance_3d, gaussian_colors, project_gaussians

ALPHA_MAX = 0.99  # 3DGS caps a Gaussian's opacity at a pixel
ALPHA_MIN = 1.0 / 255.0  # contributions below this are skipped
T_MIN = 1e-4  # compositing stops before transmittance would fall below this
FIRST_ROUND, MAX_ROUND = 16, 128  # Gaussians per tile in the first depth round; rounds double up to MAX_ROUND


def _bin(proj: Projected, tile: int, tiles_x: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Gaussian index, tile id) of every overlapping pair, sorted by tile, then front to back."""
    vis = proj.visible.nonzero().squeeze(1)  # [M]
    vis = vis[torch.argsort(proj.depths.detach()[vis], stable=True)]
    lo = proj.px_lo[vis] // tile  # [M, 2] first tile (x, y)
    span = proj.px_hi[vis] // tile - lo + 1  # [M, 2]
    counts = span[:, 0] * span[:, 1]  # [M]
    pair_g = torch.repeat_interleave(torch.arange(vis.numel(), device=vis.device), counts)  # [P]
    first = torch.cumsum(counts, 0) - counts
    local = torch.arange(pair_g.numel(), device=vis.device) - first[pair_g]
    width = span[pair_g, 0]
    tile_id = (lo[pair_g, 1] + local // width) * tiles_x + lo[pair_g, 0] + local % width
    tile_id, order = torch.sort(tile_id, stable=True)  # stable: keeps the depth order within a tile
    return vis[pair_g[order]], tile_id


def rasterize(proj: Projected, colors: torch.Tensor, opacities: torch.Tensor, bg_color: torch.Tensor,
              width: int, height: int, tile: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tiled front-to-back compositing (module docstring).

    Args:
        proj: projected Gaussians (N); colors [N, 3]; opacities [N]; bg_color [3].
    Returns:
        image [3, H, W], depth [1, H, W] (sum z a T), alpha [1, H, W] (1 - T_final).
    """
    tiles_x, tiles_y = -(-width // tile), -(-height // tile)
    n_tiles = tiles_x * tiles_y
    feats = torch.cat([colors, proj.depths[:, None]], dim=1)  # [N, 4]
    gid, tile_id = _bin(proj, tile, tiles_x)
    # an empty slice keeps the outputs on the autograd graph when nothing is visible (backward still works)
    acc = torch.zeros(n_tiles, tile * tile, 5, dtype=colors.dtype, device=colors.device) + feats[:0].sum()
    if gid.numel() > 0:
        acc = _composite_rounds(proj, feats, opacities, gid, tile_id, n_tiles, tile, tiles_x, width, height)
    acc = acc.reshape(tiles_y, tiles_x, tile, tile, 5).permute(4, 0, 2, 1, 3)
    acc = acc.reshape(5, tiles_y * tile, tiles_x * tile)[:, :height, :width]  # [5, H, W]
    alpha = acc[4:5]
    image = acc[:3] + (1.0 - alpha) * bg_color.to(acc)[:, None, None]
    return image, acc[3:4], alpha


def _composite_round(base: torch.Tensor, conic: torch.Tensor, opac: torch.Tensor, feats: torch.Tensor,
                     radius: torch.Tensor, t_in: torch.Tensor, done: torch.Tensor, tile: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Composite the next B depth-sorted Gaussians of A tiles behind what the tiles hold already.

    The exponent is separable over the tile's rows and columns: with dx over the columns and dy over the rows,
    power = (-a dx^2 / 2)[col] + (-c dy^2 / 2)[row] + (-b dx)[col] dy[row], and the screen box |dx|, |dy| <= r is
    applied as -inf on the per-column / per-row terms, so only three full-size operations build it.

    Args:
        base: [A, B, 2] tile origin minus the Gaussian's pixel mean; conic [A, B, 3]; opac [A, B] (0 = padding);
        feats [A, B, F]; radius [A, B]; t_in [A, K] transmittance in front (K = tile^2); done [A, K] stopped pixels.
    Returns:
        contrib [A, K, F + 1] (sum w f per channel, then sum w), t_out [A, K], done_out [A, K].
    """
    n_a, n_b = opac.shape
    offs = torch.arange(tile, device=base.device, dtype=base.dtype)
    dx = base[..., 0:1] + offs  # [A, B, tile] over the columns
    dy = base[..., 1:2] + offs  # over the rows
    r = radius[..., None]
    neg_inf = torch.full_like(dx, -math.inf)
    qx = torch.where(dx.abs() <= r, -0.5 * conic[..., 0:1] * dx * dx, neg_inf)
    qy = torch.where(dy.abs() <= r, -0.5 * conic[..., 2:3] * dy * dy, neg_inf)
    power = qx[..., None, :] + qy[..., :, None] + (-conic[..., 1:2] * dx)[..., None, :] * dy[..., :, None]
    alpha = torch.clamp_max(opac[..., None, None] * torch.exp(power), ALPHA_MAX).reshape(n_a, n_b, tile * tile)
    with torch.no_grad():
        valid = (alpha >= ALPHA_MIN) & ~done[:, None, :]
    alpha = torch.where(valid, alpha, torch.zeros_like(alpha))  # [A, B, K]
    log_1ma = torch.log1p(-alpha)
    log_cum = torch.cumsum(log_1ma, dim=1)  # log prod_{j<=i} (1 - a_j) within the round
    trans = t_in[:, None, :] * torch.exp(log_cum - log_1ma)  # T_i
    with torch.no_grad():
        log_room = math.log(T_MIN) - torch.log(t_in)  # [A, K]; T_i (1 - a_i) >= 1e-4  <=>  log_cum_i >= log_room
        keep = log_cum >= log_room[:, None, :]
        done_out = done | (log_cum[:, -1] < log_room)
    weight = torch.where(keep, alpha * trans, torch.zeros_like(alpha))  # w_i = a_i T_i  [A, B, K]
    w_sum = weight.sum(1)  # [A, K]
    contrib = torch.cat([weight.transpose(1, 2) @ feats, w_sum[..., None]], dim=-1)  # [A, K, F + 1]
    return contrib, t_in - w_sum, done_out


def _composite_rounds(proj: Projected, feats: torch.Tensor, opacities: torch.Tensor, gid: torch.Tensor,
                      tile_id: torch.Tensor, n_tiles: int, tile: int, tiles_x: int, width: int, height: int
                      ) -> torch.Tensor:
    """Walk every tile's depth-sorted list in rounds (sizes FIRST_ROUND, doubling to MAX_ROUND), all tiles at once,
    dropping a tile once all its pixels stopped or its list is exhausted. Returns [n_tiles, K, 5]."""
    dtype, dev, kk = feats.dtype, feats.device, tile * tile
    tile_xy = torch.stack([tile_id % tiles_x, tile_id // tiles_x], dim=1)  # [P, 2]
    base = tile_xy.to(dtype) * tile - proj.means2d[gid]  # [P, 2]
    pair = {"base": base, "conic": proj.conics[gid], "opac": opacities[gid], "feats": feats[gid],
            "radius": proj.radii[gid].to(dtype)}
    counts = torch.bincount(tile_id, minlength=n_tiles)  # [n_tiles]
    offsets = torch.cumsum(counts, 0) - counts
    active = (counts > 0).nonzero().squeeze(1)  # [A]
    k = torch.arange(kk, device=dev)
    px = (active[:, None] % tiles_x) * tile + k % tile  # [A, K] pixel coordinates
    py = (active[:, None] // tiles_x) * tile + k // tile
    done = (px >= width) | (py >= height)  # pixels outside the image never need compositing
    t_in = torch.ones(active.numel(), kk, dtype=dtype, device=dev)
    tiles_out, contribs = [], []
    start, size = 0, FIRST_ROUND
    while active.numel() > 0:
        pos = start + torch.arange(size, device=dev)  # [B]
        in_list = pos[None, :] < counts[active][:, None]  # [A, B]
        idx = torch.where(in_list, offsets[active][:, None] + pos[None, :], 0)  # [A, B] pair index (0 = padding)
        g = {key: val[idx] for key, val in pair.items()}
        opac = torch.where(in_list, g["opac"], torch.zeros_like(g["opac"]))
        contrib, t_in, done = _composite_round(g["base"], g["conic"], opac, g["feats"], g["radius"], t_in, done, tile)
        tiles_out.append(active)
        contribs.append(contrib)
        start += size
        size = min(2 * size, MAX_ROUND)
        more = (counts[active] > start) & ~done.all(dim=1)
        active, t_in, done = active[more], t_in[more], done[more]
    acc = torch.zeros(n_tiles, kk, 5, dtype=dtype, device=dev)
    return acc.index_add(0, torch.cat(tiles_out), torch.cat(contribs))


def render_torch(camera, means: torch.Tensor, features: Optional[torch.Tensor], opacities: torch.Tensor,
                 scales: torch.Tensor, rotations: torch.Tensor, bg_color: torch.Tensor, sh_degree: int,
                 scaling_modifier: float = 1.0, override_color: Optional[torch.Tensor] = None,
                 tile_size: int = 8) -> dict:
    """Render with the torch backend. Inputs are activated: means [N, 3], features [N, K, 3] SH coefficients,
    opacities [N], scales [N, 3], rotations [N, 4] (normalised here). Returns the render() dict (without `scales`)."""
    viewspace = torch.zeros_like(means, requires_grad=True)  # [N, 3]
    cov3d = covariance_3d(scales, rotations, scaling_modifier)
    proj = project_gaussians(means, cov3d, camera, viewspace)
    colors = gaussian_colors(camera, means, features, sh_degree, override_color)
    image, depth, alpha = rasterize(proj, colors, opacities, bg_color, int(camera.image_width),
                                    int(camera.image_height), tile_size)
    return {"render": image, "depth": depth, "alpha": alpha, "radii": proj.radii,
            "viewspace_points": viewspace, "visibility_filter": proj.visible}
