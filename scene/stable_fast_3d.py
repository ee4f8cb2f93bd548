"""Stable Fast 3D (SF3D, Stability AI): one picture -> a textured mesh, the initial 3D model of the paper's image-to-3D
runs (App. L). Optional: needs the `sf3d` package, its weights (a gated Hugging Face repository) and a CUDA GPU (its
texture baking runs on CUDA only). scene.initialization falls back to the sphere, with one line saying why, when any
of that is missing. Written against SF3D's run.py (`SF3D.from_pretrained`, `resize_foreground`, `run_image`);
not exercised by the CPU tests.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import torch

SF3D_MODEL = "stabilityai/stable-fast-3d"
SF3D_INSTALL = ("pip install git+https://github.com/Stability-AI/stable-fast-3d (then accept the model's licence on "
                "huggingface.co/stabilityai/stable-fast-3d and log in)")
# share of the picture the object fills before SF3D sees it (SF3D's run.py default)
FOREGROUND_RATIO = 0.85
# texture atlas side in pixels (SF3D's run.py default)
TEXTURE_RESOLUTION = 1024


def sf3d_unavailable(device) -> str | None:
    """Why SF3D cannot run here (one phrase), or None when it can."""
    try:
        found = importlib.util.find_spec("sf3d") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return f"the sf3d package is not importable; install it with {SF3D_INSTALL}"
    if device is None or torch.device(device).type != "cuda":
        return f"SF3D bakes its texture on CUDA only and this run's device is {device}"
    return None


def sf3d_mesh(rgb: np.ndarray, mask: np.ndarray, out_path: str, device) -> None:
    """Run SF3D on the picture (rgb [H, W, 3] and mask [H, W] in [0, 1]) and write its mesh as a glb (glTF axes: Y
    up) to out_path."""
    from PIL import Image
    from sf3d.system import SF3D
    from sf3d.utils import resize_foreground

    rgba = np.concatenate([rgb, mask[..., None]], axis=-1)
    image = Image.fromarray((rgba * 255.0).round().astype(np.uint8), "RGBA")
    image = resize_foreground(image, FOREGROUND_RATIO)
    model = SF3D.from_pretrained(SF3D_MODEL, config_name="config.yaml", weight_name="model.safetensors")
    model.to(device).eval()
    with torch.no_grad(), torch.autocast(device_type=torch.device(device).type, dtype=torch.float16):
        mesh, _ = model.run_image(image, bake_resolution=TEXTURE_RESOLUTION, remesh="none")
    mesh.export(out_path, include_normals=True)
