"""LoRA files in lora_diffusion's safetensors layout: what stock LucidDreamer's `GuidanceParams.LoRA_path` names and its
vendored `lora_diffusion.patch_pipe` loads (diffusers 0.18.2, no peft). `save_lora_diffusion` writes a peft adapter
(the path LoRA) that way, `read_lora_diffusion` reads such a file, `to_peft` converts one of its LoRAs to peft's
layout and `load_lora_diffusion` loads a whole file into a diffusers pipeline as stock does (GuidanceParams.LoRA_path).

The layout, as lora_diffusion/lora.py writes and reads it (save_safeloras_with_embeds, parse_safeloras,
monkeypatch_or_replace_safeloras, monkeypatch_or_replace_lora_extended, apply_learned_embed_in_clip):
  tensors   "<part>:<i>:up" [out, r] and "<part>:<i>:down" [r, in] (a Conv2d: [out, r, 1, 1] and [r, in, kh, kw]),
            <part> a pipeline attribute ("unet", "text_encoder"), i = 0, 1, ...; a textual-inversion token: a tensor
            named by the token, [D]
  metadata  "<part>": a JSON list of target class names; "<part>:<i>:rank": str(r); "<token>": "<embed>"
  No scale or alpha is stored: the loader builds every layer with scale 1.0 and stock then calls
  tune_lora_scale(..., 1.0), so a layer adds up @ down x (peft adds B @ A x * lora_alpha / r: the writer and `to_peft`
  fold that factor into up).
  Pairs go to layers BY POSITION (`walk`): the loader goes through model.modules(); inside each module whose class
  name is a target (here also a base class's name: `_is_target`), through its named_modules(); each nn.Linear /
  nn.Conv2d there takes the next pair (a Linear only a 2-D one, a Conv2d only a 4-D one, else the layer is skipped and
  keeps the pair for the next). Running out of pairs fails; pairs left over are ignored. Tokens are added to the
  tokenizer; an existing token gets the stored embedding.

Walk order (what the writer relies on). diffusers 0.18.2's UNet2DConditionModel registers conv_in, time_proj,
time_embedding, then down_blocks and up_blocks (both empty ModuleLists, filled later), then mid_block, so modules()
visits the down blocks, the up blocks, then the mid block; in each BasicTransformerBlock attn1 comes before attn2, and
each Attention registers to_q, to_k, to_v (add_k_proj/add_v_proj: not in SD), then to_out = [Linear, Dropout]. diffusers
0.42 registers the same (tests/test_lora_diffusion.py checks the order on the tiny UNet). Stock's loader needs plain
nn.Linear layers there: diffusers >= 0.19 wraps them (LoRACompatibleLinear) and patch_pipe fails with an
UnboundLocalError (cloneofsimo/lora issues 259, 262), hence stock's pin.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from utils.files import atomic_path, canonical_safetensors

FILE_NAME = "lora_diffusion.safetensors"  # beside diffusers' file in a LoRA folder (form_path.py)
EMBED_FLAG = "<embed>"
# the UNet's attention modules: "Attention" (diffusers 0.15+), "CrossAttention" (the same module up to diffusers 0.14)
UNET_TARGETS = ("Attention", "CrossAttention")
PARTS = ("unet", "text_encoder")  # the pipeline parts `load_lora_diffusion` loads


def _base(module: torch.nn.Module) -> torch.nn.Module | None:
    """The layer a LoRA wrapper adapts (peft's `get_base_layer()`, lora_diffusion's .linear / .conv), else None."""
    if callable(getattr(module, "get_base_layer", None)):
        return module.get_base_layer()
    if hasattr(module, "lora_up"):
        return module._modules.get("linear", module._modules.get("conv"))
    return None


def _layers(module: torch.nn.Module, prefix: str = ""):
    """(name, layer) of the nn.Linear / nn.Conv2d layers under `module` in named_modules() order; a LoRA wrapper counts
    as the layer it adapts, under the wrapper's name (lora_diffusion's loader replaces its own layers the same way)."""
    for name, child in module.named_children():
        layer = _base(child)
        layer = child if layer is None else layer
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            yield prefix + name, layer
        else:
            yield from _layers(child, f"{prefix}{name}.")


def _is_target(module: torch.nn.Module, targets) -> bool:
    """Whether the loader patches inside `module`: its class, or a class it derives from, is named in `targets`.
    transformers 4.3x-4.5x build CLIPTextModel's attention as CLIPSdpaAttention / CLIPFlashAttention2, subclasses of
    the CLIPAttention that stock's transformers 4.30 builds and its files name (same submodules, same order)."""
    return any(cls.__name__ in targets for cls in type(module).__mro__)


def walk(model: torch.nn.Module, targets) -> list[tuple[str, torch.nn.Module]]:
    """(name in `model`, layer) of the layers lora_diffusion's loader fills, in the order it fills them: inside each
    module whose class name is in `targets` (in model.modules() order; `_is_target`), its nn.Linear / nn.Conv2d
    layers."""
    return [(f"{name}.{sub}" if name else sub, layer) for name, module in model.named_modules()
            if _is_target(module, targets) for sub, layer in _layers(module)]


def save_lora_diffusion(path: str | os.PathLike, unet: torch.nn.Module, adapter_name: str = "ptd_path",
                        state_dict: dict[str, torch.Tensor] | None = None, targets=UNET_TARGETS) -> Path:
    """Write the peft adapter `adapter_name` of `unet` as a lora_diffusion file (part "unet"), atomically.

    The pairs follow the loader's walk over `targets`; up = B * lora_alpha / r (the adapter at weight 1 = stock's
    layer at scale 1.0), down = A, both float32; rank metadata r. state_dict: the weights in peft's layout without the
    adapter name (e.g. a stage-1 checkpoint); default the adapter's own. ValueError when the adapter does not cover
    exactly the layers the loader fills (it would give the pairs to the wrong layers) or uses rsLoRA."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    if getattr(unet.peft_config[adapter_name], "use_rslora", False):
        raise ValueError(f"LoRA adapter '{adapter_name}' uses rsLoRA (alpha / sqrt(r)); lora_diffusion files take "
                         "plain LoRA only")
    adapted = {name: m for name, m in unet.named_modules() if adapter_name in getattr(m, "lora_A", ())}
    order = [name for name, _ in walk(unet, targets)]
    if sorted(order) != sorted(adapted):
        raise ValueError(f"LoRA adapter '{adapter_name}' covers {len(adapted)} layers, but lora_diffusion's loader "
                         f"fills the {len(order)} Linear/Conv2d layers of every {'/'.join(targets)} module: adapt "
                         "exactly those (to_q, to_k, to_v, to_out.0) to write this layout")
    state = state_dict if state_dict is not None else get_peft_model_state_dict(unet, adapter_name=adapter_name)
    tensors, metadata = {}, {"unet": json.dumps(list(targets))}
    for i, name in enumerate(order):
        layer, a, b = adapted[name], state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"]
        factor = layer.lora_alpha[adapter_name] / layer.r[adapter_name]
        tensors[f"unet:{i}:up"] = (b.detach().to("cpu", torch.float32) * factor).contiguous()
        tensors[f"unet:{i}:down"] = a.detach().to("cpu", torch.float32).contiguous()
        metadata[f"unet:{i}:rank"] = str(a.shape[0])
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata)
        canonical_safetensors(tmp)  # the same bytes for the same run
    return Path(path)


def read_lora_diffusion(path: str | os.PathLike) -> dict:
    """A lora_diffusion file -> {"loras": {part: {"targets": [class names], "ranks": [r], "pairs": [(up, down)]}},
    "embeddings": {token: tensor}} (CPU tensors as stored), checked as its loader reads it, stricter (ranks and
    shapes agree, pairs complete): one-line ValueError otherwise."""
    from safetensors import safe_open

    where = f"lora_diffusion file {path}"
    if not Path(path).is_file():
        raise ValueError(f"{where} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata, tensors = f.metadata() or {}, {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # safetensors' own error type differs across versions
        raise ValueError(f"{where} is not a readable safetensors file ({str(err).splitlines()[0]})") from None
    found, embeddings = {}, {}
    for key, tensor in tensors.items():
        part, info = key.split(":")[0], metadata.get(key.split(":")[0])
        if info is None:
            raise ValueError(f"{where}: tensor '{key}' has no metadata entry '{part}' (not a lora_diffusion file)")
        if info == EMBED_FLAG:
            embeddings[key] = tensor
            continue
        fields = key.split(":")
        if len(fields) != 3 or not fields[1].isdigit() or fields[2] not in ("up", "down"):
            raise ValueError(f"{where}: tensor '{key}' is not named '<part>:<i>:up' or '<part>:<i>:down'")
        found.setdefault(part, {})[int(fields[1]), fields[2]] = tensor
    loras = {}
    for part, named in found.items():
        n = len(named) // 2
        if set(named) != {(i, side) for i in range(n) for side in ("up", "down")}:
            raise ValueError(f"{where}: the '{part}' LoRA pairs are incomplete or not numbered 0..{n - 1}")
        try:
            targets = json.loads(metadata[part])
        except ValueError:
            raise ValueError(f"{where}: metadata '{part}' is not a JSON list of target classes") from None
        pairs = [(named[i, "up"], named[i, "down"]) for i in range(n)]
        ranks = [metadata.get(f"{part}:{i}:rank", "") for i in range(n)]
        for i, ((up, down), rank) in enumerate(zip(pairs, ranks)):
            if (not rank.isdigit() or up.ndim not in (2, 4) or up.ndim != down.ndim
                    or not int(rank) == down.shape[0] == up.shape[1]):
                raise ValueError(f"{where}: pair {part}:{i} has up {list(up.shape)}, down {list(down.shape)} and rank "
                                 f"metadata '{rank}', which do not agree")
        loras[part] = {"targets": targets, "ranks": [int(r) for r in ranks], "pairs": pairs}
    return {"loras": loras, "embeddings": embeddings}


def to_peft(model: torch.nn.Module, lora: dict, scale: float = 1.0, where: str = "lora_diffusion") -> dict:
    """peft-layout state dict ('<layer>.lora_A.weight' = down, '<layer>.lora_B.weight' = scale * up, float32; load it
    with lora_alpha = r) of one LoRA of a `read_lora_diffusion` file, its pairs given to `model`'s layers as
    lora_diffusion's loader gives them: at `scale` (stock: 1.0) the adapter is stock's patched model. One-line
    ValueError where the file does not fit `model`: too few or too many pairs, or a pair's shapes not its layer's."""
    pairs, state = list(lora["pairs"]), {}
    for name, layer in walk(model, lora["targets"]):
        if not pairs:
            raise ValueError(f"{where}: {len(lora['pairs'])} LoRA pairs, but {type(model).__name__} has more layers in "
                             f"its {lora['targets']} modules; the file was made for another model")
        up, down = pairs[0]
        linear = isinstance(layer, torch.nn.Linear)
        if up.ndim != (2 if linear else 4):
            continue  # the loader skips this layer: the pair goes to the next one
        pairs.pop(0)
        want = ((layer.out_features, layer.in_features) if linear else
                (layer.out_channels, layer.in_channels, *layer.kernel_size, 1, 1))
        got = (up.shape[0], down.shape[1]) + (() if linear else (*down.shape[2:], *up.shape[2:]))
        if got != want:
            raise ValueError(f"{where}: the pair for {type(model).__name__} layer '{name}' has up {list(up.shape)}, "
                             f"down {list(down.shape)}, which do not fit it; the file was made for another model")
        state[f"{name}.lora_A.weight"] = down.to(torch.float32)
        state[f"{name}.lora_B.weight"] = up.to(torch.float32) * scale
    if pairs:
        raise ValueError(f"{where}: {len(pairs)} of {len(lora['pairs'])} LoRA pairs left over after the layers of "
                         f"{type(model).__name__}'s {lora['targets']} modules; the file was made for another model")
    return state


def load_lora_diffusion(pipe, path: str | os.PathLike, adapter_name: str = "LoRA_path") -> dict:
    """Load a lora_diffusion file into a diffusers StableDiffusionPipeline as stock's patch_pipe + tune_lora_scale(1.0)
    do, fused into the weights: the LoRA of each part (unet, text_encoder) converted by `to_peft`, loaded as adapter
    `adapter_name`, fused and unloaded; each textual-inversion token added to the tokenizer with its embedding (an
    existing token's embedding replaced, as stock's idempotent_token=True). Everything is checked before the pipeline
    changes; a part this cannot load faithfully is a one-line ValueError, never skipped. The global random stream is
    kept (adapter creation and the embedding resize draw from it). Returns {part: pairs loaded, "tokens": [...]}."""
    data = read_lora_diffusion(path)
    other = sorted(set(data["loras"]) - set(PARTS))
    if other:
        raise ValueError(f"lora_diffusion file {path} holds a LoRA for pipeline part(s) {other}, which this project "
                         f"cannot load (only {', '.join(PARTS)}); remove those tensors from the file to go on")
    state = {}
    for part, lora in data["loras"].items():
        converted = to_peft(getattr(pipe, part), lora, where=f"lora_diffusion file {path}, {part}")
        state.update({f"{part}.{key}": value for key, value in converted.items()})
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    for token, embedding in data["embeddings"].items():
        if embedding.numel() != width:
            raise ValueError(f"lora_diffusion file {path}: token '{token}' has a {list(embedding.shape)} embedding, "
                             f"the text encoder takes {width} values; the file was made for another model")
    with torch.random.fork_rng(devices=[]):
        if state:
            pipe.load_lora_weights(state, adapter_name=adapter_name)
            pipe.fuse_lora(adapter_names=[adapter_name])
            pipe.unload_lora_weights()
        for token, embedding in data["embeddings"].items():
            pipe.tokenizer.add_tokens(token)
            pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer))
            table = pipe.text_encoder.get_input_embeddings().weight
            with torch.no_grad():
                table[pipe.tokenizer.convert_tokens_to_ids(token)] = embedding.reshape(-1).to(table)
    return {**{part: len(lora["pairs"]) for part, lora in data["loras"].items()}, "tokens": list(data["embeddings"])}
