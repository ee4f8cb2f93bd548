"""Where a run computes."""
from __future__ import annotations

import torch


def resolve_device(name: str, option: str = "device") -> torch.device:
    """'auto' is CUDA when available, else the CPU; an explicit CUDA device without CUDA is a one-line ValueError
    that names the `option` to change (a config key, or a command-line flag such as '--device')."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{option} '{name}' is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():  # gpu-only
        sep = " " if option.startswith("-") else "="
        raise ValueError(f"{option} '{name}' asked for but CUDA is not available; set {option}{sep}cpu or "
                         f"{option}{sep}auto")
    return device
