"""Metrics during stage 2 (paper App. H, Fig. 8): the matching loss of the current renders under the network of that
iteration, and a CLIP snapshot, every `EvalParams.metrics_interval` iterations (and at the first and last).

    monitor = TrainingMonitor.create(cfg, guidance, device, start=start)      # after the run's setup / resume
    monitor(iteration, gaussians, guidance, ptd_weight, writer)               # after each iteration's step

Each record is one JSON line appended to <run>/metrics.jsonl (written in one call and flushed) and TensorBoard
scalars under metrics/. What is measured:
- matching loss (Eq. 5, as probe_ood.py: eps space, per-sample RMS, EvalParams.probe_timesteps, plain prompt, no CFG)
  of `probe_num_views` fixed views of the current Gaussians (drawn once from the training camera distribution, the
  probe's camera stream), against the STF estimate of `probe_num_refs` reference samples, with each render's own
  x_0 in its reference set when EvalParams.probe_include_self (Xu et al.'s STF; default: references only, Eq. 11).
  The network is the guidance's as the iteration left it: PTD's tracer set the path LoRA to w(iter) before the
  iteration's UNet calls, so PTD measures prior + w LoRA and vanilla the prior (App. H); `ptd_weight` is only
  recorded. References (EvalParams.probe_refs): "prior" = samples of the PRETRAINED prior (LoRA at 0), drawn once
  (shared cache <run>/probe/refs_<hash>.pt); "current" = samples of that same network, re-drawn at each record
  whose network differs (same seed; memoised by `evaluation.ood.network_fingerprint`: at w = 0 and in vanilla they
  are the prior's, file included).
- CLIP: the mean over the evaluation rig (2 x clip_azimuths views at clip_resolution) of 100 x cosine with the prompt,
  with EvalParams.clip_model ("none": skipped; "tiny": the toy offline scorer).
The measurement leaves the training trajectory alone: it uses its own seeded generators, no augmentation, no
gradients, and every global RNG state (python, numpy, torch, CUDA) is restored after it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from arguments import Config, run_dir
from evaluation.clip import load_scorer, model_label, rig_images
from evaluation.ood import matching_loss_summary, probe_inputs, probe_views, reading_name, reference_latents
from stages.run import background
from utils.files import write_text_atomic
from utils.rng import preserved_rng

METRICS_FILE = "metrics.jsonl"


def record_iterations(interval: int, total: int) -> set[int]:
    """Iterations with a record: 1, every `interval`-th and the last (none when interval is 0)."""
    if interval <= 0:
        return set()
    return {1, total, *range(interval, total + 1, interval)}


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


class TrainingMonitor:
    """Records metrics at `iterations`; a disabled monitor (metrics_interval 0) does nothing."""

    def __init__(self, cfg: Config | None = None, path: Path | None = None, iterations: set[int] = frozenset(),
                 refs: torch.Tensor | None = None, views: list = (), scorer: tuple | None = None,
                 bg: torch.Tensor | None = None) -> None:
        """refs None (EvalParams.probe_refs "current"): sampled from the guidance's network at each record."""
        self.cfg, self.path, self.iterations = cfg, path, set(iterations)
        self.refs, self.views, self.scorer, self.bg = refs, list(views), scorer, bg
        self.memo: dict = {}  # "current" references of recent non-prior networks

    @classmethod
    def create(cls, cfg: Config, guidance, device: torch.device, start: int = 1) -> "TrainingMonitor":
        """The run's monitor: loads the CLIP scorer and the probe's references and views (RNG streams untouched)."""
        e = cfg.EvalParams
        iterations = record_iterations(e.metrics_interval, cfg.OptimizationParams.iterations)
        path = run_dir(cfg) / METRICS_FILE
        if not iterations:
            if start == 1 and path.is_file():  # a fresh run never leaves an older run's records behind
                path.unlink()
            return cls()
        with preserved_rng():
            scorer = None
            if e.clip_model.lower() != "none":  # first: missing weights fail before anything is sampled
                pretrained = None if e.clip_pretrained.lower() in ("", "none") else e.clip_pretrained
                scorer = (model_label(e.clip_model, pretrained), load_scorer(e.clip_model, pretrained, device))
            if e.probe_refs == "prior":
                refs, views = probe_inputs(cfg, guidance, device)
            else:  # "current": the network of each record, which the tracer has not set yet
                refs, views = None, probe_views(cfg, device)
        reset_metrics_file(path, start)
        return cls(cfg, path, iterations, refs, views, scorer, background(cfg, device))

    def __call__(self, iteration: int, gaussians, guidance, ptd_weight: float | None = None,
                 writer=None) -> dict | None:
        """Measure and record at a record iteration (call after the iteration's step); else nothing."""
        if iteration not in self.iterations:
            return None
        tic = time.perf_counter()
        with preserved_rng(), torch.no_grad():
            record = self.measure(iteration, gaussians, guidance, ptd_weight)
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

    def measure(self, iteration: int, gaussians, guidance, ptd_weight: float | None) -> dict:
        cfg = self.cfg
        e = cfg.EvalParams
        refs = self.refs
        if refs is None:  # the guidance network as this iteration left it (prior + w LoRA in PTD)
            refs = reference_latents(cfg, guidance, memo=self.memo, persist_current=False)
        summary = matching_loss_summary(cfg, guidance, gaussians, refs, self.views, self.bg)
        clip = {}
        if self.scorer is not None:
            label, scorer = self.scorer
            rig = rig_images(gaussians, self.bg, e.clip_resolution, cfg.PipelineParams.backend, e.clip_azimuths)
            clip[label] = scorer.similarity(rig, cfg.GuidanceParams.text).double().mean().item()
        return {"iteration": int(iteration), "mode": cfg.PTDParams.mode, "ptd_weight": ptd_weight,
                "matching_loss": summary["overall"]["mean"], "matching_loss_std": summary["overall"]["std"],
                "matching_loss_by_t": {str(r["t"]): r["mean"] for r in summary["by_t"]},
                "matching_loss_reading": reading_name(e.probe_include_self), "matching_loss_refs": e.probe_refs,
                "clip": clip,
                "clip_views": 2 * e.clip_azimuths if clip else 0, "num_points": int(gaussians.num_points)}
