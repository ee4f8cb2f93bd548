"""Per-iteration cost of stage 2 with the NeRF representation beside the Gaussians (a benchmark, not a test).

For each representation: train.setup on the config (default configs/smoke.yaml, tiny model, CPU, PTD off), then
`--iterations` calls of train.train_step, timed one by one (the first `--warmup` left out), and the render share of
each: the forward renders of the iteration's views plus their backward, measured by wrapping train.render_batch and
the backward it feeds (timed separately on a copy of the batch: render forward + backward of the views' sum).

    python bench/nerf_cost.py [--opt configs/smoke.yaml] [--iterations 30] [--warmup 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch a model hub
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def measure(opt: str, representation: str, iterations: int, warmup: int, out: str) -> dict:
    import train
    from arguments import load_config
    from stages.run import configure_torch
    from utils.device import resolve_device

    cfg = load_config(opt, [f"ModelParams.representation={representation}", "PTDParams.mode=off",
                            f"ModelParams.output_root={out}", f"ModelParams.workspace={representation}",
                            f"OptimizationParams.iterations={iterations + 1}"])
    device = resolve_device(cfg.device)
    configure_torch(cfg)
    state = train.setup(cfg, device)
    steps, renders = [], []
    for it in range(1, iterations + 1):
        views = state.sampler.next_views(cfg.GuidanceParams.C_batch_size)  # a copy of a batch: the render share
        tic = time.perf_counter()
        batch = train.render_batch(cfg, views, state.gaussians, state.bg, torch.Generator().manual_seed(it))
        (batch["images"].sum() + batch["disparity"].sum()).backward()
        renders.append(time.perf_counter() - tic)
        state.gaussians.optimizer.zero_grad(set_to_none=True)
        tic = time.perf_counter()
        train.train_step(cfg, it, state)
        steps.append(time.perf_counter() - tic)
    steps, renders = steps[warmup:], renders[warmup:]
    return {"representation": representation, "iteration_s": statistics.median(steps),
            "render_fwd_bwd_s": statistics.median(renders), "size": state.gaussians.num_points,
            "image": f"{cfg.GenerateCamParams.image_w}x{cfg.GenerateCamParams.image_h}",
            "views": cfg.GuidanceParams.C_batch_size}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--opt", default=str(ROOT / "configs" / "smoke.yaml"))
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, load average {os.getloadavg()}, threads {args.threads}")
    print("| representation | image x views | iteration (median) | render fwd+bwd of the views | size |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as out:
        for rep in ("gaussians", "nerf"):
            r = measure(args.opt, rep, args.iterations, args.warmup, out)
            size = f"{r['size']} Gaussians" if rep == "gaussians" else f"{r['size']} occupied cells"
            print(f"| {rep} | {r['image']} x {r['views']} | {r['iteration_s']:.3f} s | {r['render_fwd_bwd_s']:.3f} s "
                  f"| {size} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
