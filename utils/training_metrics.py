"""Metrics during stage 2 (paper App. H, Fig. 8): the matching loss of the current renders under the network of that
iteration, and a CLIP snapshot, every `EvalParams.metrics_interval` iterations (and at the first and last).

    monitor = TrainingMonitor.create(cfg, state, device, start=start)   # after setup()/restore()
    monitor(iteration, state, writer)                                   # once per iteration, after train_step

Each record is one JSON line appended to <run>/metrics.jsonl (written in one call and flushed) and TensorBoard
scalars under metrics/. What is measured:
- matching loss (Eq. 5, as probe_ood.py: eps space, per-sample RMS, EvalParams.probe_timesteps, plain prompt, no CFG)
  of `probe_num_views` fixed views of the current Gaussians (drawn once from the training camera distribution, the
  probe's camera stream), against the STF estimate of `probe_num_refs` samples of the PRETRAINED prior (LoRA at 0;
  shared cache <run>/probe/refs_<hash>.pt). The network is the one of the iteration: the tracer's weight w(iter) is
  re-applied (idempotent) before the UNet calls, so PTD measures prior + w LoRA and vanilla the prior (App. H).
- CLIP: the mean over the evaluation rig (2 x clip_azimuths views at clip_resolution) of 100 x cosine with the prompt,
  with EvalParams.clip_model ("none": skipped; "tiny": the toy offline scorer).
The measurement leaves the training trajectory alone: it uses its own seeded generators, no augmentation, no
gradients, and every global RNG state (python, numpy, torch, CUDA) is restored after it.
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Iterator

import torch

from arguments import Config, run_dir
from utils.general import rng_state, set_rng_state, write_text_atomic

METRICS_FILE = "metrics.jsonl"


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Every global RNG state as it was before the block."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def record_iterations(interval: int, total: int) -> set[int]:
    """Iterations with a record: 1, every `interval`-th and the last (none when interval is 0)."""
    if interval < 0:
        raise ValueError(f"EvalParams.metrics_interval must be >= 0 (0: off), got {interval}")
    if interval == 0:
        return set()
    return {1, total, *range(interval, total + 1, interval)}


def check_eval_params(cfg: Config) -> None:
    """The cheap EvalParams checks (run before anything is written); one-line ValueErrors."""
    from utils.ood_probe import check_timesteps

    e = cfg.EvalParams
    record_iterations(e.metrics_interval, cfg.OptimizationParams.iterations)
    check_timesteps(e.probe_timesteps, "EvalParams.probe_timesteps")
    sizes = {k: getattr(e, k) for k in ("probe_num_refs", "probe_ddim_steps", "probe_num_views", "clip_azimuths",
                                        "clip_resolution")}
    if min(sizes.values()) < 1:
        raise ValueError(f"EvalParams {', '.join(k for k, v in sizes.items() if v < 1)} must be >= 1")


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl (a torn last line from a crash is skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def reset_metrics_file(path: Path, start: int) -> None:
    """Keep only records before `start` (a fresh run keeps none; a resume drops what the crash left after its
    checkpoint, which the resumed run records again)."""
    kept = [r for r in read_metrics(path) if r.get("iteration", 0) < start] if path.is_file() and start > 1 else []
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


def probe_inputs(cfg: Config, guidance, device: torch.device, cache: Path | None = None) -> tuple[torch.Tensor, list]:
    """The matching loss's fixed inputs: the STF reference latents of the guidance's network (cached in
    `cache`, default <run>/probe, as refs_<hash>.pt) and `probe_num_views` views from the probe's camera stream."""
    from utils.ood_probe import PROBE_CAMERA_OFFSET, cached_prior_latents
    from utils.run_setup import make_sampler

    c, e = cfg.GenerateCamParams, cfg.EvalParams
    refs = cached_prior_latents(cache or run_dir(cfg) / "probe", guidance, e.probe_num_refs, cfg.seed, c.image_h,
                                c.image_w, e.probe_ddim_steps, "refs")
    views = make_sampler(cfg, device, seed_offset=PROBE_CAMERA_OFFSET).next_views(e.probe_num_views)
    return refs, views


@torch.no_grad()
def matching_loss_summary(cfg: Config, guidance, gaussians, refs: torch.Tensor, views: list,
                          bg: torch.Tensor) -> dict:
    """Eq. 5 of the renders of `gaussians` at `views` under the guidance's current network against the STF of
    `refs`: {"overall": {"mean", "std"}, "by_t": [...]} (`guidance.stf.aggregate_by_timestep`)."""
    from gaussian_renderer import render
    from guidance.stf import aggregate_by_timestep
    from utils.ood_probe import encode_mean, matching_losses

    e, backend = cfg.EvalParams, cfg.PipelineParams.backend
    images = torch.stack([render(v, gaussians, bg, backend=backend)["render"] for v in views])
    x0 = encode_mean(guidance, images.clamp(0, 1))
    losses = matching_losses(guidance, x0, refs, e.probe_timesteps, guidance.embeddings["text"], cfg.seed)
    return aggregate_by_timestep(losses, list(e.probe_timesteps))


class TrainingMonitor:
    """Records metrics at `iterations`; a disabled monitor (metrics_interval 0) does nothing."""

    def __init__(self, path: Path | None = None, iterations: set[int] = frozenset(), **parts) -> None:
        self.path, self.iterations, self.parts = path, set(iterations), parts

    @classmethod
    def create(cls, cfg: Config, state: dict, device: torch.device, start: int = 1) -> "TrainingMonitor":
        e = cfg.EvalParams
        iterations = record_iterations(e.metrics_interval, cfg.OptimizationParams.iterations)
        path = run_dir(cfg) / METRICS_FILE
        if not iterations:
            if start == 1 and path.is_file():  # a fresh run never leaves an older run's records behind
                path.unlink()
            return cls()
        from utils.clip_eval import load_scorer, model_label
        from utils.run_setup import background

        check_eval_params(cfg)

        with preserved_rng():
            scorer = None
            if e.clip_model.lower() != "none":  # first: missing weights fail before anything is sampled
                pretrained = None if e.clip_pretrained.lower() in ("", "none") else e.clip_pretrained
                scorer = (model_label(e.clip_model, pretrained), load_scorer(e.clip_model, pretrained, device))
            refs, views = probe_inputs(cfg, state["guidance"], device)
        reset_metrics_file(path, start)
        return cls(path, iterations, cfg=cfg, refs=refs, views=views, scorer=scorer, bg=background(cfg, device))

    def __call__(self, iteration: int, state: dict, writer=None) -> dict | None:
        """Measure and record at a record iteration (call after the iteration's train_step); else nothing."""
        if iteration not in self.iterations:
            return None
        tic = time.perf_counter()
        with preserved_rng(), torch.no_grad():
            record = self.measure(iteration, state)
        record["time_s"] = round(time.perf_counter() - tic, 3)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
        if writer is not None:
            writer.add_scalar("metrics/matching_loss", record["matching_loss"], iteration)
            for t, value in record["matching_loss_by_t"].items():
                writer.add_scalar(f"metrics/matching_loss_t{t}", value, iteration)
            for label, value in record["clip"].items():
                writer.add_scalar(f"metrics/clip/{label}", value, iteration)
        return record

    def measure(self, iteration: int, state: dict) -> dict:
        from utils.clip_eval import rig_images

        p, guidance, gaussians = self.parts, state["guidance"], state["gaussians"]
        cfg, e, backend = p["cfg"], p["cfg"].EvalParams, p["cfg"].PipelineParams.backend
        weight = None
        if state.get("tracer") is not None:  # the network of this iteration (idempotent re-apply)
            weight = state["tracer"].apply(guidance.unet, iteration)
        summary = matching_loss_summary(cfg, guidance, gaussians, p["refs"], p["views"], p["bg"])
        clip = {}
        if p["scorer"] is not None:
            label, scorer = p["scorer"]
            rig = rig_images(gaussians, p["bg"], e.clip_resolution, backend, e.clip_azimuths)
            clip[label] = scorer.similarity(rig, cfg.GuidanceParams.text).double().mean().item()
        return {"iteration": int(iteration), "mode": cfg.PTDParams.mode, "ptd_weight": weight,
                "matching_loss": summary["overall"]["mean"], "matching_loss_std": summary["overall"]["std"],
                "matching_loss_by_t": {str(r["t"]): r["mean"] for r in summary["by_t"]}, "clip": clip,
                "clip_views": 2 * e.clip_azimuths if clip else 0, "num_points": int(gaussians.num_points)}
