"""OOD probe: per-timestep aggregation and the per-sample loss layout against brute-force loops (both readings of the
reference set, eps/score space, RMS/raw), references of the current network (fingerprint, cache, memo), the probe end
to end on a stage-1 run (cache reuse, prior vs path LoRA, both readings side by side, --raw), and one-line errors."""
import json
import math
import statistics

import pytest
import torch

import form_path
import probe_ood
from arguments import load_config, run_dir
from guidance.lora_merge import set_scale
from guidance.stf import aggregate_by_timestep, matching_loss, stf_eps
from stages.run import PATH_ADAPTER, load_path_lora, make_guidance
from test_end_to_end import SMOKE, TINY_RUN
from evaluation import ood
from guidance.sd_utils import StableDiffusionGuidance
from utils.files import stable_hash

PROBE = ["EvalParams.probe_num_refs=4", "EvalParams.probe_ddim_steps=2", "EvalParams.probe_timesteps=[100,500,900]",
         "save_video=false"]


def test_aggregation_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    losses = torch.rand(3, 4, 2, generator=g, dtype=torch.float64)  # [T, N, K]
    timesteps = [10, 400, 900]
    out = aggregate_by_timestep(losses, timesteps)
    for i, t in enumerate(timesteps):
        samples = [losses[i, n, k].item() for n in range(4) for k in range(2)]
        row = out["by_t"][i]
        assert row["t"] == t and row["n"] == 8
        assert row["mean"] == pytest.approx(statistics.mean(samples))
        assert row["std"] == pytest.approx(statistics.stdev(samples))
    per_image = [statistics.mean(losses[i, n, k].item() for i in range(3) for k in range(2)) for n in range(4)]
    assert out["overall"]["mean"] == pytest.approx(statistics.mean(per_image))
    assert out["overall"]["std"] == pytest.approx(statistics.stdev(per_image))
    assert out["overall"]["mean"] == pytest.approx(statistics.mean(r["mean"] for r in out["by_t"]))
    with pytest.raises(ValueError, match="T = 2 timesteps"):
        aggregate_by_timestep(losses, [1, 2])


class FakeGuidance:
    """abar(i) and a deterministic 'network' eps(x_t, t) = 0.3 x_t + t / 1000 (no model needed)."""

    def abar(self, i):
        return torch.tensor(1.0 - i / 1000.0)

    def unet_eps(self, x_t, t, emb):
        assert emb.shape[0] == x_t.shape[0]
        return 0.3 * x_t + t / 1000.0


@pytest.mark.parametrize("include_self,space,normalize", [(False, "eps", True), (True, "eps", True),
                                                          (True, "score", False), (False, "score", False)])
def test_matching_losses_layout_equals_a_loop(include_self, space, normalize):
    g = torch.Generator().manual_seed(1)
    x0, refs = torch.randn(3, 4, 2, 2, generator=g), torch.randn(5, 4, 2, 2, generator=g)
    timesteps, draws, emb = [100, 700], 2, torch.zeros(1, 77, 8)
    out = ood.matching_losses(FakeGuidance(), x0, refs, timesteps, emb, seed=7, draws=draws, batch=4,
                              include_self=include_self, space=space, normalize=normalize)
    assert out.shape == (2, 3, 2)
    gen = torch.Generator().manual_seed(ood.noise_seed(7))
    for i, t in enumerate(timesteps):
        abar = torch.tensor(1.0 - t / 1000.0)
        eps = torch.randn((draws, *x0.shape), generator=gen)
        for n in range(3):
            for k in range(draws):
                x_t = (abar.sqrt() * x0[n] + (1 - abar).sqrt() * eps[k, n])[None]
                ref_set = torch.cat([refs, x0[n:n + 1]]) if include_self else refs  # brute force: explicit set
                want = matching_loss(0.3 * x_t + t / 1000.0, x_t, ref_set, abar.sqrt(), (1 - abar).sqrt(), space,
                                     normalize)
                torch.testing.assert_close(out[i, n, k], want[0])


def test_scoring_noise_is_not_a_reference_starting_noise():
    """The references (and the generated set) start DDIM from torch.randn with the run's seed (seed + 1): the matching
    loss's eps must come from another stream, else each scored image's eps is some reference's x_T and the STF
    weights lean toward that reference."""
    seen = []

    class Recording(FakeGuidance):
        def unet_eps(self, x_t, t, emb):
            seen.append(x_t.clone())
            return super().unet_eps(x_t, t, emb)

    seed, shape = 0, (4, 4, 2, 2)
    x0 = torch.zeros(shape)  # x_t = sigma eps: eps readable from the UNet's input
    ood.matching_losses(Recording(), x0, torch.randn(3, *shape[1:]), [100, 500, 900], torch.zeros(1, 77, 8), seed)
    eps = torch.cat([x / math.sqrt(t / 1000.0) for x, t in zip(seen, [100, 500, 900])]).flatten(1)
    for start_seed in (seed, seed + 1):  # as sample_prior_latents draws its starting noise, batch after batch
        x_T = torch.randn((32, *shape[1:]), generator=torch.Generator().manual_seed(start_seed)).flatten(1)
        closest = torch.cdist(eps, x_T).min()
        assert closest > 1.0, f"a scoring eps equals a reference's starting noise (seed {start_seed})"


def test_both_readings_in_one_pass_equal_separate_calls():
    g = torch.Generator().manual_seed(3)
    x0, refs = torch.randn(5, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    args = (FakeGuidance(), x0, refs, [50, 400], torch.zeros(1, 77, 8), 11, 3, 4)
    both = ood.matching_losses_by_reading(*args)
    assert set(both) == {False, True}
    for include_self in (False, True):
        torch.testing.assert_close(both[include_self], ood.matching_losses(*args, include_self=include_self))
    assert not torch.allclose(both[False], both[True])


def test_matching_loss_is_zero_for_the_stf_denoiser():
    refs = torch.randn(4, 4, 2, 2, generator=torch.Generator().manual_seed(2))

    class StfGuidance(FakeGuidance):
        def unet_eps(self, x_t, t, emb):
            abar = self.abar(t)
            return stf_eps(x_t, refs, abar.sqrt(), (1 - abar).sqrt())
    out = ood.matching_losses(StfGuidance(), refs[:2], refs, [300], torch.zeros(1, 77, 8), seed=0)
    assert out.abs().max() < 1e-5


STAGE1 = [*TINY_RUN, *PROBE, "ModelParams.workspace=run", "PTDParams.mode=weighted", "PTDParams.lora_lr=0.01"]


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe_run")
    cfg = load_config(SMOKE, [*STAGE1, f"ModelParams.output_root={root}"])
    form_path.main(cfg)
    return cfg


def stage1_cfg(cfg, *overrides):
    """The stage-1 run's config with EvalParams overrides."""
    return load_config(SMOKE, [*STAGE1, f"ModelParams.output_root={cfg.ModelParams.output_root}", *overrides])


def test_current_references_follow_the_network(stage1_run, tmp_path, monkeypatch):
    """probe_refs=current: the prior's samples (same key, same file) while no LoRA contributes; the network's own
    samples, keyed by its fingerprint and memoised, once the path LoRA has a weight; probe_refs=prior: always the
    prior's, whatever the LoRA's weight."""
    prior_cfg, current_cfg = stage1_cfg(stage1_run), stage1_cfg(stage1_run, "EvalParams.probe_refs=current")
    guidance = make_guidance(prior_cfg, torch.device("cpu"))
    assert ood.network_fingerprint(guidance.unet) is None  # no LoRA at all
    load_path_lora(prior_cfg, guidance)
    calls = []
    sample = StableDiffusionGuidance.sample_prior_latents

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("network"))
        return sample(self, *args, **kwargs)
    monkeypatch.setattr(StableDiffusionGuidance, "sample_prior_latents", spy)
    memo = {}
    set_scale(guidance.unet, 0.0, PATH_ADAPTER)
    assert ood.network_fingerprint(guidance.unet) is None  # weight 0 is the prior
    prior = ood.reference_latents(prior_cfg, guidance, tmp_path)
    at_zero = ood.reference_latents(current_cfg, guidance, tmp_path, memo)
    assert calls == ["prior"] and torch.equal(prior, at_zero) and len(list(tmp_path.glob("refs_*.pt"))) == 1
    set_scale(guidance.unet, 1.0, PATH_ADAPTER)
    fingerprint = ood.network_fingerprint(guidance.unet)
    assert fingerprint is not None and fingerprint == ood.network_fingerprint(guidance.unet)
    at_one = ood.reference_latents(current_cfg, guidance, tmp_path, memo, persist_current=False)
    assert calls == ["prior", "current"] and not torch.allclose(at_one, prior)
    assert len(list(tmp_path.glob("refs_*.pt"))) == 1  # kept in the memo only
    assert torch.equal(ood.reference_latents(current_cfg, guidance, tmp_path, memo, persist_current=False), at_one)
    assert torch.equal(ood.reference_latents(prior_cfg, guidance, tmp_path), prior)  # LoRA forced to 0 (cached)
    assert len(calls) == 2
    set_scale(guidance.unet, 0.5, PATH_ADAPTER)
    assert ood.network_fingerprint(guidance.unet) not in (None, fingerprint)
    at_half = ood.reference_latents(current_cfg, guidance, tmp_path, memo)  # persisted: a second file
    assert calls[-1] == "current" and len(list(tmp_path.glob("refs_*.pt"))) == 2
    assert not torch.allclose(at_half, at_one) and not torch.allclose(at_half, prior)
    with pytest.raises(ValueError, match="network 'lora' is not 'prior' or 'current'"):
        guidance.sample_prior_latents(1, 0, 32, 32, 1, network="lora")


def test_fingerprint_of_a_folded_adapter_is_the_unfolded_one(stage1_run):
    """lora_merge.fold_lora takes peft's wrappers out of the module tree (on by default on CUDA): the network must
    read the same, at every weight, or probe_refs=current would sample the prior's references under PTD."""
    from guidance.lora_merge import fold_lora

    cfg = stage1_cfg(stage1_run)
    guidance = make_guidance(cfg, torch.device("cpu"))
    load_path_lora(cfg, guidance)
    unfolded = {}
    for w in (0.5, 1.0, 0.0):
        set_scale(guidance.unet, w, PATH_ADAPTER)
        unfolded[w] = ood.network_fingerprint(guidance.unet)
    assert unfolded[0.0] is None and None not in (unfolded[0.5], unfolded[1.0]) and unfolded[0.5] != unfolded[1.0]
    set_scale(guidance.unet, 0.5, PATH_ADAPTER)
    fold_lora(guidance.unet, PATH_ADAPTER)
    names = [n for n, _ in guidance.unet.named_modules()]
    for w in (0.5, 1.0, 0.0):
        set_scale(guidance.unet, w, PATH_ADAPTER)
        assert ood.network_fingerprint(guidance.unet) == unfolded[w], w
    assert [n for n, _ in guidance.unet.named_modules()] == names  # read without touching the tree


def test_probe_end_to_end_prior_and_path(stage1_run, monkeypatch):
    cfg = stage1_run
    folder = run_dir(cfg) / "probe"
    prior = probe_ood.main(cfg, network="prior", num_generated=3)
    assert {"rendered", "generated"} == set(prior["rows"]) and prior["timesteps"] == [100, 500, 900]
    for row in prior["rows"].values():
        assert [r["t"] for r in row["by_t"]] == [100, 500, 900] and row["overall"]["n"] == 3
        assert all(r["mean"] > 0 for r in row["by_t"])
    for ext in ("json", "md", "png"):
        assert (folder / f"matching_loss_prior.{ext}").stat().st_size > 0
    text = (folder / "matching_loss_prior.md").read_text()
    assert "| overall (t ~ U) |" in text and "not directly comparable" in text
    assert "| rendered (refs only) | generated (refs only) | ratio (refs only) | rendered (self incl.) |" in text
    # both readings side by side whatever the default; `rows` is the default's (references only)
    assert prior["reading"] == "refs_only" and set(prior["rows_by_reading"]) == {"refs_only", "self_included"}
    assert prior["rows"] == prior["rows_by_reading"]["refs_only"] != prior["rows_by_reading"]["self_included"]
    assert prior["space"] == "eps" and prior["normalize"] is True and prior["refs"] == "prior"
    assert len(list(folder.glob("refs_*.pt"))) == 1 and len(list(folder.glob("gen_*.pt"))) == 1

    def no_sampling(*args, **kwargs):
        raise AssertionError("the cached samples were not reused")
    monkeypatch.setattr(StableDiffusionGuidance, "sample_prior_latents", no_sampling)
    again = probe_ood.main(cfg, network="prior", num_generated=3)
    assert again["rows"] == prior["rows"]  # cached samples, seeded noise: identical
    code = probe_ood.cli(["--opt", str(run_dir(cfg) / "config_form_path.yaml"), "--network", "path",
                          "--num-generated", "3"])
    assert code == 0
    path = json.loads((folder / "matching_loss_path.json").read_text())
    assert path["rows"]["rendered"]["overall"]["mean"] != prior["rows"]["rendered"]["overall"]["mean"]
    assert path["rows"]["generated"]["overall"]["mean"] != prior["rows"]["generated"]["overall"]["mean"]


def test_prior_probe_builds_the_initial_model_where_no_stage_ran(stage1_run, tmp_path):
    """--network prior in a fresh run folder builds the same seeded initial model form_path.py built (same PLY bytes)
    and measures the same losses as in the stage-1 run."""
    fresh = stage1_cfg(stage1_run, f"ModelParams.output_root={tmp_path}")
    assert not (run_dir(fresh) / "init_points3d.ply").exists()
    got = probe_ood.main(fresh, network="prior", num_generated=3)
    want = probe_ood.main(stage1_run, network="prior", num_generated=3)
    assert got["rows_by_reading"] == want["rows_by_reading"]
    ply = "init_points3d.ply"
    assert (run_dir(fresh) / ply).read_bytes() == (run_dir(stage1_run) / ply).read_bytes()


def test_bad_input_is_one_line(stage1_run, tmp_path, capsys):
    opt = str(run_dir(stage1_run) / "config_form_path.yaml")
    empty = f"ModelParams.output_root={tmp_path}"
    assert probe_ood.cli(["--opt", opt, "--network", "path", empty]) == 1  # no path LoRA there
    err = capsys.readouterr().err.strip()
    assert "no path LoRA" in err and "\n" not in err
    assert probe_ood.cli(["--opt", opt, "--timesteps", "100,5000"]) == 1
    assert "--timesteps" in capsys.readouterr().err
    assert probe_ood.cli(["--opt", opt, "--raw", "--space", "eps"]) == 1
    err = capsys.readouterr().err.strip()
    assert "--raw is --space score --no-normalize" in err and "\n" not in err
    with pytest.raises(ValueError, match="--space 'latent' is not one of eps, score"):
        probe_ood.main(stage1_run, space="latent")


def test_probe_include_self_picks_the_rows_and_raw_score_space(stage1_run, capsys):
    """probe_include_self only picks `rows` (the same two readings, same eps); --raw is the score-space L2 without
    the sqrt(dim): per sample (eps-space RMS) x sqrt(D) / sigma_t exactly, so per t the means scale alike."""
    cfg = stage1_run
    folder = run_dir(cfg) / "probe"
    default = probe_ood.main(cfg, num_generated=3)
    included = probe_ood.main(stage1_cfg(cfg, "EvalParams.probe_include_self=true"), num_generated=3)
    assert included["reading"] == "self_included" and included["rows_by_reading"] == default["rows_by_reading"]
    assert included["rows"] == default["rows_by_reading"]["self_included"]
    assert probe_ood.cli(["--opt", str(run_dir(cfg) / "config_form_path.yaml"), "--num-generated", "3", "--raw"]) == 0
    assert "space: score, norm: per-sample L2 (raw" in capsys.readouterr().out
    raw = json.loads((folder / "matching_loss_prior_score_raw.json").read_text())
    assert raw["space"] == "score" and raw["normalize"] is False
    assert (folder / "matching_loss_prior_score_raw.png").stat().st_size > 0
    guidance = make_guidance(cfg, torch.device("cpu"))
    dim = 4 * (cfg.GenerateCamParams.image_h // guidance.vae_scale_factor) ** 2
    for reading in ("refs_only", "self_included"):
        for name in ("rendered", "generated"):
            for r_raw, r_eps in zip(raw["rows_by_reading"][reading][name]["by_t"],
                                    default["rows_by_reading"][reading][name]["by_t"]):
                factor = math.sqrt(dim) / (1 - guidance.abar(r_raw["t"])).sqrt().item()
                assert r_raw["mean"] == pytest.approx(r_eps["mean"] * factor, rel=1e-4)


def test_sample_cache_key_follows_the_fused_loras(tmp_path):
    """GuidanceParams.LoRA_path and prior_lora are fused into the prior at load: a cached sample set must not be reused
    for another LoRA, nor for the same path retrained in place; a plain prior's key is unchanged by this."""
    from types import SimpleNamespace

    from arguments.params import GuidanceParams
    from guidance.sd_utils import fused_lora_files

    def key(gp):  # the guidance as load time leaves it: the fused files hashed then
        guidance = SimpleNamespace(gp=gp, model_path="toy", dtype=torch.float32,
                                   fused_lora_files=fused_lora_files(gp.prior_lora, gp.LoRA_path))
        return ood.prior_sample_key(guidance, 4, 0, 64, 64, 10)

    gp = GuidanceParams()
    gp.text = "a red cube"
    plain = key(gp)
    assert not any("LoRA" in k or k.endswith("_files") for k in plain)
    lora = tmp_path / "lora_diffusion.safetensors"
    lora.write_bytes(b"first")
    gp.LoRA_path = str(lora)
    first = key(gp)
    lora.write_bytes(b"retrained")
    second = key(gp)
    assert len({stable_hash(plain), stable_hash(first), stable_hash(second)}) == 3
    folder = tmp_path / "prior_lora"
    folder.mkdir()
    (folder / "pytorch_lora_weights.safetensors").write_bytes(b"a")
    gp.LoRA_path, gp.prior_lora = None, str(folder)
    a = key(gp)
    (folder / "pytorch_lora_weights.safetensors").write_bytes(b"b")
    assert stable_hash(a) != stable_hash(key(gp))
