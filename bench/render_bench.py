"""Renderer throughput (a benchmark, not a test): torch backend forward and forward+backward, median of a few runs.

Scenes are LucidDreamer's starting point: the stock sphere initialisation (points in a 0.5 ball, kNN scales,
identity rotations) seen from the default camera (radius 3.5, fovy 0.55), with SH degree 0 colours, and opacity
settings: the initial 0.1 ("init"), U(0.5, 1) ("dense", closer to a trained model, where compositing stops early)
and 0.01 ("reset", right after an opacity reset). `--views 4` renders four views 90 degrees apart per timed step and
backpropagates once, as a stage-2 iteration does (LucidDreamer's 4 views per iteration).
On CUDA the gsplat backend (if installed) is timed beside the torch backend on the same scenes.

    python bench/render_bench.py [--sizes 64 128 256] [--counts 1000 4000 16000] [--opacities init dense]
                                 [--views 1] [--repeats 5] [--threads N] [--tile 8]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gaussian_renderer import render  # noqa: E402
from scene import GaussianModel, orbit_camera  # noqa: E402
from scene.initialization import sphere_points  # noqa: E402


def make_scene(n: int, opacity: str, device: torch.device, seed: int = 0) -> GaussianModel:
    rng = np.random.default_rng(seed)
    pcd = sphere_points(n, rng)
    model = GaussianModel(0, device=device)
    model.create_from_pcd(pcd.points, rng.random((n, 3)), spatial_lr_scale=3.5)
    if opacity in ("dense", "reset"):
        with torch.no_grad():
            o = rng.uniform(0.5, 0.999, (n, 1)) if opacity == "dense" else np.full((n, 1), 0.01)
            model._opacity.copy_(torch.logit(torch.tensor(o, dtype=torch.float32, device=device)))
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_render(model, cams, backend: str, repeats: int, device: torch.device, tile: int = 8) -> tuple[float, float]:
    """Median seconds of (forward, forward + backward) of all `cams` (one backward through their summed losses)."""
    bg = torch.ones(3, device=device)
    up = None
    fwd, both = [], []
    for i in range(repeats + 1):  # the first run warms up
        for p in model._params().values():
            p.grad = None
        sync(device)
        t0 = time.perf_counter()
        outs = [render(cam, model, bg, backend=backend, tile_size=tile) for cam in cams]
        sync(device)
        t1 = time.perf_counter()
        if up is None:
            up = torch.randn(outs[0]["render"].shape, generator=torch.Generator().manual_seed(0)).to(device)
        sum((out["render"] * up).sum() + out["depth"].mean() + out["alpha"].mean() for out in outs).backward()
        sync(device)
        t2 = time.perf_counter()
        if i > 0:
            fwd.append(t1 - t0)
            both.append(t2 - t0)
    return statistics.median(fwd), statistics.median(both)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--counts", type=int, nargs="+", default=[1000, 4000, 16000])
    ap.add_argument("--opacities", nargs="+", default=["init", "dense"], choices=["init", "dense", "reset"])
    ap.add_argument("--views", type=int, default=1, help="views per timed step (4 = a stage-2 iteration)")
    ap.add_argument("--tile", type=int, default=8, help="tile size of the torch backend (render()'s default: 8)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--backends", nargs="+", default=None, choices=["torch", "gsplat", "inria"],
                    help="default: torch, and on CUDA gsplat when installed")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # gpu-only: picks CUDA when present
    backends = args.backends or ["torch"]
    if args.backends is None and device.type == "cuda":
        import importlib.util
        if importlib.util.find_spec("gsplat") is not None:
            backends.append("gsplat")
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} runs, {args.views} view(s) per step, tile {args.tile}")
    header = f"{'backend':8} {'opacity':8} {'px':>5} {'gaussians':>10} {'fwd s':>8} {'fwd+bwd s':>10}"
    print(header)
    print("-" * len(header))
    worst = 0.0
    results = {}
    for opacity in args.opacities:
        for n in args.counts:
            model = make_scene(n, opacity, device)
            for size in args.sizes:
                cams = [orbit_camera(3.5, 90.0, 360.0 * k / args.views, 0.55, size, size, device=device)
                        for k in range(args.views)]
                for backend in backends:
                    try:
                        fwd, both = time_render(model, cams, backend, args.repeats, device,
                                                args.tile if backend == "torch" else 8)
                    except torch.OutOfMemoryError:
                        print(f"{backend:8} {opacity:8} {size:5d} {n:10d} {'out of memory':>19}", flush=True)
                        torch.cuda.empty_cache()
                        continue
                    results[(backend, opacity, size, n)] = both
                    worst = max(worst, both) if backend == "torch" else worst
                    print(f"{backend:8} {opacity:8} {size:5d} {n:10d} {fwd:8.3f} {both:10.3f}", flush=True)
    key = ("torch", "init", 128, 16000)
    ref = f"; torch init 128 px / 16k: {results[key]:.3f} s fwd+bwd" if key in results else ""
    print(f"summary: {len(results)} configurations on {device}, slowest torch fwd+bwd {worst:.3f} s{ref}")


if __name__ == "__main__":
    main()
