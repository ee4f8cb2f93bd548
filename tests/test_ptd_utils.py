"""guidance/ptd_utils.py: w(iter) of paper Alg. 2, exact LoRA scale control, the stage-2 tracer, and the file alone."""
import ast
import copy
import os
import shutil
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from guidance.ptd_utils import (SCHEDULES, PathTracer, get_lora_scale, load_adapter_weights, lora_scale, merge_lora,
                                ptd_weight,
                                set_lora_scale)

PTD_UTILS = Path(__file__).resolve().parents[1] / "guidance" / "ptd_utils.py"
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------------------------
# schedules
# ----------------------------------------------------------------------------------------------------------------------
def test_ptd_weight_values():
    assert ptd_weight(1) == 1.0
    assert ptd_weight(1000) == pytest.approx(1 - (999 / 1000) ** 0.3, abs=1e-15)
    assert ptd_weight(501, 1000, 0.3) == pytest.approx(1 - 0.5 ** 0.3)
    assert ptd_weight(1001) == 0.0 and ptd_weight(10 ** 6) == 0.0
    assert ptd_weight(11, total_steps=20, power=1.0) == pytest.approx(0.5)
    for bad in (0, -3):
        with pytest.raises(ValueError, match="1-based"):
            ptd_weight(bad)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedules_fall_from_one_to_zero(name):
    w = [SCHEDULES[name](s, 50, 0.3) for s in range(1, 60)]
    assert w[0] == 1.0 and all(v == 0.0 for v in w[50:])
    assert all(a >= b for a, b in zip(w, w[1:])) and all(0.0 <= v <= 1.0 for v in w)
    assert w[49] > 0.0  # the LoRA is still on at step T itself


# ----------------------------------------------------------------------------------------------------------------------
# set_lora_scale on the tiny UNet (r=4, lora_alpha=8: scale 2 at weight 1)
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_unet(tiny_path):
    """(unet with a randomised LoRA r=4 alpha=8, inputs, base output, peft's output at its default scaling)."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(tiny_path, subfolder="unet").eval()
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 77, 32, generator=g))
    with torch.no_grad():
        base = unet(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=TARGETS),
                         adapter_name="ptd_path")
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".lora_" in name:  # B is zero at init: randomise so that the LoRA changes the output
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
        trained = unet(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample
    assert (trained - base).abs().max() > 0.05
    return unet, inputs, base, trained


def _run(unet, inputs):
    with torch.no_grad():
        return unet(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample


def test_weight_zero_is_the_base_bit_for_bit(lora_unet):
    unet, inputs, base, _ = lora_unet
    set_lora_scale(unet, 0.0, "ptd_path")
    out = _run(unet, inputs)
    assert torch.equal(out, base)
    assert torch.equal(out.view(torch.int32), base.view(torch.int32))  # also the sign bits
    set_lora_scale(unet, 1.0)


def test_weight_zero_skips_the_lora_branch_and_any_weight_brings_it_back(lora_unet):
    unet, inputs, base, trained = lora_unet
    calls = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for name, m in unet.named_modules()
             if name.endswith("lora_A.ptd_path")]
    try:
        set_lora_scale(unet, 0.0, "ptd_path")
        assert torch.equal(_run(unet, inputs), base) and calls == []  # no low-rank product computed at w = 0
        set_lora_scale(unet, 1.0, "ptd_path")
        assert torch.equal(_run(unet, inputs), trained) and len(calls) == len(hooks) == 48
        calls.clear()
        set_lora_scale(unet, 1.0)
        with lora_scale(unet, 0.0, "ptd_path"):
            assert torch.equal(_run(unet, inputs), base) and calls == []
        assert torch.equal(_run(unet, inputs), trained) and len(calls) == 48  # restored on exit
    finally:
        for hook in hooks:
            hook.remove()


def test_weight_one_is_the_lora_as_trained_with_alpha_not_r(lora_unet):
    unet, inputs, _, trained = lora_unet
    set_lora_scale(unet, 0.2, "ptd_path")
    set_lora_scale(unet, 1.0, "ptd_path")
    assert torch.equal(_run(unet, inputs), trained)
    layers = unet.__dict__["_ptd_lora_layers"][1]
    assert len(layers) == 48 and all(layer.scaling["ptd_path"] == 2.0 for layer in layers)  # alpha / r = 8 / 4
    assert get_lora_scale(unet) == 1.0


def test_affine_in_w_at_one_layer_and_matches_the_formula(lora_unet):
    unet, *_ = lora_unet
    layer = unet.__dict__["_ptd_lora_layers"][1][0]
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(1))
    outs = {}
    for w in (0.0, 0.37, 1.0, 1.6):
        set_lora_scale(unet, w)
        with torch.no_grad():
            outs[w] = layer(x)
    set_lora_scale(unet, 1.0)
    A, B = layer.lora_A["ptd_path"].weight, layer.lora_B["ptd_path"].weight
    with torch.no_grad():  # reference twin: W x + b + w (alpha / r) B A x
        torch.testing.assert_close(outs[1.0], layer.base_layer(x) + 2.0 * x @ A.T @ B.T)
    for w in (0.37, 1.6):
        torch.testing.assert_close(outs[w], outs[0.0] + w * (outs[1.0] - outs[0.0]))


def test_get_and_context_manager_restore_also_on_error(lora_unet):
    unet, inputs, base, _ = lora_unet
    set_lora_scale(unet, 0.25)
    assert get_lora_scale(unet, "ptd_path") == pytest.approx(0.25, abs=1e-12)
    with lora_scale(unet, 0.0, "ptd_path"):
        assert get_lora_scale(unet) == 0.0 and torch.equal(_run(unet, inputs), base)
    assert get_lora_scale(unet) == pytest.approx(0.25, abs=1e-12)
    with pytest.raises(RuntimeError, match="boom"):
        with lora_scale(unet, 0.9):
            raise RuntimeError("boom")
    assert get_lora_scale(unet) == pytest.approx(0.25, abs=1e-12)
    set_lora_scale(unet, 1.0)


def test_bad_adapter_and_weight(lora_unet):
    unet, *_ = lora_unet
    with pytest.raises(ValueError, match="no layer with LoRA adapter 'nope'"):
        set_lora_scale(unet, 1.0, "nope")
    with pytest.raises(ValueError, match="finite"):
        set_lora_scale(unet, float("nan"))
    plain = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="no layer with any LoRA adapter"):
        get_lora_scale(plain)


# ----------------------------------------------------------------------------------------------------------------------
# a toy two-layer model with peft LoRA: adapters, cache, tracer
# ----------------------------------------------------------------------------------------------------------------------
def _toy(adapters=("ptd_path",), r=2, alpha=6.0):
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


@pytest.mark.filterwarnings("ignore:(Already found a .peft_config|Adapter extra was active):UserWarning")
def test_one_adapter_of_two_and_cache_refresh(lora_unet):
    model = _toy(("ptd_path", "prior"))
    set_lora_scale(model, 0.5, "ptd_path")
    assert get_lora_scale(model, "ptd_path") == 0.5 and get_lora_scale(model, "prior") == 1.0
    with pytest.raises(ValueError, match="disagree"):
        get_lora_scale(model)
    set_lora_scale(model, 0.0)
    assert get_lora_scale(model) == 0.0
    # adding an adapter to a diffusers model changes peft_config: the cache is rebuilt and sees it
    from peft import LoraConfig
    unet = lora_unet[0]
    cached = unet.__dict__["_ptd_lora_layers"]
    assert unet.__dict__["_ptd_lora_layers"] is cached  # collected once
    with torch.random.fork_rng(devices=[]):
        unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"]), adapter_name="extra")
    try:
        assert unet.active_adapters() == ["extra"]  # diffusers' add_adapter activates the new adapter only
        with pytest.raises(ValueError, match="'ptd_path' is not active"):
            set_lora_scale(unet, 0.5, "ptd_path")
        set_lora_scale(unet, 0.5, "extra")
        assert unet.__dict__["_ptd_lora_layers"] is not cached and get_lora_scale(unet, "extra") == 0.5
        assert get_lora_scale(unet, "ptd_path") == 1.0
    finally:
        unet.delete_adapters("extra")
        unet.set_adapter("ptd_path")
    set_lora_scale(unet, 1.0, "ptd_path")


def test_tracer_weighted_follows_alg2():
    model = _toy()
    tracer = PathTracer("weighted", total_steps=10, power=0.3)
    for step in range(1, 14):
        w = tracer.apply(model, step)
        assert w == ptd_weight(step, 10, 0.3) and get_lora_scale(model, "ptd_path") == pytest.approx(w, abs=1e-12)
    assert get_lora_scale(model) == 0.0 and tracer.last_step == 13
    assert PathTracer("weighted", total_steps=10, schedule="linear").weight_at(6) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="mode 'off'"):
        PathTracer("off")


def _checkpoint(model, value):
    from peft import get_peft_model_state_dict
    return {k: torch.full_like(v, value) for k, v in get_peft_model_state_dict(model, adapter_name="ptd_path").items()}


def test_tracer_checkpoints_reverse_order_and_switch_timing():
    model = _toy()
    ckpts = [_checkpoint(model, float(i + 1)) for i in range(3)]  # s^(1), s^(2), s^(3): weights filled with 1, 2, 3
    calls = []

    def loader(m, state, name):
        calls.append(float(next(iter(state.values())).flatten()[0]))
        load_adapter_weights(m, state, name)

    tracer = PathTracer("checkpoints", total_steps=100, switch_interval=4, checkpoints=ckpts, loader=loader)
    expect = {1: (3, 1.0), 4: (3, 1.0), 5: (2, 1.0), 8: (2, 1.0), 9: (1, 1.0), 12: (1, 1.0), 13: (None, 0.0)}
    for step in range(1, 20):
        w = tracer.apply(model, step)
        value, weight = expect.get(step, expect[max(s for s in expect if s <= step)])
        assert w == weight and get_lora_scale(model) == weight
        if value is not None:
            assert torch.all(model.a.lora_A["ptd_path"].weight == value)
    assert calls == [3.0, 2.0, 1.0]  # loaded only when switching, in reverse order
    assert [tracer.checkpoint_at(s) for s in (1, 5, 9, 13)] == [2, 1, 0, None]
    assert PathTracer("checkpoints", total_steps=6, switch_interval=4, checkpoints=ckpts).weight_at(7) == 0.0


def test_tracer_state_dict_round_trip_reloads_checkpoint():
    model = _toy()
    ckpts = [_checkpoint(model, 1.0), _checkpoint(model, 2.0)]
    tracer = PathTracer("checkpoints", total_steps=50, switch_interval=3, checkpoints=ckpts)
    for step in range(1, 6):
        tracer.apply(model, step)
    state = tracer.state_dict()
    assert state["last_step"] == 5 and state["mode"] == "checkpoints"
    resumed = PathTracer("checkpoints", total_steps=50, switch_interval=3, checkpoints=ckpts)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    with torch.no_grad():
        model.a.lora_A["ptd_path"].weight.fill_(9.0)  # the model was rebuilt from the final LoRA on resume
    resumed.apply(model, 6)
    assert torch.all(model.a.lora_A["ptd_path"].weight == 1.0)
    with pytest.raises(ValueError, match="does not match"):
        PathTracer("weighted", total_steps=50).load_state_dict(state)


def test_load_adapter_weights_rejects_partial_and_foreign_keys():
    model = _toy()
    state = _checkpoint(model, 1.0)
    with pytest.raises(ValueError, match="misses 1 of 4"):
        load_adapter_weights(model, dict(list(state.items())[:3]), "ptd_path")
    with pytest.raises(ValueError, match="matches no parameter"):
        load_adapter_weights(model, {"unet.a.lora_A.weight": torch.zeros(2, 3)}, "ptd_path")


# ----------------------------------------------------------------------------------------------------------------------
# merged mode
# ----------------------------------------------------------------------------------------------------------------------
def _adapted(unet):
    return {n: m for n, m in unet.named_modules() if hasattr(m, "lora_A") and "ptd_path" in m.lora_A}


def test_merged_mode_is_the_branch_folded_into_the_weights(lora_unet):
    # float64, so that the only difference between the branch and the folded weight would be a wrong formula
    unet, inputs = copy.deepcopy(lora_unet[0]).double(), tuple(x.double() if x.is_floating_point() else x
                                                               for x in lora_unet[1])
    layers = _adapted(unet)
    originals = {n: m.base_layer.weight.detach().clone() for n, m in layers.items()}
    set_lora_scale(unet, 0.0, "ptd_path")
    base = _run(unet, inputs)
    set_lora_scale(unet, 1.0, "ptd_path")
    trained = _run(unet, inputs)
    branch = {}
    for w in (1.0, 0.37, -0.5):
        set_lora_scale(unet, w, "ptd_path")
        branch[w] = _run(unet, inputs)
    calls = []
    hooks = [m.lora_A["ptd_path"].register_forward_hook(lambda *a: calls.append(1)) for m in layers.values()]
    try:
        merge_lora(unet, "ptd_path")
        for w in (1.0, 0.37, -0.5):
            set_lora_scale(unet, w, "ptd_path")
            assert get_lora_scale(unet, "ptd_path") == w
            torch.testing.assert_close(_run(unet, inputs), branch[w], rtol=1e-9, atol=1e-10)
            name, layer = next(iter(layers.items()))  # the weight itself, against the formula in float64
            a, b = layer.lora_A["ptd_path"].weight.double(), layer.lora_B["ptd_path"].weight.double()
            expect = originals[name].double() + w * 8 / 4 * (b @ a)
            torch.testing.assert_close(layer.base_layer.weight, expect, rtol=1e-12, atol=1e-13)
        with lora_scale(unet, 0.0, "ptd_path"):
            assert torch.equal(_run(unet, inputs), base)  # the prior, bit for bit, in the middle of tracing
        torch.testing.assert_close(_run(unet, inputs), branch[-0.5], rtol=1e-9, atol=1e-10)  # rewritten on exit
        set_lora_scale(unet, 0.0, "ptd_path")
        assert torch.equal(_run(unet, inputs), base)
        assert all(torch.equal(m.base_layer.weight, originals[n]) for n, m in layers.items())
        set_lora_scale(unet, 1.0, "ptd_path")
        assert calls == []  # the low-rank branch never ran: the weights carried it
    finally:
        for h in hooks:
            h.remove()
        merge_lora(unet, "ptd_path", enabled=False)
    assert all(torch.equal(m.base_layer.weight, originals[n]) for n, m in layers.items())  # W0 exactly
    assert torch.equal(_run(unet, inputs), trained)  # back on peft's branch, as before merging


def test_merged_mode_follows_checkpoints_and_the_tracer():
    from peft import get_peft_model_state_dict
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    plain = _toy().double()  # float64: any difference beyond rounding would be a wrong fold
    merged = copy.deepcopy(plain)
    base = merged[1].base_layer(merged[0].base_layer(x))
    ckpts = [{k: torch.randn(v.shape, generator=torch.Generator().manual_seed(i)) for k, v in
              get_peft_model_state_dict(plain, adapter_name="ptd_path").items()} for i in range(3)]
    for mode in ("weighted", "checkpoints"):
        tracers = [PathTracer(mode, total_steps=7, switch_interval=2, checkpoints=ckpts, merge=m) for m in (0, 1)]
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
    model = _toy(("ptd_path", "prior"))
    merge_lora(model, "prior")
    with pytest.raises(ValueError, match="already carries merged adapter 'prior'"):
        merge_lora(model, "ptd_path")


# ----------------------------------------------------------------------------------------------------------------------
# the copyable file
# ----------------------------------------------------------------------------------------------------------------------
def test_imports_only_stdlib_and_torch():
    tree = ast.parse(PTD_UTILS.read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
    assert all(r == "torch" or r in sys.stdlib_module_names for r in roots), roots
    assert not any(isinstance(n, ast.ImportFrom) and n.level > 0 for n in ast.walk(tree))


def test_file_alone_works_in_another_project(tmp_path):
    shutil.copy(PTD_UTILS, tmp_path / "ptd_utils.py")
    (tmp_path / "fork.py").write_text(textwrap.dedent("""
        import sys, torch
        from peft import LoraConfig, inject_adapter_in_model
        import ptd_utils
        assert ptd_utils.__file__.startswith(sys.path[0]) and "guidance" not in sys.modules
        torch.manual_seed(0)
        model = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False),
                                        torch.nn.Sequential(torch.nn.Linear(8, 8)), adapter_name="ptd_path")
        x = torch.randn(5, 8)
        base = model[0].base_layer(x)
        tracer = ptd_utils.PathTracer("weighted", total_steps=4, power=0.3)
        for step in range(1, 7):
            w = tracer.apply(model, step)
            out = model(x)
            assert torch.equal(out, base) == (w == 0.0), (step, w)
        print("ok", w)
    """))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "fork.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok 0.0"

