"""lora_diffusion's layers and files (stock LucidDreamer's LoRA_path): ptd_utils traces injected layers exactly, the
path LoRA written in that layout loads in stock's walk order, and GuidanceParams.LoRA_path loads such files."""
import ast
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from lora_helpers import TARGETS, LoraInjectedLinear, make_lora_unet, patch_lora_diffusion, run_unet

from guidance.lora_diffusion import (FILE_NAME, UNET_TARGETS, load_lora_diffusion, read_lora_diffusion,
                                     save_lora_diffusion, to_peft, walk)
from guidance.ptd_utils import PathTracer, lora_scale, set_lora_scale

ROOT = Path(__file__).resolve().parents[1]
PTD_UTILS = ROOT / "guidance" / "ptd_utils.py"
HELPERS = Path(__file__).resolve().parent / "lora_helpers.py"

pytestmark = pytest.mark.usefixtures("one_thread")


def _unet(tiny_path):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel.from_pretrained(tiny_path, subfolder="unet").eval()


def _save(path, tensors, metadata):
    from safetensors.torch import save_file
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(path), metadata)
    return path


@pytest.fixture(scope="module")
def path_lora(tiny_path, tmp_path_factory):
    """(tiny UNet with a randomised peft LoRA 'ptd_path' r=4 alpha=8, inputs, base output, output at weight 1, the
    adapter written as a lora_diffusion file)."""
    unet, inputs, base, trained = make_lora_unet(tiny_path)
    path = save_lora_diffusion(tmp_path_factory.mktemp("lora") / FILE_NAME, unet, "ptd_path")
    return unet, inputs, base, trained, path


# ----------------------------------------------------------------------------------------------------------------------
# the walk order the writer relies on
# ----------------------------------------------------------------------------------------------------------------------
def test_walk_order_is_what_stock_diffusers_0_18_walks(tiny_path, tiny_pipe):
    """diffusers 0.18.2 registers down_blocks and up_blocks before mid_block, attn1 before attn2, and to_q, to_k, to_v,
    to_out.0 in each Attention (plain nn.Linear): the order lora_diffusion's loader hands out pairs in. diffusers 0.42
    keeps it."""
    unet = _unet(tiny_path)
    modules = list(unet._modules)
    assert modules.index("down_blocks") < modules.index("up_blocks") < modules.index("mid_block")
    blocks = ["down_blocks.1.attentions.0", "down_blocks.1.attentions.1", "up_blocks.0.attentions.0",
              "up_blocks.0.attentions.1", "up_blocks.0.attentions.2", "mid_block.attentions.0"]
    expected = [f"{b}.transformer_blocks.0.{attn}.{proj}" for b in blocks for attn in ("attn1", "attn2")
                for proj in ("to_q", "to_k", "to_v", "to_out.0")]
    layers = walk(unet, UNET_TARGETS)
    assert [name for name, _ in layers] == expected
    assert all(type(layer) is torch.nn.Linear for _, layer in layers)  # stock's loader replaces plain Linear only
    # transformers 4.30's CLIPAttention registers k_proj, v_proj, q_proj, out_proj: so does the installed one
    names = [name for name, _ in walk(tiny_pipe.text_encoder, ["CLIPAttention"])]
    assert [n.rsplit(".", 1)[1] for n in names] == ["k_proj", "v_proj", "q_proj", "out_proj"] * 2
    # a peft-wrapped UNet walks the same names (the writer's view)
    assert [name for name, _ in walk(make_lora_unet(tiny_path)[0], UNET_TARGETS)] == expected


# ----------------------------------------------------------------------------------------------------------------------
# the file: layout, reader, stock's loading, converter
# ----------------------------------------------------------------------------------------------------------------------
def test_file_layout_round_trip(path_lora):
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    unet, *_, path = path_lora
    with safe_open(str(path), framework="pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
        raw = {k: f.get_tensor(k) for k in keys}
    n = 48
    assert keys == {f"unet:{i}:{side}" for i in range(n) for side in ("up", "down")}
    assert metadata == {"unet": json.dumps(list(UNET_TARGETS)), **{f"unet:{i}:rank": "4" for i in range(n)}}
    state = get_peft_model_state_dict(unet, adapter_name="ptd_path")
    for i, (name, layer) in enumerate(walk(unet, UNET_TARGETS)):
        up, down = raw[f"unet:{i}:up"], raw[f"unet:{i}:down"]
        assert up.dtype == down.dtype == torch.float32
        assert up.shape == (layer.out_features, 4) and down.shape == (4, layer.in_features)
        assert torch.equal(down, state[f"{name}.lora_A.weight"])
        assert torch.equal(up, state[f"{name}.lora_B.weight"] * 2.0)  # lora_alpha / r = 8 / 4 folded into up
    data = read_lora_diffusion(path)
    assert data["embeddings"] == {} and list(data["loras"]) == ["unet"]
    part = data["loras"]["unet"]
    assert part["targets"] == list(UNET_TARGETS) and part["ranks"] == [4] * n and len(part["pairs"]) == n
    assert all(torch.equal(up, raw[f"unet:{i}:up"]) and torch.equal(down, raw[f"unet:{i}:down"])
               for i, (up, down) in enumerate(part["pairs"]))


def test_stock_loading_gives_the_adapter_at_weight_one(tiny_path, tmp_path):
    """Stock's patch_pipe (re-written in lora_helpers) on a fresh UNet + tune_lora_scale 1.0 = our adapter at weight 1,
    also with lora_alpha / r = 1.5; and to_peft's adapter (lora_alpha = r) is the same network."""
    from peft import LoraConfig, set_peft_model_state_dict

    unet = _unet(tiny_path)
    g = torch.Generator().manual_seed(4)
    inputs = (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 77, 32, generator=g))
    with torch.random.fork_rng(devices=[]):
        unet.add_adapter(LoraConfig(r=4, lora_alpha=6, target_modules=TARGETS), "ptd_path")
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    set_lora_scale(unet, 0.3)  # the file holds the LoRA as trained, whatever the scale now
    with lora_scale(unet, 1.0):
        ours = run_unet(unet, inputs)
    part = read_lora_diffusion(save_lora_diffusion(tmp_path / FILE_NAME, unet))["loras"]["unet"]
    stock = _unet(tiny_path)
    filled = patch_lora_diffusion(stock, part["pairs"], part["targets"])
    assert filled == [name for name, _ in walk(unet, UNET_TARGETS)]
    torch.testing.assert_close(run_unet(stock.eval(), inputs), ours, rtol=1e-4, atol=1e-4)  # fp32 rounding
    converted = _unet(tiny_path)
    state = to_peft(converted, part)
    with torch.random.fork_rng(devices=[]):
        converted.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS), "stock")
    assert not set_peft_model_state_dict(converted, state, adapter_name="stock").unexpected_keys
    torch.testing.assert_close(run_unet(converted, inputs), ours, rtol=1e-4, atol=1e-4)


def test_checkpoints_are_written_in_both_layouts(tiny_path, tmp_path):
    from guidance.lora_training import lora_state_dict, save_lora

    unet = make_lora_unet(tiny_path)[0]
    checkpoint = {k: v * 0.5 for k, v in lora_state_dict(unet, "ptd_path").items()}
    folder = save_lora(tmp_path / "step_000010", unet, "ptd_path", {"step": 10}, state_dict=checkpoint,
                       lora_diffusion=True)
    part = read_lora_diffusion(folder / FILE_NAME)["loras"]["unet"]
    for (name, _), (up, down) in zip(walk(unet, UNET_TARGETS), part["pairs"]):
        assert torch.equal(down, checkpoint[f"{name}.lora_A.weight"])  # the checkpoint's weights, not the adapter's
        assert torch.equal(up, checkpoint[f"{name}.lora_B.weight"] * 2.0)
    save_lora(tmp_path / "plain", unet, "ptd_path")
    assert not (tmp_path / "plain" / FILE_NAME).exists()


def test_writer_refuses_an_adapter_stock_would_misplace(tiny_path, tmp_path):
    from peft import LoraConfig

    unet = _unet(tiny_path)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"]), adapter_name="ptd_path")
    with pytest.raises(ValueError, match="covers 24 layers, but lora_diffusion's loader fills the 48") as err:
        save_lora_diffusion(tmp_path / FILE_NAME, unet)
    assert "\n" not in str(err.value) and not (tmp_path / FILE_NAME).exists()


def test_converter_refuses_a_file_made_for_another_model(path_lora, tiny_path, tiny_pipe):
    part = read_lora_diffusion(path_lora[4])["loras"]["unet"]
    unet = _unet(tiny_path)
    cases = [({**part, "pairs": part["pairs"][:-1]}, "has more layers"),
             ({**part, "pairs": part["pairs"] + part["pairs"][:1]}, "1 of 49 LoRA pairs left over"),
             ({**part, "pairs": part["pairs"][1:] + part["pairs"][:1]}, "which do not fit it")]  # attn1 -> attn2 widths
    for bad, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            to_peft(unet, bad)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="which do not fit it"):
        to_peft(tiny_pipe.text_encoder, {**part, "targets": ["CLIPAttention"], "pairs": part["pairs"][:8]})


class Block(torch.nn.Module):
    """A target module with a Linear and a Conv2d, as lora_diffusion's extended targets (ResnetBlock2D) have."""

    def __init__(self):
        super().__init__()
        self.fc, self.conv = torch.nn.Linear(6, 5), torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x, y):
        return torch.cat([self.fc(x).flatten(), self.conv(y).flatten()])


def test_converter_handles_conv_pairs_and_skips_layers_as_stock(tmp_path):
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 6, generator=g), torch.randn(2, 3, 7, 7, generator=g)
    torch.manual_seed(0)
    base = Block().eval()
    linear = (torch.randn(5, 2, generator=g), torch.randn(2, 6, generator=g))
    conv = (torch.randn(4, 2, 1, 1, generator=g), torch.randn(2, 3, 3, 3, generator=g))
    for pairs, names in (([linear, conv], ["fc", "conv"]), ([conv], ["conv"])):  # a 4-D pair first: fc is skipped
        stock = copy.deepcopy(base)
        assert patch_lora_diffusion(stock, pairs, ["Block"]) == names
        state = to_peft(base, {"targets": ["Block"], "pairs": pairs})
        assert sorted(state) == sorted(f"{n}.lora_{ab}.weight" for n in names for ab in "AB")
        ours = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=names), copy.deepcopy(base))
        assert not set_peft_model_state_dict(ours, state).unexpected_keys
        with torch.no_grad():
            torch.testing.assert_close(ours(x, y), stock.eval()(x, y))
            assert not torch.equal(ours(x, y), base(x, y))


def test_reader_rejects_broken_files(tmp_path):
    up, down = torch.zeros(5, 2), torch.zeros(2, 6)
    good = {"unet": json.dumps(["Attention"]), "unet:0:rank": "2"}
    cases = [
        ({"unet:0:up": up, "unet:0:down": down}, {"unet": good["unet"]}, "rank metadata ''"),
        ({"unet:0:up": up, "unet:0:down": down}, {**good, "unet:0:rank": "3"}, "do not agree"),
        ({"unet:0:up": up}, good, "incomplete"),
        ({"unet:0:up": up, "unet:0:down": down, "vae:0:up": up}, good, "no metadata entry 'vae'"),
        ({"unet:0:up": up, "unet:0:down": down, "unet:x": up}, good, "is not named"),
    ]
    for i, (tensors, metadata, message) in enumerate(cases):
        with pytest.raises(ValueError, match=message) as err:
            read_lora_diffusion(_save(tmp_path / f"{i}.safetensors", tensors, metadata))
        assert "\n" not in str(err.value)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file at all")
    for path, message in ((tmp_path / "junk.safetensors", "not a readable safetensors file"),
                          (tmp_path / "none.safetensors", "does not exist")):
        with pytest.raises(ValueError, match=message) as err:
            read_lora_diffusion(path)
        assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------------------------------------
# ptd_utils on injected layers
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, tiny, bits", [(torch.float32, 1e-30, torch.int32), (torch.float16, 1e-4, torch.int16)])
def test_weight_zero_is_exact_where_scale_zero_is_not(dtype, tiny, bits):
    """Why weight 0 parks an injected layer: at scale 0 its branch adds +0.0 to a base output of -0.0 (-> +0.0), and a
    product that overflows (fp16) adds inf * 0 = NaN."""
    layer = LoraInjectedLinear(torch.nn.Linear(1, 3), r=1).to(dtype).eval()
    model = torch.nn.Sequential(layer)
    small, big = torch.full((2, 1), -tiny, dtype=dtype), torch.full((2, 1), 60000.0, dtype=dtype)
    with torch.no_grad():
        layer.linear.weight.fill_(tiny)
        layer.linear.bias.fill_(-0.0)
        layer.lora_down.weight.fill_(-300.0)
        layer.lora_up.weight.fill_(300.0)
        base_small, base_big = layer.linear(small), layer.linear(big)
        assert torch.signbit(base_small).all() and (base_small == 0).all()
        layer.scale = 0.0  # tune_lora_scale(model, 0.0) alone: the branch times 0
        assert not torch.equal(model(small).view(bits), base_small.view(bits))
        assert torch.isnan(model(big)).all() == (dtype == torch.float16) and torch.isfinite(base_big).all()
        layer.scale = 1.0
        set_lora_scale(model, 0.0, "ptd_path")  # parked
        assert torch.equal(model(small).view(bits), base_small.view(bits))
        assert torch.equal(model(big).view(bits), base_big.view(bits))


def test_tracer_on_the_tiny_unet_patched_by_stock(path_lora, tiny_path):
    _, inputs, base, trained, path = path_lora
    part = read_lora_diffusion(path)["loras"]["unet"]
    unet = _unet(tiny_path)
    patch_lora_diffusion(unet, part["pairs"], part["targets"])
    unet.eval()
    at_one = run_unet(unet, inputs)
    torch.testing.assert_close(at_one, trained, rtol=1e-5, atol=1e-5)
    layers = [m for m in unet.modules() if isinstance(m, LoraInjectedLinear)]
    calls = []
    hooks = [m.lora_down.register_forward_hook(lambda *_: calls.append(1)) for m in layers]
    tracer = PathTracer("weighted", total_steps=2, power=1.0, adapter_name="any name: lora_diffusion has none")
    assert tracer.apply(unet, 3) == 0.0
    out = run_unet(unet, inputs)
    assert torch.equal(out.view(torch.int32), base.view(torch.int32)) and calls == []  # parked: branch not computed
    twin = copy.deepcopy(unet)  # the parked forward is rebound to the copy's own base layer
    assert torch.equal(run_unet(twin, inputs), base)
    assert all(m.__dict__["forward"].__self__ is m.linear for m in twin.modules() if isinstance(m, LoraInjectedLinear))
    assert tracer.apply(unet, 1) == 1.0 and torch.equal(run_unet(unet, inputs), at_one) and len(calls) == 48
    assert all(m.scale == 1.0 and "forward" not in m.__dict__ for m in layers)
    with lora_scale(unet, 0.0):
        assert torch.equal(run_unet(unet, inputs), base)
    assert torch.equal(run_unet(unet, inputs), at_one)  # restored
    layer, x = layers[0], torch.randn(2, 5, layers[0].linear.in_features)
    with torch.no_grad():
        outs = {tracer.apply(unet, step): layer(x) for step in (3, 2, 1)}  # w = 0, 0.5, 1: affine in w at a layer
    torch.testing.assert_close(outs[0.5], outs[0.0] + 0.5 * (outs[1.0] - outs[0.0]))
    for hook in hooks:
        hook.remove()


def test_ptd_utils_alone_traces_lora_diffusion_layers(tmp_path):
    """The copied file, with nothing of this project importable, on a model carrying (re-written) lora_diffusion
    layers patched at scale 0.8: weight 0 is the base bit for bit (sign bits too), 1 the model as patched, 0.5 the
    affine formula; lora_scale restores. Also: the file parses as Python 3.9 (stock's environment)."""
    ast.parse(PTD_UTILS.read_text(), feature_version=(3, 9))
    shutil.copy(PTD_UTILS, tmp_path / "ptd_utils.py")
    shutil.copy(HELPERS, tmp_path / "stock_layers.py")
    (tmp_path / "fork.py").write_text(textwrap.dedent("""
        import sys, torch
        import ptd_utils
        from stock_layers import patch_lora_diffusion
        assert ptd_utils.__file__.startswith(sys.path[0])
        assert "guidance" not in sys.modules and "peft" not in sys.modules

        class Block(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc, self.conv = torch.nn.Linear(6, 5), torch.nn.Conv2d(3, 4, 3, padding=1)
            def forward(self, x, y):
                return torch.cat([self.fc(x).flatten(), self.conv(y).flatten()])

        g = torch.Generator().manual_seed(0)
        model = Block()
        with torch.no_grad():  # fc: a base output of -0.0 that the branch at scale 0 would turn into +0.0
            model.fc.weight.fill_(1e-30)
            model.fc.bias.fill_(-0.0)
        pairs = [(torch.full((5, 2), 300.0), torch.full((2, 6), -300.0)),
                 (torch.randn(4, 2, 1, 1, generator=g), torch.randn(2, 3, 3, 3, generator=g))]
        x, y = torch.full((2, 6), -1e-30), torch.randn(2, 3, 7, 7, generator=g)
        with torch.no_grad():
            base = model(x, y)
            assert torch.signbit(base[:10]).all()
            assert patch_lora_diffusion(model, pairs, ["Block"], scale=0.8) == ["fc", "conv"]
            model.eval()
            patched = model(x, y)
            model.fc.scale = 0.0
            assert not torch.equal(model(x, y).view(torch.int32), base.view(torch.int32))  # why parking
            model.fc.scale = 0.8
            tracer = ptd_utils.PathTracer("weighted", total_steps=4, power=1.0)
            outs = {tracer.apply(model, step): model(x, y) for step in (1, 3, 5)}
            assert sorted(outs) == [0.0, 0.5, 1.0]
            assert torch.equal(outs[0.0].view(torch.int32), base.view(torch.int32))
            assert torch.equal(outs[1.0], patched)
            torch.testing.assert_close(outs[0.5], base + 0.5 * (patched - base))
            assert model.fc.scale == 0.0 and "forward" in model.fc.__dict__
            tracer.apply(model, 1)
            assert model.fc.scale == 0.8 and "forward" not in model.fc.__dict__
            with ptd_utils.lora_scale(model, 0.0):
                assert torch.equal(model(x, y).view(torch.int32), base.view(torch.int32))
            assert torch.equal(model(x, y), patched) and model.conv.scale == 0.8
        print("ok")
    """))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "fork.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"


# ----------------------------------------------------------------------------------------------------------------------
# GuidanceParams.LoRA_path
# ----------------------------------------------------------------------------------------------------------------------
def _text_encoder_part(text_encoder, rank=2, seed=5):
    """A text-encoder LoRA on CLIPAttention as lora_diffusion saves one: (tensors, metadata)."""
    g = torch.Generator().manual_seed(seed)
    tensors, metadata = {}, {"text_encoder": json.dumps(["CLIPAttention"])}
    for i, (_, layer) in enumerate(walk(text_encoder, ["CLIPAttention"])):
        tensors[f"text_encoder:{i}:up"] = 0.2 * torch.randn(layer.out_features, rank, generator=g)
        tensors[f"text_encoder:{i}:down"] = 0.2 * torch.randn(rank, layer.in_features, generator=g)
        metadata[f"text_encoder:{i}:rank"] = str(rank)
    return tensors, metadata


def _full_file(path_lora, tiny_pipe, tmp_path):
    from safetensors import safe_open
    with safe_open(str(path_lora[4]), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    text, text_meta = _text_encoder_part(tiny_pipe.text_encoder)
    token = torch.randn(32, generator=torch.Generator().manual_seed(6))
    return _save(tmp_path / "full.safetensors", {**tensors, **text, "<ptd-toy>": token},
                 {**metadata, **text_meta, "<ptd-toy>": "<embed>"}), token


def test_lora_path_config_loads_unet_text_encoder_lora_and_tokens(path_lora, tiny_path, tiny_pipe, tmp_path):
    from arguments import config_from_dict
    from guidance.sd_utils import StableDiffusionGuidance

    unet, inputs, base, trained, _ = path_lora
    path, token = _full_file(path_lora, tiny_pipe, tmp_path)
    gp = {"model_key": str(tiny_path), "text": "a <ptd-toy> on a table"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a real key now: no "ignoring stock LucidDreamer key" warning
        cfg = config_from_dict({"GuidanceParams": {**gp, "LoRA_path": str(path)}})
    assert cfg.GuidanceParams.LoRA_path == str(path)
    g = StableDiffusionGuidance(cfg.GuidanceParams, "cpu", warmup_iter=1500)
    plain = StableDiffusionGuidance(config_from_dict({"GuidanceParams": gp}).GuidanceParams, "cpu", warmup_iter=1500)
    with torch.no_grad():
        got = run_unet(g.unet, inputs)
    assert (got - base).abs().max() > 0.05 and torch.equal(run_unet(plain.unet, inputs), base)
    fused = copy.deepcopy(unet)
    fused.fuse_lora()  # peft's own fusion of the same adapter: the same network up to fp32 rounding
    torch.testing.assert_close(got, run_unet(fused, inputs), rtol=1e-4, atol=1e-4)
    # vs the unfused branch: this tiny UNet with a large random LoRA amplifies rounding (fp64 vs fp32: 8e-3 apart)
    torch.testing.assert_close(got, trained, rtol=3e-3, atol=3e-3)
    assert not any(hasattr(m, "lora_A") for m in g.unet.modules())  # fused and unloaded: a plain UNet
    # the text encoder: stock's patched CLIP text encoder with the new token
    data = read_lora_diffusion(path)
    reference = copy.deepcopy(plain.text_encoder)
    tokenizer = copy.deepcopy(plain.tokenizer)
    patch_lora_diffusion(reference, data["loras"]["text_encoder"]["pairs"], ["CLIPAttention"])
    tokenizer.add_tokens("<ptd-toy>")
    reference.resize_token_embeddings(len(tokenizer))
    with torch.no_grad():
        reference.get_input_embeddings().weight[-1] = token
    ids = tokenizer(["a <ptd-toy> on a table"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert len(g.tokenizer) == len(plain.tokenizer) + 1 and g.tokenizer.convert_tokens_to_ids("<ptd-toy>") == ids[0, 2]
    assert torch.equal(g.text_encoder.get_input_embeddings().weight[ids[0, 2]], token)
    with torch.no_grad():
        torch.testing.assert_close(g.embeddings["text"], reference.eval()(ids)[0], rtol=1e-4, atol=1e-4)
    before = torch.random.get_rng_state()
    load_lora_diffusion(copy.deepcopy(tiny_pipe), path)
    assert torch.equal(torch.random.get_rng_state(), before)  # adapters and resized embeddings drew nothing from it


def test_lora_path_refuses_what_it_cannot_load(path_lora, tiny_path, tiny_pipe, tmp_path):
    from guidance.sd_utils import load_prior

    other = copy.deepcopy(tiny_pipe.text_encoder)
    encoder = getattr(other, "text_model", other).encoder  # transformers < 5 nests it under .text_model
    encoder.layers = encoder.layers[:1]  # a text-encoder LoRA made for a 1-layer encoder
    text, text_meta = _text_encoder_part(other)
    up, down = torch.zeros(5, 2), torch.zeros(2, 6)
    cases = [(_save(tmp_path / "te.safetensors", text, text_meta), "text_encoder: 4 LoRA pairs, but CLIPTextModel"),
             (_save(tmp_path / "vae.safetensors", {"vae:0:up": up, "vae:0:down": down},
                    {"vae": '["Attention"]', "vae:0:rank": "2"}), "part(s) ['vae'], which this project cannot load"),
             (_save(tmp_path / "tok.safetensors", {"<wide>": torch.zeros(64)}, {"<wide>": "<embed>"}),
              "token '<wide>' has a [64] embedding, the text encoder takes 32")]
    for path, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)) as err:
            load_prior(str(tiny_path), torch.device("cpu"), torch.float32, lora_path=str(path))
        assert str(err.value).startswith("GuidanceParams.LoRA_path: ") and "\n" not in str(err.value)
    pipe = copy.deepcopy(tiny_pipe)
    with pytest.raises(ValueError):
        load_lora_diffusion(pipe, cases[0][0])
    assert all(torch.equal(a, b) for a, b in zip(pipe.text_encoder.parameters(), tiny_pipe.text_encoder.parameters()))


def test_missing_lora_path_is_a_config_error_before_anything_is_written(tmp_path):
    out = subprocess.run([sys.executable, "form_path.py", "--opt", str(ROOT / "configs" / "smoke.yaml"),
                          f"ModelParams.output_root={tmp_path / 'out'}",
                          "GuidanceParams.LoRA_path=/no/such.safetensors"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode != 0 and len(lines) == 1, lines
    assert "GuidanceParams.LoRA_path '/no/such.safetensors' is not a .safetensors file" in lines[0]
    assert not (tmp_path / "out").exists()
