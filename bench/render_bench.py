"""Renderer throughput (a benchmark, not a test): torch backend forward and forward+backward, median of a few runs.

Scenes are LucidDreamer's starting point: the stock sphere initialisation (points in a 0.5 ball, kNN scales,
identity rotations) seen from the default camera (radius 3.5, fovy 0.55), with SH degree 0 colours, and two opacity
settings: the initial 0.1 ("init") and U(0.5, 1) ("dense", closer to a trained model, where compositing stops early).
On CUDA the gsplat backend (if installed) is timed beside the torch backend on the same scenes.

    python bench/render_bench.py [--sizes 64 128 256] [--counts 1000 4000 16000] [--repeats 5] [--threads N]
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
    if opacity == "dense":
        with torch.no_grad():
            o = torch.tensor(rng.uniform(0.5, 0.999, (n, 1)), dtype=torch.float32, device=device)
            model._opacity.copy_(torch.logit(o))
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_render(model, cam, backend: str, repeats: int, device: torch.device) -> tuple[float, float]:
    """Median seconds of (forward, forward + backward)."""
    bg = torch.ones(3, device=device)
    up = None
    fwd, both = [], []
    for i in range(repeats + 1):  # the first run warms up
        for p in model._params().values():
            p.grad = None
        sync(device)
        t0 = time.perf_counter()
        out = render(cam, model, bg, backend=backend)
        sync(device)
        t1 = time.perf_counter()
        if up is None:
            up = torch.randn(out["render"].shape, generator=torch.Generator().manual_seed(0)).to(device)
        ((out["render"] * up).sum() + out["depth"].mean() + out["alpha"].mean()).backward()
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
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # gpu-only: picks CUDA when present
    backends = ["torch"]
    if device.type == "cuda":
        import importlib.util
        if importlib.util.find_spec("gsplat") is not None:
            backends.append("gsplat")
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} runs")
    header = f"{'backend':8} {'opacity':8} {'px':>5} {'gaussians':>10} {'fwd s':>8} {'fwd+bwd s':>10}"
    print(header)
    print("-" * len(header))
    worst = 0.0
    results = {}
    for opacity in ("init", "dense"):
        for n in args.counts:
            model = make_scene(n, opacity, device)
            for size in args.sizes:
                cam = orbit_camera(3.5, 90.0, 0.0, 0.55, size, size, device=device)
                for backend in backends:
                    fwd, both = time_render(model, cam, backend, args.repeats, device)
                    results[(backend, opacity, size, n)] = both
                    worst = max(worst, both) if backend == "torch" else worst
                    print(f"{backend:8} {opacity:8} {size:5d} {n:10d} {fwd:8.3f} {both:10.3f}", flush=True)
    key = ("torch", "init", 128, 16000)
    ref = f"; torch init 128 px / 16k: {results[key]:.3f} s fwd+bwd" if key in results else ""
    print(f"summary: {len(results)} configurations on {device}, slowest torch fwd+bwd {worst:.3f} s{ref}")


if __name__ == "__main__":
    main()
