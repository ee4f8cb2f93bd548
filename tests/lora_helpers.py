"""Helpers shared by the LoRA tests (tests/test_ptd_utils.py, test_lora_merge.py, test_lora_diffusion.py)."""
import torch

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def relative_weights(model, adapter=None) -> set:
    """The relative weights {w} found in `model`'s LoRA layers: scaling / (lora_alpha / r), peft's set_scale inverted
    (rounded to 12 digits; one element when the layers agree)."""
    return {round(m.scaling[a] * m.r[a] / m.lora_alpha[a], 12) for m in model.modules()
            if isinstance(getattr(m, "scaling", None), dict) for a in m.scaling if adapter in (None, a)}


def run_unet(unet, inputs):
    with torch.no_grad():
        return unet(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample


def make_lora_unet(tiny_path):
    """(tiny unet with a randomised LoRA 'ptd_path' r=4 alpha=8, inputs, base output, peft's output at its default
    scaling)."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(tiny_path, subfolder="unet").eval()
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 77, 32, generator=g))
    base = run_unet(unet, inputs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=TARGETS),
                         adapter_name="ptd_path")
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".lora_" in name:  # B is zero at init: randomise so that the LoRA changes the output
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    trained = run_unet(unet, inputs)
    assert (trained - base).abs().max() > 0.05
    return unet, inputs, base, trained


def toy_lora_model(adapters=("ptd_path",), r=2, alpha=6.0):
    """Two Linear layers 'a' (3 -> 4) and 'b' (4 -> 2), each with peft LoRA `adapters` (all active), seeded."""
    from peft import LoraConfig, inject_adapter_in_model

    model = torch.nn.Sequential()
    model.add_module("a", torch.nn.Linear(3, 4))
    model.add_module("b", torch.nn.Linear(4, 2))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for name in adapters:
            model = inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, target_modules=["a", "b"]), model,
                                            adapter_name=name)
    for m in (model.a, model.b):
        m.set_adapter(list(adapters))  # inject_adapter_in_model leaves only the first adapter active
    return model


# ----------------------------------------------------------------------------------------------------------------------
# lora_diffusion's layers (stock LucidDreamer's vendored lora_diffusion/lora.py), re-written for the tests: the same
# attribute names and forward, and a loader that hands out a file's pairs in the order stock's patch_pipe does. This
# block imports torch only, so that a test can copy this file beside a copied ptd_utils.py.
# ----------------------------------------------------------------------------------------------------------------------
class LoraInjectedLinear(torch.nn.Module):
    """forward = linear(x) + dropout(lora_up(selector(lora_down(x)))) * scale."""

    def __init__(self, base: torch.nn.Linear, r: int = 4, scale: float = 1.0, dropout_p: float = 0.1):
        super().__init__()
        self.r, self.scale, self.linear = r, scale, base
        self.lora_down = torch.nn.Linear(base.in_features, r, bias=False)
        self.dropout = torch.nn.Dropout(dropout_p)
        self.lora_up = torch.nn.Linear(r, base.out_features, bias=False)
        self.selector = torch.nn.Identity()

    def forward(self, x):
        return self.linear(x) + self.dropout(self.lora_up(self.selector(self.lora_down(x)))) * self.scale


class LoraInjectedConv2d(torch.nn.Module):
    """forward = conv(x) + dropout(lora_up(selector(lora_down(x)))) * scale; lora_down has the base's kernel."""

    def __init__(self, base: torch.nn.Conv2d, r: int = 4, scale: float = 1.0, dropout_p: float = 0.1):
        super().__init__()
        self.r, self.scale, self.conv = r, scale, base
        self.lora_down = torch.nn.Conv2d(base.in_channels, r, base.kernel_size, base.stride, base.padding,
                                         base.dilation, base.groups, bias=False)
        self.dropout = torch.nn.Dropout(dropout_p)
        self.lora_up = torch.nn.Conv2d(r, base.out_channels, 1, bias=False)
        self.selector = torch.nn.Identity()

    def forward(self, x):
        return self.conv(x) + self.dropout(self.lora_up(self.selector(self.lora_down(x)))) * self.scale


def patch_lora_diffusion(model, pairs, targets, scale=1.0):
    """Stock's loading of one part of a lora_diffusion file, re-written: for every module whose class name is in
    `targets` (model.modules() order), each plain nn.Linear / nn.Conv2d below it (named_modules() order) takes the next
    (up, down) pair of matching dimensionality, wrapped in an injected layer at `scale`; left in training mode, as
    stock leaves them (callers choose eval()). Returns the names filled, in order."""
    pairs, filled = list(pairs), []
    for ancestor_name, ancestor in list(model.named_modules()):
        # by class or base-class name: transformers 4.3x-4.5x's CLIPSdpaAttention is the CLIPAttention of stock's 4.30
        if not any(cls.__name__ in targets for cls in type(ancestor).__mro__):
            continue
        for name, child in list(ancestor.named_modules()):
            kind = {torch.nn.Linear: (LoraInjectedLinear, 2), torch.nn.Conv2d: (LoraInjectedConv2d, 4)}.get(type(child))
            if kind is None or pairs[0][0].ndim != kind[1]:  # an IndexError when the pairs run out, as stock's
                continue
            up, down = pairs.pop(0)
            layer = kind[0](child, r=down.shape[0], scale=scale)
            layer.lora_up.weight = torch.nn.Parameter(up.to(child.weight.dtype))
            layer.lora_down.weight = torch.nn.Parameter(down.to(child.weight.dtype))
            parent_name, _, attr = name.rpartition(".")
            parent = ancestor.get_submodule(parent_name) if parent_name else ancestor
            parent._modules[attr] = layer
            filled.append(f"{ancestor_name}.{name}" if ancestor_name else name)
    return filled
