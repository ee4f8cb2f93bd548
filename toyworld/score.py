"""Ground-truth scores of a distilled model against the toy object its prompt names, from the paper's 16 evaluation
cameras (8 azimuths x elevations 0 and 45, radius 4): silhouette IoU, colour error inside the silhouette, which
shape fits best and which colour is nearest. `python -m toyworld.score output/<workspace>` scores a run's final PLY.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gaussian_renderer import render
from scene.cameras import eval_rig_cameras
from toyworld.world import COLOURS, SHAPES, ToyObject, object_splats, parse_prompt

ALPHA_THRESHOLD = 0.5  # a pixel is inside a silhouette when its accumulated opacity exceeds this
SCORE_RESOLUTION = 64
SCORE_RADIUS, SCORE_FOVY = 4.0, 0.55


def score_cameras(resolution: int = SCORE_RESOLUTION, device=None) -> list:
    """The paper's 16 evaluation views (8 azimuths at elevation 0, then 8 at 45 degrees)."""
    return eval_rig_cameras(resolution, resolution, radius=SCORE_RADIUS, fovy=SCORE_FOVY, n_azimuths=8, device=device)


@torch.no_grad()
def views(model, cameras, bg: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Renders of a model (GaussianModel, NeRFModel or Splats): colour over `bg` (default white) [V, 3, H, W], alpha
    [V, H, W]."""
    bg = torch.ones(3) if bg is None else bg
    outs = [render(cam, model, bg, backend="torch") for cam in cameras]  # render() moves bg to the model
    rgb = torch.stack([o["render"] for o in outs]).clamp(0, 1)
    alpha = torch.stack([o["alpha"][0] for o in outs]).clamp(0, 1)
    return rgb, alpha


def silhouette_iou(alpha: torch.Tensor, alpha_ref: torch.Tensor, threshold: float = ALPHA_THRESHOLD) -> float:
    """|A and B| / |A or B| of the two thresholded silhouettes, pooled over all views ([V, H, W] each)."""
    a, b = alpha > threshold, alpha_ref > threshold
    union = (a | b).sum().item()
    return float((a & b).sum().item() / union) if union else 0.0


def colour_error(rgb: torch.Tensor, rgb_ref: torch.Tensor, alpha: torch.Tensor, alpha_ref: torch.Tensor,
                 threshold: float = ALPHA_THRESHOLD) -> float:
    """Mean absolute RGB difference (0..1) over the pixels inside both silhouettes; 1.0 when they do not overlap."""
    both = (alpha > threshold) & (alpha_ref > threshold)  # [V, H, W]
    if not both.any():
        return 1.0
    diff = (rgb - rgb_ref).abs().mean(dim=1)  # [V, H, W]
    return float(diff[both].mean())


def mean_colour(rgb: torch.Tensor, alpha: torch.Tensor, threshold: float = ALPHA_THRESHOLD) -> torch.Tensor:
    """Mean colour [3] inside the silhouette (the background's colour when it is empty)."""
    mask = alpha > threshold
    if not mask.any():
        return rgb.mean(dim=(0, 2, 3))
    return rgb.permute(1, 0, 2, 3)[:, mask].mean(dim=1)


@dataclass
class Scaled:
    """A model seen scaled by s about the origin (positions and Gaussian scales; a radiance field's box, step and
    field sigma_s(x) = sigma(x / s), colours alike), for the renderer."""
    model: object
    s: float

    def __getattr__(self, name):
        value = getattr(self.model, name)
        return value * self.s if name in ("get_xyz", "get_scaling", "bound", "render_step") else value

    def query(self, x: torch.Tensor):
        return self.model.query(x / self.s)

    def occupied(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.occupied(x / self.s)


SCALES = tuple(float(v) for v in np.geomspace(0.4, 2.5, 11))  # the scale search: 0.4x to 2.5x, ~20% steps


@torch.no_grad()
def scale_aligned_iou(model, reference, cameras, scales=SCALES) -> tuple[float, float]:
    """(best IoU, its scale) of the model scaled about the origin by each of `scales` against a reference model.
    The toy prior fixes shape and colour but barely the object's size (its images span a 4x range of apparent size),
    so this separates "the right shape" from "the right size"."""
    return best_scale(scaled_silhouettes(model, cameras, scales), views(reference, cameras)[1])


@torch.no_grad()
def scaled_silhouettes(model, cameras, scales=SCALES) -> dict[float, torch.Tensor]:
    """scale -> alpha [V, H, W] of the model scaled by it about the origin (rendered once, compared with many)."""
    return {s: views(Scaled(model, s), cameras)[1] for s in scales}


def best_scale(alphas: dict[float, torch.Tensor], ref_alpha: torch.Tensor) -> tuple[float, float]:
    """(best IoU, its scale) over `scaled_silhouettes` against a reference's alpha."""
    return max((silhouette_iou(alpha, ref_alpha), s) for s, alpha in alphas.items())


@functools.lru_cache(maxsize=128)
def reference_views(obj: ToyObject, resolution: int, n_views: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The ground-truth object's first `n_views` evaluation views (`views`), computed once per process: every
    scored model of a study compares with the same few objects."""
    return views(object_splats(obj), score_cameras(resolution)[:n_views])


def score_model(model, prompt: str, resolution: int = SCORE_RESOLUTION, vae=None) -> dict:
    """Scores of `model` against the object `prompt` names (toyworld.world.parse_prompt):

    iou, colour_error: against that object; aligned_iou / aligned_scale: the IoU after the best uniform scale
    about the origin (`scale_aligned_iou`, 8 horizontal views at 32 px); shape_ious: aligned IoU against each shape
    in the prompt's colour, and best_shape its argmax; colour_distances: distance of the model's mean colour inside
    its silhouette to each colour's ground-truth mean (the prompt's shape), and nearest_colour its argmin;
    shape_ok / colour_ok. With `vae` (the prior's AutoencoderKL), also the colour as the prior sees it: the views
    through the autoencoder, against the references through it likewise (round_trip_colour, _colour_distances,
    _nearest_colour, _colour_ok). A model can render one colour and encode as another: stage 2 only asks that the
    encoder's latents look right."""
    target = parse_prompt(prompt)
    rgb, alpha = views(model, score_cameras(resolution))
    scaled = scaled_silhouettes(model, score_cameras(32)[:8])
    shape_ious, scales = {}, {}
    for shape in SHAPES:
        ref_alpha = reference_views(ToyObject(shape, target.colour), 32, 8)[1]
        shape_ious[shape], scales[shape] = best_scale(scaled, ref_alpha)
    gt_rgb, gt_alpha = reference_views(target, resolution)
    ours = mean_colour(rgb, alpha)
    colour_distances, nearest = nearest_colour(ours, target.shape, resolution)
    best_shape = max(shape_ious, key=shape_ious.get)
    out = {"prompt": prompt, "object": target.text, "iou": silhouette_iou(alpha, gt_alpha),
           "aligned_iou": shape_ious[target.shape], "aligned_scale": scales[target.shape],
           "colour_error": colour_error(rgb, gt_rgb, alpha, gt_alpha), "shape_ious": shape_ious,
           "best_shape": best_shape, "shape_ok": best_shape == target.shape,
           "colour_distances": colour_distances, "nearest_colour": nearest, "colour_ok": nearest == target.colour,
           "mean_colour": [float(v) for v in ours]}
    if vae is not None:
        trip = mean_colour(round_trip(rgb, vae), alpha)
        trip_distances, trip_nearest = nearest_colour(trip, target.shape, resolution, vae)
        out.update({"round_trip_colour": [float(v) for v in trip], "round_trip_colour_distances": trip_distances,
                    "round_trip_nearest_colour": trip_nearest, "round_trip_colour_ok": trip_nearest == target.colour})
    return out


def round_trip(rgb: torch.Tensor, vae) -> torch.Tensor:
    """Views [V, 3, H, W] in [0, 1] through the prior's autoencoder (decode of the encoder's mean): what the prior
    sees of them, since stage 2's gradient reaches the pixels only through the encoder."""
    from toyworld.train_clip import autoencoder_round_trip

    return autoencoder_round_trip(rgb, torch.ones(len(rgb), dtype=torch.bool), vae)


def nearest_colour(ours: torch.Tensor, shape: str, resolution: int, vae=None) -> tuple[dict[str, float], str]:
    """Distance of a mean colour [3] to each colour's ground-truth mean (`shape` in that colour, no purple front,
    its evaluation views; with `vae` those views go through the autoencoder too), and the nearest colour."""
    distances = {c: float((reference_colour(ToyObject(shape, c, False), resolution, vae) - ours).norm())
                 for c in COLOURS}
    return distances, min(distances, key=distances.get)


@functools.lru_cache(maxsize=64)
def reference_colour(obj: ToyObject, resolution: int, vae=None) -> torch.Tensor:
    """The ground-truth object's mean colour [3] inside its silhouette over its evaluation views (through `vae`'s
    round trip when given), computed once per process and autoencoder."""
    rgb, alpha = reference_views(obj, resolution)
    return mean_colour(rgb if vae is None else round_trip(rgb, vae), alpha)


def strip(model, prompt: str, resolution: int = SCORE_RESOLUTION, vae=None) -> np.ndarray:
    """A picture [2H, 8W, 3] uint8: the model's 8 elevation-0 evaluation views above the ground truth's; with `vae`
    [3H, 8W, 3], the model's views through the autoencoder between them."""
    cams = score_cameras(resolution)[:8]
    rgb, _ = views(model, cams)
    gt, _ = views(object_splats(parse_prompt(prompt)), cams)
    rows = [torch.cat(list(x), dim=2) for x in (rgb, *([round_trip(rgb, vae)] if vae is not None else []), gt)]
    return (torch.cat(rows, dim=1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def main(argv=None) -> int:
    from arguments import RunError
    from scene.nerf_io import load_model
    from stages.run import model_source
    from utils.files import write_text_atomic
    from utils.image_io import save_png

    p = argparse.ArgumentParser(description="Score a run's final model against the toy world's ground truth.")
    p.add_argument("workspace", help="a finished run folder (output/<workspace>) of a toy-world prompt, or a PLY")
    p.add_argument("--prompt", help="the prompt (default: the run's saved config)")
    p.add_argument("--round-trip", action="store_true",
                   help="also the colour as the prior sees it: the views through the run's prior's autoencoder "
                        "(a middle row in toy_score_views.png)")
    args = p.parse_args(argv)
    run = Path(args.workspace)
    try:
        ply, cfg = model_source(run)
        prompt = args.prompt or cfg.GuidanceParams.text
        model = load_model(ply)  # Gaussians (PLY, its own SH degree) or a NeRF run's nerf.safetensors
        vae = None
        if args.round_trip:
            from guidance.sd_utils import resolve_model_key
            from toyworld.train_clip import load_autoencoder
            key = cfg.GuidanceParams.model_key if run.is_dir() else "toy"  # a bare PLY: the toy prior
            vae = load_autoencoder(Path(resolve_model_key(key)))
        scores = score_model(model, prompt, vae=vae)
    except (RunError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    folder = run if run.is_dir() else ply.parent
    write_text_atomic(folder / "toy_score.json", json.dumps(scores, indent=1))
    save_png(torch.from_numpy(strip(model, prompt, vae=vae)).permute(2, 0, 1).float() / 255,
             folder / "toy_score_views.png")
    keys = ("object", "iou", "aligned_iou", "aligned_scale", "colour_error", "best_shape", "nearest_colour",
            *(("round_trip_nearest_colour",) if vae is not None else ()))
    print(json.dumps({k: scores[k] for k in keys}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
