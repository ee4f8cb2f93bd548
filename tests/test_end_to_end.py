"""End to end on the tiny model: form_path.py + train.py (vanilla, weighted, checkpoints), exact A/B identity,
determinism, resume."""
import subprocess
import sys
from pathlib import Path

import pytest

import form_path
import train
from arguments import load_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
TINY_RUN = ["GenerateCamParams.image_w=32", "GenerateCamParams.image_h=32", "GenerateCamParams.init_num_pts=300",
            "OptimizationParams.iterations=8", "OptimizationParams.warmup_iter=4",
            "OptimizationParams.densify_from_iter=2", "OptimizationParams.densify_until_iter=7",
            "OptimizationParams.densification_interval=3", "OptimizationParams.opacity_reset_interval=6",
            "OptimizationParams.scale_up_cameras_iter=4", "OptimizationParams.save_iterations=[4]",
            "OptimizationParams.test_ratio=1", "OptimizationParams.video_frames=4",
            "OptimizationParams.checkpoint_interval=3", "PTDParams.total_steps=6", "PTDParams.num_views=6",
            "PTDParams.path_epochs=2", "PTDParams.checkpoint_interval=1", "PTDParams.switch_interval=2",
            "GuidanceParams.C_batch_size=2"]

pytestmark = pytest.mark.slow


def cfg_for(tmp_path, *overrides, workspace="run"):
    return load_config(SMOKE, [*TINY_RUN, f"ModelParams.output_root={tmp_path}",
                               f"ModelParams.workspace={workspace}", *overrides])


def final_ply(cfg) -> bytes:
    it = cfg.OptimizationParams.iterations
    return (Path(cfg.ModelParams.output_root) / cfg.ModelParams.workspace / "point_cloud" / f"iteration_{it}" /
            "point_cloud.ply").read_bytes()


def crash_train_at(crash_iteration, cfg, **main_kwargs) -> None:
    """Run train.main(cfg) and let it die with a simulated crash at the start of `crash_iteration`."""
    original = train.train_step

    def crashing(cfg_, iteration, state):
        if iteration == crash_iteration:
            raise RuntimeError("simulated crash")
        return original(cfg_, iteration, state)
    train.train_step = crashing
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            train.main(cfg, **main_kwargs)
    finally:
        train.train_step = original


def test_vanilla_train_writes_stock_outputs(tmp_path):
    cfg = cfg_for(tmp_path, "PTDParams.mode=off")
    ply = train.main(cfg)
    run = tmp_path / "run"
    assert ply.is_file() and (run / "point_cloud" / "iteration_4" / "point_cloud.ply").is_file()
    assert (run / "videos" / "8_iteration" / "video_rgb_8.mp4").stat().st_size > 0
    assert sorted(p.name for p in (run / "test_six_views" / "8_iteration").glob("render_view_*.png")) == \
        sorted(f"render_view_{k}.png" for k in range(16))
    assert list(run.glob("events.out.tfevents.*")) and (run / "config.yaml").is_file()
    assert load_config(run / "config.yaml") == cfg  # the saved config loads back
    first = (run / "config.yaml").read_text().splitlines()[0]  # what ran, on top as a comment
    assert first.startswith("# ran with: rasteriser torch, prior tiny (") and ", float32, device cpu, torch " in first
    assert not (run / "path_lora").exists()  # vanilla touches no LoRA
    check_test_views_in_tensorboard(cfg, run)


def check_test_views_in_tensorboard(cfg, run: Path) -> None:
    """test/rgb and test/depth at each test iteration: one grid, a row of 8 views per orbit, equal (up to TensorBoard's
    truncation to uint8) to the saved PNGs."""
    import io

    import numpy as np
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"images": 0})
    events.Reload()
    assert {"test/rgb", "test/depth"} <= set(events.Tags()["images"])
    c, last = cfg.GenerateCamParams, cfg.OptimizationParams.iterations
    rows = 2 if c.render_45 else 1
    for tag, name in (("test/rgb", "render_view"), ("test/depth", "render_depth")):
        records = events.Images(tag)
        assert [r.step for r in records] == sorted(train.test_iterations(cfg)) == [1, last]
        assert all((r.width, r.height) == (8 * c.image_w, rows * c.image_h) for r in records)
        grid = np.asarray(Image.open(io.BytesIO(records[-1].encoded_image_string)).convert("RGB"), dtype=int)
        for uid in range(8 * rows):
            row, col = divmod(uid, 8)
            cell = grid[row * c.image_h:(row + 1) * c.image_h, col * c.image_w:(col + 1) * c.image_w]
            png = run / "test_six_views" / f"{last}_iteration" / f"{name}_{uid}.png"
            saved = np.asarray(Image.open(png).convert("RGB"), dtype=int)
            assert np.abs(cell - saved).max() <= 1


def test_form_path_then_weighted_and_checkpoints(tmp_path):
    import json

    cfg = cfg_for(tmp_path, "PTDParams.mode=weighted")
    folder = form_path.main(cfg)
    meta = json.loads((folder / "ptd_path.json").read_text())
    assert meta["prompt"] == cfg.GuidanceParams.text and meta["base_model"] == "tiny"
    assert len(list((folder / "checkpoints").glob("step_*"))) == meta["steps"]  # checkpoint_interval 1
    assert (folder / "denoising_loss.png").is_file() and (tmp_path / "run" / "init_points3d.ply").is_file()
    train.main(cfg)
    # the path reused from a new workspace (one command, no stage 1 there): the same run, byte for byte
    reuse = cfg_for(tmp_path, "PTDParams.mode=weighted", f"PTDParams.path_lora={folder}", workspace="reuse")
    train.main(reuse)
    assert final_ply(reuse) == final_ply(cfg)
    cfg_ck = cfg_for(tmp_path, "PTDParams.mode=checkpoints")
    train.main(cfg_ck, overwrite=True)
    assert final_ply(cfg_ck)


def test_path_made_for_another_prompt_is_refused(tmp_path):
    form_path.main(cfg_for(tmp_path, "PTDParams.mode=weighted"))
    cfg = cfg_for(tmp_path, "PTDParams.mode=weighted", "GuidanceParams.text=a different prompt")
    with pytest.raises(ValueError, match="formed for prompt"):
        train.main(cfg)
    assert not (tmp_path / "run" / "point_cloud").exists()


def test_weight_zero_is_bit_identical_to_vanilla(tmp_path, monkeypatch):
    from guidance.ptd_utils import PathTracer

    form_path.main(cfg_for(tmp_path, "PTDParams.mode=weighted", workspace="ptd"))
    monkeypatch.setattr(PathTracer, "weight_at", lambda self, step: 0.0)
    ptd = cfg_for(tmp_path, "PTDParams.mode=weighted", workspace="ptd")
    train.main(ptd)
    vanilla = cfg_for(tmp_path, "PTDParams.mode=off", workspace="vanilla")
    train.main(vanilla)
    assert final_ply(ptd) == final_ply(vanilla)


def test_weight_one_changes_the_run(tmp_path):
    form_path.main(cfg_for(tmp_path, "PTDParams.mode=weighted", "PTDParams.lora_lr=0.01", workspace="ptd"))
    ptd = cfg_for(tmp_path, "PTDParams.mode=weighted", "PTDParams.lora_lr=0.01", workspace="ptd")
    train.main(ptd)
    vanilla = cfg_for(tmp_path, "PTDParams.mode=off", workspace="vanilla")
    train.main(vanilla)
    assert final_ply(ptd) != final_ply(vanilla)


def test_same_seed_same_bytes_and_exact_resume(tmp_path):
    a = cfg_for(tmp_path, "PTDParams.mode=off", workspace="a")
    train.main(a)
    b = cfg_for(tmp_path, "PTDParams.mode=off", workspace="b")
    train.main(b)
    assert final_ply(a) == final_ply(b)
    # interrupted after the checkpoint of iteration 6, then resumed
    c = cfg_for(tmp_path, "PTDParams.mode=off", workspace="c")
    c.OptimizationParams.iterations = 8
    crash_train_at(7, c)
    assert sorted(p.name for p in (tmp_path / "c" / "checkpoints").glob("*.pt")) == \
        ["iteration_000003.pt", "iteration_000006.pt"]
    train.main(c, resume=True)
    assert final_ply(c) == final_ply(a)


def test_existing_run_is_not_overwritten_without_flag(tmp_path):
    cfg = cfg_for(tmp_path, "PTDParams.mode=off")
    train.main(cfg)
    before = final_ply(cfg)
    out = subprocess.run([sys.executable, "train.py", "--opt", str(SMOKE), *TINY_RUN,
                          f"ModelParams.output_root={tmp_path}", "ModelParams.workspace=run", "PTDParams.mode=off"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 1 and "--resume" in out.stderr and "--overwrite" in out.stderr
    assert final_ply(cfg) == before


def test_form_path_lowers_the_denoising_loss_on_the_renders(tmp_path):
    import json

    # the smoke config's stage 1 (64 px, 16 views, 100 LoRA steps)
    cfg = cfg_for(tmp_path, "PTDParams.mode=weighted", "GenerateCamParams.image_w=64", "GenerateCamParams.image_h=64",
                  "PTDParams.num_views=16", "PTDParams.path_epochs=25", "PTDParams.checkpoint_interval=0")
    folder = form_path.main(cfg)
    report = json.loads((folder / "denoising_loss.json").read_text())
    assert report["path_lora_mean"] < report["prior_mean"]
    assert all(b < a for a, b in zip(report["prior"], report["path_lora"]))  # at each of the 10 timesteps


def test_prior_finetune_lora_on_images_then_used_as_prior(tmp_path):
    import json

    import numpy as np
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for k in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(images / f"{k}.png")
    cfg = cfg_for(tmp_path, "PTDParams.prior_epochs=2", "PTDParams.mode=off")
    out = form_path.main(cfg, images=str(images), prompt="a photo of sks toy", out=str(tmp_path / "prior_lora"))
    meta = json.loads((out / "ptd_path.json").read_text())
    assert meta["kind"] == "prior" and meta["num_images"] == 3 and meta["steps"] == 2
    used = cfg_for(tmp_path, f"GuidanceParams.prior_lora={out}", "PTDParams.mode=off", workspace="with_prior")
    train.main(used)
    plain = cfg_for(tmp_path, "PTDParams.mode=off", workspace="plain")
    train.main(plain)
    assert final_ply(used) != final_ply(plain)


def test_both_stages_in_half_precision(tmp_path, monkeypatch):
    """The GPU's half-precision path on the CPU: the guidance forced to bfloat16 (CPU half kernels), stage 1 and a PTD
    stage 2 with the branch and with the fold. fp16 only happens on CUDA, so without this a dtype slip between the
    fp32 latent math and a half UNet (stage 1 once had one) shows up only on a GPU."""
    import torch

    import guidance.sd_utils as sd_utils
    from guidance.lora_merge import fold_lora, folded_adapter
    from stages.run import PATH_ADAPTER
    plain_init = sd_utils.StableDiffusionGuidance.__init__
    seen = []

    def half_init(self, gp, device, **kwargs):
        plain_init(self, gp, device, **{**kwargs, "dtype": torch.bfloat16})
        seen.append(self)

    monkeypatch.setattr(sd_utils.StableDiffusionGuidance, "__init__", half_init)
    cfg = cfg_for(tmp_path, "PTDParams.mode=weighted")
    form_path.main(cfg)
    for fold in ("off", "on"):
        ply = train.main(cfg_for(tmp_path, "PTDParams.mode=weighted", f"PTDParams.fold_lora={fold}"), overwrite=True)
        assert ply.is_file()
        unet = seen[-1].unet
        assert (folded_adapter(unet) == PATH_ADAPTER) == (fold == "on")
        fold_lora(unet, PATH_ADAPTER, enabled=False)  # peft's wrappers back in the tree, for the dtype check
        assert unet.dtype == torch.bfloat16
        assert {p.dtype for n, p in unet.named_parameters() if f".{PATH_ADAPTER}." in n} == {torch.bfloat16}
    assert len(seen) >= 3
