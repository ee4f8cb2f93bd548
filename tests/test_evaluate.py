"""CLIP evaluation by the paper's protocol with the tiny open_clip config (random weights, seeded): the 16-view rig,
deterministic scores, per-run and overall aggregation equal to a direct computation, evaluate.py end to end on
trained tiny runs (folder of runs, --prompts), the A/B report from metrics files, and one-line errors."""
import json
import math
import shutil

import pytest
import torch

import evaluate
import train
from arguments import load_config, save_config
from scene import GaussianModel, eval_rig_cameras
from scene.cameras import orbit_position, wrap_degrees
from test_end_to_end import SMOKE, TINY_RUN
from evaluation.ab_report import PAPER_TABLE1, write_ab_report
from evaluation.clip import clip_scores, load_scorer, parse_clip_models, rig_images
from evaluation.monitor import METRICS_FILE

ARGS = ["--clip-models", "tiny", "--resolution", "32", "--device", "cpu", "--backend", "torch"]


def test_rig_is_the_papers_16_views():
    cams = eval_rig_cameras(32, 32)
    assert len(cams) == 16
    assert [c.polar for c in cams] == [90.0] * 8 + [45.0] * 8  # elevations 0 and 45 degrees
    azimuths = [-180.0 + 45.0 * k for k in range(8)]  # -180 is stored wrapped as 180: the same view
    assert [c.azimuth for c in cams[:8]] == [wrap_degrees(a) for a in azimuths] == [c.azimuth for c in cams[8:]]
    for c, elevation, azimuth in zip(cams, [0.0] * 8 + [45.0] * 8, azimuths * 2):
        eye = orbit_position(4.0, 90.0 - elevation, azimuth)
        torch.testing.assert_close(c.camera_center.double(), torch.from_numpy(eye), atol=1e-5, rtol=0)
        assert math.degrees(math.asin(float(c.camera_center[2]) / 4.0)) == pytest.approx(elevation, abs=1e-4)


def test_model_specs():
    assert parse_clip_models(None) == [("ViT-L-14", "openai"), ("ViT-bigG-14", "laion2b_s39b_b160k")]
    assert parse_clip_models("tiny, ViT-B-32:/w/x:y.bin,RN50:none") == \
        [("tiny", None), ("ViT-B-32", "/w/x:y.bin"), ("RN50", None)]
    with pytest.raises(ValueError, match="names no model"):
        parse_clip_models(" , ")
    with pytest.raises(ValueError, match="unknown open_clip model"):
        load_scorer("ViT-Nope", None)


def test_tiny_scores_are_deterministic_and_aggregate_like_a_loop():
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    a, b = load_scorer("tiny", None), load_scorer("tiny", None)  # seeded random weights: the same scorer twice
    state = torch.get_rng_state()
    out = clip_scores({"tiny": a}, images, "a bagel")["tiny"]
    assert torch.equal(state, torch.get_rng_state())
    assert out["views"] == clip_scores({"tiny": b}, images, "a bagel")["tiny"]["views"]
    singles = [a.similarity(im[None], "a bagel").item() for im in images]  # one view at a time
    assert out["views"] == pytest.approx(singles, abs=1e-4)
    assert out["mean"] == pytest.approx(sum(singles) / 4, abs=1e-4)
    rows = [{"scores": {"tiny": {"mean": 1.0}}}, {"scores": {"tiny": {"mean": 4.0}}}]
    assert evaluate.aggregate(rows, ["tiny"]) == {"tiny": 2.5}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished tiny runs with different prompts and two unfinished run folders: c never trained, d killed after
    an intermediate save (its iteration-4 PLY is there, the final one and the completion marker are not)."""
    root = tmp_path_factory.mktemp("eval_runs")
    for name, prompt in (("a", "a bagel"), ("b", "a red car")):
        cfg = load_config(SMOKE, [*TINY_RUN, "save_video=false", "PTDParams.mode=off", f"GuidanceParams.text={prompt}",
                                  f"ModelParams.output_root={root}", f"ModelParams.workspace={name}"])
        train.main(cfg)
    (root / "c").mkdir()
    (root / "c" / "config.yaml").write_text((root / "a" / "config.yaml").read_text().replace("a bagel", "a cat"))
    shutil.copytree(root / "a", root / "d")
    (root / "d" / "config.yaml").write_text((root / "a" / "config.yaml").read_text().replace("a bagel", "a dog"))
    (root / "d" / "train_done.json").unlink()
    shutil.rmtree(root / "d" / "point_cloud" / "iteration_8")
    return root


def test_evaluate_folder_of_runs(runs):
    assert evaluate.cli([str(runs), *ARGS]) == 0
    report = json.loads((runs / "clip_scores.json").read_text())
    assert [r["run"] for r in report["rows"]] == ["a", "b"] and report["unfinished"] == ["c", "d"]
    assert report["models"] == ["tiny"] and all(r["views"] == 16 for r in report["rows"])
    # the score of run a equals a direct computation: load the final PLY, render the rig, score, average
    gaussians = GaussianModel(0)
    gaussians.load_ply(str(runs / "a" / "point_cloud" / "iteration_8" / "point_cloud.ply"))
    images = rig_images(gaussians, torch.ones(3), 32, "torch")
    direct = load_scorer("tiny", None).similarity(images, "a bagel").double().mean().item()
    assert report["rows"][0]["scores"]["tiny"]["mean"] == pytest.approx(direct, abs=1e-6)
    assert report["overall"]["tiny"] == pytest.approx(sum(r["scores"]["tiny"]["mean"] for r in report["rows"]) / 2)
    text = (runs / "clip_scores.md").read_text()
    assert "| **overall** |" in text and "unfinished (not scored): c" in text and "unfinished (not scored): d" in text


def test_prompts_file_restricts_and_orders(runs, tmp_path):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"dreamfusion": ["a red car", "a missing prompt", "a bagel"]}))
    assert evaluate.cli([str(runs), *ARGS, "--prompts", f"{prompts}:dreamfusion", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "clip_scores.json").read_text())
    assert [r["prompt"] for r in report["rows"]] == ["a red car", "a bagel"]
    assert report["missing_prompts"] == ["a missing prompt"]
    assert evaluate.cli([str(runs / "b"), *ARGS, "--out", str(tmp_path / "one")]) == 0  # a single run folder
    assert json.loads((tmp_path / "one" / "clip_scores.json").read_text())["rows"][0]["prompt"] == "a red car"


def test_bad_input_is_one_line(runs, tmp_path, capsys):
    cases = [([str(runs / "c"), *ARGS], "is unfinished"), ([str(runs / "d"), *ARGS], "is unfinished"),
             ([str(runs), *ARGS, "--prompts", str(tmp_path / "nope.txt")], "not found"),
             ([str(tmp_path / "nothing"), *ARGS], "is not a folder"),
             (["--ab", str(runs / "a"), str(runs / "b")], "metrics_interval")]
    for argv, message in cases:
        assert evaluate.cli(argv) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and message in err and "\n" not in err, err
    with pytest.raises(SystemExit):
        evaluate.parse_args([])


def test_missing_clip_weights_offline_is_one_line(runs, tmp_path, capsys, monkeypatch):
    import open_clip

    def offline(*args, **kwargs):
        raise RuntimeError("Failed to download weights for ViT-L-14 openai")
    monkeypatch.setattr(open_clip, "create_model_and_transforms", offline)
    assert evaluate.cli([str(runs / "a"), "--resolution", "32", "--out", str(tmp_path)]) == 1  # the paper's scorers
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: CLIP weights 'ViT-L-14:openai' are not available offline") and "\n" not in err
    assert not (tmp_path / "clip_scores.json").exists()


def write_metrics(run, mode, losses, clips, iterations=21, finished=True):
    """A run folder as train.py leaves it for the A/B report: config.yaml, metrics.jsonl, completion marker."""
    run.mkdir(parents=True)
    records = [{"iteration": 1 + 10 * i, "mode": mode, "matching_loss": m, "matching_loss_std": 0.1,
                "clip": {"tiny": c}} for i, (m, c) in enumerate(zip(losses, clips))]
    (run / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    save_config(load_config(SMOKE, [f"OptimizationParams.iterations={iterations}", f"PTDParams.mode={mode}"]),
                run / "config.yaml")
    if finished:
        ply = run / "point_cloud" / f"iteration_{iterations}" / "point_cloud.ply"
        ply.parent.mkdir(parents=True)
        ply.write_bytes(b"ply")
        (run / "train_done.json").write_text(json.dumps({"iterations": iterations, "ply": str(ply.relative_to(run))}))


def test_ab_report_refuses_unfinished_or_unequal_arms(tmp_path):
    write_metrics(tmp_path / "van", "off", [3.0, 2.5, 2.0], [20.0, 22.0, 24.0])
    write_metrics(tmp_path / "killed", "weighted", [1.5, 1.4], [21.0, 24.0], iterations=30, finished=False)
    write_metrics(tmp_path / "long", "weighted", [1.5, 1.4, 1.3, 1.2], [21.0, 24.0, 26.0, 27.0], iterations=31)
    with pytest.raises(ValueError, match=r"'.*killed' is unfinished \(last metrics record at iteration 11 of 30\)"):
        write_ab_report(tmp_path / "van", tmp_path / "killed", tmp_path / "out")
    with pytest.raises(ValueError, match=r"different numbers of iterations \(21 vs 31\)"):
        write_ab_report(tmp_path / "van", tmp_path / "long", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_ab_report_from_metrics_files(tmp_path):
    write_metrics(tmp_path / "van", "off", [3.0, 2.5, 2.0], [20.0, 22.0, 24.0])
    write_metrics(tmp_path / "ptd", "weighted", [1.5, 1.4, 1.3], [21.0, 24.0, 26.0])
    report = write_ab_report(tmp_path / "van", tmp_path / "ptd", tmp_path / "out")
    text = (tmp_path / "out" / "ab_report.md").read_text()
    assert (tmp_path / "out" / "ab_report.png").stat().st_size > 0
    assert "| vanilla | off | 1-21 | 3.0000 | 2.0000 ± 0.1000 | 24.00 |" in text
    assert "| PTD | weighted | 1-21 | 1.5000 | 1.3000 ± 0.1000 | 26.00 |" in text
    assert "the paper's Table 1 (quoted from the paper, NOT our measurements)" in text
    for name, (vit_l, vit_g) in PAPER_TABLE1.items():
        assert f"| {name} | {vit_l:.2f} | {vit_g:.2f} |" in text
    assert [a["label"] for a in report["arms"]] == ["vanilla", "PTD"]


def test_resolution_zero_is_refused_before_anything_runs(capsys):
    with pytest.raises(SystemExit) as err:
        evaluate.parse_args(["some_run", "--resolution", "0"])
    assert err.value.code == 2 and "--resolution must be in [1, 8192] pixels" in capsys.readouterr().err
