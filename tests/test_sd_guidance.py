"""StableDiffusionGuidance on the offline tiny models: stock-ISM step, call counts, routing, determinism, loading."""
import dataclasses
import math

import pytest
import torch
from torch.testing import assert_close

from arguments.params import GuidanceParams
from guidance import ism
from guidance.sd_utils import StableDiffusionGuidance, resolve_model_key

AZIMUTHS = [0.0, 45.0, 180.0, -90.0]


def make(model_path, **overrides) -> StableDiffusionGuidance:
    gp = dataclasses.replace(GuidanceParams(model_key=str(model_path), text="a hamburger", negative="ugly, blurry"),
                             **overrides)
    return StableDiffusionGuidance(gp, "cpu", warmup_iter=1500)


def leaf_images(seed: int = 0) -> torch.Tensor:
    return torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)


def record_unet_calls(guidance: StableDiffusionGuidance) -> list[dict]:
    """Wrap unet_eps (every UNet call goes through it) and record each call."""
    calls, inner = [], guidance.unet_eps

    def wrapper(x_t, t_index, text_emb):
        out = inner(x_t, t_index, text_emb)
        calls.append({"batch": x_t.shape[0], "t_index": t_index, "emb": text_emb.detach().clone(), "out": out})
        return out

    guidance.unet_eps = wrapper
    return calls


def test_ism_step_gives_finite_gradients_on_the_images(tiny_path):
    g = make(tiny_path)
    images = leaf_images()
    out = g.train_step(images, AZIMUTHS, iteration=1)
    out["loss"].backward()
    assert images.grad is not None and images.grad.shape == images.shape
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    h = 64 // g.vae_scale_factor
    assert out["grad"].shape == (4, 4, h, h) and out["pred"].shape == out["target"].shape == (4, 4, h, h)
    # iteration 1: r = 1 - 1/1500, delta = int(80 + 20 r) = 99 (stock truncates), bound 500 + int(480 r) = 979
    assert 20 <= out["t_index"] < 979 and out["s_index"] == max(out["t_index"] - 99, 0)
    assert out["timestep"] == out["t_index"] + 1


def test_gradient_is_lambda_w_pred_minus_target(tiny_path):
    g = make(tiny_path, lambda_guidance=0.3)
    out = g.train_step(leaf_images(), AZIMUTHS, iteration=2000)
    abar_t = g.scheduler.alphas_cumprod[out["t_index"] + 1]
    expected = 0.3 * torch.sqrt((1 - abar_t) / abar_t) * (out["pred"] - out["target"])
    assert_close(out["grad"], expected)
    assert 20 <= out["t_index"] < 500 and out["s_index"] == max(out["t_index"] - 80, 0)  # after warm-up


def test_same_seed_same_step_bit_for_bit_and_exact_resume(tiny_path):
    grads, outs = [], []
    for _ in range(2):
        g = make(tiny_path)
        images = leaf_images()
        out = g.train_step(images, AZIMUTHS, iteration=10)
        out["loss"].backward()
        grads.append(images.grad)
        outs.append(out)
    assert torch.equal(grads[0], grads[1])
    assert outs[0]["t_index"] == outs[1]["t_index"] and outs[0]["flipped"] == outs[1]["flipped"]
    assert torch.equal(outs[0]["target"], outs[1]["target"]) and torch.equal(outs[0]["pred"], outs[1]["pred"])

    first = make(tiny_path)
    first.train_step(leaf_images(), AZIMUTHS, iteration=1)
    state = first.state_dict()
    expected = first.train_step(leaf_images(1), AZIMUTHS, iteration=2)
    resumed = make(tiny_path)
    resumed.load_state_dict(state)
    got = resumed.train_step(leaf_images(1), AZIMUTHS, iteration=2)
    assert got["t_index"] == expected["t_index"] and torch.equal(got["grad"], expected["grad"])


@pytest.mark.parametrize("overrides", [
    {},  # defaults: s anywhere in [0, 900)
    {"t_range": [0.02, 0.05], "max_t_range": 0.05, "delta_t": 100},  # t < 50: s = 0 always
    {"t_range": [0.9, 0.95], "max_t_range": 0.95, "xs_inv_steps": 2},  # s > 400: x0 noised to s - 400 first
])
def test_unet_calls_per_ism_step(tiny_path, overrides):
    g = make(tiny_path, **overrides)
    gp = g.gp
    for iteration in (1, 700, 1600):
        calls = record_unet_calls(g)
        out = g.train_step(leaf_images(), AZIMUTHS, iteration)
        del g.unet_eps  # back to the class method
        s, t = out["s_index"], out["t_index"]
        at_b = [c for c in calls if c["batch"] == 4]
        at_2b = [c for c in calls if c["batch"] == 8]
        assert len(at_b) + len(at_2b) == len(calls)
        assert len(at_b) == min(math.ceil(s / gp.xs_delta_t), gp.xs_inv_steps) + 1
        if s <= gp.xs_delta_t * gp.xs_inv_steps:
            assert len(at_b) == math.ceil(s / gp.xs_delta_t) + 1
        assert len(at_2b) == 1 and calls[-1] is at_2b[0] and at_2b[0]["t_index"] == t
        # inversion indices climb the chain; the last batch-B call is at s and its output is the target
        assert [c["t_index"] for c in at_b] == ism.inversion_timesteps(s, gp.xs_delta_t, gp.xs_inv_steps)[:-1] + [s]
        assert torch.equal(at_b[-1]["out"], out["target"])
        if overrides.get("max_t_range") == 0.05:
            assert s == 0


def test_cfg_uses_the_negative_prompt_and_inversion_the_inverse_prompt(tiny_path):
    g = make(tiny_path, inverse_text="")
    e = g.embeddings
    assert torch.equal(e["inverse"], g.text_embeddings(""))
    assert torch.equal(e["negative"], g.text_embeddings("ugly, blurry"))
    assert not torch.equal(e["negative"], e["inverse"])
    calls = record_unet_calls(g)
    g.train_step(leaf_images(), AZIMUTHS, iteration=1)
    for c in calls[:-1]:
        assert torch.equal(c["emb"], e["inverse"].expand(4, -1, -1))
    cfg_emb = calls[-1]["emb"]
    assert torch.equal(cfg_emb[:4], e["negative"].expand(4, -1, -1))
    assert torch.equal(cfg_emb[4:], g.view_embeddings(AZIMUTHS))
    assert torch.equal(cfg_emb[4], e["front"][0]) and torch.equal(cfg_emb[6], e["back"][0])  # azimuth 0 and 180
    assert_close(cfg_emb[5], 0.5 * (e["front"][0] + e["side"][0]))
    assert torch.equal(cfg_emb[7], e["side"][0])  # -90


def test_timestep_convention_reaches_the_unet(tiny_path):
    g = make(tiny_path)
    assert g.scheduler.config.steps_offset == 1
    assert g.timesteps == list(range(1, 1001))
    seen, unet = [], g.unet

    def spy(x, timestep, **kwargs):
        seen.append(timestep)
        return unet(x, timestep, **kwargs)

    g.unet = spy
    x = torch.zeros(2, 4, 8, 8)
    g.unet_eps(x, 0, g.embeddings["text"].expand(2, -1, -1))
    assert seen[0].tolist() == [1, 1]
    assert g.abar(0) == g.scheduler.alphas_cumprod[1] and g.abar(979) == g.scheduler.alphas_cumprod[980]


@pytest.mark.parametrize("v_prior", [False, True])
@pytest.mark.parametrize("sds", [False, True])
def test_sds_and_ism_run_for_eps_and_v_priors(tiny_path, tiny_v_path, v_prior, sds):
    g = make(tiny_v_path if v_prior else tiny_path, sds=sds)
    assert g.prediction_type == ("v_prediction" if v_prior else "epsilon")
    calls = record_unet_calls(g)
    images = leaf_images()
    out = g.train_step(images, AZIMUTHS, iteration=1)
    out["loss"].backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    if sds:  # one CFG call; x_t is the forward noising of the latents with the target noise
        assert [c["batch"] for c in calls] == [8]
        assert_close(out["x_t"], ism.add_noise(out["latents"], out["target"], g.abar(out["t_index"])))


def test_unet_eps_converts_v_prediction(tiny_v_path):
    g = make(tiny_v_path)
    gen = torch.Generator().manual_seed(0)
    x, emb = torch.randn(2, 4, 8, 8, generator=gen), g.embeddings["text"].expand(2, -1, -1)
    with torch.no_grad():
        v = g.unet(x, torch.tensor([301, 301]), encoder_hidden_states=emb).sample
        assert_close(g.unet_eps(x, 300, emb), ism.v_to_eps(v, x, g.scheduler.alphas_cumprod[301]))


def test_perpneg_and_reversed_inversion_cfg_call_counts(tiny_path):
    g = make(tiny_path, perpneg=True, denoise_guidance_scale=2.0)
    calls = record_unet_calls(g)
    images = leaf_images()
    out = g.train_step(images, AZIMUTHS, iteration=1)
    out["loss"].backward()
    assert torch.isfinite(images.grad).all()
    s = out["s_index"]
    assert [c["batch"] for c in calls] == [8] * (math.ceil(s / 200) + 1) + [16]


def test_encode_decode_shapes_seeding_and_gradients(tiny_path):
    g = make(tiny_path)
    images = leaf_images()
    state = g.state_dict()
    lat = g.encode_images(images)
    g.load_state_dict(state)
    assert torch.equal(lat, g.encode_images(images))  # the posterior sample is seeded
    f = g.vae_scale_factor
    assert lat.shape == (4, 4, 64 // f, 64 // f)
    lat.sum().backward()
    assert images.grad.abs().sum() > 0
    dec = g.decode_latents(lat.detach())
    assert dec.shape == (4, 3, 64, 64) and dec.min() >= 0 and dec.max() <= 1
    with pytest.raises(ValueError, match="multiples of the VAE factor"):
        g.encode_images(torch.rand(1, 3, 60, 60))


def test_batched_encode_sample_and_mean(tiny_path):
    """encode(mean=False) is encode_images in batches (same generator draws); encode(mean=True) is the VAE posterior
    mean, draws nothing, and has no gradient."""
    g = make(tiny_path)
    images = leaf_images()[:3].detach()
    state = g.state_dict()
    batched = g.encode(images, batch=2)
    after = g.state_dict()["generator"]
    g.load_state_dict(state)
    one_by_one = torch.cat([g.encode_images(images[:2]), g.encode_images(images[2:])]).detach()
    assert torch.equal(batched, one_by_one) and torch.equal(after, g.state_dict()["generator"])
    g.load_state_dict(state)
    mean = g.encode(images.requires_grad_(True), mean=True, batch=2)
    assert torch.equal(g.state_dict()["generator"], state["generator"]) and not mean.requires_grad
    with torch.no_grad():
        expected = torch.cat([g.vae.encode(2 * x - 1).latent_dist.mean for x in (images[:2], images[2:])])
    assert torch.equal(mean, expected * g.vae.config.scaling_factor)


def test_hub_ids_resolve_from_the_cache_then_download_unless_offline(tmp_path, monkeypatch):
    """Cached first; offline (tests, CI) never downloads; online the pipeline's files are downloaded on first use, and
    the stock SD 2.1-base id, which the hub no longer serves, falls back to its mirror."""
    import huggingface_hub

    from guidance.sd_utils import MIRROR_MODEL_ID, PIPELINE_FILES, STOCK_MODEL_ID
    calls = []

    def fake_download(repo, cache_dir=None, local_files_only=False, allow_patterns=None):
        calls.append((repo, local_files_only))
        if local_files_only or repo == STOCK_MODEL_ID:
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached") if local_files_only else \
                OSError("404 Client Error: Repository Not Found")
        assert allow_patterns == PIPELINE_FILES
        return str(tmp_path / repo)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    with pytest.raises(ValueError, match="unset HF_HUB_OFFLINE to download it"):
        resolve_model_key(STOCK_MODEL_ID)  # conftest sets HF_HUB_OFFLINE=1
    assert calls == [(STOCK_MODEL_ID, True), (MIRROR_MODEL_ID, True)]
    calls.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert resolve_model_key(STOCK_MODEL_ID) == str(tmp_path / MIRROR_MODEL_ID)
    assert calls == [(STOCK_MODEL_ID, True), (MIRROR_MODEL_ID, True), (STOCK_MODEL_ID, False), (MIRROR_MODEL_ID, False)]


def test_bad_inputs_raise_one_line_errors(tiny_path):
    with pytest.raises(ValueError, match="GuidanceParams.text is empty") as err:
        StableDiffusionGuidance(GuidanceParams(model_key=str(tiny_path)), "cpu", warmup_iter=1500)
    with pytest.raises(ValueError, match="not a local folder, 'tiny', nor in the Hugging Face cache") as err:
        make("nobody-here/no-such-model")
    assert "\n" not in str(err.value) and "hf download nobody-here/no-such-model" in str(err.value)
    with pytest.raises(ValueError, match="nor in the Hugging Face cache"):
        resolve_model_key("not a repo id!")
    with pytest.raises(ValueError, match="past the prior's 1000 timesteps"):
        make(tiny_path, max_t_range=1.0)
    with pytest.raises(ValueError, match="xs_eta"):
        make(tiny_path, xs_eta=0.5)
    with pytest.raises(ValueError, match="prior_lora"):
        make(tiny_path, prior_lora="/nonexistent/lora")


def test_resolve_model_key(tiny_path, tiny_v_path, tmp_path):
    assert resolve_model_key("tiny") == str(tiny_path) and resolve_model_key("tiny-v") == str(tiny_v_path)
    assert resolve_model_key(str(tiny_path)) == str(tiny_path)
    # a hub id already in a (fake, local) Hugging Face cache resolves to its snapshot without any network
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--someone--cached-model"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")
    assert resolve_model_key("someone/cached-model", cache_dir=tmp_path) == str(snapshot)


def test_prior_lora_is_fused_into_the_unet(tiny_path, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    unet = UNet2DConditionModel.from_pretrained(tiny_path, subfolder="unet")
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name="prior")
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name="prior"))
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=layers,
                                              unet_lora_adapter_metadata=unet.peft_config["prior"].to_dict())
    g = make(tiny_path, prior_lora=str(tmp_path))
    assert not any(isinstance(m, LoraLayer) for m in g.unet.modules())
    gen = torch.Generator().manual_seed(1)
    x, emb = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 32, generator=gen)
    tau = torch.tensor([500, 500])
    with torch.no_grad():
        expected = unet(x, tau, encoder_hidden_states=emb).sample
        got = g.unet(x, tau, encoder_hidden_states=emb).sample
        base = make(tiny_path).unet(x, tau, encoder_hidden_states=emb).sample
    assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert (got - base).abs().max() > 1e-3
