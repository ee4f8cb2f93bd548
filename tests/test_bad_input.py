"""Bad input to the entry scripts: one line naming the thing and the fix, a non-zero exit, nothing written."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


def run(script, tmp_path, *overrides, extra=()):
    out = subprocess.run([sys.executable, script, "--opt", str(SMOKE), f"ModelParams.output_root={tmp_path / 'out'}",
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
