"""Path-Tracing Distillation, stage 2 ("tracing the path"), in one file to copy into any fork: it imports only the
standard library and torch, and finds LoRA layers by duck typing: peft's and lora_diffusion's (stock LucidDreamer's).

Paper: stage 1 fits the path LoRA (Eq. 6); iteration `iter` (1-based) of stage 2 scores every UNet call with
s_pretrain + w * LoRA, C being the "LoRA load strategy" and T the number of tracing iterations:

    w(iter) = 1 - ((iter - 1) / T) ** C   for iter <= T,   0 afterwards          (Eq. 8, Alg. 2; T=1000, C=0.3)

Eq. 7 instead walks stage 1's checkpoints s^(n), ..., s^(1), s^(0) = prior in reverse, K iterations each.

Use in another fork (`step`: the 1-based iteration; README.md, "Using the path LoRA in stock LucidDreamer and other
forks", has the details). Current diffusers (>= 0.34) with peft, e.g. threestudio (`pipe`: the guidance's pipeline):

    from ptd_utils import PathTracer
    pipe.load_lora_weights("output/<ws>/path_lora", adapter_name="ptd_path")   # stage-1 output, once
    # (diffusers < 0.40 under HF_HUB_OFFLINE=1 also wants weight_name="pytorch_lora_weights.safetensors")
    tracer = PathTracer("weighted", total_steps=1000, power=0.3, adapter_name="ptd_path")
    tracer.apply(pipe.unet, step)                        # every iteration, before the guidance's UNet calls

Stock LucidDreamer (diffusers 0.18.2, torch 2.0.1, no peft): copy this file beside its train.py; in its config set
`GuidanceParams.LoRA_path: output/<ws>/path_lora/lora_diffusion.safetensors` (its patch_pipe injects the LoRA); in its
train.py add after `guidance, embeddings = guidance_setup(guidance_opt)` (line 162) the line
    from ptd_utils import PathTracer; tracer = PathTracer("weighted", total_steps=1000, power=0.3); guidance.unet.eval()
(the injected layers start in training mode: Dropout(0.1) on the LoRA branch) and right before the loop's line
`warm_up_rate = 1. - min(iteration/opt.warmup_iter,1.)` (line 299) the line `tracer.apply(guidance.unet, iteration)`.

Exactness (peft 0.21): `LoraLayer.set_scale(adapter, w)` sets scaling = w * lora_alpha / r (/ sqrt(r) with rsLoRA), the
forward adds `lora_B(lora_A(x)) * scaling`: w = 1 is the LoRA as trained, the output affine in w. At w = 0 that sum is
not the base bit for bit (-0.0 + 0.0 = +0.0; an fp16 product overflowing gives inf * 0 = NaN), so weight 0 also parks
the adapter (out of each layer's active adapters): peft skips the branch, the output is the base network's bit for bit.
A lora_diffusion layer (no adapter names: every adapter_name selects it) gets scale = w * its scale when first touched
(stock: 1.0); at w = 0 an instance `forward` calls its wrapped layer alone. Eq. 7 on it needs your own `loader`.
"""
from __future__ import annotations

import contextlib
import math
import weakref
from typing import Callable, Iterator, Mapping, Sequence

import torch

__all__ = ["ptd_weight", "set_lora_scale", "lora_scale", "load_adapter_weights", "PathTracer"]

# PathTracer's extension points: set_scale(model, weight, adapter_name), loader(model, state_dict, adapter_name)
SetScale = Callable[[torch.nn.Module, float, str], None]
Loader = Callable[[torch.nn.Module, Mapping[str, torch.Tensor], str], None]
_CACHE_ATTR = "_ptd_lora_layers"  # on the model: (adapter signature, its configs, the LoRA layers)
_PARK_ATTR = "_ptd_parked"  # on a layer: (its active adapters before parking, the list parking set)
_ONE_ATTR, _FORWARD_ATTR = "_ptd_scale_1", "_ptd_forward"  # on a lora_diffusion layer: scale at w = 1, forward parked


def ptd_weight(step: int, total_steps: int = 1000, power: float = 0.3) -> float:
    """Path LoRA weight of paper Alg. 2: w(iter) = 1 - ((iter - 1) / T) ** C for iter <= T, else 0.

    step: iter, the 1-based iteration; total_steps: T, after which the prior alone is used (paper: 1000);
    power: C, the "LoRA load strategy" (paper: 0.3; a smaller C leaves the LoRA sooner).
    """
    if step < 1 or total_steps < 1:
        raise ValueError(f"step must be 1-based (>= 1) and total_steps >= 1, got {step} and {total_steps}")
    if power <= 0:
        raise ValueError(f"power (C) must be > 0, got {power}")
    return 0.0 if step > total_steps else 1.0 - ((step - 1) / total_steps) ** power


def _is_lora_layer(m: torch.nn.Module) -> bool:  # peft's LoraLayer, by duck typing: this file never imports peft
    return (callable(getattr(m, "set_scale", None)) and callable(getattr(m, "set_adapter", None))
            and all(isinstance(getattr(m, a, None), dict) for a in ("scaling", "lora_alpha", "r")))


def _injected_base(m: torch.nn.Module) -> torch.nn.Module | None:
    """The layer a lora_diffusion layer wraps (LoraInjectedLinear.linear, LoraInjectedConv2d.conv), else None. Their
    forward: base(x) + dropout(lora_up(selector(lora_down(x)))) * scale."""
    if all(hasattr(m, name) for name in ("lora_up", "lora_down", "scale")):
        return m._modules.get("linear", m._modules.get("conv"))
    return None


def _lora_layers(model: torch.nn.Module, adapter_name: str | None) -> list[torch.nn.Module]:
    """The LoRA layers of `model` holding `adapter_name` (None: any; lora_diffusion layers hold every name), collected
    once per `model.peft_config` (the cache holds its configs so that their ids stay unique): an SD UNet has ~1,700
    modules to walk. Load or patch the LoRA before the first call."""
    configs = getattr(model, "peft_config", None) or {}
    key = tuple(sorted((name, id(config)) for name, config in configs.items()))
    cached = model.__dict__.get(_CACHE_ATTR)
    if cached is None or cached[0] != key or not cached[2]:
        found = tuple(m for m in model.modules() if _is_lora_layer(m) or _injected_base(m) is not None)
        cached = model.__dict__[_CACHE_ATTR] = (key, tuple(configs.values()), found)  # no submodule, not in state_dict
    layers = [m for m in cached[2] if adapter_name is None or adapter_name in getattr(m, "scaling", (adapter_name,))]
    if not layers:
        what = "any LoRA adapter" if adapter_name is None else f"LoRA adapter '{adapter_name}'"
        raise ValueError(f"{type(model).__name__} has no layer with {what}; load one first, e.g. "
                         f"pipe.load_lora_weights(folder, adapter_name='{adapter_name or 'ptd_path'}')")
    return layers


def _pairs(model: torch.nn.Module, adapter_name: str | None) -> list[tuple[torch.nn.Module, str]]:
    """(layer, adapter) of every LoRA layer holding `adapter_name` (None: each of a layer's adapters)."""
    pairs = [(layer, a) for layer in _lora_layers(model, adapter_name) if _is_lora_layer(layer)
             for a in (layer.scaling if adapter_name is None else (adapter_name,))]
    merged = sorted({a for layer, a in pairs if a in (getattr(layer, "merged_adapters", None) or ())})
    if merged:
        raise ValueError(f"LoRA adapter(s) {merged} are merged into the base weights, where a scale has no effect: "
                         "call unet.unmerge_adapter() (or unfuse_lora()) first")
    return pairs


def _set_branch(layer: torch.nn.Module, adapter: str, on: bool) -> None:
    """Park (on=False) or unpark `adapter` in `layer`: out of the active adapters, peft skips it. Writes through peft's
    `LoraLayer.set_adapter(list)`, whose side effect on requires_grad is undone. A change of the active adapters by
    anyone else since parking (set_adapter(s), add_adapter) wins: the parking is then forgotten."""
    state = layer.__dict__.pop(_PARK_ATTR, None)
    if state is None and on:
        return  # nothing parked here: the common path at w != 0
    if state is not None and layer.active_adapter is not state[1]:
        state = None
    original = state[0] if state is not None else list(layer.active_adapters)
    parked = set(original).difference(state[1]) if state is not None else set()
    parked = parked - {adapter} if on else parked | ({adapter} & set(original))
    now = [name for name in original if name not in parked]
    if now != list(layer.active_adapters):
        flags = [(p, p.requires_grad) for p in layer.parameters()]
        layer.set_adapter(now)
        for p, flag in flags:
            p.requires_grad_(flag)
    if parked:
        layer.__dict__[_PARK_ATTR] = (original, layer.active_adapter)


def _set_injected(layer: torch.nn.Module, scale: float, park: bool) -> None:
    """A lora_diffusion layer's scale; parked, its instance `forward` is the wrapped layer's call, the base output bit
    for bit (base + 0 * branch is not), put back as it was (a hook's own `forward`, say) when unparked."""
    layer.scale = scale
    if park and _FORWARD_ATTR not in layer.__dict__:
        layer.__dict__[_FORWARD_ATTR] = layer.__dict__.get("forward")
        layer.__dict__["forward"] = _injected_base(layer).__call__
    elif not park and _FORWARD_ATTR in layer.__dict__:
        previous = layer.__dict__.pop(_FORWARD_ATTR)
        layer.__dict__.pop("forward")
        if previous is not None:
            layer.__dict__["forward"] = previous


def _injected(model: torch.nn.Module, adapter_name: str | None) -> list[torch.nn.Module]:
    return [layer for layer in _lora_layers(model, adapter_name) if not _is_lora_layer(layer)]


def _finite(weight: float) -> float:
    if not math.isfinite(float(weight)):
        raise ValueError(f"LoRA weight must be finite, got {weight}")
    return float(weight)


def _scale_adapter(layer: torch.nn.Module, adapter: str, weight: float, strict: bool) -> None:
    """peft's set_scale, parked at weight 0; strict: refuse an adapter that is inactive at a non-zero weight."""
    _set_branch(layer, adapter, weight != 0.0)
    if strict and weight != 0.0 and adapter not in layer.active_adapters:
        raise ValueError(f"LoRA adapter '{adapter}' is not active, so its weight would have no effect: activate it, "
                         f"e.g. unet.set_adapters(['{adapter}'])")
    layer.set_scale(adapter, weight)


def set_lora_scale(model: torch.nn.Module, weight: float, adapter_name: str | None = None) -> None:
    """Scale the LoRA of `model` (e.g. a diffusers UNet) to `weight` (finite) times its trained strength: w of Eq. 8.

    Each peft layer gets `LoraLayer.set_scale(adapter, weight)`, i.e. weight * lora_alpha / r of its own alpha and r;
    each lora_diffusion layer scale = weight * its scale when first touched. Weight 0 is the base network bit for bit
    (parked), weight 1 the LoRA as trained. adapter_name None: all.
    """
    weight = _finite(weight)
    for layer, adapter in _pairs(model, adapter_name):
        _scale_adapter(layer, adapter, weight, strict=adapter_name is not None)
    for layer in _injected(model, adapter_name):
        _set_injected(layer, weight * layer.__dict__.setdefault(_ONE_ATTR, layer.scale), weight == 0.0)


@contextlib.contextmanager
def lora_scale(model: torch.nn.Module, weight: float, adapter_name: str | None = None) -> Iterator[None]:
    """LoRA weight `weight` inside; the previous per-layer scalings (and parking at 0) restored on exit, also on
    error. E.g. the prior in the middle of tracing: `with lora_scale(unet, 0.0): eps = unet(...)`."""
    saved = [(layer, a, layer.scaling[a]) for layer, a in _pairs(model, adapter_name)]
    injected = [(layer, layer.scale, _FORWARD_ATTR in layer.__dict__) for layer in _injected(model, adapter_name)]
    set_lora_scale(model, weight, adapter_name)
    try:
        yield
    finally:
        for layer, adapter, scaling in saved:
            layer.scaling[adapter] = scaling
            _set_branch(layer, adapter, scaling != 0.0)
        for layer, scale, parked in injected:
            _set_injected(layer, scale, parked)


@torch.no_grad()
def load_adapter_weights(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], adapter_name: str) -> None:
    """Copy one checkpoint into the existing LoRA adapter `adapter_name` of `model`, in place. `state_dict`: peft's
    layout (`get_peft_model_state_dict(unet, adapter_name=...)`, keys without the adapter name; keys with it pass
    too), covering every LoRA parameter of the adapter (a partial one would mix two points of the path)."""
    params = {name: p for name, p in model.named_parameters() if f".{adapter_name}." in f".{name}."
              and any(part.startswith("lora_") for part in name.split("."))}
    if not params:
        raise ValueError(f"{type(model).__name__} has no parameters of LoRA adapter '{adapter_name}'")
    done = set()
    for key, value in state_dict.items():
        parts = key.split(".")  # 'a.to_q.lora_A.weight' -> 'a.to_q.lora_A.<adapter>.weight'
        i = next((i + 1 for i, part in enumerate(parts) if part.startswith("lora_")), len(parts))
        name = key if key in params else ".".join(parts[:i] + [adapter_name] + parts[i:])
        if name not in params:
            raise ValueError(f"checkpoint key '{key}' matches no parameter of LoRA adapter '{adapter_name}' "
                             f"(expected peft's layout, e.g. '{next(iter(params))}' saved without the adapter name)")
        params[name].copy_(value.to(device=params[name].device, dtype=params[name].dtype))
        done.add(name)
    if len(done) != len(params):
        missing = sorted(set(params) - done)
        raise ValueError(f"checkpoint misses {len(missing)} of {len(params)} LoRA parameters of adapter "
                         f"'{adapter_name}', e.g. '{missing[0]}'")


class PathTracer:
    """Stage 2 of PTD: sets the score network of each iteration on the way back from the path LoRA to the prior.

    "weighted" (Eq. 8, Alg. 2): prior + ptd_weight(step, T, C) * final LoRA. "checkpoints" (Eq. 7): `checkpoints` =
    [s^(1), ..., s^(n)] as stage 1 saved them (peft-layout state dicts); steps 1..K use s^(n), K+1..2K s^(n-1), ...,
    then s^(0) = the prior (the paper's text starts at s^(n-1): pass `checkpoints[:-1]`). Every step after
    `total_steps` uses the prior alone. `loader`/`set_scale` replace load_adapter_weights/set_lora_scale.
    """

    MODES = ("weighted", "checkpoints")

    def __init__(self, mode: str = "weighted", *, total_steps: int = 1000, power: float = 0.3,
                 adapter_name: str = "ptd_path", checkpoints: Sequence[Mapping[str, torch.Tensor]] = (),
                 switch_interval: int = 200, loader: Loader | None = None, set_scale: SetScale | None = None) -> None:
        if mode not in self.MODES:
            raise ValueError(f"PathTracer mode '{mode}' is not one of {self.MODES} (mode 'off': use no tracer)")
        if mode == "checkpoints" and not checkpoints:
            raise ValueError("PathTracer mode 'checkpoints' needs the stage-1 checkpoints (a list of state dicts)")
        if switch_interval < 1 or total_steps < 1:
            raise ValueError(f"switch_interval and total_steps must be >= 1, got {switch_interval}, {total_steps}")
        self.mode, self.total_steps, self.power = mode, int(total_steps), float(power)
        self.adapter_name, self.switch_interval = adapter_name, int(switch_interval)
        self.checkpoints = list(checkpoints)
        self.loader: Loader = loader or load_adapter_weights
        self.set_scale: SetScale = set_scale or set_lora_scale
        self.last_step, self.last_weight = 0, None
        self._loaded: tuple[weakref.ref, int] | None = None  # (model, index of the checkpoint now in its adapter)
        self.weight_at(1)  # fail now, not at the first iteration, on a bad power

    def checkpoint_at(self, step: int) -> int | None:
        """Index into `checkpoints` used at `step` (checkpoints mode), or None for the prior s^(0)."""
        if step < 1:
            raise ValueError(f"step must be 1-based (>= 1), got {step}")
        k = (step - 1) // self.switch_interval
        if self.mode != "checkpoints" or step > self.total_steps or k >= len(self.checkpoints):
            return None
        return len(self.checkpoints) - 1 - k

    def weight_at(self, step: int) -> float:
        """The LoRA weight at `step` (1-based), without touching a model."""
        if self.mode == "weighted":
            return ptd_weight(step, self.total_steps, self.power)
        return 0.0 if self.checkpoint_at(step) is None else 1.0

    def apply(self, model: torch.nn.Module, step: int) -> float:
        """Set `model`'s path LoRA for iteration `step` (1-based), before its UNet calls; returns the weight (log it).
        Checkpoints mode loads a checkpoint only at a switch."""
        weight, index = self.weight_at(step), self.checkpoint_at(step)
        if index is not None:
            loaded = self._loaded[0]() if self._loaded is not None else None
            if loaded is not model or self._loaded[1] != index:
                self.loader(model, self.checkpoints[index], self.adapter_name)
                self._loaded = (weakref.ref(model), index)
        self.set_scale(model, weight, self.adapter_name)
        self.last_step, self.last_weight = int(step), weight
        return weight

    def state_dict(self) -> dict:
        """For a training checkpoint: the configuration (checked on resume) and the last step applied."""
        return {"mode": self.mode, "total_steps": self.total_steps, "power": self.power,
                "adapter_name": self.adapter_name, "switch_interval": self.switch_interval,
                "num_checkpoints": len(self.checkpoints), "last_step": self.last_step, "last_weight": self.last_weight}

    def load_state_dict(self, state: Mapping) -> None:
        """Resume: the saved configuration must be this tracer's (an older state's "schedule" key is ignored: it
        could only be "power"); the next apply() reloads its checkpoint."""
        differ = {k: (state.get(k), v) for k, v in self.state_dict().items()
                  if not k.startswith("last_") and state.get(k) != v}
        if differ:
            raise ValueError(f"PathTracer state does not match this tracer (saved, current): {differ}")
        self.last_step, self.last_weight = int(state["last_step"]), state["last_weight"]
        self._loaded = None
