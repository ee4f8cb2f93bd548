"""Where a run computes."""
from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """'auto' is CUDA when available, else the CPU; an explicit CUDA device without CUDA is a one-line ValueError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():  # gpu-only
        raise ValueError(f"device '{name}' asked for but CUDA is not available; use device cpu or auto")
    return device
