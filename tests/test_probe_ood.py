"""OOD probe: per-timestep aggregation and the per-sample loss layout against brute-force loops, the probe end to end
on a stage-1 run (cache reuse, prior vs path LoRA), and one-line errors for bad input."""
import json
import statistics

import pytest
import torch

import form_path
import probe_ood
from arguments import load_config, run_dir
from guidance.stf import aggregate_by_timestep, matching_loss, stf_eps
from test_end_to_end import SMOKE, TINY_RUN
from evaluation import ood
from guidance.sd_utils import StableDiffusionGuidance

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


def test_matching_losses_layout_equals_a_loop():
    g = torch.Generator().manual_seed(1)
    x0, refs = torch.randn(3, 4, 2, 2, generator=g), torch.randn(5, 4, 2, 2, generator=g)
    timesteps, draws, emb = [100, 700], 2, torch.zeros(1, 77, 8)
    out = ood.matching_losses(FakeGuidance(), x0, refs, timesteps, emb, seed=7, draws=draws, batch=4)
    assert out.shape == (2, 3, 2)
    gen = torch.Generator().manual_seed(7)
    for i, t in enumerate(timesteps):
        abar = torch.tensor(1.0 - t / 1000.0)
        eps = torch.randn((draws, *x0.shape), generator=gen)
        for n in range(3):
            for k in range(draws):
                x_t = (abar.sqrt() * x0[n] + (1 - abar).sqrt() * eps[k, n])[None]
                want = matching_loss(0.3 * x_t + t / 1000.0, x_t, refs, abar.sqrt(), (1 - abar).sqrt())
                torch.testing.assert_close(out[i, n, k], want[0])


def test_matching_loss_is_zero_for_the_stf_denoiser():
    refs = torch.randn(4, 4, 2, 2, generator=torch.Generator().manual_seed(2))

    class StfGuidance(FakeGuidance):
        def unet_eps(self, x_t, t, emb):
            abar = self.abar(t)
            return stf_eps(x_t, refs, abar.sqrt(), (1 - abar).sqrt())
    out = ood.matching_losses(StfGuidance(), refs[:2], refs, [300], torch.zeros(1, 77, 8), seed=0)
    assert out.abs().max() < 1e-5


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe_run")
    cfg = load_config(SMOKE, [*TINY_RUN, *PROBE, f"ModelParams.output_root={root}", "ModelParams.workspace=run",
                              "PTDParams.mode=weighted", "PTDParams.lora_lr=0.01"])
    form_path.main(cfg)
    return cfg


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


def test_bad_input_is_one_line(stage1_run, tmp_path, capsys):
    opt = str(run_dir(stage1_run) / "config_form_path.yaml")
    empty = f"ModelParams.output_root={tmp_path}"
    assert probe_ood.cli(["--opt", opt, empty]) == 1  # no init_points3d.ply there
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "init_points3d.ply" in err and "\n" not in err
    assert probe_ood.cli(["--opt", opt, "--network", "path", empty]) == 1  # no path LoRA there
    err = capsys.readouterr().err.strip()
    assert "no path LoRA" in err and "\n" not in err
    assert probe_ood.cli(["--opt", opt, "--timesteps", "100,5000"]) == 1
    assert "--timesteps" in capsys.readouterr().err
