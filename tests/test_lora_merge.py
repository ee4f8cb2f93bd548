"""guidance/lora_merge.py: the project's speed-ups on top of ptd_utils (parking through its functions, the in-place
fold, make_tracer), exact at w = 0."""
import contextlib
import copy
from collections import OrderedDict

import pytest
import torch
from lora_helpers import make_lora_unet, relative_weights, run_unet, toy_lora_model

from guidance.lora_merge import fold_lora, folded_adapter, load_adapter_weights, make_tracer, scale, set_scale
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
# the fold: W = W0 + w (alpha/r) B A in place, peft's wrappers out of the call path
# ----------------------------------------------------------------------------------------------------------------------
def _double(lora_unet):
    """A float64 copy of the fixture's UNet and inputs: the fold and the branch then differ only by a wrong formula."""
    unet, inputs = lora_unet[0], lora_unet[1]
    return copy.deepcopy(unet).double(), tuple(x.double() if x.is_floating_point() else x for x in inputs)


def _lora_modules(unet):
    from peft.tuners.lora import LoraLayer
    return [m for m in unet.modules() if isinstance(m, LoraLayer)]


def test_fold_is_the_branch_folded_into_the_weights_in_float64(lora_unet):
    unet, inputs = _double(lora_unet)
    layers = _adapted(unet)
    originals = {n: m.base_layer.weight.detach().clone() for n, m in layers.items()}
    set_scale(unet, 0.0, "ptd_path")
    base = run_unet(unet, inputs)
    branch = {}
    for w in (1.0, 0.37, -0.5, 0.0):
        set_scale(unet, w, "ptd_path")
        branch[w] = run_unet(unet, inputs)
    set_scale(unet, 1.0, "ptd_path")
    wrappers = torch.nn.ModuleList(_lora_modules(unet))  # set aside while folded; their scalings still follow w
    fold_lora(unet, "ptd_path")
    try:
        assert folded_adapter(unet) == "ptd_path" and relative_weights(wrappers, "ptd_path") == {1.0}
        torch.testing.assert_close(run_unet(unet, inputs), branch[1.0], rtol=1e-9, atol=1e-10)  # folded at its w
        for w in (0.37, -0.5, 1.0, 0.37):
            set_scale(unet, w, "ptd_path")
            assert relative_weights(wrappers, "ptd_path") == {w} and relative_weights(unet) == set()
            torch.testing.assert_close(run_unet(unet, inputs), branch[w], rtol=1e-9, atol=1e-10)
            for name, layer in layers.items():  # each weight against the formula, in float64
                a, b = layer.lora_A["ptd_path"].weight, layer.lora_B["ptd_path"].weight
                torch.testing.assert_close(layer.base_layer.weight, originals[name] + w * 8 / 4 * (b @ a),
                                           rtol=1e-12, atol=1e-13)
        set_scale(unet, 0.0, "ptd_path")  # after folding at other weights: W0 and the prior, bit for bit
        assert all(torch.equal(m.base_layer.weight, originals[n]) for n, m in layers.items())
        assert torch.equal(run_unet(unet, inputs), base) and torch.equal(branch[0.0], base)
        set_scale(unet, -0.5, "ptd_path")
    finally:
        fold_lora(unet, "ptd_path", enabled=False)
    assert folded_adapter(unet) is None
    assert all(torch.equal(m.base_layer.weight, originals[n]) for n, m in layers.items())  # W0 exactly
    assert relative_weights(unet, "ptd_path") == {-0.5}
    assert torch.equal(run_unet(unet, inputs), branch[-0.5])  # back on peft's branch at the folded weight
    set_scale(unet, 0.0, "ptd_path")
    assert torch.equal(run_unet(unet, inputs), base)


def test_fold_writes_in_place_and_takes_peft_out_of_the_call_path(lora_unet):
    """Graph safety: every adapted weight keeps its Parameter object and storage across weight changes, loads of new
    factors and fold/unfold; while folded no peft wrapper is in the module tree or runs."""
    from peft import get_peft_model_state_dict
    unet, inputs = _double(lora_unet)
    layers = _adapted(unet)
    params = {n: m.base_layer.weight for n, m in layers.items()}
    pointers = {n: p.data_ptr() for n, p in params.items()}
    wrappers = _lora_modules(unet)
    assert len(wrappers) == 48
    calls = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in wrappers]
    g = torch.Generator().manual_seed(3)
    factors = {k: 0.2 * torch.randn(v.shape, generator=g, dtype=v.dtype)
               for k, v in get_peft_model_state_dict(unet, adapter_name="ptd_path").items()}

    def same_storage():
        return all(m.base_layer.weight is params[n] and params[n].data_ptr() == pointers[n]
                   for n, m in layers.items())

    try:
        for _ in range(2):  # fold, unfold, fold again
            set_scale(unet, 0.8, "ptd_path")
            fold_lora(unet, "ptd_path")
            assert _lora_modules(unet) == [] and same_storage()
            assert all(unet.get_submodule(n) is m.base_layer for n, m in layers.items())
            for w in (0.8, 0.3, 0.0, -1.2):
                set_scale(unet, w, "ptd_path")
                run_unet(unet, inputs)
                assert same_storage()
            with scale(unet, 0.0, "ptd_path"):
                run_unet(unet, inputs)
            load_adapter_weights(unet, factors, "ptd_path")  # checkpoints mode: new factors, same storage
            assert same_storage() and _lora_modules(unet) == [] and calls == []
            fold_lora(unet, "ptd_path", enabled=False)
            assert same_storage() and _lora_modules(unet) == wrappers
            run_unet(unet, inputs)
            assert len(calls) == 48  # peft's wrappers run again once unfolded
            calls.clear()
    finally:
        for hook in hooks:
            hook.remove()
        fold_lora(unet, "ptd_path", enabled=False)


def test_scale_zero_inside_the_fold_is_w0_bit_for_bit_and_restores(lora_unet):
    unet, inputs, base, _ = lora_unet
    unet = copy.deepcopy(unet)
    layers = _adapted(unet)
    wrappers = torch.nn.ModuleList(layers.values())
    originals = {n: m.base_layer.weight.detach().clone() for n, m in layers.items()}
    set_scale(unet, 1.0, "ptd_path")
    fold_lora(unet, "ptd_path")
    try:
        set_scale(unet, 0.6, "ptd_path")
        folded = {n: m.base_layer.weight.detach().clone() for n, m in layers.items()}
        out = run_unet(unet, inputs)
        for fail in (False, True):
            with pytest.raises(RuntimeError, match="boom") if fail else contextlib.nullcontext():
                with scale(unet, 0.0, "ptd_path"):
                    assert all(torch.equal(m.base_layer.weight, originals[n]) for n, m in layers.items())
                    assert torch.equal(run_unet(unet, inputs).view(torch.int32), base.view(torch.int32))
                    if fail:
                        raise RuntimeError("boom")
            assert all(torch.equal(m.base_layer.weight, folded[n]) for n, m in layers.items())
            assert torch.equal(run_unet(unet, inputs), out) and relative_weights(wrappers, "ptd_path") == {0.6}
        with scale(unet, 0.0):  # adapter None (sample_prior_latents' prior): the folded adapter too
            assert torch.equal(run_unet(unet, inputs), base)
        assert torch.equal(run_unet(unet, inputs), out)
    finally:
        fold_lora(unet, "ptd_path", enabled=False)


def _checkpoints(model, n=3):
    from peft import get_peft_model_state_dict
    return [{k: 0.3 * torch.randn(v.shape, generator=torch.Generator().manual_seed(i), dtype=v.dtype) for k, v in
             get_peft_model_state_dict(model, adapter_name="ptd_path").items()} for i in range(n)]


def test_the_fold_follows_checkpoints_and_the_tracer():
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    plain = toy_lora_model().double()  # float64: any difference beyond rounding would be a wrong fold
    folded = copy.deepcopy(plain)
    base = folded[1].base_layer(folded[0].base_layer(x))
    ckpts = _checkpoints(plain)
    for mode in ("weighted", "checkpoints"):
        tracers = [make_tracer(mode, model, fold=f, total_steps=7, switch_interval=2, checkpoints=ckpts)
                   for f, model in ((False, plain), (True, folded))]
        assert all(isinstance(t, PathTracer) and t.set_scale is set_scale and t.loader is load_adapter_weights
                   for t in tracers)
        load_adapter_weights(plain, ckpts[0], "ptd_path")
        load_adapter_weights(folded, ckpts[0], "ptd_path")
        for step in range(1, 10):
            weights = [t.apply(model, step) for t, model in zip(tracers, (plain, folded))]
            assert weights[0] == weights[1]
            with torch.no_grad():
                torch.testing.assert_close(folded(x), plain(x), rtol=1e-12, atol=1e-12)
                assert torch.equal(folded(x), base) == (weights[1] == 0.0)
        fold_lora(folded, "ptd_path", enabled=False)


def test_the_tracer_gives_the_same_unet_outputs_folded_and_on_the_branch(lora_unet):
    branch, inputs = _double(lora_unet)
    folded = copy.deepcopy(branch)
    ckpts = _checkpoints(branch, 2)
    for mode in ("weighted", "checkpoints"):
        tracers = [make_tracer(mode, model, fold=f, total_steps=5, power=0.3, switch_interval=2, checkpoints=ckpts)
                   for f, model in ((False, branch), (True, folded))]
        assert folded_adapter(folded) == "ptd_path" and folded_adapter(branch) is None
        for step in (1, 2, 3, 4, 5, 6):
            assert tracers[0].apply(branch, step) == tracers[1].apply(folded, step)
            torch.testing.assert_close(run_unet(folded, inputs), run_unet(branch, inputs), rtol=1e-9, atol=1e-10)
        fold_lora(folded, "ptd_path", enabled=False)


@pytest.mark.filterwarnings("ignore:Already found a .peft_config:UserWarning")
def test_fold_lora_refuses_what_it_cannot_fold():
    from peft import LoraConfig, inject_adapter_in_model
    conv = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=["c"]),
                                   torch.nn.Sequential(OrderedDict(c=torch.nn.Conv2d(3, 4, 3))),
                                   adapter_name="ptd_path")
    with pytest.raises(ValueError, match="Conv2d layer cannot fold adapter 'ptd_path'") as err:
        fold_lora(conv, "ptd_path")
    assert "\n" not in str(err.value) and folded_adapter(conv) is None
    with pytest.raises(ValueError, match="Conv2d layer cannot fold"):
        make_tracer("weighted", conv, fold=True, total_steps=4)
    model = toy_lora_model()
    model.a.fan_in_fan_out = True
    with pytest.raises(ValueError, match="Linear layer cannot fold adapter 'ptd_path'"):
        fold_lora(model, "ptd_path")
    model = toy_lora_model(("ptd_path", "prior"))
    with pytest.raises(ValueError, match=r"also holds adapter\(s\) \['prior'\]"):
        fold_lora(model, "ptd_path")
    assert folded_adapter(model) is None and isinstance(model.a, type(toy_lora_model().a))  # left untouched
    for switch_off in (lambda m: m.set_adapter([]), lambda m: m.enable_adapters(False)):  # inactive, disabled
        model = toy_lora_model()
        for layer in (model.a, model.b):
            switch_off(layer)
        with pytest.raises(ValueError, match="adapter 'ptd_path' is disabled or inactive") as err:
            fold_lora(model, "ptd_path")  # peft skips it: folded, the tracer's next w > 0 would apply it
        assert "\n" not in str(err.value) and folded_adapter(model) is None
    model = toy_lora_model()
    set_scale(model, 0.0, "ptd_path")  # parked at w = 0 (out of the active adapters by its weight): foldable
    fold_lora(model, "ptd_path")
    assert folded_adapter(model) == "ptd_path"
    fold_lora(model, "ptd_path", enabled=False)
    model = toy_lora_model()
    set_scale(model.a, 0.5, "ptd_path")  # one layer at another weight than the other
    with pytest.raises(ValueError, match="different weights"):
        fold_lora(model, "ptd_path")
    set_scale(model, 0.5, "ptd_path")
    fold_lora(model, "ptd_path")
    fold_lora(model, "ptd_path")  # folded already: nothing to do
    with pytest.raises(ValueError, match="adapter 'ptd_path' is folded into this model"):
        fold_lora(model, "other")
    with pytest.raises(ValueError, match="mode 'off'"):
        make_tracer("off", model, fold=True)
