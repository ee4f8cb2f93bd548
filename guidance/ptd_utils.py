"""Path-Tracing Distillation, stage 2 ("tracing the path"), in one file you can copy into any fork.

Self-contained on purpose: it imports only the standard library and torch. The LoRA layers are peft's
(`peft.tuners.lora.LoraLayer`), found by duck typing, so this file works with any diffusers UNet that carries a peft
adapter (LucidDreamer, threestudio, GaussianDreamer, ...).

Paper notation (Alg. 2): s_pretrain is the prior, s_pretrain^LoRA the prior with the path LoRA fitted in stage 1
(Eq. 6), C the "LoRA load strategy" constant and T the number of tracing iterations. At iteration `iter` (1-based)
the score network is s_pretrain + w(iter) * LoRA with

    w(iter) = 1 - ((iter - 1) / T) ** C   for iter <= T,   0 afterwards          (Eq. 8, Alg. 2; T=1000, C=0.3)

and every UNet call of that iteration (ISM inversion, target, prediction) uses the same w. The variant of Eq. 7
instead walks the saved checkpoints s^(n), ..., s^(1), s^(0) = prior in reverse, switching every K iterations.

Use in another fork (five lines; `step` is the 1-based iteration, `pipe` the diffusers pipeline of the guidance):

    from ptd_utils import PathTracer
    pipe.load_lora_weights("outputs/run/path_lora", adapter_name="ptd_path")   # stage-1 output
    tracer = PathTracer("weighted", total_steps=1000, power=0.3, adapter_name="ptd_path")
    for step in range(1, max_steps + 1):                                       # your training loop
        tracer.apply(pipe.unet, step)                                          # before the guidance's UNet calls

Mode "off" (stock behaviour) is simply not creating a tracer. Lower-level tools: `ptd_weight`, `set_lora_scale`,
`get_lora_scale`, `lora_scale` (a context manager).

Exactness (peft 0.21): `LoraLayer.set_scale(adapter, w)` sets `scaling[adapter] = w * lora_alpha / r` (or
`/ sqrt(r)` with rsLoRA) from the layer's own alpha and r, and the forward adds `lora_B(lora_A(x)) * scaling`. So
w = 1 is the LoRA as trained and the output is affine in w. At w = 0 `set_lora_scale` also takes the adapter out of
each layer's active adapters, so peft skips the branch: the output is the base network's bit for bit, and the
low-rank products, which would only be multiplied by 0, are not computed (stage 2 runs most of its iterations at
w = 0). Any non-zero weight activates the adapter again.
"""
from __future__ import annotations

import contextlib
import math
import weakref
from typing import Callable, Iterator, Mapping, Sequence

import torch

__all__ = ["ptd_weight", "linear_weight", "cosine_weight", "SCHEDULES", "set_lora_scale", "get_lora_scale",
           "lora_scale", "load_adapter_weights", "merge_lora", "PathTracer"]

# attribute under which the collected LoRA layers are cached on the model (no module-level state)
_CACHE_ATTR = "_ptd_lora_layers"


# ----------------------------------------------------------------------------------------------------------------------
# w(iter) schedules
# ----------------------------------------------------------------------------------------------------------------------
def _check_step(step: int, total_steps: int) -> None:
    if step < 1:
        raise ValueError(f"step must be 1-based (>= 1), got {step}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")


def ptd_weight(step: int, total_steps: int = 1000, power: float = 0.3) -> float:
    """Path LoRA weight of paper Alg. 2: w(iter) = 1 - ((iter - 1) / T) ** C for iter <= T, else 0.

    Args:
        step: iter, the 1-based training iteration.
        total_steps: T, the iteration after which the prior alone is used (paper: 1000).
        power: C, the "LoRA load strategy" (paper: 0.3; smaller C leaves the LoRA sooner).
    """
    _check_step(step, total_steps)
    if power <= 0:
        raise ValueError(f"power must be > 0, got {power}")
    if step > total_steps:
        return 0.0
    return 1.0 - ((step - 1) / total_steps) ** power


def linear_weight(step: int, total_steps: int = 1000, power: float = 1.0) -> float:
    """w(iter) = 1 - (iter - 1) / T for iter <= T, else 0 (`power` is ignored; same as ptd_weight with C = 1)."""
    _check_step(step, total_steps)
    return 0.0 if step > total_steps else 1.0 - (step - 1) / total_steps


def cosine_weight(step: int, total_steps: int = 1000, power: float = 1.0) -> float:
    """w(iter) = (1 + cos(pi (iter - 1) / T)) / 2 for iter <= T, else 0 (`power` is ignored)."""
    _check_step(step, total_steps)
    return 0.0 if step > total_steps else 0.5 * (1.0 + math.cos(math.pi * (step - 1) / total_steps))


# name -> w(step, total_steps, power); every schedule is 1 at step 1 and 0 after total_steps
SCHEDULES: Mapping[str, Callable[[int, int, float], float]] = {
    "power": ptd_weight, "linear": linear_weight, "cosine": cosine_weight}


# ----------------------------------------------------------------------------------------------------------------------
# LoRA scale control
# ----------------------------------------------------------------------------------------------------------------------
def _is_lora_layer(module: torch.nn.Module) -> bool:
    """peft's LoraLayer, by duck typing (so that this file never imports peft)."""
    return (callable(getattr(module, "set_scale", None)) and isinstance(getattr(module, "scaling", None), dict)
            and isinstance(getattr(module, "lora_alpha", None), dict) and isinstance(getattr(module, "r", None), dict))


def _lora_layers(model: torch.nn.Module, adapter_name: str | None) -> list[torch.nn.Module]:
    """The LoRA layers of `model` that hold `adapter_name` (None: any adapter); collected once, cached on the model.

    The cache is keyed by the model's adapters (`model.peft_config`: names and config objects, which the cache holds so
    their ids stay unique), so adding, deleting or unloading and reloading an adapter recollects.
    """
    configs = getattr(model, "peft_config", None) or {}
    signature = tuple(sorted((name, id(config)) for name, config in configs.items()))
    cached = model.__dict__.get(_CACHE_ATTR)
    if cached is None or cached[0] != signature or not cached[1]:
        # (signature, all LoRA layers, the configs, adapter name -> its layers)
        cached = (signature, tuple(m for m in model.modules() if _is_lora_layer(m)), tuple(configs.values()), {})
        object.__setattr__(model, _CACHE_ATTR, cached)  # plain attribute: not a submodule, not in state_dict
    layers = cached[3].get(adapter_name)
    if layers is None:
        layers = [m for m in cached[1] if adapter_name is None or adapter_name in m.scaling]
        if layers:
            cached[3][adapter_name] = layers
    if not layers:
        what = "any LoRA adapter" if adapter_name is None else f"LoRA adapter '{adapter_name}'"
        raise ValueError(f"{type(model).__name__} has no layer with {what}; load one first, e.g. "
                         f"pipe.load_lora_weights(folder, adapter_name='{adapter_name or 'ptd_path'}')")
    return layers


def _adapters(layer: torch.nn.Module, adapter_name: str | None) -> tuple[str, ...]:
    names = tuple(layer.scaling) if adapter_name is None else (adapter_name,)
    merged = getattr(layer, "merged_adapters", None)
    if merged and any(name in merged for name in names):
        raise ValueError(f"LoRA adapter(s) {sorted(set(merged).intersection(names))} are merged into the base "
                         "weights, where a scale has no effect: call unet.unmerge_adapter() (or unfuse_lora()) first")
    return names


def _unit_scaling(layer: torch.nn.Module, adapter: str) -> float:
    """lora_alpha / r of this layer (lora_alpha / sqrt(r) with rsLoRA): the scaling of weight 1, as in peft."""
    r = layer.r[adapter]
    use_rslora = getattr(layer, "use_rslora", {}).get(adapter, False)
    return layer.lora_alpha[adapter] / (math.sqrt(r) if use_rslora else r)


# Weight 0 "parks" an adapter: it leaves the layer's active list (peft's `_active_adapter`), so peft skips its branch
# (no low-rank products; the output is the base layer's, bit for bit). A layer holds (the active list before parking,
# the list set by parking, the parked adapters) under this attribute; any other change of the active list since
# (set_adapter, set_adapters, add_adapter) wins: the parking is then forgotten, never undone over it.
_PARK_ATTR = "_ptd_parked"


def _park(layer: torch.nn.Module, adapter: str) -> None:
    current = layer.__dict__.get("_active_adapter")
    if current is None:  # not peft's layout: keep computing the branch at scale 0
        return
    state = layer.__dict__.get(_PARK_ATTR)
    if state is None or current is not state[1]:
        state = (current, None, frozenset())
    original = [state[0]] if isinstance(state[0], str) else list(state[0])
    if adapter not in original or adapter in state[2]:
        return
    parked = state[2] | {adapter}
    now = [name for name in original if name not in parked]
    layer.__dict__["_active_adapter"] = now
    layer.__dict__[_PARK_ATTR] = (state[0], now, parked)


def _unpark(layer: torch.nn.Module, adapter: str) -> None:
    state = layer.__dict__.get(_PARK_ATTR)
    if state is None or adapter not in state[2]:
        return
    if layer.__dict__.get("_active_adapter") is not state[1]:  # the active list was changed by someone else
        del layer.__dict__[_PARK_ATTR]
        return
    parked = state[2] - {adapter}
    if not parked:
        layer.__dict__["_active_adapter"] = state[0]
        del layer.__dict__[_PARK_ATTR]
        return
    original = [state[0]] if isinstance(state[0], str) else list(state[0])
    now = [name for name in original if name not in parked]
    layer.__dict__["_active_adapter"] = now
    layer.__dict__[_PARK_ATTR] = (state[0], now, parked)


def _scale_units(model: torch.nn.Module, adapter_name: str | None) -> list[tuple]:
    """[(layer, ((adapter, lora_alpha, r or sqrt(r) with rsLoRA), ...))] of `_lora_layers`, cached beside them: what
    peft's `LoraLayer.set_scale` reads, gathered once (an adapter's alpha and r never change after it is added)."""
    layers = _lora_layers(model, adapter_name)
    per_adapter = model.__dict__[_CACHE_ATTR][3]
    key = ("units", adapter_name)
    units = per_adapter.get(key)
    if units is None or len(units) != len(layers):
        units = []
        for layer in layers:
            names = tuple(layer.scaling) if adapter_name is None else (adapter_name,)
            rs = getattr(layer, "use_rslora", {})
            units.append((layer, tuple((a, layer.lora_alpha[a], math.sqrt(layer.r[a]) if rs.get(a, False)
                                        else layer.r[a]) for a in names)))
        per_adapter[key] = units
    return units


# Merged mode (opt-in, `merge_lora`): the adapter stays parked and the base layer's weight itself carries it,
# W = W0 + scaling * B A, rewritten at every scale change from the saved original W0 (exactly W0 at scaling 0). A UNet
# call then costs what the base network's does: no per-layer low-rank branch (on a GPU whose UNet calls are bound by
# kernel launches, peft's branch made them 41% slower; docs/benchmarks.md). A layer holds [adapter, W0, the scaling
# last written] under this attribute. Only nn.Linear layers with Linear LoRA factors can merge (the path LoRA's
# attention projections).
_MERGE_ATTR = "_ptd_merged"


def _merged_original(layer: torch.nn.Module, adapter: str) -> torch.Tensor | None:
    state = layer.__dict__.get(_MERGE_ATTR)
    return state[1] if state is not None and state[0] == adapter else None


def _write_merged(layer: torch.nn.Module, adapter: str, force: bool = False) -> None:
    """base weight = W0 + scaling * B A, summed in (at least) float32 and rounded once to the weight's dtype; W0 at
    scaling 0. Skipped when the scaling is the one last written, unless `force` (new factors)."""
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


def merge_lora(model: torch.nn.Module, adapter_name: str, enabled: bool = True) -> None:
    """Switch `adapter_name` to merged mode (enabled) or back to peft's low-rank branch (not enabled).

    In merged mode `set_lora_scale`, `lora_scale` and `load_adapter_weights` keep working as before, but each scale
    change rewrites the adapted layers' weights (W0 + w * lora_alpha / r * B A) instead of scaling a branch that
    every forward call computes. Weight 0 restores W0 exactly (the base network bit for bit). Costs a copy of the
    adapted weights (~0.2 GB for SD 2.1-base's attention projections in fp16) and one weight rewrite per scale
    change; in half precision the merged weight is rounded once (the branch rounds its products instead).
    Switching back restores every W0 exactly.
    """
    layers = _lora_layers(model, adapter_name)
    if not enabled:
        for layer in layers:
            original = _merged_original(layer, adapter_name)
            if original is not None:
                with torch.no_grad():
                    layer.get_base_layer().weight.copy_(original)
                del layer.__dict__[_MERGE_ATTR]
                if layer.scaling[adapter_name] != 0.0:
                    _unpark(layer, adapter_name)
        return
    for layer in layers:
        _adapters(layer, adapter_name)  # refuses adapters that peft itself merged
        base = layer.get_base_layer() if callable(getattr(layer, "get_base_layer", None)) else None
        factors = [holder[adapter_name] if adapter_name in holder else None
                   for holder in (getattr(layer, "lora_A", {}), getattr(layer, "lora_B", {}))]
        other = layer.__dict__.get(_MERGE_ATTR)
        if (not isinstance(base, torch.nn.Linear) or not all(isinstance(f, torch.nn.Linear) for f in factors)
                or getattr(layer, "fan_in_fan_out", False)):
            raise ValueError(f"merge_lora: {type(base).__name__} layer cannot merge adapter '{adapter_name}' (only "
                             "nn.Linear layers with Linear LoRA factors can); use the unmerged branch")
        if other is not None and other[0] != adapter_name:
            raise ValueError(f"merge_lora: a layer already carries merged adapter '{other[0]}'; unmerge it first")
    for layer in layers:
        if _merged_original(layer, adapter_name) is None:  # [adapter, W0, scaling last written]
            layer.__dict__[_MERGE_ATTR] = [adapter_name, layer.get_base_layer().weight.detach().clone(), None]
        _park(layer, adapter_name)
        _write_merged(layer, adapter_name, force=True)


def _is_active(layer: torch.nn.Module, adapter: str) -> bool:
    active = layer.__dict__.get("_active_adapter")  # peft's list (or str) behind the active_adapters property
    if active is None:
        active = getattr(layer, "active_adapters", (adapter,))
    return active == adapter if isinstance(active, str) else adapter in active


def set_lora_scale(model: torch.nn.Module, weight: float, adapter_name: str | None = None) -> None:
    """Scale the LoRA of `model` to `weight` relative to its trained strength (the w of paper Eq. 8).

    Every LoRA layer gets scaling = weight * lora_alpha / r from its own alpha and r (alpha_pattern, rank_pattern and
    rsLoRA respected), by `LoraLayer.set_scale`'s formula (the layers, alphas and ranks are gathered at the first call:
    then ~0.4 us per layer, ~0.05 ms for the 128 LoRA layers of an SD 2.1 UNet). weight 0 is the base network, weight
    1 the LoRA as trained. At weight 0 the adapter is also taken out of each layer's active adapters, so that its
    low-rank products are skipped, not multiplied by 0 (stage 2 spends most iterations at w = 0); any non-zero weight
    puts it back.

    Args:
        model: a module (e.g. diffusers UNet2DConditionModel) carrying peft LoRA layers.
        weight: the relative LoRA weight w; any finite float.
        adapter_name: the adapter to scale; None scales every adapter.
    """
    weight = float(weight)
    if not math.isfinite(weight):
        raise ValueError(f"LoRA weight must be finite, got {weight}")
    for layer, units in _scale_units(model, adapter_name):  # the per-iteration path of stage 2: kept lean
        names = _adapters(layer, adapter_name)
        merged = layer.__dict__.get(_MERGE_ATTR)  # [adapter, W0, scaling written] in merged mode, else None
        if weight != 0.0:
            if _PARK_ATTR in layer.__dict__:
                for adapter in names:
                    if merged is None or merged[0] != adapter:  # a merged adapter stays parked: the weight has it
                        _unpark(layer, adapter)
            if adapter_name is not None and merged is None and not _is_active(layer, adapter_name):
                raise ValueError(f"LoRA adapter '{adapter_name}' is not active, so its weight would have no effect: "
                                 f"activate it, e.g. unet.set_adapters(['{adapter_name}'])")
        scaling = layer.scaling
        for adapter, alpha, denom in units:
            scaling[adapter] = weight * alpha / denom  # LoraLayer.set_scale's formula, in its order of operations
            if weight == 0.0:
                _park(layer, adapter)
            if merged is not None and merged[0] == adapter:
                _write_merged(layer, adapter)


def get_lora_scale(model: torch.nn.Module, adapter_name: str | None = None) -> float:
    """The current relative LoRA weight of `model` (the inverse of `set_lora_scale`).

    Raises ValueError when the layers disagree (e.g. after a partial manual edit), rather than pick one.
    """
    weights = [layer.scaling[a] / _unit_scaling(layer, a)
               for layer in _lora_layers(model, adapter_name) for a in _adapters(layer, adapter_name)]
    if not weights:
        raise ValueError(f"{type(model).__name__} has LoRA layers but no adapter in them")
    if any(not math.isclose(w, weights[0], rel_tol=1e-9, abs_tol=1e-12) for w in weights):
        raise ValueError(f"LoRA layers disagree on the weight (from {min(weights)} to {max(weights)}); "
                         "call set_lora_scale to make them consistent")
    return weights[0]


@contextlib.contextmanager
def lora_scale(model: torch.nn.Module, weight: float, adapter_name: str | None = None) -> Iterator[None]:
    """Context manager: LoRA weight `weight` inside, the previous per-layer scalings restored on exit (also on error),
    and with them the parking of the adapters at scaling 0 (see set_lora_scale).

    Example (a base-prior evaluation in the middle of tracing):  `with lora_scale(unet, 0.0): eps = unet(...)`
    """
    saved = [(layer, a, layer.scaling[a])
             for layer in _lora_layers(model, adapter_name) for a in _adapters(layer, adapter_name)]
    set_lora_scale(model, weight, adapter_name)
    try:
        yield
    finally:
        for layer, adapter, scaling in saved:
            layer.scaling[adapter] = scaling
        for layer, adapter, scaling in reversed(saved):
            merged = _merged_original(layer, adapter) is not None
            if scaling == 0.0:
                _park(layer, adapter)
            elif not merged:
                _unpark(layer, adapter)
            if merged:
                _write_merged(layer, adapter)


# ----------------------------------------------------------------------------------------------------------------------
# checkpoint path (Eq. 7)
# ----------------------------------------------------------------------------------------------------------------------
def _with_adapter(key: str, adapter_name: str) -> str:
    """peft's saved key 'a.to_q.lora_A.weight' -> the parameter name 'a.to_q.lora_A.<adapter>.weight'."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part.startswith("lora_"):
            return ".".join(parts[:i + 1] + [adapter_name] + parts[i + 1:])
    return key


@torch.no_grad()
def load_adapter_weights(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], adapter_name: str) -> None:
    """Copy one LoRA checkpoint into the existing adapter `adapter_name` of `model`, in place (torch only).

    Args:
        state_dict: the adapter's tensors in peft's own key layout, i.e. `peft.get_peft_model_state_dict(unet,
            adapter_name=...)` (keys without the adapter name); keys that already carry it are accepted too.
            It must cover every LoRA parameter of the adapter: a partial checkpoint would mix two path points.
    """
    params = {name: p for name, p in model.named_parameters() if f".{adapter_name}." in f".{name}."
              and any(part.startswith("lora_") for part in name.split("."))}
    if not params:
        raise ValueError(f"{type(model).__name__} has no parameters of LoRA adapter '{adapter_name}'")
    done = set()
    for key, value in state_dict.items():
        name = key if key in params else _with_adapter(key, adapter_name)
        if name not in params:
            raise ValueError(f"checkpoint key '{key}' matches no parameter of LoRA adapter '{adapter_name}' "
                             f"(expected peft's layout, e.g. '{next(iter(params))}' saved without the adapter name)")
        params[name].copy_(value.to(device=params[name].device, dtype=params[name].dtype))
        done.add(name)
    if len(done) != len(params):
        missing = sorted(set(params) - done)
        raise ValueError(f"checkpoint misses {len(missing)} of {len(params)} LoRA parameters of adapter "
                         f"'{adapter_name}', e.g. '{missing[0]}'")
    for layer in model.modules():  # merged mode: the weights carry the new factors at the current scale (once per
        if _merged_original(layer, adapter_name) is not None:  # checkpoint switch; any module layout)
            _write_merged(layer, adapter_name, force=True)


# loader(model, state_dict, adapter_name): puts one checkpoint into the adapter's weights
Loader = Callable[[torch.nn.Module, Mapping[str, torch.Tensor], str], None]


class PathTracer:
    """Stage 2 of PTD: sets the score network of each iteration on the way back from the path LoRA to the prior.

    Modes:
        "weighted" (paper Eq. 8, Alg. 2): prior + w(step) * final LoRA, w = SCHEDULES[schedule](step, T, C).
        "checkpoints" (paper Eq. 7): `checkpoints` = [s^(1), ..., s^(n)] in the order stage 1 saved them (peft-layout
            state dicts of the adapter); steps 1..K use s^(n), K+1..2K s^(n-1), ..., then s^(0) = the prior (weight 0).
            The paper's text starts from the penultimate s^(n-1): pass `checkpoints[:-1]` for that reading.
    In both modes every step after `total_steps` uses the prior alone (weight 0), for good.
    merge=True runs the adapter in merged mode (`merge_lora`, from the first apply): the same path, without the
    per-call low-rank branch.
    """

    MODES = ("weighted", "checkpoints")

    def __init__(self, mode: str = "weighted", *, total_steps: int = 1000, power: float = 0.3,
                 schedule: str = "power", adapter_name: str = "ptd_path",
                 checkpoints: Sequence[Mapping[str, torch.Tensor]] = (), switch_interval: int = 200,
                 loader: Loader | None = None, merge: bool = False) -> None:
        if mode not in self.MODES:
            raise ValueError(f"PathTracer mode '{mode}' is not one of {self.MODES} (mode 'off': use no tracer)")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule '{schedule}' is not one of {sorted(SCHEDULES)}")
        if mode == "checkpoints" and not checkpoints:
            raise ValueError("PathTracer mode 'checkpoints' needs the stage-1 checkpoints (a list of state dicts)")
        if switch_interval < 1 or total_steps < 1:
            raise ValueError(f"switch_interval and total_steps must be >= 1, got {switch_interval}, {total_steps}")
        self.mode, self.total_steps, self.power, self.schedule = mode, int(total_steps), float(power), schedule
        self.adapter_name, self.switch_interval = adapter_name, int(switch_interval)
        self.checkpoints = list(checkpoints)
        self.loader: Loader = loader if loader is not None else load_adapter_weights
        self.merge = bool(merge)  # merged mode (see merge_lora): switched on at the first apply()
        self.last_step, self.last_weight = 0, None
        self._loaded: tuple[weakref.ref, int] | None = None  # (model, index of the checkpoint now in its adapter)
        self.weight_at(1)  # fail now, not at the first iteration, on a bad power

    def checkpoint_at(self, step: int) -> int | None:
        """Index into `checkpoints` used at `step` (checkpoints mode), or None for the prior s^(0)."""
        _check_step(step, self.total_steps)
        k = (step - 1) // self.switch_interval
        if self.mode != "checkpoints" or step > self.total_steps or k >= len(self.checkpoints):
            return None
        return len(self.checkpoints) - 1 - k

    def weight_at(self, step: int) -> float:
        """The LoRA weight at `step` (1-based) without touching a model."""
        if self.mode == "weighted":
            return SCHEDULES[self.schedule](step, self.total_steps, self.power)
        return 0.0 if self.checkpoint_at(step) is None else 1.0

    def apply(self, model: torch.nn.Module, step: int) -> float:
        """Set `model`'s path LoRA for iteration `step` (1-based); call before the iteration's UNet calls.

        Returns the weight used (log it). In checkpoints mode, loads a checkpoint only when the switch happens.
        """
        weight = self.weight_at(step)
        index = self.checkpoint_at(step)
        if self.merge and _merged_original(_lora_layers(model, self.adapter_name)[0], self.adapter_name) is None:
            merge_lora(model, self.adapter_name)
        if index is not None:
            loaded_model = self._loaded[0]() if self._loaded is not None else None
            if loaded_model is not model or self._loaded[1] != index:
                self.loader(model, self.checkpoints[index], self.adapter_name)
                self._loaded = (weakref.ref(model), index)
        set_lora_scale(model, weight, self.adapter_name)
        self.last_step, self.last_weight = int(step), weight
        return weight

    def _config(self) -> dict:
        return {"mode": self.mode, "total_steps": self.total_steps, "power": self.power, "schedule": self.schedule,
                "adapter_name": self.adapter_name, "switch_interval": self.switch_interval,
                "num_checkpoints": len(self.checkpoints)}

    def state_dict(self) -> dict:
        """Named state for a training checkpoint: the schedule (checked on resume) and the last step applied."""
        return {**self._config(), "last_step": self.last_step, "last_weight": self.last_weight}

    def load_state_dict(self, state: Mapping) -> None:
        """Resume: the saved schedule must equal this tracer's; the next apply() reloads its checkpoint if needed."""
        config = self._config()
        differ = {k: (state.get(k), v) for k, v in config.items() if state.get(k) != v}
        if differ:
            raise ValueError(f"PathTracer state does not match this tracer (saved, current): {differ}")
        self.last_step, self.last_weight = int(state["last_step"]), state["last_weight"]
        self._loaded = None
