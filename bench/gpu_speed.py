"""Issue 19's targets in one run: stage 2 with the UNet compiled (CUDA graphs) and the path LoRA folded (a benchmark,
not a test; needs CUDA).

On SD 2.1-base's architecture at random weights (bench/gpu_scale.py builds the folder once) with configs/paper.yaml
(512 px, 4 views per iteration, fp16, 100k initial Gaussians; gsplat when installed, else the torch rasteriser):
  1. stage 1 with a few LoRA steps, its phases timed (bench/stage_costs.py's wrappers), extrapolated to 400 steps;
  2. the vanilla and PTD arms (train.setup + train.train_step, bench/ptd_overhead.Arm) paired and interleaved with
     PipelineParams.compile on (the fold on, as auto sets it on CUDA): each arm's compile warm-up, per-iteration
     medians, the paired ratio PTD / vanilla at w > 0 and at w = 0 (T = half the window), peak GPU memory of a run;
  3. compiled vs eager numerics of one PTD iteration: the same train_step (same generator state, w > 0) through the
     graphs and with them bypassed (the guidance runs eagerly at shapes it has no graph for);
  4. the same pair with compile off over a shorter window: what the graphs buy;
  5. a paper-length run extrapolated: stage 1 (400 LoRA steps) + the warm-up + 5,000 iterations (T = 1000 at w > 0),
     each iteration's UNet calls taken from the timestep schedule (bench/stage_costs.expected_ism_calls).
Then issue 19's table: measure, value, target.

    python bench/gpu_speed.py [--iterations 100] [--eager-iterations 24] [--warmup 4] [--model-dir DIR]
                              [Section.key=value ...]
    python bench/gpu_speed.py --cpu-dry-run     # tiny model, 64 px, compile off: the code runs, measures nothing
On a machine without CUDA (and without --cpu-dry-run) it prints one line and exits 0.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch a model hub
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

GIB = 2 ** 30
PAPER_LORA_STEPS = 400  # paper §4: the path LoRA's steps
NUMERICS_TOL = 1e-2  # compiled vs eager, fp16: |a - b| <= tol + tol |b| elementwise (outputs are of unit scale)


# ---------------------------------------------------------------------------------------------- configs
def make_configs(args, output_root: str, compiled: bool):
    """(vanilla, PTD) configs of one comparison; compile on or off."""
    from ptd_overhead import make_configs as both_arms

    overrides = [f"PTDParams.total_steps={args.warmup + args.iterations // 2}", "PTDParams.checkpoint_interval=0",
                 f"PTDParams.num_views={args.num_views}", "ModelParams.workspace=gpu_speed",
                 f"PipelineParams.compile={'on' if compiled else 'off'}", "PTDParams.fold_lora=auto"]
    if args.cpu_dry_run:
        overrides += ["GuidanceParams.model_key=tiny", "device=cpu", "GuidanceParams.fp16=false",
                      "PipelineParams.backend=torch", "GenerateCamParams.image_w=64", "GenerateCamParams.image_h=64",
                      "GenerateCamParams.init_num_pts=2000"]
    else:
        import importlib.util

        from gpu_scale import sd21_model_dir
        backend = "gsplat" if importlib.util.find_spec("gsplat") is not None else "torch"
        overrides += [f"GuidanceParams.model_key={sd21_model_dir(args.model_dir, 'cuda')}", "device=cuda",
                      f"PipelineParams.backend={backend}"]
    return both_arms(args.opt, overrides + list(args.overrides), output_root, args.path_epochs)


# ---------------------------------------------------------------------------------------------- 1. stage 1
def stage1(cfg) -> dict:
    """form_path.main on cfg with its phases timed; returns seconds per phase and the unit costs."""
    from stage_costs import timed_stage1

    s1, _ = timed_stage1(cfg)
    p = cfg.PTDParams
    steps = p.path_epochs * math.ceil(p.num_views / p.lora_batch_size)
    return {"s": dict(s1), "steps": steps, "per_step": s1["fit_lora"] / steps,
            "fixed": s1["total"] - s1["fit_lora"]}


# ---------------------------------------------------------------------------------------------- 2./4. the pair
@contextlib.contextmanager
def recorded_warm_ups(seconds: list):
    """Collect the seconds of every StableDiffusionGuidance.warm_up (train.setup calls it when compiled)."""
    from guidance.sd_utils import StableDiffusionGuidance

    plain = StableDiffusionGuidance.warm_up

    def warm_up(self, *args, **kwargs):
        seconds.append(plain(self, *args, **kwargs))
        return seconds[-1]

    StableDiffusionGuidance.warm_up = warm_up
    try:
        yield
    finally:
        StableDiffusionGuidance.warm_up = plain


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0  # gpu-only


def run_pair(vanilla_cfg, ptd_cfg, device: torch.device, iterations: int) -> dict:
    """Both arms built (PTD first, its setup peak alone on the card), then stepped interleaved with phase timers."""
    from ptd_overhead import Arm, CudaPeak, PhaseTimer, instrument

    warm: list[float] = []
    if device.type == "cuda":  # gpu-only
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with recorded_warm_ups(warm):
        before = allocated(device)
        ptd = Arm("PTD", ptd_cfg, device)
        setup_peak = torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else 0
        mid = allocated(device)
        vanilla = Arm("vanilla", vanilla_cfg, device)
        vanilla_resident = allocated(device) - mid
    timer = PhaseTimer(device)
    calls = {"vanilla": [], "PTD": []}
    ptd_peak = setup_peak
    with instrument(timer, [vanilla.state, ptd.state]):
        for it in range(1, iterations + 1):
            for arm in ((vanilla, ptd) if it % 2 else (ptd, vanilla)):
                probe = CudaPeak(device) if device.type == "cuda" else None
                arm.step(it, timer, memory=probe)
                calls[arm.name].append(timer.calls["unet"])
                if probe is not None and arm is ptd:  # the PTD run alone: less the vanilla arm's resident bytes
                    ptd_peak = max(ptd_peak, probe.start + probe.peak - before - vanilla_resident)
    return {"vanilla": vanilla, "ptd": ptd, "calls": calls, "warm_up_s": warm, "peak_bytes": ptd_peak}


def paired(pair: dict, skip: int) -> dict:
    """Medians per arm and of the paired ratio PTD / vanilla, over all iterations and split by w > 0 / w = 0."""
    v, p = pair["vanilla"], pair["ptd"]
    tv, tp, live = v.times[skip:], p.times[skip:], [w > 0 for w in p.weights[skip:]]
    ratios = [b / a for a, b in zip(tv, tp)]
    out = {"vanilla": statistics.median(tv), "ptd": statistics.median(tp), "ratio": statistics.median(ratios)}
    for key, want in (("w>0", True), ("w=0", False)):
        sel = [r for r, lv in zip(ratios, live) if lv == want]
        out[f"ratio {key}"] = statistics.median(sel) if sel else float("nan")
        out[f"ptd {key}"] = statistics.median([t for t, lv in zip(tp, live) if lv == want]) if sel else float("nan")
    return out


# ---------------------------------------------------------------------------------------------- 3. numerics
@torch.no_grad()
def compiled_vs_eager(arm, iteration: int) -> dict | None:
    """One PTD train_step at w(1) through the graphs and with them bypassed, from the same generator state: max
    |difference| of pred and target, and whether they are within NUMERICS_TOL. None when the UNet is not compiled."""
    g, cfg = arm.state.guidance, arm.cfg
    if g.compiled_unet is None:
        return None
    c = cfg.GenerateCamParams
    b = cfg.GuidanceParams.C_batch_size
    images = torch.rand(b, 3, c.image_h, c.image_w, generator=torch.Generator().manual_seed(0)).to(g.device)
    azimuths = [360.0 * k / b - 180.0 for k in range(b)]
    weight = arm.state.tracer.apply(g.unet, 1) if arm.state.tracer is not None else 0.0
    state, shapes, outs = g.generator.get_state(), g.graph_shapes, []
    for graphs in (shapes, set()):
        g.graph_shapes = graphs
        g.generator.set_state(state)
        outs.append(g.train_step(images, azimuths, iteration))
    g.graph_shapes = shapes
    result = {"w": weight}
    for key in ("pred", "target"):
        a, ref = outs[0][key].float(), outs[1][key].float()
        result[key] = (a - ref).abs().max().item()
        result[f"{key} scale"] = ref.abs().max().item()
        result["ok"] = result.get("ok", True) and torch.allclose(a, ref, rtol=NUMERICS_TOL, atol=NUMERICS_TOL)
    return result


# ---------------------------------------------------------------------------------------------- 5. extrapolation
def paper_length(pair: dict, skip: int, paper, s1: dict) -> dict:
    """Seconds of a paper-length run: stage 1 at 400 LoRA steps; stage 2 = setup and warm-up + per iteration i the
    measured non-UNet time of its class (w > 0 up to T, w = 0 after) + its expected UNet calls x the measured time
    per call. Also the vanilla run's stage 2, for the ratio over a whole run."""
    from stage_costs import expected_ism_calls

    g, o, p = paper.GuidanceParams, paper.OptimizationParams, paper.PTDParams
    inv = 2 if g.denoise_guidance_scale > 1 else 1
    expected = [k * inv + 1 for k in expected_ism_calls(g, o.iterations, o.warmup_iter)]  # + the CFG call

    def unit(arm, calls, want):
        rows = [(t, ph["unet"], n) for t, ph, n, w in zip(arm.times[skip:], arm.phases[skip:], calls[skip:],
                                                           arm.weights[skip:]) if want is None or (w > 0) == want]
        rows = rows or [(t, ph["unet"], n) for t, ph, n in zip(arm.times[skip:], arm.phases[skip:], calls[skip:])]
        return (statistics.median([t - u for t, u, _ in rows]), statistics.median([u / max(n, 1) for _, u, n in rows]))

    v, ptd = pair["vanilla"], pair["ptd"]
    units = {"vanilla": unit(v, pair["calls"]["vanilla"], None), "w>0": unit(ptd, pair["calls"]["PTD"], True),
             "w=0": unit(ptd, pair["calls"]["PTD"], False)}
    ptd_s2 = sum(units["w>0" if i < p.total_steps else "w=0"][0] + k * units["w>0" if i < p.total_steps else
                 "w=0"][1] for i, k in enumerate(expected))
    van_s2 = sum(units["vanilla"][0] + k * units["vanilla"][1] for k in expected)
    warm = max(pair["warm_up_s"], default=0.0)
    stage1_s = s1["fixed"] + PAPER_LORA_STEPS * s1["per_step"]
    return {"stage1": stage1_s, "warm_up": warm, "ptd_stage2": ptd_s2, "vanilla_stage2": van_s2,
            "total": stage1_s + warm + ptd_s2, "ratio": ptd_s2 / van_s2, "mean_calls": statistics.mean(expected)}


# ---------------------------------------------------------------------------------------------- report
def report(device, on: dict, off: dict, numerics: dict | None, run: dict, warm: list, peak: int, backend: str) -> None:
    def row(measure, value, target):
        print(f"| {measure} | {value} | {target} |")

    print("\n| measure | measured | target |\n|---|---|---|")
    row(f"stage-2 iteration, median, {backend}, compile on: PTD / vanilla", f"{on['ptd']:.3f} / {on['vanilla']:.3f} s",
        "<= 0.15 s")
    row("same, compile off: PTD / vanilla", f"{off['ptd']:.3f} / {off['vanilla']:.3f} s", "(the graphs' gain)")
    row("PTD / vanilla per iteration, paired and interleaved, at w > 0 (compile off)",
        f"{on['ratio w>0']:.3f} ({off['ratio w>0']:.3f})", "<= 1.03")
    row("same, at w = 0 / over a paper-length run", f"{on['ratio w=0']:.3f} / {run['ratio']:.3f}", "<= 1.01 / <= 1.02")
    row(f"paper-length run (stage 1, {PAPER_LORA_STEPS} LoRA steps, + 5,000 iterations), extrapolated",
        f"{run['total'] / 60:.1f} min (stage 1 {run['stage1']:.0f} s, warm-up {run['warm_up']:.0f} s, "
        f"stage 2 {run['ptd_stage2'] / 60:.1f} min)", "<= 15 min")
    row("peak GPU memory of a PTD run", f"{peak / GIB:.2f} GiB" if device.type == "cuda" else "- (CPU)", "<= 12 GiB")
    row("compile warm-up per arm", ", ".join(f"{s:.1f} s" for s in warm) or "- (not compiled)", "reported")
    if numerics is None:
        row("compiled vs eager, one PTD iteration", "- (not compiled)", f"within {NUMERICS_TOL:g} (rtol, atol)")
    else:
        row(f"compiled vs eager, one PTD iteration at w = {numerics['w']:.2f}: max abs diff pred / target",
            f"{numerics['pred']:.2e} / {numerics['target']:.2e} (outputs up to {numerics['pred scale']:.2f}): "
            f"{'within' if numerics['ok'] else 'OUTSIDE'}", f"within {NUMERICS_TOL:g} (rtol, atol)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--opt", default=str(ROOT / "configs" / "paper.yaml"))
    ap.add_argument("--paper", default=str(ROOT / "configs" / "paper.yaml"), help="config with the paper's counts")
    ap.add_argument("--iterations", type=int, default=100, help="measured iterations per arm, compile on")
    ap.add_argument("--eager-iterations", type=int, default=24, help="measured iterations per arm, compile off")
    ap.add_argument("--warmup", type=int, default=4, help="first iterations left out of the statistics")
    ap.add_argument("--num-views", type=int, default=8, help="stage-1 renders")
    ap.add_argument("--path-epochs", type=int, default=2, help="stage-1 epochs (timed per LoRA step)")
    ap.add_argument("--model-dir", default=None, help="where the random-weight SD 2.1-base folder is built/reused")
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny model, 64 px, compile off, a few iterations")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("overrides", nargs="*", help="Section.key=value config overrides")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_dry_run:
        print("skipped: needs CUDA (SD 2.1-base scale, fp16, CUDA graphs); --cpu-dry-run runs the same path on CPU")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_dry_run:
        args.iterations, args.eager_iterations, args.warmup = 4, 4, 1
        args.num_views, args.path_epochs = min(args.num_views, 4), 1
    from arguments import load_config
    from utils.device import resolve_device

    paper = load_config(args.paper)
    with tempfile.TemporaryDirectory(prefix="gpu_speed_") as tmp:
        vanilla_on, ptd_on = make_configs(args, tmp, compiled=not args.cpu_dry_run)
        vanilla_off, ptd_off = make_configs(args, tmp, compiled=False)
        device = resolve_device(ptd_on.device)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"  # gpu-only
        print(f"device {device} ({name}), torch {torch.__version__}, model {ptd_on.GuidanceParams.model_key}, "
              f"{ptd_on.GenerateCamParams.image_w} px, {ptd_on.GuidanceParams.C_batch_size} views/iteration, "
              f"backend {ptd_on.PipelineParams.backend}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
        s1 = stage1(ptd_on)
        print(f"stage 1: {s1['s']['total']:.1f} s ({s1['steps']} LoRA steps, {s1['per_step']:.3f} s each; "
              f"the rest {s1['fixed']:.1f} s)")
        for cfg in (vanilla_on, ptd_on):
            cfg.OptimizationParams.iterations = max(cfg.OptimizationParams.iterations, args.iterations)
        pair = run_pair(vanilla_on, ptd_on, device, args.iterations)
        on = paired(pair, args.warmup)
        if args.cpu_dry_run:  # the numerics' code path, with the eager UNet standing in for the compiled one
            g, c = pair["ptd"].state.guidance, ptd_on.GenerateCamParams
            g.compiled_unet = g.unet
            g.warm_up(ptd_on.GuidanceParams.C_batch_size, c.image_h, c.image_w)
        numerics = compiled_vs_eager(pair["ptd"], args.iterations + 1)
        run = paper_length(pair, args.warmup, paper, s1)
        warm, peak = pair["warm_up_s"], pair["peak_bytes"]
        print(f"compile on: warm-up {', '.join(f'{s:.1f} s' for s in warm) or '-'}; medians {on}", file=sys.stderr)
        del pair
        gc.collect()
        for cfg in (vanilla_off, ptd_off):
            cfg.OptimizationParams.iterations = max(cfg.OptimizationParams.iterations, args.eager_iterations)
            cfg.PTDParams.total_steps = args.warmup + args.eager_iterations // 2
        off = paired(run_pair(vanilla_off, ptd_off, device, args.eager_iterations), args.warmup)
    report(device, on, off, numerics, run, warm, peak, ptd_on.PipelineParams.backend)
    if args.cpu_dry_run:
        print("(CPU dry run on the tiny model: the code ran; these numbers measure nothing)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
