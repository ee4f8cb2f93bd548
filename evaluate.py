"""CLIP similarity by the paper's protocol (§6.1, Table 1), and the vanilla-vs-PTD A/B report.

    python evaluate.py RUN_OR_FOLDER [--clip-models NAME:PRETRAINED,...|none] [--matching-loss]
                       [--prompts FILE | FILE.json:KEY] [--out DIR] [--resolution 512] [--device auto] [--backend auto]
    python evaluate.py --ab VANILLA_RUN PTD_RUN [--out DIR] [--clip-models ...]

Scoring: each run's final PLY (point_cloud/iteration_<max>/point_cloud.ply) rendered from the 16-view rig (radius 4,
elevations 0 and 45 degrees, azimuths -180..135 in 45-degree steps) over the run's background, each view scored as
100 x cosine(CLIP image, CLIP text of the run's prompt from its config.yaml), averaged over the views; "overall" is the
mean over the scored runs. Default scorers: the paper's OpenAI ViT-L/14 (ViT-L-14:openai) and ViT-bigG-14
(ViT-bigG-14:laion2b_s39b_b160k); `tiny` is an offline toy scorer (random weights) for tests.
RUN_OR_FOLDER is a run folder (with config.yaml) or a folder of them; unfinished runs of a folder are listed, not
scored. `--prompts` restricts and orders the runs by prompt text (the paper's list: threestudio's
load/prompt_library.json:dreamfusion). `--matching-loss` adds each final model's matching loss (Eq. 5, as the
training monitor measures it) under the prior. Writes <out>/clip_scores.json and clip_scores.md (default out:
RUN_OR_FOLDER).

A/B (`--ab`): matching loss and CLIP snapshot vs iteration from each run's metrics.jsonl (train with
EvalParams.metrics_interval=K) in <out>/ab_report.png, final numbers in ab_report.md next to the paper's Table 1
(quoted, labelled as such); with --clip-models the final PLYs are also scored by the protocol. <out>/gallery.html
shows both runs' final 360-degree videos side by side with those numbers and the plot (links relative to <out>).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from arguments import RunError, load_config
from evaluation.ab_report import write_ab_report
from evaluation.clip import clip_scores, load_scorers, parse_clip_models, rig_images
from evaluation import MATCHING
from evaluation.ood import matching_loss_summary, probe_inputs
from scene.nerf_io import load_model
from stages.run import DONE_MARKER, background, finished_ply, make_guidance, run_entry
from utils.device import resolve_device
from utils.files import write_json_atomic, write_text_atomic
from utils.prompts import read_prompts
from utils.rng import preserved_rng


def find_runs(path: Path) -> list[Path]:
    """[path] when it is a run folder (holds config.yaml), else its sub-folders that are."""
    if not path.is_dir():
        raise RunError(f"'{path}' is not a folder; pass a run folder (with config.yaml) or a folder of runs")
    if (path / "config.yaml").is_file():
        return [path]
    runs = sorted(p for p in path.iterdir() if (p / "config.yaml").is_file())
    if not runs:
        raise RunError(f"'{path}' holds no run folders (folders with config.yaml written by train.py)")
    return runs


def select_runs(runs: list[Path], prompts: list[str] | None) -> tuple[list[tuple[Path, object]], list[str]]:
    """(run, config) pairs, restricted to and ordered by `prompts` when given; and the prompts without a run."""
    configs = [(run, load_config(run / "config.yaml")) for run in runs]
    if prompts is None:
        return configs, []
    by_prompt: dict[str, list] = {}
    for run, cfg in configs:
        by_prompt.setdefault(cfg.GuidanceParams.text.strip(), []).append((run, cfg))
    chosen = [pair for p in dict.fromkeys(prompts) for pair in by_prompt.get(p.strip(), [])]
    return chosen, [p for p in dict.fromkeys(prompts) if p.strip() not in by_prompt]


@torch.no_grad()
def score_run(run: Path, cfg, ply: Path, scorers: dict, resolution: int, device: torch.device, backend: str,
              matching: bool = False) -> dict:
    """One run: the rig's renders of its final PLY scored by every CLIP model; with `matching` also the final
    model's matching loss (Eq. 5) under the prior."""
    gaussians = load_model(ply, device)  # the run's Gaussians (PLY) or NeRF (nerf.safetensors)
    row = {"run": run.name, "path": str(run), "prompt": cfg.GuidanceParams.text, "ply": str(ply),
           "num_points": int(gaussians.num_points), "views": 0, "scores": {}}
    if scorers:
        images = rig_images(gaussians, background(cfg, device), resolution, backend)
        row.update(views=int(images.shape[0]), scores=clip_scores(scorers, images, cfg.GuidanceParams.text))
    if matching:
        row["matching_loss"] = final_matching_loss(run, cfg, gaussians, device)
    return row


def final_matching_loss(run: Path, cfg, gaussians, device: torch.device) -> dict:
    """Eq. 5 of the final model under the prior (LoRAs of stage 2 off: the network every arm ends with), measured as
    the training monitor measures it (EvalParams.probe_*; the same views and references for every arm of a seed;
    references cached in <run>/probe)."""
    guidance = make_guidance(cfg, device)
    with preserved_rng():
        refs, views = probe_inputs(cfg, guidance, device, cache=run / "probe")
        summary = matching_loss_summary(cfg, guidance, gaussians, refs, views, background(cfg, device))
    return {"mean": summary["overall"]["mean"], "std": summary["overall"]["std"],
            "by_t": {str(r["t"]): r["mean"] for r in summary["by_t"]}}


def aggregate(rows: list[dict], labels: list[str]) -> dict:
    """Mean over runs per model (each run already averaged over its views), and of the matching loss if measured."""
    overall = {label: sum(r["scores"][label]["mean"] for r in rows) / len(rows) for label in labels}
    if rows and all("matching_loss" in r for r in rows):
        overall[MATCHING] = sum(r["matching_loss"]["mean"] for r in rows) / len(rows)
    return overall


def markdown(report: dict) -> str:
    labels = report["models"]
    matching = MATCHING in report["overall"]
    lines = ["# CLIP similarity (paper protocol: 16 views, radius 4, elevations 0/45, 100 x cosine)", "",
             f"runs scored: {len(report['rows'])}" + (f"; not scored: {len(report['unfinished'])} unfinished runs, "
                                                      f"{len(report['missing_prompts'])} prompts without a run"
                                                      if report["unfinished"] or report["missing_prompts"] else ""),
             "", "| run | prompt | " + " | ".join(labels + ["matching loss"] * matching) + " |",
             "|---|---|" + "---|" * (len(labels) + matching)]
    for r in report["rows"]:
        cells = [f"{r['scores'][m]['mean']:.2f}" for m in labels]
        if matching:
            cells.append(f"{r['matching_loss']['mean']:.4f} ± {r['matching_loss']['std']:.4f}")
        lines.append(f"| {r['run']} | {r['prompt']} | " + " | ".join(cells) + " |")
    cells = [f"**{report['overall'][m]:.2f}**" for m in labels]
    if matching:
        cells.append(f"**{report['overall'][MATCHING]:.4f}**")
    lines.append("| **overall** | mean over runs | " + " | ".join(cells) + " |")
    if matching:
        lines.append("\nmatching loss: Eq. 5 of the final model's renders under the prior against its Stable Target "
                     "Field (eps space, RMS; EvalParams.probe_*), lower = closer to the prior's distribution")
    for name in report["unfinished"]:
        lines.append(f"\nunfinished (not scored): {name}")
    for prompt in report["missing_prompts"]:
        lines.append(f"\nno run for prompt: {prompt}")
    return "\n".join(lines) + "\n"


def evaluate_runs(path: str | Path, *, clip_models: str | None = None, matching_loss: bool = False,
                  prompts: str | None = None, out: str | Path | None = None, resolution: int = 512,
                  device: str = "auto", backend: str = "auto") -> dict:
    """Score a run or a folder of runs; writes <out>/clip_scores.{json,md} (default out: `path`).

    Args:
        clip_models: 'NAME:PRETRAINED,...' | 'tiny' | 'none' | None (the paper's two scorers).
        matching_loss: also each final model's matching loss (Eq. 5) under the prior.
        prompts: FILE.txt or FILE.json:KEY restricting and ordering the runs by prompt.
    """
    source = Path(path)
    prompt_list = read_prompts(prompts) if prompts else None
    runs = find_runs(source)
    selected, missing_prompts = select_runs(runs, prompt_list)
    ready = [(run, cfg, finished_ply(run, cfg)) for run, cfg in selected]
    if len(runs) == 1 and runs[0] == source and ready and ready[0][2] is None:
        raise RunError(f"run folder '{source}' is unfinished (no {DONE_MARKER}, no final PLY of its "
                       f"{ready[0][1].OptimizationParams.iterations} iterations); finish it with train.py --resume")
    unfinished = [run.name for run, _, ply in ready if ply is None]
    ready = [item for item in ready if item[2] is not None]
    if not ready:
        raise RunError(f"no finished run to score in '{source}' (unfinished: {len(unfinished)}, prompts without a "
                       f"run: {len(missing_prompts)})")
    torch_device = resolve_device(device, "--device")
    models = parse_clip_models(clip_models)
    if not models and not matching_loss:
        raise RunError("--clip-models none with no --matching-loss measures nothing; name a CLIP model or add "
                       "--matching-loss")
    scorers = load_scorers(models, torch_device)
    rows = []
    for run, cfg, ply in ready:
        rows.append(score_run(run, cfg, ply, scorers, resolution, torch_device, backend, matching_loss))
        parts = [f"{m} {s['mean']:.2f}" for m, s in rows[-1]["scores"].items()]
        if matching_loss:
            parts.append(f"matching loss {rows[-1]['matching_loss']['mean']:.4f}")
        print(f"{run.name}: " + ", ".join(parts))
    labels = list(scorers)
    report = {"models": labels, "resolution": resolution, "rows": rows, "overall": aggregate(rows, labels),
              "unfinished": unfinished, "missing_prompts": missing_prompts}
    out = Path(out) if out else source
    write_json_atomic(out / "clip_scores.json", report)
    text = markdown(report)
    write_text_atomic(out / "clip_scores.md", text)
    print(text)
    return report


def ab_report(vanilla: str | Path, ptd: str | Path, *, out: str | Path | None = None, clip_models: str | None = None,
              matching_loss: bool = False, resolution: int = 512, device: str = "auto",
              backend: str = "auto") -> dict:
    """The A/B report of two runs (<out>/ab_report.{png,md,json}, gallery.html); with `clip_models` also the protocol
    scores of their final PLYs (the other arguments as in evaluate_runs)."""
    vanilla, ptd = Path(vanilla), Path(ptd)
    out = Path(out) if out else ptd.parent / f"ab_{vanilla.name}_vs_{ptd.name}"
    protocol = None
    if clip_models:
        protocol = {label: evaluate_runs(run, clip_models=clip_models, matching_loss=matching_loss, out=out / label,
                                         resolution=resolution, device=device, backend=backend)["overall"]
                    for label, run in (("vanilla", vanilla), ("PTD", ptd))}
    return write_ab_report(vanilla, ptd, out, protocol)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="CLIP similarity (paper protocol) and the vanilla/PTD A/B report")
    parser.add_argument("path", nargs="?", help="a run folder or a folder of runs")
    parser.add_argument("--ab", nargs=2, metavar=("VANILLA_RUN", "PTD_RUN"), help="A/B report of two runs")
    parser.add_argument("--clip-models", default=None,
                        help="NAME:PRETRAINED,... (default: ViT-L-14:openai,ViT-bigG-14:laion2b_s39b_b160k; 'tiny' "
                             "for the offline toy scorer)")
    parser.add_argument("--matching-loss", action="store_true",
                        help="also the final model's matching loss (Eq. 5) under the prior (EvalParams.probe_*)")
    parser.add_argument("--prompts", default=None, help="FILE.txt or FILE.json:KEY restricting/ordering the runs")
    parser.add_argument("--out", default=None, help="output folder (default: the input folder)")
    parser.add_argument("--resolution", type=int, default=512, help="square render size of the rig views")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--backend", default="auto", help="rasterizer: auto | torch | gsplat | inria")
    args = parser.parse_args(argv)
    if bool(args.path) == bool(args.ab):
        parser.error("give either a run folder (or folder of runs) or --ab VANILLA_RUN PTD_RUN")
    if not 1 <= args.resolution <= 8192:
        parser.error(f"--resolution must be in [1, 8192] pixels (the paper's protocol: 512), got {args.resolution}")
    return args


def cli(argv=None) -> int:
    args = parse_args(argv)
    scoring = dict(clip_models=args.clip_models, matching_loss=args.matching_loss, out=args.out,
                   resolution=args.resolution, device=args.device, backend=args.backend)
    if args.ab:
        return run_entry(ab_report, *args.ab, **scoring)
    return run_entry(evaluate_runs, args.path, prompts=args.prompts, **scoring)


if __name__ == "__main__":
    sys.exit(cli())
