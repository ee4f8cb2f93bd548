"""guidance/lora_training.py: the path LoRA of paper Eq. 6 (fit, checkpoints, resume) and its files."""
import copy
import json

import pytest
import torch

from guidance.hf_compat import OFFLINE_GUESS_DIFFUSERS, diffusers_version, dtype_kwargs
from guidance.lora_training import (METADATA_NAME, WEIGHT_NAME, add_path_lora, denoising_loss, fit_lora, load_lora,
                                    lora_parameters, lora_state_dict, read_lora_metadata, read_lora_state_dict,
                                    save_lora, training_target)
from guidance.ptd_utils import PathTracer, set_lora_scale

TIMESTEPS = [50, 200, 400, 600, 800, 950]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tiny_pipe):
    """4 fixed latents [4,4,8,8] with view-dependent prompt embeddings [4,77,32] from the tiny text encoder."""
    prompts = [f"a hamburger, {view} view" for view in ("front", "side", "back", "side")]
    tokens = tiny_pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        emb = tiny_pipe.text_encoder(tokens.input_ids)[0]
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(4, 4, 8, 8, generator=g) * 0.5 + torch.linspace(-1, 1, 8).view(1, 1, 1, 8)
    return latents, emb


@pytest.fixture()
def unet(tiny_path):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel.from_pretrained(tiny_path, subfolder="unet")


@pytest.fixture(scope="module")
def scheduler(tiny_path):
    from diffusers import DDIMScheduler
    return DDIMScheduler.from_pretrained(tiny_path, subfolder="scheduler")


def _add(unet, rank=4, alpha=4.0, seed=0):
    with torch.random.fork_rng(devices=[]):  # peft's gaussian init draws from the global RNG
        torch.manual_seed(seed)
        return add_path_lora(unet, rank=rank, alpha=alpha)


def _eval_loss(unet, scheduler, data):
    return denoising_loss(unet, scheduler, *data, timesteps=TIMESTEPS, generator=torch.Generator().manual_seed(7))


def test_add_path_lora_starts_at_the_prior_and_trains_only_lora(unet, scheduler, data):
    base = _eval_loss(unet, scheduler, data)
    params = _add(unet)
    assert len(params) == 96 and sum(p.numel() for p in params) > 0
    assert {id(p) for p in unet.parameters() if p.requires_grad} == {id(p) for p in params}
    assert torch.equal(_eval_loss(unet, scheduler, data), base)  # B = 0 at init: s^(0) is the prior
    assert base.shape == (len(TIMESTEPS),)


def test_lora_stays_float32_in_a_half_precision_unet(tiny_path, scheduler, data):
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(tiny_path, subfolder="unet", **dtype_kwargs(torch.bfloat16))
    assert unet.dtype == torch.bfloat16  # the keyword the installed diffusers reads (dtype= is ignored before 0.40)
    params = _add(unet)
    assert {p.dtype for p in params} == {torch.float32}
    half = tuple(x.to(torch.bfloat16) for x in data)
    out = fit_lora(unet, scheduler, *half, epochs=1, batch_size=4, lr=1e-2, progress=False)
    assert len(out["losses"]) == 1 and all(p.grad is not None for p in params)
    # form_path keeps the cached latents and embeddings in float32 (latent math in fp32): the UNet call casts them
    out = fit_lora(unet, scheduler, *data, epochs=1, batch_size=4, lr=1e-2, progress=False)
    assert len(out["losses"]) == 1 and all(p.dtype == torch.float32 for p in params)
    loss = _eval_loss(unet, scheduler, data)
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    assert unet(half[0], torch.tensor([1, 2, 3, 4]), encoder_hidden_states=half[1]).sample.dtype == torch.bfloat16


def test_fit_lora_lowers_the_denoising_loss_below_the_prior(unet, scheduler, data):
    base = _eval_loss(unet, scheduler, data)
    _add(unet)
    seen = []
    # lr 1e-2 instead of the paper's 1e-4: the test takes 40 steps, not 200 epochs
    out = fit_lora(unet, scheduler, *data, epochs=40, batch_size=4, lr=1e-2, checkpoint_interval=15,
                   generator=torch.Generator().manual_seed(0), on_checkpoint=lambda s, sd: seen.append((s, sd)),
                   progress=False)
    assert out["step"] == 40 and len(out["losses"]) == 40
    fitted = _eval_loss(unet, scheduler, data)
    # a random tiny UNet with rank-4 attention LoRA learns slowly (~2% in 40 steps): the direction is what counts
    assert torch.all(fitted < base) and fitted.mean() < 0.99 * base.mean(), (fitted, base)
    assert [s for s, _ in seen] == [15, 30, 40]  # every K steps and the final s^(n)
    assert all(torch.equal(v, seen[-1][1][k]) for k, v in lora_state_dict(unet, "ptd_path").items())
    assert not torch.equal(*(next(iter(sd.values())) for _, sd in seen[:2]))
    assert not unet.training  # mode restored


def test_fit_lora_resume_is_exact(unet, scheduler, data):
    _add(unet)
    twin = copy.deepcopy(unet)
    kwargs = dict(epochs=3, batch_size=3, lr=1e-3, progress=False)  # 2 steps per epoch, the second a partial batch
    straight = fit_lora(unet, scheduler, *data, generator=torch.Generator().manual_seed(1), **kwargs)
    first = fit_lora(twin, scheduler, *data, generator=torch.Generator().manual_seed(1), max_steps=3, **kwargs)
    assert first["step"] == 3  # stopped in the middle of the second epoch
    rest = fit_lora(twin, scheduler, *data, generator=torch.Generator(), resume=first["state"], **kwargs)
    assert rest["step"] == 6 and first["losses"] + rest["losses"] == straight["losses"]
    a, b = lora_state_dict(unet, "ptd_path"), lora_state_dict(twin, "ptd_path")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_target_v_prediction(tiny_v_path, data):
    from diffusers import DDIMScheduler
    sched = DDIMScheduler.from_pretrained(tiny_v_path, subfolder="scheduler")
    x0, noise, t = data[0], torch.randn_like(data[0]), torch.tensor([10, 300, 600, 990])
    a, s = sched.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1), (1 - sched.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(training_target(sched, x0, noise, t), a * noise - s * x0)


# ----------------------------------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------------------------------
def _randomised(unet, rank=4, alpha=8.0):
    _add(unet, rank, alpha)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in lora_parameters(unet, "ptd_path"):
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return unet


def _out(unet, data):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(data[0].shape, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([20, 400, 700, 999]), encoder_hidden_states=data[1]).sample


def test_save_load_round_trip_through_a_stock_pipeline(unet, tiny_path, data, tmp_path):
    from diffusers import StableDiffusionPipeline
    _randomised(unet)  # r 4, alpha 8: alpha != r must survive the trip
    folder = save_lora(tmp_path / "path_lora", unet, "ptd_path", metadata={"prompt": "a hamburger", "steps": 40,
                                                                            "losses": [1.0, 0.5], "init_hash": "ab"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["path_lora"]  # no temp folder left behind
    info = json.loads((folder / METADATA_NAME).read_text())
    assert info["rank"] == 4 and info["lora_alpha"] == 8.0 and info["prompt"] == "a hamburger"
    assert read_lora_metadata(folder) == info
    from safetensors import safe_open
    with safe_open(str(folder / WEIGHT_NAME), "pt") as f:  # peft's set, sorted: the same bytes whatever the hash seed
        adapter = json.loads(f.metadata()["lora_adapter_metadata"])
    assert adapter["unet.target_modules"] == sorted(adapter["unet.target_modules"]) == ["to_k", "to_out.0", "to_q",
                                                                                         "to_v"]
    again = save_lora(tmp_path / "again", unet, "ptd_path", metadata={"prompt": "a hamburger", "steps": 40,
                                                                      "losses": [1.0, 0.5], "init_hash": "ab"},
                      lora_diffusion=True)
    folder2 = save_lora(tmp_path / "again2", unet, "ptd_path", metadata={"prompt": "a hamburger", "steps": 40,
                                                                         "losses": [1.0, 0.5], "init_hash": "ab"},
                        lora_diffusion=True)
    for name in (WEIGHT_NAME, "lora_diffusion.safetensors"):  # safetensors' metadata map has no fixed order: sorted
        assert (again / name).read_bytes() == (folder2 / name).read_bytes()

    pipe = StableDiffusionPipeline.from_pretrained(tiny_path)
    # the stock call other forks use; diffusers < 0.40 needs the file named under HF_HUB_OFFLINE (conftest sets it)
    named = {} if diffusers_version() >= OFFLINE_GUESS_DIFFUSERS else {"weight_name": WEIGHT_NAME}
    pipe.load_lora_weights(str(folder), adapter_name="ptd_path", **named)
    assert pipe.unet.peft_config["ptd_path"].lora_alpha == 8
    for w in (1.0, 0.4, 0.0):
        set_lora_scale(unet, w, "ptd_path")
        set_lora_scale(pipe.unet, w, "ptd_path")
        assert torch.equal(_out(pipe.unet, data), _out(unet, data)), w
    set_lora_scale(pipe.unet, 1.0, "ptd_path")

    pipe2 = StableDiffusionPipeline.from_pretrained(tiny_path)
    assert load_lora(pipe2.unet, folder, "ptd_path")["init_hash"] == "ab"  # bare UNet, same classmethods
    assert torch.equal(_out(pipe2.unet, data), _out(pipe.unet, data))
    loaded = read_lora_state_dict(folder)
    assert all(torch.equal(v, loaded[k]) for k, v in lora_state_dict(unet, "ptd_path").items())


def test_saved_checkpoints_drive_the_tracer(unet, tmp_path, data):
    _randomised(unet)
    final = lora_state_dict(unet, "ptd_path")
    half = {k: v * 0.5 for k, v in final.items()}
    save_lora(tmp_path / "ckpt", unet, "ptd_path", state_dict=half)
    save_lora(tmp_path / "ckpt", unet, "ptd_path", state_dict=half, metadata={"step": 2})  # overwrite in place
    assert read_lora_metadata(tmp_path / "ckpt")["step"] == 2 and len(list(tmp_path.iterdir())) == 1
    ckpts = [read_lora_state_dict(tmp_path / "ckpt"), final]
    tracer = PathTracer("checkpoints", total_steps=10, switch_interval=2, checkpoints=ckpts)
    tracer.apply(unet, 3)  # steps 3-4: s^(1), the half-strength checkpoint
    got = lora_state_dict(unet, "ptd_path")
    assert all(torch.equal(got[k], half[k]) for k in half)


def test_missing_or_truncated_folder_one_line_errors(unet, tmp_path):
    with pytest.raises(ValueError, match="does not exist") as err:
        read_lora_metadata(tmp_path / "nowhere")
    assert "\n" not in str(err.value) and "nowhere" in str(err.value) and "form_path.py" in str(err.value)
    folder = save_lora(tmp_path / "lora", _randomised(unet), "ptd_path")
    weights = folder / WEIGHT_NAME
    blob = weights.read_bytes()
    weights.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="truncated") as err:
        load_lora(unet, folder, "other")
    assert "\n" not in str(err.value) and str(folder) in str(err.value)
    weights.write_bytes(blob[:5])
    with pytest.raises(ValueError, match="truncated"):
        read_lora_metadata(folder)
    weights.write_bytes(blob)
    (folder / METADATA_NAME).write_text('{"rank": 4, "lora_al')
    with pytest.raises(ValueError, match="not valid JSON"):
        read_lora_metadata(folder)
    (folder / METADATA_NAME).unlink()
    with pytest.raises(ValueError, match=f"lacks {METADATA_NAME}"):
        read_lora_metadata(folder)
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        save_lora(tmp_path / "bad", unet, "ptd_path", metadata={"x": object()})
    assert not (tmp_path / "bad").exists()
