"""guidance/ptd_utils.py: w(iter) of paper Alg. 2, exact LoRA scale control, the stage-2 tracer, and the file alone.
(The project's speed-ups on top, guidance/lora_merge.py: tests/test_lora_merge.py.)"""
import ast
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from lora_helpers import make_lora_unet, relative_weights, run_unet, toy_lora_model

from guidance.ptd_utils import PathTracer, _lora_layers, load_adapter_weights, lora_scale, ptd_weight, set_lora_scale

PTD_UTILS = Path(__file__).resolve().parents[1] / "guidance" / "ptd_utils.py"


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


def test_ptd_weight_falls_from_one_to_zero():
    w = [ptd_weight(s, 50, 0.3) for s in range(1, 60)]
    assert w[0] == 1.0 and all(v == 0.0 for v in w[50:])
    assert all(a >= b for a, b in zip(w, w[1:])) and all(0.0 <= v <= 1.0 for v in w)
    assert w[49] > 0.0  # the LoRA is still on at step T itself


# ----------------------------------------------------------------------------------------------------------------------
# set_lora_scale on the tiny UNet (r=4, lora_alpha=8: scale 2 at weight 1)
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_unet(tiny_path):
    return make_lora_unet(tiny_path)


def test_weight_zero_is_the_base_bit_for_bit(lora_unet):
    unet, inputs, base, _ = lora_unet
    set_lora_scale(unet, 0.0, "ptd_path")
    out = run_unet(unet, inputs)
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
        assert torch.equal(run_unet(unet, inputs), base) and calls == []  # no low-rank product computed at w = 0
        set_lora_scale(unet, 1.0, "ptd_path")
        assert torch.equal(run_unet(unet, inputs), trained) and len(calls) == len(hooks) == 48
        calls.clear()
        set_lora_scale(unet, 1.0)
        with lora_scale(unet, 0.0, "ptd_path"):
            assert torch.equal(run_unet(unet, inputs), base) and calls == []
        assert torch.equal(run_unet(unet, inputs), trained) and len(calls) == 48  # restored on exit
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("dtype, tiny, bits", [(torch.float32, 1e-30, torch.int32), (torch.float16, 1e-4, torch.int16)])
def test_weight_zero_is_exact_where_peft_branch_times_zero_is_not(dtype, tiny, bits):
    """Why weight 0 parks the adapter: peft's branch at scaling 0 adds +0.0 to a base output of -0.0 (-> +0.0), and a
    low-rank product that overflows (fp16) adds inf * 0 = NaN."""
    from peft import LoraConfig, inject_adapter_in_model
    model = inject_adapter_in_model(LoraConfig(r=1, lora_alpha=1, target_modules=["0"], init_lora_weights=False),
                                    torch.nn.Sequential(torch.nn.Linear(1, 3)), adapter_name="ptd_path").to(dtype)
    layer = model[0]
    small, big = torch.full((2, 1), -tiny, dtype=dtype), torch.full((2, 1), 60000.0, dtype=dtype)
    with torch.no_grad():
        layer.base_layer.weight.fill_(tiny)
        layer.base_layer.bias.fill_(-0.0)
        layer.lora_A["ptd_path"].weight.fill_(-300.0)
        layer.lora_B["ptd_path"].weight.fill_(300.0)
        base_small, base_big = layer.base_layer(small), layer.base_layer(big)
        assert torch.signbit(base_small).all() and (base_small == 0).all()  # -0.0: the product underflows
        layer.set_scale("ptd_path", 0.0)  # peft alone: the branch, multiplied by 0
        assert not torch.equal(model(small).view(bits), base_small.view(bits))
        assert torch.isnan(model(big)).all() == (dtype == torch.float16) and torch.isfinite(base_big).all()
        set_lora_scale(model, 0.0, "ptd_path")  # parked
        assert torch.equal(model(small).view(bits), base_small.view(bits))
        assert torch.equal(model(big).view(bits), base_big.view(bits))


@pytest.mark.filterwarnings("ignore:Already found a .peft_config:UserWarning")
def test_parking_keeps_requires_grad_and_yields_to_set_adapter():
    model = toy_lora_model(("ptd_path", "prior"))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.a.lora_A["prior"].weight.requires_grad_(False)
    flags["a.lora_A.prior.weight"] = False
    set_lora_scale(model, 0.0, "ptd_path")
    assert model.a.active_adapters == ["prior"]  # parked
    set_lora_scale(model, 1.0, "ptd_path")
    assert model.a.active_adapters == ["ptd_path", "prior"]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags  # set_adapter's side effect undone
    set_lora_scale(model, 0.0, "ptd_path")
    model.a.set_adapter("prior")  # anyone else's choice of active adapters wins over the parking
    set_lora_scale(model, 0.5)
    assert model.a.active_adapters == ["prior"] and model.b.active_adapters == ["ptd_path", "prior"]


def test_weight_one_is_the_lora_as_trained_with_alpha_not_r(lora_unet):
    unet, inputs, _, trained = lora_unet
    set_lora_scale(unet, 0.2, "ptd_path")
    set_lora_scale(unet, 1.0, "ptd_path")
    assert torch.equal(run_unet(unet, inputs), trained)
    layers = _lora_layers(unet, "ptd_path")
    assert len(layers) == 48 and all(layer.scaling["ptd_path"] == 2.0 for layer in layers)  # alpha / r = 8 / 4
    assert relative_weights(unet) == {1.0}


def test_affine_in_w_at_one_layer_and_matches_the_formula(lora_unet):
    unet, *_ = lora_unet
    layer = _lora_layers(unet, "ptd_path")[0]
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


def test_context_manager_restores_also_on_error(lora_unet):
    unet, inputs, base, _ = lora_unet
    set_lora_scale(unet, 0.25)
    assert relative_weights(unet, "ptd_path") == {0.25}
    before = {id(m): dict(m.scaling) for m in _lora_layers(unet, None)}
    with lora_scale(unet, 0.0, "ptd_path"):
        assert relative_weights(unet) == {0.0} and torch.equal(run_unet(unet, inputs), base)
    assert {id(m): dict(m.scaling) for m in _lora_layers(unet, None)} == before  # the very same floats
    with pytest.raises(RuntimeError, match="boom"):
        with lora_scale(unet, 0.9):
            raise RuntimeError("boom")
    assert {id(m): dict(m.scaling) for m in _lora_layers(unet, None)} == before
    set_lora_scale(unet, 1.0)


def test_bad_adapter_and_weight(lora_unet):
    unet, *_ = lora_unet
    with pytest.raises(ValueError, match="no layer with LoRA adapter 'nope'"):
        set_lora_scale(unet, 1.0, "nope")
    with pytest.raises(ValueError, match="finite"):
        set_lora_scale(unet, float("nan"))
    plain = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="no layer with any LoRA adapter"):
        set_lora_scale(plain, 1.0)
    for bad in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="finite") as err, lora_scale(unet, bad):
            pass
        assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------------------------------------
# a toy two-layer model with peft LoRA: adapters, cache, tracer
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:(Already found a .peft_config|Adapter extra was active):UserWarning")
def test_one_adapter_of_two_and_cache_refresh(lora_unet):
    model = toy_lora_model(("ptd_path", "prior"))
    set_lora_scale(model, 0.5, "ptd_path")
    assert relative_weights(model, "ptd_path") == {0.5} and relative_weights(model, "prior") == {1.0}
    assert relative_weights(model) == {0.5, 1.0}  # the other adapter is left alone
    set_lora_scale(model, 0.0)
    assert relative_weights(model) == {0.0}
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
        assert unet.__dict__["_ptd_lora_layers"] is not cached and relative_weights(unet, "extra") == {0.5}
        assert relative_weights(unet, "ptd_path") == {1.0}
    finally:
        unet.delete_adapters("extra")
        unet.set_adapter("ptd_path")
    set_lora_scale(unet, 1.0, "ptd_path")


def test_tracer_weighted_follows_alg2():
    model = toy_lora_model()
    tracer = PathTracer("weighted", total_steps=10, power=0.3)
    for step in range(1, 14):
        w = tracer.apply(model, step)
        assert w == ptd_weight(step, 10, 0.3) and relative_weights(model, "ptd_path") == {round(w, 12)}
    assert relative_weights(model) == {0.0} and tracer.last_step == 13
    assert PathTracer("weighted", total_steps=10, power=1.0).weight_at(6) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="mode 'off'"):
        PathTracer("off")
    with pytest.raises(ValueError, match=r"power \(C\) must be > 0"):
        PathTracer("weighted", power=0.0)


def test_tracer_set_scale_is_the_extension_point():
    model, calls = toy_lora_model(), []
    tracer = PathTracer("weighted", total_steps=4, set_scale=lambda m, w, name: calls.append((m, w, name)))
    assert [tracer.apply(model, s) for s in (1, 5)] == [1.0, 0.0]
    assert calls == [(model, 1.0, "ptd_path"), (model, 0.0, "ptd_path")]
    assert relative_weights(model) == {1.0}  # untouched


def _checkpoint(model, value):
    from peft import get_peft_model_state_dict
    return {k: torch.full_like(v, value) for k, v in get_peft_model_state_dict(model, adapter_name="ptd_path").items()}


def test_tracer_checkpoints_reverse_order_and_switch_timing():
    model = toy_lora_model()
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
        assert w == weight and relative_weights(model) == {weight}
        if value is not None:
            assert torch.all(model.a.lora_A["ptd_path"].weight == value)
    assert calls == [3.0, 2.0, 1.0]  # loaded only when switching, in reverse order
    assert [tracer.checkpoint_at(s) for s in (1, 5, 9, 13)] == [2, 1, 0, None]
    assert PathTracer("checkpoints", total_steps=6, switch_interval=4, checkpoints=ckpts).weight_at(7) == 0.0


def test_tracer_state_dict_round_trip_reloads_checkpoint():
    model = toy_lora_model()
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
    assert "schedule" not in state
    older = PathTracer("checkpoints", total_steps=50, switch_interval=3, checkpoints=ckpts)
    older.load_state_dict({**state, "schedule": "power"})  # a checkpoint from before the schedules were removed
    assert older.last_step == 5


def test_load_adapter_weights_rejects_partial_and_foreign_keys():
    model = toy_lora_model()
    state = _checkpoint(model, 1.0)
    with pytest.raises(ValueError, match="misses 1 of 4"):
        load_adapter_weights(model, dict(list(state.items())[:3]), "ptd_path")
    with pytest.raises(ValueError, match="matches no parameter"):
        load_adapter_weights(model, {"unet.a.lora_A.weight": torch.zeros(2, 3)}, "ptd_path")


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

