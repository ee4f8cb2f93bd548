"""Helpers shared by the LoRA-scale tests (tests/test_ptd_utils.py, tests/test_lora_merge.py)."""
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
