"""Metrics during stage 2: records at the right iterations under the iteration's network, the training trajectory
untouched (same final PLY bytes with metrics on and off, PTD and vanilla, references of the prior or of the current
network, the scored x_0 in or out of the reference set), exact resume, and the A/B report."""
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
import form_path
import train
from arguments import ConfigError, load_config
from arguments.checks import check_eval_params
from guidance.ptd_utils import ptd_weight
from guidance.sd_utils import StableDiffusionGuidance
from stages.run import INIT_KEY, INIT_PLY
from test_end_to_end import SMOKE, TINY_RUN, crash_train_at
from evaluation.monitor import METRICS_FILE, read_metrics, record_iterations, reset_metrics_file
from utils.rng import preserved_rng

pytestmark = pytest.mark.slow

# the monitor at toy scale: tiny CLIP at 32 px, 4 references of 2 DDIM steps, 2 views, 3 timesteps
TINY_METRICS = ["EvalParams.clip_model=tiny", "EvalParams.clip_resolution=32", "EvalParams.probe_num_refs=4",
                "EvalParams.probe_ddim_steps=2", "EvalParams.probe_num_views=2",
                "EvalParams.probe_timesteps=[100,500,900]", "save_video=false",
                "OptimizationParams.save_iterations=[3,6]"]  # models saved at records: toyworld.study re-measures them
RECORDED = [1, 3, 6, 8]  # metrics_interval 3 over 8 iterations: the first, every 3rd and the last


def cfg_for(root, workspace, *overrides):
    return load_config(SMOKE, [*TINY_RUN, *TINY_METRICS, f"ModelParams.output_root={root}",
                               f"ModelParams.workspace={workspace}", "PTDParams.lora_lr=0.01", *overrides])


def ply_bytes(ply: Path) -> bytes:
    return Path(ply).read_bytes()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """PTD and vanilla arms, each trained with metrics off, then again (same folder) with metrics every 3 its."""
    root = tmp_path_factory.mktemp("metrics_runs")
    form_path.main(cfg_for(root, "ptd", "PTDParams.mode=weighted"))
    out = {"root": root}
    for arm, mode in (("ptd", "weighted"), ("vanilla", "off")):
        off = ply_bytes(train.main(cfg_for(root, arm, f"PTDParams.mode={mode}")))
        assert not (root / arm / METRICS_FILE).exists()
        on = ply_bytes(train.main(cfg_for(root, arm, f"PTDParams.mode={mode}", "EvalParams.metrics_interval=3"),
                                  overwrite=True))
        out[arm] = {"off": off, "on": on, "records": read_metrics(root / arm / METRICS_FILE)}
    return out


@pytest.fixture(scope="module")
def current_run(runs):
    """The PTD arm again (own folder, the same path LoRA) with references of the current network and each render's
    own x_0 in its reference set, every sampling of references recorded."""
    root, calls = runs["root"], []
    sample = StableDiffusionGuidance.sample_prior_latents

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("network"))
        return sample(self, *args, **kwargs)
    cfg = cfg_for(root, "ptd_current", "PTDParams.mode=weighted", f"PTDParams.path_lora={root / 'ptd' / 'path_lora'}",
                  "EvalParams.metrics_interval=3", "EvalParams.probe_refs=current",
                  "EvalParams.probe_include_self=true")
    (root / "ptd_current").mkdir()
    for name in (INIT_PLY, INIT_KEY):  # PTD's stage 2 starts from stage 1's initial model
        shutil.copy(root / "ptd" / name, root / "ptd_current" / name)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(StableDiffusionGuidance, "sample_prior_latents", spy)
        ply = ply_bytes(train.main(cfg))
    return {"ply": ply, "calls": calls, "records": read_metrics(root / "ptd_current" / METRICS_FILE),
            "folder": root / "ptd_current"}


@pytest.mark.parametrize("arm", ["ptd", "vanilla"])
def test_metrics_do_not_change_the_trajectory(runs, arm):
    assert runs[arm]["on"] == runs[arm]["off"]


def test_current_references_are_resampled_per_network_off_the_trajectory(runs, current_run):
    assert current_run["ply"] == runs["ptd"]["off"]
    records = current_run["records"]
    assert [r["iteration"] for r in records] == RECORDED
    assert all(r["matching_loss_reading"] == "self_included" and r["matching_loss_refs"] == "current"
               for r in records)
    assert all(r["matching_loss_reading"] == "refs_only" and r["matching_loss_refs"] == "prior"
               for r in runs["ptd"]["records"])
    # w(1), w(3), w(6) > 0: three networks, each sampled at its record (memo only); w(8) = 0: the prior, whose
    # references are sampled once and shared through the file with probe_ood.py and evaluate.py
    assert [r["ptd_weight"] > 0 for r in records] == [True, True, True, False]
    assert current_run["calls"] == ["current", "current", "current", "prior"]
    assert len(list((current_run["folder"] / "probe").glob("refs_*.pt"))) == 1
    assert all(np.isfinite(r["matching_loss"]) and r["matching_loss"] >= 0 for r in records)
    assert records[-1]["matching_loss"] != runs["ptd"]["records"][-1]["matching_loss"]  # the other reading


def test_evaluate_matching_loss_uses_the_run_s_reading(current_run, tmp_path):
    """evaluate.py --matching-loss reads EvalParams.probe_include_self/probe_refs from the run's config: the final
    PLY under the prior scores what the monitor's last record (w = 0) does."""
    last = current_run["records"][-1]
    assert evaluate.cli([str(current_run["folder"]), "--clip-models", "none", "--matching-loss", "--out",
                         str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "clip_scores.json").read_text())["rows"]
    assert row["matching_loss"]["mean"] == pytest.approx(last["matching_loss"], rel=1e-6)
    assert row["matching_loss"]["by_t"] == pytest.approx(last["matching_loss_by_t"], rel=1e-6)


def test_records_at_the_interval_under_the_iterations_network(runs):
    cfg = cfg_for(runs["root"], "ptd")
    for arm in ("ptd", "vanilla"):
        records = runs[arm]["records"]
        assert [r["iteration"] for r in records] == RECORDED
        for r in records:
            assert set(r["matching_loss_by_t"]) == {"100", "500", "900"}
            assert np.isfinite(r["matching_loss"]) and r["matching_loss"] > 0 and r["matching_loss_std"] >= 0
            assert r["matching_loss"] == pytest.approx(np.mean(list(r["matching_loss_by_t"].values())))
            assert set(r["clip"]) == {"tiny"} and r["clip_views"] == 16 and abs(r["clip"]["tiny"]) <= 100
    p = cfg.PTDParams
    assert [r["ptd_weight"] for r in runs["ptd"]["records"]] == \
        pytest.approx([ptd_weight(i, p.total_steps, p.power) for i in RECORDED])
    assert all(r["ptd_weight"] is None and r["mode"] == "off" for r in runs["vanilla"]["records"])
    # the reference set is shared with probe_ood.py through the run's cache
    assert list((runs["root"] / "ptd" / "probe").glob("refs_*.pt"))


def test_tensorboard_has_the_metric_scalars(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(runs["root"] / "ptd"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"metrics/matching_loss", "metrics/clip/tiny", "metrics/matching_loss_t100"} <= set(tags)
    assert [e.step for e in events.Scalars("metrics/matching_loss")] == RECORDED


def test_ab_report_has_both_arms(runs, tmp_path):
    root = runs["root"]
    assert evaluate.cli(["--ab", str(root / "vanilla"), str(root / "ptd"), "--out", str(tmp_path), "--clip-models",
                         "tiny", "--resolution", "32", "--device", "cpu", "--backend", "torch"]) == 0
    text = (tmp_path / "ab_report.md").read_text()
    assert (tmp_path / "ab_report.png").stat().st_size > 0
    assert "| vanilla | off |" in text and "| PTD | weighted |" in text
    assert "CLIP tiny (16 views, final PLY)" in text  # --clip-models: the final PLYs scored by the protocol
    protocol = json.loads((tmp_path / "PTD" / "clip_scores.json").read_text())["overall"]["tiny"]
    assert f"{protocol:.2f} |" in text.split("| PTD | weighted |")[1].splitlines()[0]
    assert "NOT our measurements" in text and "| PTD (paper) | 27.16 | 42.36 |" in text
    report = json.loads((tmp_path / "ab_report.json").read_text())
    final = report["arms"][1]["final"]
    assert final["final_iteration"] == 8
    assert final["matching_loss_final"] == pytest.approx(runs["ptd"]["records"][-1]["matching_loss"])


def test_resume_keeps_one_record_per_iteration(runs):
    """A crash after the checkpoint of iteration 6 leaves a record of 7 behind; the resumed run records it again."""
    root = runs["root"]
    cfg = cfg_for(root, "vanilla", "PTDParams.mode=off", "EvalParams.metrics_interval=1")
    crash_train_at(8, cfg, overwrite=True)
    assert [r["iteration"] for r in read_metrics(root / "vanilla" / METRICS_FILE)] == list(range(1, 8))
    assert ply_bytes(train.main(cfg, resume=True)) == runs["vanilla"]["off"]
    assert [r["iteration"] for r in read_metrics(root / "vanilla" / METRICS_FILE)] == list(range(1, 9))


def test_bad_eval_params_are_one_line(runs):
    cfg = cfg_for(runs["root"], "bad", "PTDParams.mode=off", "EvalParams.metrics_interval=2",
                  "EvalParams.probe_timesteps=[100,1200]")
    with pytest.raises(ValueError, match=r"EvalParams.probe_timesteps must be timestep indices in \[0, 999\)"):
        train.main(cfg, overwrite=True)
    with pytest.raises(ConfigError, match="metrics_interval must be >= 0"):
        check_eval_params(load_config(SMOKE, ["EvalParams.metrics_interval=-1"]))


def test_probe_refs_is_checked_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match="EvalParams.probe_refs 'lora' is not 'prior'"):
        check_eval_params(load_config(SMOKE, ["EvalParams.probe_refs=lora"]))
    cfg = cfg_for(tmp_path, "bad", "PTDParams.mode=off", "EvalParams.probe_refs=lora")
    with pytest.raises(ConfigError, match="probe_refs"):
        train.main(cfg)
    assert not (tmp_path / "bad").exists()
    check_eval_params(load_config(SMOKE, ["EvalParams.probe_refs=current", "EvalParams.probe_include_self=true"]))


def test_record_iterations_and_file_reset(tmp_path):
    assert record_iterations(0, 10) == set()
    assert record_iterations(4, 10) == {1, 4, 8, 10}
    path = tmp_path / METRICS_FILE
    path.write_text("".join(json.dumps({"iteration": i}) + "\n" for i in (1, 2, 3)) + '{"iteration": 4, "tor')
    assert [r["iteration"] for r in read_metrics(path)] == [1, 2, 3]  # a torn last line is skipped
    reset_metrics_file(path, start=3)
    assert [r["iteration"] for r in read_metrics(path)] == [1, 2]
    reset_metrics_file(path, start=1)
    assert read_metrics(path) == []


def test_preserved_rng_restores_every_stream():
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    with preserved_rng():
        torch.rand(3), random.random(), np.random.rand()
    after = (torch.rand(1).item(), random.random(), np.random.rand())
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    assert after == (torch.rand(1).item(), random.random(), np.random.rand())


@pytest.mark.parametrize("arm", ["ptd", "vanilla"])
def test_evaluate_matching_loss_of_the_final_ply_equals_the_last_record(runs, arm, tmp_path):
    """Two paths to one number: the monitor on the live Gaussians at the last iteration (w = 0 there, so the prior
    in both arms) and evaluate.py --matching-loss on the PLY read back from disk."""
    last = runs[arm]["records"][-1]
    assert last["iteration"] == 8 and last["ptd_weight"] in (None, 0.0)
    assert evaluate.cli([str(runs["root"] / arm), "--clip-models", "none", "--matching-loss", "--out",
                         str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "clip_scores.json").read_text())["rows"]
    assert row["matching_loss"]["mean"] == pytest.approx(last["matching_loss"], rel=1e-6)
    assert row["matching_loss"]["by_t"] == pytest.approx(last["matching_loss_by_t"], rel=1e-6)
    assert row["scores"] == {} and "matching loss" in (tmp_path / "clip_scores.md").read_text()


def test_saved_models_remeasured_afterwards_reproduce_the_records(runs, current_run):
    """toyworld.study.app_h_losses rebuilds each saved iteration's network (path LoRA at w(iter)) and references: with
    the prior's references it must give the PTD monitor's records exactly, and with the current network's those of
    the run that recorded with EvalParams.probe_refs=current (and its reading); vanilla's two readings coincide."""
    from toyworld.study import app_h_losses

    for folder, records, refs in ((runs["root"] / "ptd", runs["ptd"]["records"], "prior"),
                                  (current_run["folder"], current_run["records"], "current")):
        again = app_h_losses(folder)
        assert sorted(again) == [3, 6, 8]
        for rec in records:
            if rec["iteration"] in again:
                assert again[rec["iteration"]][refs] == rec["matching_loss"], (folder.name, rec["iteration"])
                assert again[rec["iteration"]]["ptd_weight"] == pytest.approx(ptd_weight(rec["iteration"], 6, 0.3))
        assert again[3]["prior"] != again[3]["current"]  # w(3) > 0: another reference set
        assert again[8]["prior"] == again[8]["current"]  # w = 0 after total_steps: the prior's
    assert app_h_losses(runs["root"] / "vanilla", cached_only=True) == {}  # never measured: nothing computed
    vanilla = app_h_losses(runs["root"] / "vanilla")
    assert all(v["prior"] == v["current"] and v["ptd_weight"] is None for v in vanilla.values())
    assert app_h_losses(runs["root"] / "vanilla", cached_only=True) == vanilla
    ply = runs["root"] / "vanilla" / "point_cloud" / "iteration_3" / "point_cloud.ply"
    os.utime(ply, ns=(ply.stat().st_atime_ns, ply.stat().st_mtime_ns + 10**9))  # a model saved again since
    assert sorted(app_h_losses(runs["root"] / "vanilla", cached_only=True)) == sorted(set(vanilla) - {3})
