"""Stage 1 (form the path) as a share of stage 2 (trace it): measured, extrapolated, and a FLOP model (a benchmark).

Three estimates of stage-1 wall time / stage-2 wall time (paper: stage 1 is a "trivial extra computational cost";
goal here: <= 10%):
  A. measured: a full run of both stages on the config (default configs/smoke.yaml, tiny model, CPU):
     form_path.main, then train.main (PTD weighted), each phase timed by wrapping what they call.
  B. extrapolated (tiny model, this machine): A's per-unit costs (one render, one 8-image encode, one LoRA step, one
     report forward, one stage-2 iteration) times the paper's counts (configs/paper.yaml: N = num_views renders,
     path_epochs * ceil(N / lora_batch_size) LoRA steps, `iterations` stage-2 iterations).
  C. FLOP model (SD 2.1-base at 512 px, the paper's GPU setting): FLOPs counted on the meta device for the real
     architecture (bench/gpu_scale.py): stage 1 = steps x LoRA step (UNet fwd+bwd into the LoRA) + N/8 VAE encodes +
     the loss report; stage 2 = sum over iterations of the ISM UNet calls (the expected number of DDIM-inversion calls
     at each iteration from the timestep schedule, + the target call, + the CFG call at 2B) + the VAE encode with its
     backward. Rendering is left out of both (a CUDA rasteriser costs milliseconds per view).

    python bench/stage_costs.py [--opt configs/smoke.yaml] [--paper configs/paper.yaml] [--threads N]
                                [--skip-run] [Section.key=value ...]
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch a model hub
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

REPORT_BATCH = 8  # StableDiffusionGuidance.encode and lora_training.denoising_loss batch size


# ---------------------------------------------------------------------------------------------- A. measured run
@contextlib.contextmanager
def patched(module, names, timings: dict, counts: dict):
    """Wrap module.<name> for each name with a wall-clock accumulator (restored on exit)."""
    saved = {name: getattr(module, name) for name in names}

    def wrap(name, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timings[name] += time.perf_counter() - t0
                counts[name] += 1
        return timed

    for name, fn in saved.items():
        setattr(module, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(module, name, fn)


def warm_up(cfg) -> None:
    """Load the prior once (imports, model files in the page cache): run as two CLI calls, each stage would pay its
    own imports; in one process only the first would, so neither pays them here."""
    from guidance.sd_utils import load_prior, resolve_model_key

    load_prior(resolve_model_key(cfg.GuidanceParams.model_key), torch.device("cpu"), torch.float32)
    import form_path  # noqa: F401
    import train  # noqa: F401


def timed_stage1(cfg) -> tuple[dict, dict]:
    """form_path.main on cfg with its phases timed: (seconds per phase, with "total"; calls per phase)."""
    import form_path
    from guidance.sd_utils import StableDiffusionGuidance

    s1, n1 = defaultdict(float), defaultdict(int)
    t0 = time.perf_counter()
    with patched(form_path, ("initial_model", "make_guidance", "stage1_views", "loss_report",
                             "plot_denoising_report", "fit_lora", "save_lora"), s1, n1), \
            patched(StableDiffusionGuidance, ("encode",), s1, n1), contextlib.redirect_stdout(sys.stderr):
        form_path.main(cfg, overwrite=True)
    s1["total"] = time.perf_counter() - t0
    return s1, n1


def measured_run(cfg) -> dict:
    """form_path.main + train.main on cfg, with per-phase times."""
    import train

    warm_up(cfg)

    s1, n1 = timed_stage1(cfg)
    s2, n2 = defaultdict(float), defaultdict(int)
    t0 = time.perf_counter()
    iteration_times = []
    step = train.train_step

    def timed_step(*args, **kwargs):
        tic = time.perf_counter()
        try:
            return step(*args, **kwargs)
        finally:
            iteration_times.append(time.perf_counter() - tic)

    with patched(train, ("setup", "save_test_views", "save_video", "save_point_cloud", "save_checkpoint"), s2, n2), \
            contextlib.redirect_stdout(sys.stderr):
        train.train_step = timed_step
        try:
            train.main(cfg, overwrite=True)
        finally:
            train.train_step = step
    s2["total"] = time.perf_counter() - t0
    s2["train_step"] = sum(iteration_times)
    n2["train_step"] = len(iteration_times)
    return {"stage1": (dict(s1), dict(n1)), "stage2": (dict(s2), dict(n2)), "iterations": iteration_times}


def print_measured(cfg, run: dict) -> float:
    (s1, n1), (s2, n2) = run["stage1"], run["stage2"]
    p = cfg.PTDParams
    steps = p.path_epochs * math.ceil(p.num_views / p.lora_batch_size)
    print(f"\nA. measured full run ({cfg.GuidanceParams.model_key} model, {cfg.GenerateCamParams.image_w} px, "
          f"{torch.get_num_threads()} threads): stage 1 = {p.num_views} renders, {p.path_epochs} epochs x "
          f"{math.ceil(p.num_views / p.lora_batch_size)} steps = {steps} LoRA steps; stage 2 = "
          f"{cfg.OptimizationParams.iterations} iterations")
    print(f"{'stage 1 phase':22} {'calls':>5} {'s':>8} | {'stage 2 phase':22} {'calls':>5} {'s':>8}")
    left = [k for k in ("make_guidance", "initial_model", "stage1_views", "encode", "fit_lora", "save_lora",
                        "loss_report", "plot_denoising_report", "total")]
    right = [k for k in ("setup", "train_step", "save_test_views", "save_video", "save_point_cloud", "save_checkpoint",
                         "total")]
    for i in range(max(len(left), len(right))):
        a = f"{left[i]:22} {n1.get(left[i], 1):5d} {s1.get(left[i], 0.0):8.2f}" if i < len(left) else " " * 37
        b = f"{right[i]:22} {n2.get(right[i], 1):5d} {s2.get(right[i], 0.0):8.2f}" if i < len(right) else ""
        print(f"{a} | {b}")
    share = s1["total"] / s2["total"]
    print(f"measured stage 1 / stage 2 wall time: {100 * share:.1f}% (fit only / train_step only: "
          f"{100 * s1['fit_lora'] / s2['train_step']:.1f}%)")
    return share


# ---------------------------------------------------------------------------------------------- B. extrapolated
def unit_costs(cfg, run: dict) -> dict:
    (s1, _), (s2, _) = run["stage1"], run["stage2"]
    p = cfg.PTDParams
    steps = p.path_epochs * math.ceil(p.num_views / p.lora_batch_size)
    return {"setup1": s1["make_guidance"] + s1["initial_model"],
            "render": s1["stage1_views"] / p.num_views,
            "encode8": s1["encode"] / math.ceil(p.num_views / REPORT_BATCH),
            "lora_step": s1["fit_lora"] / steps,
            "report8": s1["loss_report"] / (2 * 10 * math.ceil(p.num_views / REPORT_BATCH)),
            "save": s1["save_lora"] / max(1, run["stage1"][1].get("save_lora", 1)),
            "setup2": s2["setup"], "iteration": statistics.median(run["iterations"]),
            "iteration_mean": statistics.mean(run["iterations"])}


def stage1_counts(p) -> dict:
    steps = p.path_epochs * math.ceil(p.num_views / p.lora_batch_size)
    saves = 1 + (steps // p.checkpoint_interval + (steps % p.checkpoint_interval > 0) if p.checkpoint_interval else 0)
    return {"renders": p.num_views, "encodes8": math.ceil(p.num_views / REPORT_BATCH), "steps": steps,
            "reports8": 2 * 10 * math.ceil(p.num_views / REPORT_BATCH), "saves": saves}


def extrapolate(units: dict, paper, steps_override: int | None = None) -> tuple[float, float]:
    c = stage1_counts(paper.PTDParams)
    steps = c["steps"] if steps_override is None else steps_override
    s1 = (units["setup1"] + c["renders"] * units["render"] + c["encodes8"] * units["encode8"] +
          steps * units["lora_step"] + c["reports8"] * units["report8"] + c["saves"] * units["save"])
    s2 = units["setup2"] + paper.OptimizationParams.iterations * units["iteration"]
    return s1, s2


# ---------------------------------------------------------------------------------------------- C. FLOP model
def expected_ism_calls(gp, iterations: int, warmup_iter: int, num_train_timesteps: int = 1000) -> list[float]:
    """Expected UNet calls at batch B of each stage-2 iteration (inversion chain + target), t uniform on its bounds:
    the schedule of guidance/sd_utils.py (sample_timesteps, invert) evaluated exactly, not sampled."""
    from guidance import ism

    out = []
    cache = {}
    for it in range(1, iterations + 1):
        rate = ism.warm_up_rate(it, warmup_iter)
        delta = ism.interval_delta(rate, gp.delta_t, gp.delta_t_start, gp.annealing_intervals, round_up=gp.perpneg)
        low, high = ism.timestep_bounds(rate, gp.t_range, gp.max_t_range, num_train_timesteps)
        key = (low, high, delta)
        if key not in cache:
            calls = [len(ism.inversion_timesteps(max(t - delta, 0), gp.xs_delta_t, gp.xs_inv_steps))
                     for t in range(low, high)]  # len(chain) - 1 inversion calls + 1 target call
            cache[key] = sum(calls) / len(calls)
        out.append(cache[key])
    return out


def flop_model(paper) -> dict:
    from gpu_scale import count_flops, lora_flops, meta_unet_and_vae

    g, c, p, o = paper.GuidanceParams, paper.GenerateCamParams, paper.PTDParams, paper.OptimizationParams
    b, latent = g.C_batch_size, c.image_h // 8
    unet_b, unet_b_lora, train_b = lora_flops(b, latent)
    unet_cfg, _, _ = lora_flops((4 if g.perpneg else 2) * b, latent)
    unet_8, _, _ = lora_flops(REPORT_BATCH, latent)
    _, vae = meta_unet_and_vae()
    vae.requires_grad_(False)  # frozen, as in the guidance: its backward computes only the input gradient
    img = torch.zeros(b, 3, c.image_h, c.image_w, device="meta", requires_grad=True)
    vae_b = count_flops(lambda: vae.encode(img).latent_dist.mean.sum().backward())
    img8 = torch.zeros(REPORT_BATCH, 3, c.image_h, c.image_w, device="meta")
    with torch.no_grad():
        vae_8 = count_flops(lambda: vae.encode(img8))
    inv_factor = 2 if g.denoise_guidance_scale > 1 else 1
    calls = expected_ism_calls(g, o.iterations, o.warmup_iter)
    stage2 = sum(k * inv_factor * unet_b + unet_cfg + vae_b for k in calls)
    n = stage1_counts(p)
    stage1 = n["steps"] * train_b + n["encodes8"] * vae_8 + n["reports8"] * unet_8
    return {"stage1": stage1, "stage2": stage2, "train_b": train_b, "unet_b": unet_b, "unet_cfg": unet_cfg,
            "vae_b": vae_b, "mean_calls": statistics.mean(calls), "lora_extra": (unet_b_lora - unet_b) / unet_b,
            "steps": n["steps"], "iterations": o.iterations}


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--opt", default=str(ROOT / "configs" / "smoke.yaml"), help="config of the measured run")
    ap.add_argument("--paper", default=str(ROOT / "configs" / "paper.yaml"), help="config with the paper's counts")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--skip-run", action="store_true", help="only the FLOP model (C)")
    ap.add_argument("overrides", nargs="*", help="Section.key=value overrides of --opt")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from arguments import load_config

    paper = load_config(args.paper)
    p = paper.PTDParams
    measured = extrapolated = None
    if not args.skip_run:
        with tempfile.TemporaryDirectory(prefix="stage_costs_") as tmp:
            cfg = load_config(args.opt, list(args.overrides))
            cfg.ModelParams.output_root = tmp
            if cfg.PTDParams.mode == "off":
                cfg.PTDParams.mode = "weighted"
            run = measured_run(cfg)
        measured = print_measured(cfg, run)
        units = unit_costs(cfg, run)
        print(f"\nB. extrapolated to {args.paper}'s counts with A's unit costs (tiny model, this machine)")
        print("unit costs (s): " + ", ".join(f"{k} {v:.4f}" for k, v in units.items()))
        n = stage1_counts(p)
        print(f"paper counts: {n['renders']} renders, {n['steps']} LoRA steps ({p.path_epochs} epochs x "
              f"{math.ceil(p.num_views / p.lora_batch_size)}), {n['reports8']} report forwards of 8, "
              f"{paper.OptimizationParams.iterations} stage-2 iterations")
        print(f"{'stage-1 reading':34} {'stage 1 s':>10} {'stage 2 s':>10} {'share':>7}")
        for label, steps in ((f"{p.path_epochs} epochs x {p.num_views} views", None),
                             ("400 LoRA steps (paper §4 text)", 400)):
            s1, s2 = extrapolate(units, paper, steps)
            print(f"{label:34} {s1:10.0f} {s2:10.0f} {100 * s1 / s2:6.1f}%")
            extrapolated = s1 / s2 if steps is None else extrapolated
    f = flop_model(paper)
    print(f"\nC. FLOP model, SD 2.1-base architecture at {paper.GenerateCamParams.image_w} px, batch "
          f"{paper.GuidanceParams.C_batch_size} (meta device, torch.utils.flop_counter)")
    print(f"UNet fwd (B={paper.GuidanceParams.C_batch_size}) {f['unet_b'] / 1e12:.2f} TFLOP, CFG call "
          f"{f['unet_cfg'] / 1e12:.2f}, VAE encode+backward {f['vae_b'] / 1e12:.2f}, LoRA training step "
          f"{f['train_b'] / 1e12:.2f} TFLOP ({f['train_b'] / f['unet_b']:.2f}x a forward); mean inversion+target "
          f"calls per iteration {f['mean_calls']:.2f}; path LoRA adds {100 * f['lora_extra']:.2f}% to a UNet call")
    print(f"stage 1: {f['steps']} steps -> {f['stage1'] / 1e15:.1f} PFLOP; stage 2: {f['iterations']} iterations -> "
          f"{f['stage2'] / 1e15:.1f} PFLOP; share {100 * f['stage1'] / f['stage2']:.1f}%")
    per_iteration = f["stage2"] / f["iterations"]
    fixed = f["stage1"] - f["steps"] * f["train_b"]  # encodes and the loss report
    budget = (0.1 * f["stage2"] - fixed) / f["train_b"]
    print(f"one LoRA step = {f['train_b'] / per_iteration:.2f} stage-2 iterations of FLOPs; the 10% goal allows "
          f"{budget:.0f} LoRA steps (= {budget / math.ceil(p.num_views / p.lora_batch_size):.0f} epochs of "
          f"{p.num_views} views at batch {p.lora_batch_size})")
    for steps in (400, 1000, 2000):
        print(f"  at {steps} LoRA steps: {100 * (fixed + steps * f['train_b']) / f['stage2']:.1f}%")
    parts = []
    if extrapolated is not None:
        parts.append(f"{100 * extrapolated:.1f}% extrapolated (tiny model, CPU)")
    parts.append(f"{100 * f['stage1'] / f['stage2']:.1f}% SD 2.1 FLOP model")
    if measured is not None:
        parts.append(f"{100 * measured:.1f}% measured smoke run")
    print("stage-1/stage-2 time at the paper's counts: " + "; ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
