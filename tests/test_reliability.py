"""Reliability: kill -9 / Ctrl-C and resume to the same bytes, NaN guard, disk full, damaged checkpoints."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from test_end_to_end import ROOT, SMOKE, TINY_RUN, cfg_for, final_ply

pytestmark = pytest.mark.slow
LONGER = ["OptimizationParams.iterations=14", "OptimizationParams.checkpoint_interval=2", "PTDParams.mode=off"]


def start_train(tmp_path, workspace, *extra):
    args = [sys.executable, "train.py", "--opt", str(SMOKE), *TINY_RUN, *LONGER,
            f"ModelParams.output_root={tmp_path}", f"ModelParams.workspace={workspace}", *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for_checkpoint(tmp_path, workspace, proc, timeout=120):
    folder = tmp_path / workspace / "checkpoints"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"run ended before its first checkpoint: {proc.stderr.read()[-2000:]}")
        if list(folder.glob("iteration_*.pt")):
            return
        time.sleep(0.05)
    pytest.fail("no checkpoint appeared")


def reference_ply(tmp_path):
    """The uninterrupted run, in a subprocess like the victim (same torch thread count: float reductions and so the
    bytes depend on it)."""
    proc = start_train(tmp_path, "reference")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    return final_ply(cfg_for(tmp_path, *LONGER, workspace="reference"))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_resumes_to_the_same_bytes(tmp_path, sig):
    proc = start_train(tmp_path, "victim")
    wait_for_checkpoint(tmp_path, "victim", proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if sig in (signal.SIGINT, signal.SIGTERM):  # SIGTERM: a scheduler's pre-emption notice
        assert proc.returncode == 130 and "--resume" in err and "checkpoint saved" in err
    else:
        assert proc.returncode == -signal.SIGKILL
    resumed = start_train(tmp_path, "victim", "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    victim = cfg_for(tmp_path, *LONGER, workspace="victim")
    assert final_ply(victim) == reference_ply(tmp_path)
    assert len(list((tmp_path / "victim" / "checkpoints").glob("*.pt"))) == 2  # the last two are kept


def test_nonfinite_steps_are_skipped_then_the_run_stops(tmp_path, monkeypatch):
    original = train.render_batch
    bad = {3, 5}

    def poisoned(cfg, views, gaussians, bg, gen):
        batch = original(cfg, views, gaussians, bg, gen)
        if train_iteration[0] in bad:
            batch["images"] = batch["images"] * float("nan")
        return batch
    train_iteration = [0]
    step = train.train_step

    def counting_step(cfg, iteration, state):
        train_iteration[0] = iteration
        logs = step(cfg, iteration, state)
        skipped.append(logs["nonfinite/skipped"])
        return logs
    skipped = []
    monkeypatch.setattr(train, "render_batch", poisoned)
    monkeypatch.setattr(train, "train_step", counting_step)
    cfg = cfg_for(tmp_path, "PTDParams.mode=off", workspace="some_nan")
    ply = train.main(cfg)
    assert skipped == [0, 0, 1, 0, 1, 0, 0, 0]
    assert ply.is_file()
    bad.update(range(1, 100))
    skipped.clear()
    cfg = cfg_for(tmp_path, "PTDParams.mode=off", "OptimizationParams.max_nonfinite_steps=4", workspace="all_nan")
    with pytest.raises(ValueError, match="4 iterations in a row had a non-finite loss or gradient") as err:
        train.main(cfg)
    assert "\n" not in str(err.value) and skipped == [1, 1, 1, 1]
    assert [p.name for p in (tmp_path / "all_nan" / "checkpoints").glob("*.pt")] == ["iteration_000003.pt"]


def test_an_overflowing_guidance_step_counts_as_nonfinite(tmp_path):
    """guidance_scale 1e30: the ISM loss overflows (and its gradient is absurd or non-finite before nan_to_num cleans
    it). Such a step counts as non-finite, the run stops and never says it is done."""
    cfg = cfg_for(tmp_path, "PTDParams.mode=off", "GuidanceParams.guidance_scale=1e30",
                  "OptimizationParams.max_nonfinite_steps=3", workspace="huge")
    with pytest.raises(ValueError, match="3 iterations in a row had a non-finite loss or gradient"):
        train.main(cfg)
    assert not (tmp_path / "huge" / "train_done.json").exists()
    assert not list((tmp_path / "huge" / "point_cloud").glob("iteration_8"))


def test_disk_full_keeps_the_last_checkpoint_and_says_how_to_resume(tmp_path, monkeypatch):
    cfg = cfg_for(tmp_path, "PTDParams.mode=off", workspace="full")
    real_save = torch.save
    calls = []

    def save(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint hits a full disk half-way
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)
    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(ValueError, match="No space left on device.*--resume"):
        train.main(cfg)
    folder = tmp_path / "full" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["iteration_000003.pt"]  # no partial file left
    monkeypatch.setattr(torch, "save", real_save)
    train.main(cfg, resume=True)
    assert final_ply(cfg) == final_ply(train_reference(tmp_path))


def train_reference(tmp_path):
    ref = cfg_for(tmp_path, "PTDParams.mode=off", workspace="ref8")
    train.main(ref)
    return ref


def test_damaged_checkpoint_and_changed_config_on_resume(tmp_path):
    cfg = cfg_for(tmp_path, "PTDParams.mode=off", workspace="damaged")
    train.main(cfg)
    newest = sorted((tmp_path / "damaged" / "checkpoints").glob("*.pt"))[-1]
    newest.write_bytes(newest.read_bytes()[:100])
    with pytest.raises(ValueError, match="unreadable"):
        train.main(cfg, resume=True)
    other = cfg_for(tmp_path, "PTDParams.mode=off", "GuidanceParams.guidance_scale=3", workspace="damaged")
    with pytest.raises(ValueError, match="differs from the run's"):
        train.main(other, resume=True)


def test_stage1_resumes_to_the_same_lora(tmp_path, monkeypatch):
    import form_path

    over = ["PTDParams.mode=weighted", "PTDParams.path_epochs=4", "PTDParams.checkpoint_interval=2"]
    whole = form_path.main(cfg_for(tmp_path, *over, workspace="whole"))
    real_fit, calls = form_path.fit_lora, []

    def crash_on_third_chunk(*args, **kwargs):
        calls.append(kwargs["max_steps"])
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real_fit(*args, **kwargs)
    monkeypatch.setattr(form_path, "fit_lora", crash_on_third_chunk)
    cfg = cfg_for(tmp_path, *over, workspace="broken")
    with pytest.raises(RuntimeError, match="killed"):
        form_path.main(cfg)
    assert calls == [2, 4, 6] and not (tmp_path / "broken" / "path_lora").exists()
    monkeypatch.setattr(form_path, "fit_lora", real_fit)
    resumed = form_path.main(cfg, resume=True)
    from safetensors.torch import load_file
    for name in ("pytorch_lora_weights.safetensors", "checkpoints/step_000006/pytorch_lora_weights.safetensors"):
        a, b = load_file(resumed / name), load_file(whole / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [json.loads((folder / "ptd_path.json").read_text())["losses"] for folder in (resumed, whole)]
    assert losses[0] == losses[1] and len(losses[0]) == 8
    assert not list((tmp_path / "broken").glob(".path_lora.*"))


def test_render_gradients_repeat_bit_for_bit_with_two_threads():
    """Regression: the renderer's multi-threaded scatter-adds vary between runs unless the run's configure_torch
    turns on torch's deterministic algorithms (Config.deterministic, default true)."""
    import numpy as np

    from arguments import Config
    from gaussian_renderer import render
    from scene import GaussianModel, orbit_camera
    from scene.initialization import sphere_points
    from stages.run import configure_torch

    def grads():
        g = GaussianModel(0)
        pc = sphere_points(6000, np.random.default_rng(0))
        g.create_from_pcd(pc.points, pc.colors, 3.5)
        for p in g._params().values():
            p.requires_grad_(True)
        out = render(orbit_camera(3.5, 80, 30, 0.55, 64, 64), g, torch.ones(3), backend="torch")
        (out["render"].sum() + out["depth"].sum()).backward()
        return [p.grad.clone() for p in g._params().values() if p.grad is not None]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        configure_torch(Config())
        assert all(torch.equal(a, b) for a, b in zip(grads(), grads()))
    finally:
        torch.set_num_threads(threads)
