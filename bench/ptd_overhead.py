"""Stage-2 cost of PTD against stock ISM (a benchmark, not a test): per-iteration time, phases and peak memory.

Both arms are built with train.py's `setup()` from ONE config and seed (the PTD arm with `PTDParams.mode=weighted`
and a path LoRA that form_path.main writes into a temporary output_root; the vanilla arm with `mode=off`) and stepped
with train.py's own `train_step`, interleaved in one process (iteration i: vanilla then PTD, or PTD then vanilla on
alternate iterations; each arm keeps its own global RNG state). The phases are timed by wrapping what train_step
calls (train.render_batch, guidance.encode_images, guidance.unet_eps, Tensor.backward, train.densify, the Adam step,
PathTracer.apply = the PTD set-scale); "other" is the rest (loss terms, lr schedule, camera sampling, logging).
Both arms draw the same views, timesteps and noise, so iteration i does the same work in both: the summary is the
median over iterations of the paired ratio t_PTD(i) / t_vanilla(i).

Peak memory: on CUDA torch.cuda.max_memory_allocated() over the iteration minus the memory allocated before it; on
the CPU, where torch keeps no allocator statistics, the peak of live tensor-storage bytes created during the
iteration (a TorchDispatchMode that counts each new storage until it is freed), measured in a separate pass because
the counting slows every op.

    python bench/ptd_overhead.py [--opt configs/smoke.yaml] [--iterations N] [--warmup 4] [--threads N]
                                 [--memory-iterations 8] [Section.key=value ...]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import tempfile
import time
import weakref
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch a model hub
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

PHASES = ("render", "vae_encode", "unet", "backward", "densify", "optimizer", "ptd_set_scale", "other")


# ---------------------------------------------------------------------------------------------- arms
def make_configs(opt: str, overrides, output_root: str, path_epochs: int):
    """(vanilla cfg, PTD cfg): one config, two modes, same workspace (so the same initial Gaussians)."""
    from arguments import load_config

    base = load_config(opt, list(overrides))
    base.ModelParams.output_root = output_root
    base.PTDParams.path_epochs = path_epochs
    base.save_video = False
    ptd = copy.deepcopy(base)
    if ptd.PTDParams.mode == "off":
        ptd.PTDParams.mode = "weighted"
    vanilla = copy.deepcopy(base)
    vanilla.PTDParams.mode = "off"
    return vanilla, ptd


def form_path_lora(cfg) -> Path:
    """Stage 1 on cfg (writes the initial Gaussians and the path LoRA under cfg's run folder)."""
    import form_path

    with contextlib.redirect_stdout(sys.stderr):
        return form_path.main(cfg, overwrite=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":  # gpu-only
        torch.cuda.synchronize(device)


class PhaseTimer:
    """Accumulates seconds per phase into `self.current` (the dict of the arm being stepped)."""

    def __init__(self, device: torch.device):
        self.device, self.current, self.calls = device, None, None

    def wrap(self, phase: str, fn):
        def timed(*args, **kwargs):
            if self.current is None:
                return fn(*args, **kwargs)
            sync(self.device)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync(self.device)
                self.current[phase] += time.perf_counter() - t0
                self.calls[phase] += 1
        timed.__wrapped__ = fn
        return timed


@contextlib.contextmanager
def instrument(timer: PhaseTimer, states):
    """Wrap what train.train_step calls with phase timers (restored on exit)."""
    import train

    saved_module = {name: getattr(train, name) for name in ("render_batch", "densify")}
    saved_backward = torch.Tensor.backward
    train.render_batch = timer.wrap("render", saved_module["render_batch"])
    train.densify = timer.wrap("densify", saved_module["densify"])
    torch.Tensor.backward = timer.wrap("backward", saved_backward)
    for state in states:
        g = state.guidance
        g.encode_images = timer.wrap("vae_encode", type(g).encode_images.__get__(g))
        g.unet_eps = timer.wrap("unet", type(g).unet_eps.__get__(g))
        if state.tracer is not None:
            state.tracer.apply = timer.wrap("ptd_set_scale", type(state.tracer).apply.__get__(state.tracer))
    try:
        yield
    finally:
        for name, fn in saved_module.items():
            setattr(train, name, fn)
        torch.Tensor.backward = saved_backward
        for state in states:
            for attr in ("encode_images", "unet_eps"):
                state.guidance.__dict__.pop(attr, None)
            if state.tracer is not None:
                state.tracer.__dict__.pop("apply", None)


def wrap_optimizer(timer: PhaseTimer, state) -> None:
    """Time the Adam step (re-wrapped if densification or a restore replaced the optimizer)."""
    opt = state.gaussians.optimizer
    if not getattr(opt.step, "_phase_timed", False):  # torch's own step wrapper has __wrapped__: mark ours
        opt.step = timer.wrap("optimizer", opt.step)
        opt.step._phase_timed = True


class Arm:
    """One stage-2 run (vanilla or PTD) that can be stepped one iteration at a time, with its own global RNG."""

    def __init__(self, name: str, cfg, device: torch.device):
        import train
        from utils.rng import rng_state

        self.name, self.cfg, self.device = name, cfg, device
        self.state = train.setup(cfg, device)
        self.rng = rng_state()
        self.times: list[float] = []
        self.phases: list[dict] = []
        self.weights: list[float] = []
        self.points: list[int] = []
        self.peaks: list[float] = []
        self.skipped = 0  # iterations the NaN guard skipped (a non-finite loss or gradient: fp16 trouble)

    def step(self, iteration: int, timer: PhaseTimer | None = None, memory=None) -> float:
        import train
        from utils.rng import rng_state, set_rng_state

        set_rng_state(self.rng)
        phases = dict.fromkeys(PHASES, 0.0)
        if timer is not None:
            wrap_optimizer(timer, self.state)
            timer.current, timer.calls = phases, dict.fromkeys(PHASES, 0)
        sync(self.device)
        with (memory if memory is not None else contextlib.nullcontext()):
            t0 = time.perf_counter()
            logs = train.train_step(self.cfg, iteration, self.state)
            sync(self.device)
            elapsed = time.perf_counter() - t0
        if timer is not None:
            timer.current = None
            phases["other"] = elapsed - sum(v for k, v in phases.items() if k != "other")
        self.rng = rng_state()
        self.times.append(elapsed)
        self.phases.append(phases)
        self.weights.append(float(logs.get("ptd/weight", 0.0)))
        self.points.append(int(logs["scene/total_points"]))
        self.skipped += int(logs["nonfinite/skipped"])
        return elapsed


# ---------------------------------------------------------------------------------------------- memory
class LiveTensorBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes of tensor storages created inside the mode and still alive: the CPU stand-in for
    torch.cuda.max_memory_allocated() - memory_allocated() at entry (tensors that existed before are not counted)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.live -= self._seen.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        outs = out if isinstance(out, (tuple, list)) and len(returns) == len(out) else (out,)
        for ret, value in zip(returns, outs):
            if ret.alias_info is not None:  # in-place and view ops return storage that exists already
                continue
            for t in torch.utils._pytree.tree_leaves(value):
                if not isinstance(t, torch.Tensor) or t.is_meta:
                    continue
                storage = t.untyped_storage()  # torch keeps one Python object per storage: finalize fires on free
                key = id(storage)
                if key not in self._seen:
                    self._seen[key] = storage.nbytes()
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key)
        return out


class CudaPeak:
    """torch.cuda.max_memory_allocated over the block, minus what was allocated at entry."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def __enter__(self):
        torch.cuda.synchronize(self.device)  # gpu-only
        torch.cuda.reset_peak_memory_stats(self.device)
        self.start = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize(self.device)
        self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
        return False


def memory_probe(device: torch.device):
    return CudaPeak(device) if device.type == "cuda" else LiveTensorBytes()


# ---------------------------------------------------------------------------------------------- micro
def median_call_time(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def set_scale_cost(ptd_arm: Arm, repeats: int = 2000) -> tuple[float, int]:
    """Median seconds of one lora_merge.set_scale (what the tracer calls) to a new weight on the PTD UNet (the whole
    per-iteration PTD bookkeeping: with the fold, the in-place rewrite of the weights), and the number of LoRA layers
    with the path adapter."""
    from guidance.lora_merge import scale, set_scale
    from guidance.ptd_utils import _lora_layers
    from stages.run import PATH_ADAPTER

    unet = ptd_arm.state.guidance.unet
    weights = iter([0.37 + 1e-6 * i for i in range(repeats)])  # a new weight at each call, as the tracer's
    with scale(unet, 0.37, PATH_ADAPTER):  # the tracer's scalings (and parking, folded weights) come back after
        cost = median_call_time(lambda: set_scale(unet, next(weights), PATH_ADAPTER), repeats, ptd_arm.device)
    return cost, len(_lora_layers(unet, PATH_ADAPTER))  # the wrappers, also while folded (out of the module tree)


@torch.no_grad()
def lora_forward_cost(vanilla: Arm, ptd: Arm, batch: int, repeats: int) -> tuple[float, float, float]:
    """Median seconds of one UNet call (batch x latents of the config): vanilla, PTD at w = 0.5 (LoRA branch
    computed), PTD at w = 0 (adapter parked: only peft's wrapper remains); interleaved."""
    from guidance.lora_merge import scale, set_scale
    from stages.run import PATH_ADAPTER

    g_v, g_p = vanilla.state.guidance, ptd.state.guidance
    c = vanilla.cfg.GenerateCamParams
    f = g_v.vae_scale_factor
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, c.image_h // f, c.image_w // f, generator=gen).to(g_v.device)
    emb = g_v.embeddings["text"].expand(batch, -1, -1)
    variants = [(g_v, None, []), (g_p, 0.5, []), (g_p, 0.0, [])]
    with scale(g_p.unet, 0.5, PATH_ADAPTER):  # the tracer's scalings come back on exit
        for i in range(repeats + 1):
            for g, weight, out in (variants if i % 2 == 0 else variants[::-1]):
                if weight is not None:
                    set_scale(g.unet, weight, PATH_ADAPTER)
                t = median_call_time(lambda: type(g).unet_eps(g, x, 100, emb), 1, g.device)
                if i > 0:
                    out.append(t)
    return tuple(statistics.median(v[2]) for v in variants)


# ---------------------------------------------------------------------------------------------- report
def ms(x: float) -> str:
    return f"{1e3 * x:9.2f}"


def report(vanilla: Arm, ptd: Arm, skip: int, device: torch.device, extras: dict) -> float:
    tv, tp = vanilla.times[skip:], ptd.times[skip:]
    ratios = [b / a for a, b in zip(tv, tp)]
    live = [w > 0 for w in ptd.weights[skip:]]
    print(f"\nstage-2 iteration, {len(tv)} timed iterations per arm after {skip} warm-up (interleaved), device "
          f"{device}, {torch.get_num_threads()} threads; ms per iteration: medians per arm, and the median over "
          f"iterations of the paired difference PTD - vanilla (all iterations / w > 0 / w = 0)")
    header = f"{'phase':15} {'vanilla':>9} {'PTD':>9} {'diff all':>9} {'diff w>0':>9} {'diff w=0':>9}"
    print(header)
    print("-" * len(header))

    def row(name, a_list, b_list):
        diffs = [b - a for a, b in zip(a_list, b_list)]
        parts = [statistics.median(a_list), statistics.median(b_list), statistics.median(diffs)]
        for want in (True, False):
            sel = [d for d, lv in zip(diffs, live) if lv == want]
            parts.append(statistics.median(sel) if sel else float("nan"))
        print(f"{name:15} " + " ".join(ms(x) for x in parts))

    for phase in PHASES:
        row(phase, [p[phase] for p in vanilla.phases[skip:]], [p[phase] for p in ptd.phases[skip:]])
    row("total", tv, tp)
    print("('other' = total - timed phases, per iteration: loss terms, lr schedule, camera sampling, logging)")
    print(f"\npaired ratio PTD/vanilla per iteration: median {statistics.median(ratios):.3f}, "
          f"IQR {_q(ratios, 0.25):.3f}-{_q(ratios, 0.75):.3f}; ratio of means {sum(tp) / sum(tv):.3f}; "
          f"ratio of medians {statistics.median(tp) / statistics.median(tv):.3f}")
    for want, label in ((True, "w > 0"), (False, "w = 0 (after T)")):
        sel = [r for r, lv in zip(ratios, live) if lv == want]
        if sel:
            calls = [p["unet"] for p, lv in zip(ptd.phases[skip:], live) if lv == want]
            print(f"  iterations with {label}: {len(sel)}, median ratio {statistics.median(sel):.3f} "
                  f"(PTD UNet time median {1e3 * statistics.median(calls):.1f} ms)")
    print(f"  Gaussians at the end: vanilla {vanilla.points[-1]}, PTD {ptd.points[-1]}")
    for line in extras.get("lines", []):
        print(line)
    return statistics.median(ratios)


def _q(values, q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]


def lora_size(ptd: Arm) -> tuple[int, int]:
    from guidance.lora_training import lora_parameters
    from guidance.ptd_utils import _lora_layers
    from stages.run import PATH_ADAPTER

    layers = torch.nn.ModuleList(_lora_layers(ptd.state.guidance.unet, PATH_ADAPTER))  # also while folded
    params = lora_parameters(layers, PATH_ADAPTER)
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def run(vanilla_cfg, ptd_cfg, device: torch.device, iterations: int, warmup: int, memory_iterations: int,
        micro_repeats: int) -> float:
    """Memory pass (fresh arms), then the timing pass (fresh arms); prints the tables; returns the summary ratio."""
    extras = {"lines": []}
    if memory_iterations > 0:
        mem = {"vanilla": Arm("vanilla", vanilla_cfg, device), "ptd": Arm("PTD", ptd_cfg, device)}
        for it in range(1, memory_iterations + 1):
            for name in (("vanilla", "ptd") if it % 2 else ("ptd", "vanilla")):
                probe = memory_probe(device)
                mem[name].step(it, memory=probe)
                mem[name].peaks.append(probe.peak / 2 ** 20)
        n_params, n_bytes = lora_size(mem["ptd"])
        kind = "max_memory_allocated - allocated at start" if device.type == "cuda" else "live tensor storages"
        extras["lines"] += [
            f"\npeak memory per iteration ({kind}), {memory_iterations} iterations per arm, MiB:",
            f"{'arm':8} {'median':>9} {'max':>9}",
            *[f"{arm.name:8} {statistics.median(arm.peaks):9.2f} {max(arm.peaks):9.2f}" for arm in mem.values()],
            f"path LoRA parameters (resident in the PTD arm for the whole run): {n_params} "
            f"({n_bytes / 2 ** 20:.3f} MiB)"]
        del mem
    vanilla, ptd = Arm("vanilla", vanilla_cfg, device), Arm("PTD", ptd_cfg, device)
    timer = PhaseTimer(device)
    with instrument(timer, [vanilla.state, ptd.state]):
        for it in range(1, iterations + 1):
            for arm in ((vanilla, ptd) if it % 2 else (ptd, vanilla)):
                arm.step(it, timer)
            if it % 10 == 0:
                print(f"  iteration {it}/{iterations}: vanilla {vanilla.times[-1]:.3f} s, PTD {ptd.times[-1]:.3f} s",
                      file=sys.stderr, flush=True)
    cost, layers = set_scale_cost(ptd)
    extras["lines"].append(f"set_scale on the PTD UNet ({layers} LoRA layers): {cost * 1e3:.4f} ms per call")
    g = vanilla_cfg.GuidanceParams
    for batch in (g.C_batch_size, 2 * g.C_batch_size):
        a, b, c = lora_forward_cost(vanilla, ptd, batch, micro_repeats)
        extras["lines"].append(f"one UNet call, batch {batch}: vanilla {a * 1e3:.2f} ms; with the path LoRA at "
                               f"w = 0.5 {b * 1e3:.2f} ms (+{100 * (b - a) / a:.1f}%), at w = 0 "
                               f"{c * 1e3:.2f} ms (+{100 * (c - a) / a:.1f}%)")
    return report(vanilla, ptd, warmup, device, extras)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--opt", default=str(ROOT / "configs" / "smoke.yaml"), help="YAML config (default: smoke)")
    ap.add_argument("--iterations", type=int, default=None, help="timed + warm-up iterations per arm (default: "
                    "the config's OptimizationParams.iterations)")
    ap.add_argument("--warmup", type=int, default=4, help="first iterations left out of the statistics")
    ap.add_argument("--memory-iterations", type=int, default=8, help="iterations per arm of the memory pass")
    ap.add_argument("--path-epochs", type=int, default=0, help="stage-1 epochs of the path LoRA. Default 0: B = 0, so "
                    "the LoRA computes its full branch but adds exactly 0 and both arms follow the same trajectory "
                    "(same Gaussians, same densification): the comparison isolates the LoRA's cost. A trained LoRA "
                    "costs the same per call but changes the scene the arms render")
    ap.add_argument("--micro-repeats", type=int, default=30, help="repeats of the UNet-call micro-benchmark")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--output-root", default=None, help="where stage 1 writes (default: a temporary folder)")
    ap.add_argument("--no-park", action="store_true", help="keep computing the LoRA branch at w = 0 (the behaviour "
                    "before weight 0 parked the adapter), for an A/B of that optimisation")
    ap.add_argument("overrides", nargs="*", help="Section.key=value config overrides")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.no_park:
        if any(o.replace(" ", "").lower() == "ptdparams.fold_lora=on" for o in args.overrides):
            ap.error("--no-park cannot be combined with PTDParams.fold_lora=on (the fold has no branch to park)")
        args.overrides += ["PTDParams.fold_lora=off", "PipelineParams.compile=off"]  # auto would fold on CUDA
        from guidance import lora_merge, ptd_utils
        ptd_utils._set_branch = lora_merge._set_branch = lambda layer, adapter, on: None  # no parking anywhere
        print("--no-park: the LoRA branch (not folded) is computed at w = 0 (scaled by 0)")
    from utils.device import resolve_device

    with tempfile.TemporaryDirectory(prefix="ptd_overhead_") as tmp:
        vanilla_cfg, ptd_cfg = make_configs(args.opt, args.overrides, args.output_root or tmp, args.path_epochs)
        iterations = args.iterations or vanilla_cfg.OptimizationParams.iterations
        if iterations <= args.warmup:
            ap.error(f"--iterations {iterations} must exceed --warmup {args.warmup}")
        for cfg in (vanilla_cfg, ptd_cfg):
            cfg.OptimizationParams.iterations = max(cfg.OptimizationParams.iterations, iterations)
        device = resolve_device(ptd_cfg.device)
        t0 = time.perf_counter()
        form_path_lora(ptd_cfg)
        print(f"stage 1 (path LoRA, {args.path_epochs} epochs) for the PTD arm: {time.perf_counter() - t0:.1f} s "
              f"(not part of the comparison)")
        print(f"config {args.opt}, {ptd_cfg.GenerateCamParams.image_w} px, {ptd_cfg.GuidanceParams.C_batch_size} "
              f"views/iteration, {ptd_cfg.GenerateCamParams.init_num_pts} initial Gaussians, model "
              f"{ptd_cfg.GuidanceParams.model_key}, PTD weighted (T={ptd_cfg.PTDParams.total_steps}, "
              f"C={ptd_cfg.PTDParams.power}), seed {ptd_cfg.seed}")
        ratio = run(vanilla_cfg, ptd_cfg, device, iterations, args.warmup, args.memory_iterations,
                    args.micro_repeats)
    print(f"ptd/vanilla per-iteration time ratio: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
