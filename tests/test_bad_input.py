"""Bad input to the entry scripts: one line naming the thing and the fix, a non-zero exit, nothing written."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


def run(script, tmp_path, *overrides, extra=(), opt=SMOKE):
    out = subprocess.run([sys.executable, script, "--opt", str(opt), f"ModelParams.output_root={tmp_path / 'out'}",
                          *overrides, *extra], cwd=ROOT, capture_output=True, text=True,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    return out.returncode, lines


@pytest.mark.parametrize("script", ["train.py", "form_path.py"])
@pytest.mark.parametrize("override, expected", [
    ("GuidanceParams.text=", "GuidanceParams.text is empty"),
    ("GuidanceParams.model_key=nobody/no-such-model", "not a local folder, 'tiny', nor in the Hugging Face cache"),
    ("GuidanceParams.guidance_scale=lots", "expected a number"),
    ("GuidanceParams.guidance_scal=5", "did you mean 'guidance_scale'"),
    ("PipelineParams.backend=vulkan", "unknown render backend 'vulkan'"),
    ("PipelineParams.backend=gsplat", "needs the Gaussians on a CUDA device"),
    ("PTDParams.mode=sometimes", "PTDParams.mode 'sometimes'"),
    ("GenerateCamParams.init_shape=file", "GenerateCamParams.init_path 'None' is not a file"),
    ("GuidanceParams.prior_lora=/no/such/lora", "prior_lora '/no/such/lora' is not a folder"),
])
def test_one_line_error_nonzero_exit_nothing_written(tmp_path, script, override, expected):
    code, lines = run(script, tmp_path, override)
    assert code != 0
    assert len(lines) == 1 and expected in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_path_lora_missing_for_ptd_run(tmp_path):
    code, lines = run("train.py", tmp_path, "PTDParams.mode=weighted")
    assert code == 1 and len(lines) == 1 and "run form_path.py first" in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_output_folder_not_writable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, lines = run("train.py", tmp_path, f"ModelParams.output_root={blocker / 'sub'}", "PTDParams.mode=off")
    assert code == 1 and len(lines) == 1 and "cannot be written" in lines[0], lines


def test_prior_finetune_without_images(tmp_path):
    code, lines = run("form_path.py", tmp_path, extra=["--images", str(tmp_path / "none"), "--prompt", "a cat"])
    assert code == 1 and len(lines) == 1 and "image folder" in lines[0], lines


@pytest.mark.parametrize("script", ["train.py", "form_path.py"])
@pytest.mark.parametrize("name, content, expected", [
    ("broken.glb", b"glTF but not really", "broken.glb"),
    ("broken.ply", b"ply\nformat ascii 1.0\nelement vertex 5\n", "broken.ply"),
    ("empty.obj", b"# no faces, no vertices\n", "empty.obj"),
])
def test_corrupt_init_file(tmp_path, script, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    code, lines = run(script, tmp_path, "GenerateCamParams.init_shape=file", f"GenerateCamParams.init_path={path}",
                      "PTDParams.mode=off")
    assert code == 1 and len(lines) == 1 and expected in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_unreadable_image_in_prior_folder(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    (images / "a.png").write_bytes(b"not a png")
    code, lines = run("form_path.py", tmp_path, extra=["--images", str(images), "--prompt", "a cat"])
    assert code == 1 and len(lines) == 1 and "a.png' is not a readable image" in lines[0], lines


def fake_path_lora(folder, base_model="tiny", truncate=False):
    import json

    from safetensors.torch import save_file
    import torch

    folder.mkdir(parents=True)
    weights = folder / "pytorch_lora_weights.safetensors"
    save_file({"unet.a.lora_A.weight": torch.zeros(4, 4)}, str(weights))
    if truncate:
        weights.write_bytes(weights.read_bytes()[:-10])
    cfg_text = "a DSLR photo of a bagel filled with cream cheese and lox."
    (folder / "ptd_path.json").write_text(json.dumps({"prompt": cfg_text, "base_model": base_model, "rank": 4,
                                                     "lora_alpha": 4}))


@pytest.mark.parametrize("kwargs, expected", [
    ({"truncate": True}, "truncated"),
    ({"base_model": "stabilityai/stable-diffusion-2-1-base"}, "formed for base_model="),
])
def test_bad_path_lora(tmp_path, kwargs, expected):
    fake_path_lora(tmp_path / "lora", **kwargs)
    code, lines = run("train.py", tmp_path, "PTDParams.mode=weighted", f"PTDParams.path_lora={tmp_path / 'lora'}")
    assert code == 1 and len(lines) == 1 and expected in lines[0], lines
    assert not (tmp_path / "out").exists()


# issue 17, items 6 and 8: every value that would escape output_root, divide by zero, loop zero times or not fit in
# memory is refused by arguments/checks.py before the model loads or anything is written (exit 1)
@pytest.mark.parametrize("override, expected", [
    ("ModelParams.workspace=../../x", "ModelParams.workspace '../../x' has a path separator"),
    ("ModelParams.workspace={tmp}/abs_ws", "abs_ws' is an absolute path, which would ignore"),
    ("ModelParams.workspace=", "ModelParams.workspace is empty"),
    ("ModelParams.workspace=..", "ModelParams.workspace '..' is not a folder name"),
    ("OptimizationParams.iterations=0", "OptimizationParams.iterations must be >= 1"),
    ("GenerateCamParams.image_w=0", "GenerateCamParams.image_w must be a positive multiple of 8"),
    ("GenerateCamParams.image_h=100", "GenerateCamParams.image_h must be a positive multiple of 8"),
    ("GenerateCamParams.image_w=16384", "above the limit of 8192 pixels a side"),
    ("GenerateCamParams.fovy_range=[0.6, 0.3]", "GenerateCamParams.fovy_range must be [min, max] with 0 < min < max"),
    ("GenerateCamParams.max_fovy_range=[0.16, 3.5]", "GenerateCamParams.max_fovy_range must be [min, max]"),
    ("GenerateCamParams.default_fovy=0", "GenerateCamParams.default_fovy must be in (0, pi)"),
    ("GenerateCamParams.radius_range=[0, 5.5]", "GenerateCamParams.radius_range must be [min, max] with 0 < min"),
    ("GenerateCamParams.max_radius_range=[5.0, 3.5]", "GenerateCamParams.max_radius_range must be [min, max]"),
    ("GenerateCamParams.init_num_pts=60000000", "above the limit of 50_000_000 points"),
    ("OptimizationParams.densification_interval=0", "OptimizationParams.densification_interval must be >= 1"),
    ("OptimizationParams.opacity_reset_interval=0", "OptimizationParams.opacity_reset_interval must be >= 1"),
    ("OptimizationParams.scale_up_cameras_iter=-1", "OptimizationParams.scale_up_cameras_iter must be >= 0"),
    ("OptimizationParams.video_frames=0", "test_ratio and video_frames must be >= 1"),
    ("mesh_resolution=4", "mesh_resolution must be in 8..1024"),
    ("mesh_threshold=0", "mesh_threshold a positive density"),
    ("OptimizationParams.max_nonfinite_steps=0", "OptimizationParams.max_nonfinite_steps must be >= 1"),
    ("GuidanceParams.C_batch_size=0", "GuidanceParams.C_batch_size must be >= 1"),
    ("ModelParams.batch=0", "ModelParams.batch must be >= 1"),
    ("PTDParams.num_views=0", "PTDParams.num_views must be >= 1"),
    ("PTDParams.lora_batch_size=0", "PTDParams.lora_batch_size must be >= 1"),
    ("GuidanceParams.delta_t=-1", "GuidanceParams.delta_t must be >= 0"),
    ("GuidanceParams.delta_t_start=-5", "GuidanceParams.delta_t_start must be >= 0"),
    ("PTDParams.path_epochs=0", "PTDParams.path_epochs must be >= 1"),
    ("PTDParams.prior_epochs=0", "PTDParams.prior_epochs must be >= 1"),
    ("PTDParams.total_steps=0", "PTDParams.total_steps must be >= 1"),
    ("PTDParams.switch_interval=0", "PTDParams.switch_interval must be >= 1"),
    ("PTDParams.lora_rank=0", "PTDParams.lora_rank must be >= 1"),
    ("PTDParams.power=0", "PTDParams.power must be > 0"),
    ("seed=-1", "seed must be in [0, 2^32 - 1]"),
    ("GuidanceParams.noise_seed=4294967296", "GuidanceParams.noise_seed must be in [0, 2^32 - 1]"),
    ("device=tpu", "device 'tpu' is not a"),
    ("ModelParams.bg_aug_ratio=1.5", "ModelParams.bg_aug_ratio is a probability"),
    ("ModelParams.sh_deg_aug_ratio=-0.1", "ModelParams.sh_deg_aug_ratio is a probability"),
    ("ModelParams.scale_aug_ratio=2", "ModelParams.scale_aug_ratio is a probability"),
    ("OptimizationParams.as_latent_ratio=1.2", "OptimizationParams.as_latent_ratio is a probability"),
])
def test_range_checks_before_anything_is_written(tmp_path, override, expected):
    code, lines = run("train.py", tmp_path, override.format(tmp=tmp_path))
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert sorted(tmp_path.iterdir()) == []  # no output folder, nothing beside it


@pytest.mark.parametrize("override, expected", [
    ("ModelParams.workspace=../x", "has a path separator"),
    ("GenerateCamParams.image_h=100", "GenerateCamParams.image_h must be a positive multiple of 8"),
    ("PTDParams.path_epochs=0", "PTDParams.path_epochs must be >= 1"),
])
def test_range_checks_in_stage_1(tmp_path, override, expected):
    code, lines = run("form_path.py", tmp_path, override)
    assert code == 1 and len(lines) == 1 and expected in lines[0], lines
    assert sorted(tmp_path.iterdir()) == []


def test_override_after_a_flag_is_applied_and_checked(tmp_path):
    code, lines = run("train.py", tmp_path, extra=["--resume", "OptimizationParams.iterations=0"])
    assert code == 1 and len(lines) == 1 and "OptimizationParams.iterations must be >= 1" in lines[0], lines
    assert sorted(tmp_path.iterdir()) == []


# issue 17, item 9: a config file that is binary, a folder, empty or sets a key twice: one line, exit 2 (parse_cli)
@pytest.mark.parametrize("name, content, expected", [
    ("image.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is a PNG image, not a YAML config"),
    ("noise.bin", bytes(range(128, 256)), "is a binary file (not UTF-8 text), not a YAML config"),
    ("empty.yaml", b"# nothing but a comment\n", "is empty (no sections)"),
    ("twice.yaml", b"GuidanceParams:\n  text: a cat\n  text: a dog\n", "key 'GuidanceParams.text' is given twice "
                                                                      "(lines 2 and 3)"),
    ("sections.yaml", b"GuidanceParams:\n  text: a cat\nseed: 1\nGuidanceParams:\n  guidance_scale: 5\n",
     "section 'GuidanceParams' is given twice (lines 1 and 4)"),
    ("folder", None, "is a folder; pass a YAML file with --opt"),
])
@pytest.mark.parametrize("script", ["train.py", "form_path.py"])
def test_bad_config_file(tmp_path, script, name, content, expected):
    path = tmp_path / name
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    code, lines = run(script, tmp_path, opt=path)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert sorted(tmp_path.iterdir()) == [path]  # only the file itself
