"""The method end to end where the answer is known: stage 2 on the toy prior (model_key: toy) turns the initial sphere
into the prompt's object. A broken sign, camera convention, view-prompt blend or LoRA scale fails here, where on a
random-weight prior it would still "run".

The run: 200 vanilla iterations of configs/toy.yaml from the sphere for "a blue cone" (~2 min on 2 cores). Measured
on this project's CPU machine, scale-aligned IoU / colour error / best shape / nearest colour:
- toy prior (broad autoencoder, 10,000 UNet steps, decoder phase; committed 2026-12-01 19:45): 0.817 / 0.169 / cone /
  blue (the thresholds below: >= 0.7, <= 0.3, cone, blue)
- the previous toy prior (broad autoencoder, 7,000 UNet steps, committed 2026-12-01 12:03): 0.849 / 0.169 / cone / blue
- the one before it (world-only autoencoder, 7,000 UNet steps): 0.863 / 0.183 / cone / blue
- the earlier 2,400-step toy prior (2026-11-30): 0.795 / 0.206 / cone / blue
- random-weight tiny prior: 0.383 / 0.383 / cylinder / yellow (same run, model_key=tiny)
- a solid sphere (the initial shape, fully opaque): 0.571 / - / sphere
The raw IoU is low for all (0.46 toy; 0.38 and 0.27 with the previous two priors): the toy prior fixes shape and
colour, not size (see toyworld.score)."""
from pathlib import Path

import pytest

import train
from arguments import load_config
from scene.gaussian_model import GaussianModel
from toyworld.score import score_model

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "configs" / "toy.yaml"
PROMPT = "a blue cone"
# a short vanilla stage 2 (no stage 1 needed), no video, no test views in between; the schedule is spelled out (the
# one the figures above were measured with) so that tuning the demo's config does not move this test
SHORT_RUN = ["PTDParams.mode=off", "save_video=false", "OptimizationParams.test_ratio=1",
             "OptimizationParams.save_iterations=[]", "OptimizationParams.iterations=200",
             "OptimizationParams.warmup_iter=140", "OptimizationParams.densify_until_iter=200",
             "OptimizationParams.opacity_reset_interval=150", "OptimizationParams.scale_up_cameras_iter=75",
             f"GuidanceParams.text={PROMPT}"]
REGRESSION = {"aligned_iou": 0.7, "colour_error": 0.3}

pytestmark = pytest.mark.slow


def test_toy_prior_makes_the_prompted_object(tmp_path):
    cfg = load_config(TOY, [*SHORT_RUN, f"ModelParams.output_root={tmp_path}", "ModelParams.workspace=run"])
    ply = train.main(cfg)
    model = GaussianModel(sh_degree=cfg.ModelParams.sh_degree)
    model.load_ply(str(ply))
    s = score_model(model, PROMPT)
    print({k: s[k] for k in ("iou", "aligned_iou", "aligned_scale", "colour_error", "shape_ious", "mean_colour")})
    assert s["shape_ok"], f"best-fitting shape {s['best_shape']} (IoUs {s['shape_ious']}), not the cone"
    assert s["colour_ok"], f"nearest colour {s['nearest_colour']} ({s['colour_distances']}), not blue"
    assert s["aligned_iou"] >= REGRESSION["aligned_iou"]
    assert s["colour_error"] <= REGRESSION["colour_error"]
