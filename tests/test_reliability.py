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


@pytest.fixture(scope="module")
def reference_ply(tmp_path_factory):
    """The uninterrupted run's final PLY bytes, in a subprocess like the victims (same torch thread count: float
    reductions and so the bytes depend on it); run once for the three signals."""
    tmp_path = tmp_path_factory.mktemp("reference")
    proc = start_train(tmp_path, "reference")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    return final_ply(cfg_for(tmp_path, *LONGER, workspace="reference"))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_resumes_to_the_same_bytes(tmp_path, sig, reference_ply):
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
    assert final_ply(victim) == reference_ply
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


@pytest.mark.parametrize("stage", ["train", "form_path"])
def test_a_file_size_limit_is_one_line_naming_the_file(tmp_path, stage):
    """ulimit -f: torch.save and safetensors fail with their own exception types; the user gets one line naming the
    file and the cause, no temporary file is left, and --resume is advised only where a checkpoint exists."""
    import resource

    def limit():  # 200 kB: config, init PLY and PNGs fit; checkpoints and the LoRA do not
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
    mode = "PTDParams.mode=off" if stage == "train" else "PTDParams.mode=weighted"
    out = subprocess.run([sys.executable, f"{stage}.py", "--opt", str(SMOKE), *TINY_RUN, mode, "save_video=false",
                          "GenerateCamParams.init_num_pts=2000", f"ModelParams.output_root={tmp_path}",
                          "ModelParams.workspace=limited"], cwd=ROOT, capture_output=True, text=True,
                         preexec_fn=limit, timeout=600)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and lines[-1].startswith("error: could not write "), out.stderr[-1500:]
    assert "File too large" in lines[-1] and "Traceback" not in out.stderr and "Errno" not in lines[-1]
    if stage == "train":
        assert "--overwrite (no checkpoint was written yet)" in lines[-1]
    assert not list((tmp_path / "limited").rglob(".tmp_*"))


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


def test_two_processes_never_share_a_workspace(tmp_path):
    """A stage holds the workspace's lock while it writes; a second stage on it stops with the holder's PID and
    writes nothing; the lock is free again once the holder dies (SIGKILL included)."""
    import form_path
    cfg = cfg_for(tmp_path, "PTDParams.mode=off", workspace="shared")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from utils.files import lock_folder; "
                               f"h = lock_folder({str(tmp_path / 'shared')!r}, '.ptd.lock'); print('locked', "
                               "flush=True); time.sleep(600)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for run in (lambda: train.main(cfg), lambda: form_path.main(cfg)):
            with pytest.raises(ValueError, match=f"in use by another process \\(PID {holder.pid}\\)"):
                run()
        assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == [".ptd.lock"]
    finally:
        holder.kill()
        holder.wait()
    assert train.main(cfg).is_file()


def test_overwrite_replaces_only_what_the_project_wrote(tmp_path):
    import form_path
    mine = tmp_path / "my_files"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    cfg = cfg_for(tmp_path, "PTDParams.mode=weighted", f"PTDParams.path_lora={mine}", workspace="w")
    with pytest.raises(ValueError, match="is not a LoRA folder written by form_path.py"):
        form_path.main(cfg, overwrite=True)
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_leftovers_of_a_killed_run_never_send_the_user_in_a_circle(tmp_path):
    cfg = cfg_for(tmp_path, "PTDParams.mode=off", workspace="left")
    run = tmp_path / "left"
    (run / "point_cloud").mkdir(parents=True)  # an empty output folder is not a run
    (run / ".tmp_config.yaml.0123abcd.yaml").write_text("half")  # a killed atomic write
    with pytest.raises(ValueError, match="holds no config.yaml of a stage-2 run; start without --resume"):
        train.main(cfg, resume=True)
    from arguments import save_config
    save_config(cfg, run / "config.yaml")  # killed after iteration 1's outputs, before any checkpoint
    views = run / "test_six_views" / "1_iteration"
    views.mkdir(parents=True)
    (views / "render_view_0.png").write_bytes(b"png")
    with pytest.raises(ValueError, match="before its first checkpoint: nothing to resume from; start again with "
                                         "--overwrite"):
        train.main(cfg, resume=True)
    with pytest.raises(ValueError, match="pass --overwrite to start again \\(it has no checkpoint to resume"):
        train.main(cfg)
    assert not list(run.glob(".tmp_*"))  # removed once the workspace was locked
    assert train.main(cfg, overwrite=True).is_file()


def test_overwrite_deletes_all_or_nothing(tmp_path, monkeypatch):
    outputs = [tmp_path / "point_cloud", tmp_path / "videos", tmp_path / "events.out.tfevents.1"]
    for path in outputs[:2]:
        (path / "sub").mkdir(parents=True)
        (path / "sub" / "f").write_text("x")
    outputs[2].write_text("events")
    real = os.replace

    def stuck(src, dst):  # the second output cannot be moved (an undeletable file, a busy mount, ...)
        if Path(src) == outputs[1]:
            raise PermissionError(errno.EACCES, "Permission denied", str(src))
        return real(src, dst)
    monkeypatch.setattr(os, "replace", stuck)
    with pytest.raises(ValueError, match="cannot remove .*videos \\(Permission denied\\); nothing was deleted"):
        train.discard_outputs(outputs)
    assert all(p.exists() for p in outputs) and not list(tmp_path.glob(".tmp_*"))
    monkeypatch.setattr(os, "replace", real)
    train.discard_outputs(outputs)
    assert sorted(tmp_path.iterdir()) == []


class _Payload:
    """Unpickling this runs code (creates a marker file): what a crafted checkpoint could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_resume_never_unpickles_code(tmp_path):
    cfg = cfg_for(tmp_path, "PTDParams.mode=off", workspace="crafted")
    train.main(cfg)
    marker = tmp_path / "pwned"
    ckpt = sorted((tmp_path / "crafted" / "checkpoints").glob("*.pt"))[-1]
    good = torch.load(ckpt, weights_only=True)  # what train.py writes loads without unpickling code
    torch.save({**good, "extra": _Payload(marker)}, ckpt)
    with pytest.raises(ValueError, match="unreadable .*not written by train.py") as err:
        train.main(cfg, resume=True)
    assert not marker.exists() and "\n" not in str(err.value)
    torch.save({k: v for k, v in good.items() if k != "sampler"}, ckpt)
    with pytest.raises(ValueError, match="lacks 'sampler'"):
        train.main(cfg, resume=True)
    (tmp_path / "crafted" / "config.yaml").unlink()
    with pytest.raises(ValueError, match="holds no config.yaml"):
        train.main(cfg, resume=True)


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
