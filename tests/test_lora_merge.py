"""guidance/lora_merge.py: the project's speed-ups on top of ptd_utils (parking through its functions, merged mode,
make_tracer), exact at w = 0."""
import contextlib
import copy
from collections import OrderedDict

import pytest
import torch
from lora_helpers import make_lora_unet, relative_weights, run_unet, toy_lora_model

from guidance.lora_merge import load_adapter_weights, make_tracer, merge_lora, scale, set_scale
from guidance.ptd_utils import PathTracer


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lora_unet(tiny_path):
    return make_lora_unet(tiny_path)


def _adapted(unet):
    return {n: m for n, m in unet.named_modules() if hasattr(m, "lora_A") and "ptd_path" in m.lora_A}


# ----------------------------------------------------------------------------------------------------------------------
# parking through this module's functions
# ----------------------------------------------------------------------------------------------------------------------
def test_weight_zero_skips_the_lora_branch_and_any_weight_brings_it_back(lora_unet):
    unet, inputs, base, trained = lora_unet
    calls = []
    hooks = [m.lora_A["ptd_path"].register_forward_hook(lambda *_: calls.append(1)) for m in _adapted(unet).values()]
    try:
        set_scale(unet, 0.0, "ptd_path")
        assert torch.equal(run_unet(unet, inputs), base) and calls == []  # no low-rank product computed at w = 0
        set_scale(unet, 1.0, "ptd_path")
        assert torch.equal(run_unet(unet, inputs), trained) and len(calls) == len(hooks) == 48
        calls.clear()
        with scale(unet, 0.0, "ptd_path"):
            assert torch.equal(run_unet(unet, inputs), base) and calls == []
        assert torch.equal(run_unet(unet, inputs), trained) and len(calls) == 48  # restored on exit
        with pytest.raises(ValueError, match="finite"):
            set_scale(unet, float("inf"))
        with pytest.raises(ValueError, match="no layer with LoRA adapter 'nope'"):
            set_scale(unet, 1.0, "nope")
    finally:
        for hook in hooks:
            hook.remove()


# ----------------------------------------------------------------------------------------------------------------------
# merged mode
# ----------------------------------------------------------------------------------------------------------------------
def test_merged_mode_is_the_branch_folded_into_the_weights(lora_unet):
    # float64, so that the only difference between the branch and the folded weight would be a wrong formula
    unet, inputs = copy.deepcopy(lora_unet[0]).double(), tuple(x.double() if x.is_floating_point() else x
                                                               for x in lora_unet[1])
    layers = _adapted(unet)
    originals = {n: m.base_layer.weight.detach().clone() for n, m in layers.items()}
    set_scale(unet, 0.0, "ptd_path")
    base = run_unet(unet, inputs)
    set_scale(unet, 1.0, "ptd_path")
    trained = run_unet(unet, inputs)
    branch = {}
    for w in (1.0, 0.37, -0.5):
        set_scale(unet, w, "ptd_path")
        branch[w] = run_unet(unet, inputs)
    calls = []
    hooks = [m.lora_A["ptd_path"].register_forward_hook(lambda *a: calls.append(1)) for m in layers.values()]
    try:
        merge_lora(unet, "ptd_path")
        for w in (1.0, 0.37, -0.5):
            set_scale(unet, w, "ptd_path")
            assert relative_weights(unet, "ptd_path") == {w}
            torch.testing.assert_close(run_unet(unet, inputs), branch[w], rtol=1e-9, atol=1e-10)
            name, layer = next(iter(layers.items()))  # the weight itself, against the formula in float64
            a, b = layer.lora_A["ptd_path"].weight.double(), layer.lora_B["ptd_path"].weight.double()
            expect = originals[name].double() + w * 8 / 4 * (b @ a)
            torch.testing.assert_close(layer.base_layer.weight, expect, rtol=1e-12, atol=1e-13)
        with scale(unet, 0.0, "ptd_path"):
            assert torch.equal(run_unet(unet, inputs), base)  # the prior, bit for bit, in the middle of tracing
        torch.testing.assert_close(run_unet(unet, inputs), branch[-0.5], rtol=1e-9, atol=1e-10)  # rewritten on exit
        set_scale(unet, 0.0, "ptd_path")
        assert torch.equal(run_unet(unet, inputs), base)
        assert all(torch.equal(m.base_layer.weight, originals[n]) for n, m in layers.items())
        set_scale(unet, 1.0, "ptd_path")
        assert calls == []  # the low-rank branch never ran: the weights carried it
    finally:
        for h in hooks:
            h.remove()
        merge_lora(unet, "ptd_path", enabled=False)
    assert all(torch.equal(m.base_layer.weight, originals[n]) for n, m in layers.items())  # W0 exactly
    assert torch.equal(run_unet(unet, inputs), trained)  # back on peft's branch, as before merging


def test_scale_zero_inside_merged_mode_is_w0_bit_for_bit_and_restores(lora_unet):
    unet, inputs, base, _ = lora_unet
    unet = copy.deepcopy(unet)
    layers = _adapted(unet)
    originals = {n: m.base_layer.weight.detach().clone() for n, m in layers.items()}
    set_scale(unet, 1.0, "ptd_path")
    merge_lora(unet, "ptd_path")
    try:
        set_scale(unet, 0.6, "ptd_path")
        merged = {n: m.base_layer.weight.detach().clone() for n, m in layers.items()}
        out = run_unet(unet, inputs)
        for fail in (False, True):
            with pytest.raises(RuntimeError, match="boom") if fail else contextlib.nullcontext():
                with scale(unet, 0.0, "ptd_path"):
                    assert all(torch.equal(m.base_layer.weight, originals[n]) for n, m in layers.items())
                    assert torch.equal(run_unet(unet, inputs).view(torch.int32), base.view(torch.int32))
                    if fail:
                        raise RuntimeError("boom")
            assert all(torch.equal(m.base_layer.weight, merged[n]) for n, m in layers.items())
            assert torch.equal(run_unet(unet, inputs), out) and relative_weights(unet, "ptd_path") == {0.6}
    finally:
        merge_lora(unet, "ptd_path", enabled=False)


def test_merged_mode_follows_checkpoints_and_the_tracer():
    from peft import get_peft_model_state_dict
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    plain = toy_lora_model().double()  # float64: any difference beyond rounding would be a wrong fold
    merged = copy.deepcopy(plain)
    base = merged[1].base_layer(merged[0].base_layer(x))
    ckpts = [{k: torch.randn(v.shape, generator=torch.Generator().manual_seed(i)) for k, v in
              get_peft_model_state_dict(plain, adapter_name="ptd_path").items()} for i in range(3)]
    for mode in ("weighted", "checkpoints"):
        tracers = [make_tracer(mode, model, merge=m, total_steps=7, switch_interval=2, checkpoints=ckpts)
                   for m, model in ((False, plain), (True, merged))]
        assert all(isinstance(t, PathTracer) and t.set_scale is set_scale and t.loader is load_adapter_weights
                   for t in tracers)
        load_adapter_weights(plain, ckpts[0], "ptd_path")
        load_adapter_weights(merged, ckpts[0], "ptd_path")
        for step in range(1, 10):
            weights = [t.apply(model, step) for t, model in zip(tracers, (plain, merged))]
            assert weights[0] == weights[1]
            with torch.no_grad():
                torch.testing.assert_close(merged(x), plain(x), rtol=1e-12, atol=1e-12)
                assert torch.equal(merged(x), base) == (weights[1] == 0.0)
        merge_lora(merged, "ptd_path", enabled=False)


@pytest.mark.filterwarnings("ignore:Already found a .peft_config:UserWarning")
def test_merge_lora_refuses_what_it_cannot_fold():
    from peft import LoraConfig, inject_adapter_in_model
    conv = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=["c"]),
                                   torch.nn.Sequential(OrderedDict(c=torch.nn.Conv2d(3, 4, 3))),
                                   adapter_name="ptd_path")
    with pytest.raises(ValueError, match="Conv2d layer cannot merge adapter 'ptd_path'") as err:
        merge_lora(conv, "ptd_path")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="Conv2d layer cannot merge"):
        make_tracer("weighted", conv, merge=True, total_steps=4)
    model = toy_lora_model()
    model.a.fan_in_fan_out = True
    with pytest.raises(ValueError, match="Linear layer cannot merge adapter 'ptd_path'"):
        merge_lora(model, "ptd_path")
    model = toy_lora_model(("ptd_path", "prior"))
    merge_lora(model, "prior")
    with pytest.raises(ValueError, match="already carries merged adapter 'prior'"):
        merge_lora(model, "ptd_path")
    with pytest.raises(ValueError, match="mode 'off'"):
        make_tracer("off", model, merge=True)
