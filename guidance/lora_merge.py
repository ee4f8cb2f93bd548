"""Project-only speed-ups of guidance/ptd_utils.py's LoRA scale control (ptd_utils stays the file to copy alone).

The fold (`fold_lora`; PTDParams.fold_lora, on by default on CUDA): the path adapter is folded into the base Linear
weights, W_l = W0_l + w * delta_l with delta_l = s_l B_l A_l (s_l = lora_alpha / r, peft's scaling at w = 1),
computed once per layer when the adapter is folded or new factors are loaded. Each change of w rewrites all adapted
weights IN PLACE with two multi-tensor ops (`torch._foreach_copy_` of W0, `torch._foreach_add_` of w * delta): the
weights keep their storage, so CUDA graphs captured over the UNet (PipelineParams.compile) stay valid; w = 0 copies
W0 back, the base network bit for bit. While folded, peft's LoRA wrappers are out of the call path: each sits aside
and its parent holds its base nn.Linear (the same parameters), so a UNet call costs what the base network's does (on
an H200, where SD 2.1 UNet calls are bound by kernel launches, peft's branch made a call 41% slower at w > 0 and its
wrapper alone 5%, docs/benchmarks.md). Unfolding restores W0 and the wrappers. Costs: W0 and delta, two copies of the
adapted weights (~0.2 GB each for SD 2.1-base's attention projections in fp16); in half precision delta is rounded
once to the weight dtype and W once more (the branch rounds its products instead).

Parking (in ptd_utils, because exactness needs it) also saves time on the branch: at w = 0 it is not computed.

The project calls `set_scale`, `scale`, `load_adapter_weights` and `make_tracer` from here: ptd_utils' functions of
the same contract that also keep folded weights in step with the scale and the factors.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch

from guidance import ptd_utils
from guidance.ptd_utils import _PARK_ATTR, PathTracer, _finite, _is_lora_layer, _pairs, _scale_adapter, _set_branch

__all__ = ["fold_lora", "folded_adapter", "lora_scalings", "set_scale", "scale", "load_adapter_weights",
           "make_tracer"]

_FOLD_ATTR = "_ptd_fold"  # on the model: its _Fold while an adapter is folded


@dataclass
class _Fold:
    """One folded adapter: the wrappers set aside, where they sat, and the per-layer tensors of W = W0 + w delta."""
    adapter: str
    layers: list[torch.nn.Module]  # peft LoraLayer wrappers, out of the call path
    sites: list[tuple[torch.nn.Module, str]]  # (parent, attribute name) each wrapper sat at
    weights: list[torch.Tensor]  # the base Linear weights, [out, in] each, written in place
    w0: list[torch.Tensor]  # their values before folding
    deltas: list[torch.Tensor]  # s B A per layer, in the weight's dtype
    weight: float = 0.0  # the w the weights carry now


def folded_adapter(model: torch.nn.Module) -> str | None:
    """The adapter folded into `model`'s weights, or None."""
    fold = model.__dict__.get(_FOLD_ATTR)
    return fold.adapter if fold is not None else None


def _fold_of(model: torch.nn.Module, adapter_name: str | None) -> _Fold | None:
    fold = model.__dict__.get(_FOLD_ATTR)
    return fold if fold is not None and adapter_name in (None, fold.adapter) else None


def _check_foldable(layer: torch.nn.Module, adapter: str) -> None:
    base = layer.get_base_layer() if callable(getattr(layer, "get_base_layer", None)) else None
    factors = [holder[adapter] if adapter in holder else None
               for holder in (getattr(layer, "lora_A", {}), getattr(layer, "lora_B", {}))]
    if (not isinstance(base, torch.nn.Linear) or not all(isinstance(f, torch.nn.Linear) and f.bias is None
                                                          for f in factors)
            or getattr(layer, "fan_in_fan_out", False) or adapter in getattr(layer, "lora_variant", {})):
        raise ValueError(f"fold_lora: {type(base).__name__} layer cannot fold adapter '{adapter}' (only nn.Linear "
                         "layers with bias-free Linear LoRA factors, not fan_in_fan_out nor DoRA, can); set "
                         "PTDParams.fold_lora=off")
    others = sorted(set(layer.scaling) - {adapter})
    if others:
        raise ValueError(f"fold_lora: a layer of adapter '{adapter}' also holds adapter(s) {others}, which taking "
                         "peft's wrapper out of the call path would drop; fuse or delete them first")
    if getattr(layer, "disable_adapters", False) or (adapter not in layer.active_adapters
                                                     and not _parked(layer, adapter)):
        raise ValueError(f"fold_lora: adapter '{adapter}' is disabled or inactive (peft skips it), but once folded it "
                         f"would act at any non-zero weight; activate it first, e.g. unet.enable_lora() and "
                         f"unet.set_adapters(['{adapter}']), or set PTDParams.fold_lora=off")


def _parked(layer: torch.nn.Module, adapter: str) -> bool:
    """Whether `adapter` is out of `layer`'s active adapters because ptd_utils parked it at w = 0 (its weight, not
    the user, turned it off), by ptd_utils._set_branch's record, which a later change of the active adapters voids."""
    state = layer.__dict__.get(_PARK_ATTR)
    return state is not None and layer.active_adapter is state[1] and adapter in state[0]


def _deltas_into(fold: _Fold, out: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """delta_l = s_l B_l A_l, summed in (at least) float32 and rounded once to the weight dtype; written into `out`
    (same storage) when given."""
    deltas = []
    for i, (layer, weight) in enumerate(zip(fold.layers, fold.weights)):
        a, b = layer.lora_A[fold.adapter].weight, layer.lora_B[fold.adapter].weight  # [r, in], [out, r]
        acc = torch.promote_types(weight.dtype, torch.float32)  # fp16/bf16 -> fp32, fp64 stays
        unit = _scaling_at(layer, fold.adapter)
        delta = torch.mm(b.detach().to(acc), a.detach().to(acc)).mul_(unit).to(weight.dtype)
        deltas.append(out[i].copy_(delta) if out is not None else delta)
    return deltas


def _scaling_at(layer: torch.nn.Module, adapter: str, weight: float = 1.0) -> float:
    """peft's scaling of `adapter` at w = `weight` (w lora_alpha / r, or / sqrt(r) with rsLoRA; the unit scaling at
    1), read through set_scale, the layer left as it was."""
    now = layer.scaling[adapter]
    layer.set_scale(adapter, weight)
    unit = layer.scaling[adapter]
    layer.scaling[adapter] = now
    return unit


def lora_scalings(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, float]]:
    """Every (peft LoRA layer, adapter, scaling) of `model`, in module order, as if nothing were folded: the layers of
    a folded adapter (out of the module tree) in their places, with the scaling peft's branch has at the folded w.
    So a network reads the same folded or not (evaluation.ood.network_fingerprint); the tree is left untouched."""
    fold = model.__dict__.get(_FOLD_ATTR)
    wrappers = {id(layer.get_base_layer()): layer for layer in fold.layers} if fold is not None else {}
    out = []
    for module in model.modules():
        layer = wrappers.get(id(module), module)
        if not _is_lora_layer(layer):
            continue
        for adapter, scaling in sorted(layer.scaling.items()):
            if fold is not None and adapter == fold.adapter and layer is not module:
                scaling = _scaling_at(layer, adapter, fold.weight)
            out.append((layer, adapter, float(scaling)))
    return out


@torch.no_grad()
def _write(fold: _Fold, weight: float, force: bool = False) -> None:
    """W = W0 + weight * delta over all layers in place (W0 exactly at 0); the wrappers' scalings follow, so that
    unfolding (and anyone reading them) finds the same w. Skipped when `weight` is already written, unless `force`."""
    if weight == fold.weight and not force:
        return
    torch._foreach_copy_(fold.weights, fold.w0)
    if weight != 0.0:
        torch._foreach_add_(fold.weights, fold.deltas, alpha=weight)
    fold.weight = weight
    for layer in fold.layers:
        layer.set_scale(fold.adapter, weight)


def _sites(model: torch.nn.Module, layers: list[torch.nn.Module]) -> list[tuple[torch.nn.Module, str]]:
    where = {id(child): (parent, name) for parent in model.modules() for name, child in parent._modules.items()
             if child is not None}
    return [where[id(layer)] for layer in layers]


def _current_weight(pairs: list[tuple[torch.nn.Module, str]]) -> float:
    """The one w the layers carry (0 where the adapter is parked or inactive)."""
    weights = {0.0 if a not in layer.active_adapters else layer.scaling[a] / _scaling_at(layer, a)
               for layer, a in pairs}
    if len(weights) != 1:
        raise ValueError(f"fold_lora: the layers carry different weights {sorted(weights)}; set one with "
                         "lora_merge.set_scale first")
    return weights.pop()


def fold_lora(model: torch.nn.Module, adapter_name: str, enabled: bool = True) -> None:
    """Fold `adapter_name` into the base weights at its current weight, peft's wrappers out of the call path
    (enabled), or unfold: W0 back bit for bit and the wrappers back in place, on peft's branch at the same weight.

    While folded, `set_scale`, `scale` and `load_adapter_weights` of this module work as before, each change writing
    the weights in place. Folding an adapter that is folded already does nothing."""
    fold = model.__dict__.get(_FOLD_ATTR)
    if not enabled:
        if fold is None:
            return
        with torch.no_grad():
            torch._foreach_copy_(fold.weights, fold.w0)  # W0 exactly
        for (parent, name), layer in zip(fold.sites, fold.layers):
            setattr(parent, name, layer)
        del model.__dict__[_FOLD_ATTR]
        for layer in fold.layers:  # peft's branch at the folded weight (parked at 0)
            _scale_adapter(layer, fold.adapter, fold.weight, strict=False)
        return
    if fold is not None:
        if fold.adapter != adapter_name:
            raise ValueError(f"fold_lora: adapter '{fold.adapter}' is folded into this model; unfold it first")
        return
    pairs = _pairs(model, adapter_name)  # also refuses an adapter that peft itself merged
    for layer, adapter in pairs:
        _check_foldable(layer, adapter)
    weight = _current_weight(pairs)
    layers = [layer for layer, _ in pairs]
    weights = [layer.get_base_layer().weight for layer in layers]
    fold = _Fold(adapter_name, layers, _sites(model, layers), weights, [w.detach().clone() for w in weights], [])
    fold.deltas = _deltas_into(fold)
    for (parent, name), layer in zip(fold.sites, layers):
        setattr(parent, name, layer.get_base_layer())  # same Linear, same Parameter objects
    model.__dict__[_FOLD_ATTR] = fold
    _write(fold, weight, force=True)


@contextlib.contextmanager
def _wrappers_in(fold: _Fold) -> Iterator[None]:
    """peft's wrappers back in the module tree inside (their parameters visible by name), set aside again after."""
    for (parent, name), layer in zip(fold.sites, fold.layers):
        setattr(parent, name, layer)
    try:
        yield
    finally:
        for (parent, name), layer in zip(fold.sites, fold.layers):
            setattr(parent, name, layer.get_base_layer())


def _unfolded_pairs(model: torch.nn.Module, adapter_name: str | None, fold: _Fold | None) -> list:
    """(layer, adapter) pairs ptd_utils scales: all of them, less those of the fold."""
    if fold is not None and adapter_name == fold.adapter:
        return []
    pairs = _pairs(model, adapter_name)
    return pairs if fold is None else [(layer, a) for layer, a in pairs if a != fold.adapter]


def set_scale(model: torch.nn.Module, weight: float, adapter_name: str | None = None) -> None:
    """ptd_utils.set_lora_scale (same contract: parked at weight 0), which rewrites the weights of a folded adapter."""
    weight = _finite(weight)
    fold = _fold_of(model, adapter_name)
    for layer, adapter in _unfolded_pairs(model, adapter_name, fold):
        _scale_adapter(layer, adapter, weight, strict=adapter_name is not None)
    if fold is not None:
        _write(fold, weight)


@contextlib.contextmanager
def scale(model: torch.nn.Module, weight: float, adapter_name: str | None = None) -> Iterator[None]:
    """ptd_utils.lora_scale with `set_scale`: on exit (also on error) the previous scalings, the parking at 0 and the
    folded weights come back."""
    fold = _fold_of(model, adapter_name)
    saved = [(layer, a, layer.scaling[a]) for layer, a in _unfolded_pairs(model, adapter_name, fold)]
    folded_weight = fold.weight if fold is not None else None
    set_scale(model, weight, adapter_name)
    try:
        yield
    finally:
        for layer, adapter, scaling in saved:
            layer.scaling[adapter] = scaling
            _set_branch(layer, adapter, scaling != 0.0)
        if fold is not None:
            _write(fold, folded_weight)


def load_adapter_weights(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], adapter_name: str) -> None:
    """ptd_utils.load_adapter_weights; a folded adapter's deltas are recomputed (in their storage) and its weights
    rewritten at the current w."""
    fold = _fold_of(model, adapter_name)
    if fold is None:
        ptd_utils.load_adapter_weights(model, state_dict, adapter_name)
        return
    with _wrappers_in(fold):
        ptd_utils.load_adapter_weights(model, state_dict, adapter_name)
    _deltas_into(fold, out=fold.deltas)
    _write(fold, fold.weight, force=True)


def make_tracer(mode: str, model: torch.nn.Module, *, fold: bool = False, **tracer_kwargs) -> PathTracer:
    """A PathTracer (same arguments) that scales and loads through this module; fold=True folds `model`'s adapter
    (already loaded) right away."""
    tracer_kwargs.setdefault("set_scale", set_scale)
    tracer_kwargs.setdefault("loader", load_adapter_weights)
    tracer = PathTracer(mode, **tracer_kwargs)  # first, so that a bad configuration leaves the model untouched
    if fold:
        fold_lora(model, tracer.adapter_name)
    return tracer
