"""The few diffusers calls whose spelling changed between the oldest supported release and the pinned one.

Oldest combination the LoRA and half-precision tests were run against (`bench/oldest_deps.sh`): diffusers 0.34.0,
peft 0.15.0, transformers 4.44.2, huggingface_hub 0.27.0, accelerate 0.34.2, safetensors 0.4.3 (setup.py's minimums).
What differs:
- `from_pretrained(dtype=...)` exists from diffusers 0.40; before it the keyword is `torch_dtype` and `dtype` is
  dropped with only a log warning (a half-precision load silently comes back float32). `dtype_kwargs` picks the one
  the installed release reads.
- The peft adapter config in a LoRA file's header (`save_lora_weights(unet_lora_adapter_metadata=...)`, read back by
  `load_lora_weights`) exists from 0.34; before it lora_alpha reloads as r. `require_lora_metadata` refuses older.
- Before 0.40, `load_lora_weights(folder)` without `weight_name` raises under HF_HUB_OFFLINE even for a local folder;
  `lora_weight_name` names the file so the call works offline on every release.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

LORA_METADATA_DIFFUSERS = (0, 34)  # save_lora_weights(unet_lora_adapter_metadata=) and reading it back
DTYPE_KEYWORD_DIFFUSERS = (0, 40)  # from_pretrained(dtype=) replaces torch_dtype=
OFFLINE_GUESS_DIFFUSERS = (0, 40)  # load_lora_weights(local folder) finds the file by itself under HF_HUB_OFFLINE
DEFAULT_LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def diffusers_version() -> tuple[int, int]:
    """(major, minor) of the installed diffusers ('0.43.0.dev0' -> (0, 43))."""
    import diffusers

    numbers = re.findall(r"\d+", diffusers.__version__)
    return int(numbers[0]), int(numbers[1])


def dtype_kwargs(dtype: torch.dtype | None) -> dict:
    """The keyword for a diffusers `from_pretrained` load in `dtype`: {'dtype': d} from 0.40, {'torch_dtype': d} before
    (where `dtype=` would be ignored); {} for None."""
    if dtype is None:
        return {}
    return {"dtype": dtype} if diffusers_version() >= DTYPE_KEYWORD_DIFFUSERS else {"torch_dtype": dtype}


def require_lora_metadata(what: str) -> None:
    """One-line RuntimeError unless diffusers stores and restores the peft adapter config (lora_alpha) of a LoRA."""
    if diffusers_version() < LORA_METADATA_DIFFUSERS:
        import diffusers

        need = ".".join(map(str, LORA_METADATA_DIFFUSERS))
        raise RuntimeError(f"{what} needs diffusers>={need} (found {diffusers.__version__}: older releases reload "
                           f"lora_alpha as the rank); pip install 'diffusers>={need}'")


def lora_weight_name(folder: str | os.PathLike) -> str | None:
    """The weight file of a local LoRA folder to pass as `load_lora_weights(..., weight_name=)`: diffusers' default
    name if present, else the folder's only .safetensors file; None (let diffusers choose) if neither applies."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    if (folder / DEFAULT_LORA_WEIGHT_NAME).is_file():
        return DEFAULT_LORA_WEIGHT_NAME
    files = sorted(p.name for p in folder.glob("*.safetensors") if p.is_file())
    return files[0] if len(files) == 1 else None
