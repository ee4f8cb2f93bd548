"""Project-only speed-ups of guidance/ptd_utils.py's LoRA scale control (ptd_utils stays the file to copy alone).

Merged mode (`merge_lora`, opt-in: PTDParams.merge_lora): the path adapter stays parked and the base Linear weights
carry it, W = W0 + w * (lora_alpha / r) * B A, rewritten from the saved W0 at each change of w. A UNet call then costs
what the base network's does: on an H200, where SD 2.1 UNet calls are bound by kernel launches, peft's low-rank
branch made a call 41% slower at w > 0; merged mode halves PTD's per-iteration overhead there (docs/benchmarks.md).
It costs a copy of the adapted weights (~0.2 GB for SD 2.1-base's attention projections in fp16) and one rewrite per
change of w; in half precision the merged weight is rounded once (the branch rounds its products instead).

Parking (in ptd_utils, because exactness needs it) also saves time: at w = 0, most of stage 2, the branch is not
computed. Both are exact at w = 0: the output is the base network's bit for bit (merged mode copies W0 back).

The project calls `set_scale`, `scale`, `load_adapter_weights` and `make_tracer` from here: ptd_utils' functions of
the same contract that also keep merged weights in step with the scale and the factors.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

import torch

from guidance import ptd_utils
from guidance.ptd_utils import PathTracer, _finite, _lora_layers, _pairs, _scale_adapter, _set_branch

__all__ = ["merge_lora", "set_scale", "scale", "load_adapter_weights", "make_tracer"]

# On a layer in merged mode: [adapter, W0 (the base weight before merging), the scaling last written]
_MERGE_ATTR = "_ptd_merged"


def _merged(layer: torch.nn.Module, adapter: str) -> list | None:
    state = layer.__dict__.get(_MERGE_ATTR)
    return state if state is not None and state[0] == adapter else None


def _write(layer: torch.nn.Module, adapter: str, force: bool = False) -> None:
    """base weight = W0 + scaling * B A, summed in (at least) float32 and rounded once to the weight's dtype; exactly
    W0 at scaling 0. Skipped when the scaling is the one last written, unless `force` (new factors)."""
    state = layer.__dict__[_MERGE_ATTR]
    original, scaling = state[1], layer.scaling[adapter]
    if scaling == state[2] and not force:
        return
    state[2] = scaling
    weight = layer.get_base_layer().weight
    with torch.no_grad():
        if scaling == 0.0:
            weight.copy_(original)
        else:
            a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight  # [r, in], [out, r]
            acc = torch.promote_types(original.dtype, torch.float32)  # fp16/bf16 -> fp32, fp64 stays
            weight.copy_(torch.addmm(original.to(acc), b.to(acc), a.to(acc), alpha=scaling))


def _check_mergeable(layer: torch.nn.Module, adapter: str) -> None:
    base = layer.get_base_layer() if callable(getattr(layer, "get_base_layer", None)) else None
    factors = [holder[adapter] if adapter in holder else None
               for holder in (getattr(layer, "lora_A", {}), getattr(layer, "lora_B", {}))]
    if (not isinstance(base, torch.nn.Linear) or not all(isinstance(f, torch.nn.Linear) for f in factors)
            or getattr(layer, "fan_in_fan_out", False)):
        raise ValueError(f"merge_lora: {type(base).__name__} layer cannot merge adapter '{adapter}' (only nn.Linear "
                         "layers with Linear LoRA factors, not fan_in_fan_out, can); use the unmerged branch")
    other = layer.__dict__.get(_MERGE_ATTR)
    if other is not None and other[0] != adapter:
        raise ValueError(f"merge_lora: a layer already carries merged adapter '{other[0]}'; unmerge it first")


def merge_lora(model: torch.nn.Module, adapter_name: str, enabled: bool = True) -> None:
    """Switch `adapter_name` to merged mode (enabled) or back to peft's low-rank branch (not enabled).

    In merged mode `set_scale`, `scale` and `load_adapter_weights` of this module work as before, but each change
    rewrites the adapted layers' weights instead of scaling a branch. Switching back restores every W0 exactly.
    """
    pairs = _pairs(model, adapter_name)  # also refuses an adapter that peft itself merged
    if not enabled:
        for layer, adapter in pairs:
            state = _merged(layer, adapter)
            if state is not None:
                with torch.no_grad():
                    layer.get_base_layer().weight.copy_(state[1])
                del layer.__dict__[_MERGE_ATTR]
                _set_branch(layer, adapter, layer.scaling[adapter] != 0.0)
        return
    for layer, adapter in pairs:
        _check_mergeable(layer, adapter)
    for layer, adapter in pairs:
        if _merged(layer, adapter) is None:
            layer.__dict__[_MERGE_ATTR] = [adapter, layer.get_base_layer().weight.detach().clone(), None]
        _set_branch(layer, adapter, False)  # parked for good: the weight carries the adapter
        _write(layer, adapter, force=True)


def set_scale(model: torch.nn.Module, weight: float, adapter_name: str | None = None) -> None:
    """ptd_utils.set_lora_scale (same contract: parked at weight 0), which in merged mode rewrites the weights."""
    weight = _finite(weight)
    for layer, adapter in _pairs(model, adapter_name):
        if _merged(layer, adapter) is None:
            _scale_adapter(layer, adapter, weight, strict=adapter_name is not None)
        else:
            _set_branch(layer, adapter, False)  # parked again if anyone re-activated it: the weight carries it
            layer.set_scale(adapter, weight)
            _write(layer, adapter)


@contextlib.contextmanager
def scale(model: torch.nn.Module, weight: float, adapter_name: str | None = None) -> Iterator[None]:
    """ptd_utils.lora_scale with `set_scale`: on exit (also on error) the previous scalings, the parking at 0 and the
    merged weights come back."""
    saved = [(layer, a, layer.scaling[a]) for layer, a in _pairs(model, adapter_name)]
    set_scale(model, weight, adapter_name)
    try:
        yield
    finally:
        for layer, adapter, scaling in saved:
            layer.scaling[adapter] = scaling
            if _merged(layer, adapter) is None:
                _set_branch(layer, adapter, scaling != 0.0)
            else:
                _write(layer, adapter)


def load_adapter_weights(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], adapter_name: str) -> None:
    """ptd_utils.load_adapter_weights, then merged weights rewritten with the new factors at the current scale."""
    ptd_utils.load_adapter_weights(model, state_dict, adapter_name)
    for layer in _lora_layers(model, adapter_name):
        if _merged(layer, adapter_name) is not None:
            _write(layer, adapter_name, force=True)


def make_tracer(mode: str, model: torch.nn.Module, *, merge: bool = False, **tracer_kwargs) -> PathTracer:
    """A PathTracer (same arguments) that scales and loads through this module; merge=True switches `model`'s
    adapter (already loaded) to merged mode right away."""
    tracer_kwargs.setdefault("set_scale", set_scale)
    tracer_kwargs.setdefault("loader", load_adapter_weights)
    tracer = PathTracer(mode, **tracer_kwargs)  # first, so that a bad configuration leaves the model untouched
    if merge:
        merge_lora(model, tracer.adapter_name)
    return tracer
