"""Image-to-3D (paper App. L; the DreamGaussian / Magic123 recipe): a fixed reference view that sees the user's
picture, and the RGB + mask loss there that stage 2 adds to ISM/PTD on the other views.

The reference camera is the front view (azimuth 0) at the default polar angle, radius and fov of GenerateCamParams
(the first test view), un-jittered, at the render size. The picture (`GenerateCamParams.ref_image`) is read, keyed
and fitted to that size by `utils.reference_image` (rules in its docstring); `arguments/checks.py` has already
refused a bad one before anything was written.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from arguments import Config
from gaussian_renderer import render
from scene.cameras import Camera, orbit_camera
from utils.reference_image import fit_to_size, load_reference


@dataclass
class ReferenceView:
    camera: Camera  # the fixed front view
    rgb: torch.Tensor  # [3, H, W] the picture's colours in [0, 1] (0 outside the mask)
    mask: torch.Tensor  # [1, H, W] the picture's mask in [0, 1]


def reference_camera(cam_params, device=None) -> Camera:
    """The front view: azimuth 0, default_polar, default_radius, default_fovy, image_w x image_h, looking at the
    origin, Z up (scene/cameras.py's conventions)."""
    c = cam_params
    return orbit_camera(c.default_radius, c.default_polar, 0.0, c.default_fovy, c.image_w, c.image_h,
                        defaults=(c.default_polar, c.default_azimuth, c.default_radius), device=device)


def load_reference_view(cfg: Config, device: torch.device) -> ReferenceView | None:
    """The run's reference view, or None when GenerateCamParams.ref_image is unset (text-to-3D: stock)."""
    c = cfg.GenerateCamParams
    if c.ref_image is None:
        return None
    ref = fit_to_size(load_reference(c.ref_image), c.image_w, c.image_h)
    rgb = torch.from_numpy(ref.rgb).permute(2, 0, 1).to(device)  # [3, H, W]
    mask = torch.from_numpy(ref.mask)[None].to(device)  # [1, H, W]
    return ReferenceView(camera=reference_camera(c, device), rgb=rgb, mask=mask)


def reference_losses(image: torch.Tensor, alpha: torch.Tensor, ref_rgb: torch.Tensor,
                     ref_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference view's two losses, means over the whole picture (DreamGaussian's normalisation):

        L_rgb  = 1 / (3 H W) sum_{c, p} m_p (I_{c,p} - I^ref_{c,p})^2     colour inside the mask only
        L_mask = 1 / (H W)   sum_p (A_p - m_p)^2                         accumulated opacity against the mask

    Args:
        image: [3, H, W] the render (composited over its background).
        alpha: [1, H, W] its accumulated opacity A.
        ref_rgb: [3, H, W] the picture I^ref.
        ref_mask: [1, H, W] its mask m in [0, 1].
    Returns:
        (L_rgb, L_mask), scalars.
    """
    rgb_loss = (ref_mask * (image - ref_rgb) ** 2).mean()
    mask_loss = ((alpha - ref_mask) ** 2).mean()
    return rgb_loss, mask_loss


def reference_step(cfg: Config, ref: ReferenceView, model, bg: torch.Tensor,
                   render_fn: Callable[..., dict] = render) -> tuple[torch.Tensor, dict]:
    """Render the reference view (no augmentation: no random draw) and return the weighted loss
    lambda_ref_rgb L_rgb + lambda_ref_mask L_mask with its parts for logging. Its gradient moves the model; it adds
    nothing to the densification statistics (stock's come from the guidance views)."""
    o = cfg.OptimizationParams
    pkg = render_fn(ref.camera, model, bg, backend=cfg.PipelineParams.backend,
                    depth_grad=cfg.PipelineParams.depth_grad)
    rgb_loss, mask_loss = reference_losses(pkg["render"], pkg["alpha"], ref.rgb, ref.mask)
    loss = o.lambda_ref_rgb * rgb_loss + o.lambda_ref_mask * mask_loss
    return loss, {"loss/ref_rgb": rgb_loss.item(), "loss/ref_mask": mask_loss.item()}


@torch.no_grad()
def reference_scores(image: torch.Tensor, alpha: torch.Tensor, ref_rgb: torch.Tensor,
                     ref_mask: torch.Tensor) -> dict:
    """How well a render matches the picture: mask IoU (alpha and mask thresholded at 0.5) and the mean absolute
    colour error inside the picture's mask (pixels with m > 0.5)."""
    a, m = alpha[0] > 0.5, ref_mask[0] > 0.5
    iou = float((a & m).sum()) / max(float((a | m).sum()), 1.0)
    error = float((image - ref_rgb).abs().mean(dim=0)[m].mean()) if bool(m.any()) else float("nan")
    return {"mask_iou": iou, "colour_error": error}
