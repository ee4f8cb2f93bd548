"""Score a toy-world batch against ground truth: `python -m toyworld.study output/toy_study`.

For every finished run of a batch.py folder (<out>/runs/<prompt>__<arm>__s<seed>__<hash>/), every saved PLY
(point_cloud/iteration_N/) is scored by toyworld.score (16 evaluation views: silhouette IoU, colour error, best shape,
nearest colour) and by the toy CLIP (the paper's 16-view protocol, 100 x cosine, 64 px, white background, with the
CLIP committed now, so runs scored before a retrained CLIP are re-scored alike); scores are cached per PLY in the run
(toy_scores.json, keyed by the PLY's and the CLIP weights' size and mtime). Writes <out>/toy_study.csv (one row per run
and iteration), <out>/toy_study.md (per arm at the last iteration: mean +- std over runs; the iteration at which each
arm's mean aligned IoU and mean toy-CLIP score first reach vanilla's final and best means; paired differences
from vanilla on the same prompt and seed; the matching loss along training from metrics.jsonl) and
<out>/toy_study.png (IoU, toy-CLIP score and matching loss along training, per arm). Runs still going are skipped
and counted.

With `--app-h`, also the matching loss of every saved model under the network of its iteration with references
sampled from that network (App. H's protocol; the monitor's default records use the prior's references), re-measured
from the saved PLYs (`app_h_losses`: with the prior's references it reproduces metrics.jsonl exactly). Without it,
the values a previous `--app-h` pass cached are still reported (the paired table says over how many pairs).

With `--from-csv CSV`, the tables and plot are made from a toy_study.csv instead of run folders: the study's runs
do not outlive the machine they ran on, its CSV is committed (docs/toy_study.csv).

With `--probe`, first the paper's §3 measurement for every prompt of `--prompts`: probe_ood.py (the prior, the
`--opt` config's EvalParams) on renders of the initial model vs held-out prior samples, into
<out>/probe/<prompt slug>/ (a prompt already measured is skipped: rerun to resume); then <out>/toy_probe.md, the
matching loss per timestep and reading as mean +- std over prompts of each prompt's mean.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from evaluation.clip import TOY_CLIP_DIR, TOY_CLIP_NAME, clip_scores, load_scorer, rig_images
from scene.gaussian_model import GaussianModel
from toyworld.score import score_model
from utils.files import atomic_path, write_text_atomic

RUN_NAME = re.compile(r"^(?P<prompt>.+)__(?P<arm>[^_].*?)__s(?P<seed>\d+)__[0-9a-f]+$")
CACHE = "toy_scores.json"
SCORES_VERSION = 3  # part of each cache entry's stamp: raise it when the scores change meaning
CLIP_RESOLUTION = 64  # the toy CLIP's input size


def run_plys(run: Path) -> dict[int, Path]:
    """iteration -> PLY of a run's saved models."""
    out = {}
    for ply in (run / "point_cloud").glob("iteration_*/point_cloud.ply"):
        out[int(ply.parent.name.split("_")[1])] = ply
    return dict(sorted(out.items()))


def run_prompt(run: Path) -> str:
    import yaml
    for name in ("batch_job.yaml", "config.yaml"):
        if (run / name).is_file():
            return yaml.safe_load((run / name).read_text())["GuidanceParams"]["text"]
    raise ValueError(f"{run} has no config")


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def toy_clip_score(model, prompt: str, scorer) -> float:
    """The toy CLIP's score of `model` for `prompt`: evaluate.py's (mean over the 16 evaluation views of 100 x
    cosine), on a white background."""
    images = rig_images(model, torch.ones(3), CLIP_RESOLUTION, backend="torch")
    return clip_scores({"toy": scorer}, images, prompt)["toy"]["mean"]


def score_run(run: Path, scorer=None, vae=None) -> dict[int, dict]:
    """Ground-truth and toy-CLIP scores of each saved PLY of a run, with the colour as the toy prior's autoencoder
    sees it (toyworld.score), cached in the run folder (keyed by the PLY's, the CLIP's and the autoencoder's
    weights' size and mtime). `scorer`, `vae`: the toy CLIP and autoencoder (loaded here when None)."""
    from guidance.sd_utils import TOY_PRIOR_DIR
    from toyworld.train_clip import load_autoencoder

    cache_path = run / CACHE
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    prompt = run_prompt(run)
    clip_stamp = _stamp(TOY_CLIP_DIR / f"{TOY_CLIP_NAME}.safetensors")
    vae_stamp = _stamp(TOY_PRIOR_DIR / "vae" / "diffusion_pytorch_model.safetensors")
    out = {}
    for it, ply in run_plys(run).items():
        stamp = f"v{SCORES_VERSION}|{_stamp(ply)}|{clip_stamp}|{vae_stamp}"
        entry = cache.get(str(it))
        if not entry or entry.get("stamp") != stamp:
            scorer = scorer or load_scorer("toy", None)
            vae = vae or load_autoencoder(TOY_PRIOR_DIR)
            model = GaussianModel(sh_degree=3)
            model.load_ply(str(ply))
            entry = {"stamp": stamp, **score_model(model, prompt, vae=vae),
                     "toy_clip": toy_clip_score(model, prompt, scorer)}
            cache[str(it)] = entry
            write_text_atomic(cache_path, json.dumps(cache, indent=1))
        out[it] = entry
    return out


def matching_losses(run: Path) -> dict[int, float]:
    """iteration -> matching loss (the monitor's overall mean) from the run's metrics.jsonl."""
    path = run / "metrics.jsonl"
    out = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            loss = rec.get("matching_loss")
            if isinstance(loss, (int, float)):
                out[int(rec["iteration"])] = float(loss)
    return out


APP_H_CACHE = "toy_app_h.json"
APP_H_VERSION = 1


def app_h_losses(run: Path, device: torch.device | None = None, cached_only: bool = False) -> dict[int, dict]:
    """The matching loss of each saved model of a run under the network of its iteration (the path tracer set to that
    iteration: prior + w(iter) LoRA, or the checkpoint of Eq. 7; the prior in vanilla), on the monitor's views,
    noise and reading, with two reference sets: "prior" (the prior's samples: what the monitor records with the
    default EvalParams.probe_refs, so this must reproduce metrics.jsonl) and "current" (samples of that network:
    App. H's "x_0^ref ... sampled from the guidance model"). Cached in <run>/toy_app_h.json per PLY; the current
    networks' samples in <run>/probe/ (one DDIM sampling per distinct network). With `cached_only`, only the saved
    models already measured (and unchanged since) are returned, and nothing is computed."""
    from arguments import load_config
    from evaluation.ood import matching_loss_summary, probe_views, reference_latents
    from stages.run import background, make_guidance, make_tracer

    device = device or torch.device("cpu")
    cache_path = run / APP_H_CACHE
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    plys, out, state = run_plys(run), {}, {}
    for it, ply in plys.items():
        stamp = f"v{APP_H_VERSION}|{_stamp(ply)}"
        entry = cache.get(str(it))
        if not entry or entry.get("stamp") != stamp:
            if cached_only:
                continue
            if not state:  # the run's config, wherever its folder is now
                cfg = load_config(str(run / "config.yaml"), [f"ModelParams.output_root={run.parent}",
                                                             f"ModelParams.workspace={run.name}"])
                guidance = make_guidance(cfg, device)
                state.update(cfg=cfg, guidance=guidance, tracer=make_tracer(cfg, guidance), memo={},
                             views=probe_views(cfg, device), bg=background(cfg, device))
            cfg, guidance = state["cfg"], state["guidance"]
            weight = state["tracer"].apply(guidance.unet, it) if state["tracer"] is not None else None
            model = GaussianModel(sh_degree=cfg.ModelParams.sh_degree)
            model.load_ply(str(ply))
            entry = {"stamp": stamp, "ptd_weight": weight}
            for refs in ("prior", "current"):
                cfg.EvalParams.probe_refs = refs
                ref_x0 = reference_latents(cfg, guidance, run / "probe", state["memo"])
                with torch.no_grad():
                    entry[refs] = matching_loss_summary(cfg, guidance, model, ref_x0, state["views"],
                                                        state["bg"])["overall"]["mean"]
            cache[str(it)] = entry
            write_text_atomic(cache_path, json.dumps(cache, indent=1))
        out[it] = entry
    return out


def collect(out: Path, app_h: bool = False) -> tuple[list[dict], int]:
    """One row per finished run and saved iteration, with the matching loss of `app_h_losses`
    ("matching_loss_current"; "matching_loss_posthoc": its prior-reference value, which should equal the monitor's):
    measured where missing with `app_h`, otherwise only where a previous `app_h` pass cached it (None elsewhere)."""
    rows, unfinished = [], 0
    for run in sorted((out / "runs").iterdir()) if (out / "runs").is_dir() else []:
        m = RUN_NAME.match(run.name)
        if not m or not run.is_dir():
            continue
        if not (run / "train_done.json").is_file():
            unfinished += 1
            continue
        losses = matching_losses(run)
        app = app_h_losses(run, cached_only=not app_h)
        for it, s in score_run(run).items():
            rows.append({"run": run.name, "prompt": s["prompt"], "arm": m["arm"], "seed": int(m["seed"]),
                         "iteration": it, "iou": s["iou"], "aligned_iou": s["aligned_iou"],
                         "colour_error": s["colour_error"], "toy_clip": s["toy_clip"],
                         "shape_ok": s["shape_ok"], "colour_ok": s["colour_ok"], "best_shape": s["best_shape"],
                         "nearest_colour": s["nearest_colour"], "round_trip_colour_ok": s["round_trip_colour_ok"],
                         "round_trip_nearest_colour": s["round_trip_nearest_colour"], "matching_loss": losses.get(it),
                         "matching_loss_current": app.get(it, {}).get("current"),
                         "matching_loss_posthoc": app.get(it, {}).get("prior")})
    return rows, unfinished


def rows_csv(rows: list[dict]) -> str:
    """The rows of `collect` as CSV text (None as an empty field)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


_INT_FIELDS = ("seed", "iteration")
_BOOL_FIELDS = ("shape_ok", "colour_ok", "round_trip_colour_ok")
_TEXT_FIELDS = ("run", "prompt", "arm", "best_shape", "nearest_colour", "round_trip_nearest_colour")
_NEEDED = ("arm", "seed", "iteration", "iou", "aligned_iou", "colour_error", "toy_clip", *_BOOL_FIELDS,
           "matching_loss")


def read_rows(text: str) -> list[dict]:
    """The rows of a toy_study.csv (`rows_csv`) with their types back: the tables and plots of a study whose run
    folders are gone can be made again from its committed CSV (`--from-csv`)."""
    reader = csv.DictReader(io.StringIO(text))
    missing = [k for k in _NEEDED if k not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"no column {', '.join(missing)}")
    rows = []
    for raw in reader:
        row = {}
        for key, value in raw.items():
            if key in _TEXT_FIELDS:
                row[key] = value or None
            elif value == "":
                row[key] = None
            elif key in _INT_FIELDS:
                row[key] = int(value)
            elif key in _BOOL_FIELDS:
                if value not in ("True", "False"):
                    raise ValueError(f"column {key!r} holds {value!r}, not True or False")
                row[key] = value == "True"
            else:
                row[key] = float(value)
        rows.append(row)
    return rows


def summarise(rows: list[dict]) -> dict:
    """Per arm: the last iteration's mean +- std of each score, and per iteration the mean raw and scale-aligned IoU,
    colour error, toy-CLIP score and matching loss.
    "reaches_vanilla_final_at": the first iteration whose mean aligned IoU (the shape, with the size that text cannot
    fix factored out: toyworld.score) reaches vanilla's final one; "reaches_vanilla_best_at": vanilla's best mean
    over its iterations (vanilla's quality need not peak at the end).
    "clip_reaches_vanilla_final_at" / "clip_reaches_vanilla_best_at": the same with the mean toy-CLIP score.
    "paired": per iteration, the arm's aligned IoU minus vanilla's on the same (prompt, seed), as (mean, standard
    error, pairs): the comparison with the prompt-to-prompt spread taken out; "paired_clip", "paired_colour",
    "paired_loss", "paired_loss_current" likewise for the toy-CLIP score, colour error and the two matching losses."""
    by_arm = defaultdict(list)
    for r in rows:
        by_arm[r["arm"]].append(r)
    summary = {}
    for arm, rs in by_arm.items():
        last_it = max(r["iteration"] for r in rs)
        last = [r for r in rs if r["iteration"] == last_it]
        curve, aligned = defaultdict(list), defaultdict(list)
        loss_curve, colour_curve, clip_curve = defaultdict(list), defaultdict(list), defaultdict(list)
        current_curve = defaultdict(list)
        for r in rs:
            curve[r["iteration"]].append(r["iou"])
            aligned[r["iteration"]].append(r["aligned_iou"])
            colour_curve[r["iteration"]].append(r["colour_error"])
            clip_curve[r["iteration"]].append(r["toy_clip"])
            if r["matching_loss"] is not None:
                loss_curve[r["iteration"]].append(r["matching_loss"])
            if r.get("matching_loss_current") is not None:
                current_curve[r["iteration"]].append(r["matching_loss_current"])
        summary[arm] = {
            "runs": len(last), "iteration": last_it,
            "iou": _mean_std([r["iou"] for r in last]),
            "aligned_iou": _mean_std([r["aligned_iou"] for r in last]),
            "colour_error": _mean_std([r["colour_error"] for r in last]),
            "toy_clip": _mean_std([r["toy_clip"] for r in last]),
            "shape_ok": float(np.mean([r["shape_ok"] for r in last])),
            "colour_ok": float(np.mean([r["colour_ok"] for r in last])),
            "round_trip_colour_ok": float(np.mean([r["round_trip_colour_ok"] for r in last])),
            "iou_curve": {it: float(np.mean(v)) for it, v in sorted(curve.items())},
            "aligned_curve": {it: float(np.mean(v)) for it, v in sorted(aligned.items())},
            "loss_curve": {it: float(np.mean(v)) for it, v in sorted(loss_curve.items())},
            "colour_curve": {it: float(np.mean(v)) for it, v in sorted(colour_curve.items())},
            "clip_curve": {it: float(np.mean(v)) for it, v in sorted(clip_curve.items())},
            "current_loss_curve": {it: float(np.mean(v)) for it, v in sorted(current_curve.items())}}
    if "vanilla" in summary:
        van = summary["vanilla"]
        levels = [(prefix, curve, van[final][0], max(van[curve].values()))
                  for prefix, curve, final in (("", "aligned_curve", "aligned_iou"),
                                               ("clip_", "clip_curve", "toy_clip"))]
        for arm, s in summary.items():
            for prefix, curve, final, best in levels:
                s[f"{prefix}reaches_vanilla_final_at"] = _first_at(s[curve], final)
                s[f"{prefix}reaches_vanilla_best_at"] = _first_at(s[curve], best)
            if arm != "vanilla":
                for name, key, _ in PAIRED:
                    s[name] = _paired(by_arm[arm], by_arm["vanilla"], key)
    posthoc = [abs(r["matching_loss_posthoc"] - r["matching_loss"]) for r in rows
               if r.get("matching_loss_posthoc") is not None and r["matching_loss"] is not None]
    if posthoc:
        summary["vanilla" if "vanilla" in summary else next(iter(summary))]["posthoc_max_diff"] = max(posthoc)
    return summary


# (summary key, row key, table title) of the paired differences from vanilla
PAIRED = (("paired", "aligned_iou", "Aligned IoU"), ("paired_clip", "toy_clip", "Toy-CLIP score"),
          ("paired_colour", "colour_error", "Colour error"),
          ("paired_loss", "matching_loss", "Matching loss (monitor: prior's references)"),
          ("paired_loss_current", "matching_loss_current",
           "Matching loss (App. H: references of each iteration's network)"))


def _first_at(curve: dict[int, float], level: float) -> int | None:
    """The first iteration whose value reaches `level` (None if none does)."""
    return next((it for it, v in curve.items() if v >= level), None)


def _paired(rows: list[dict], base_rows: list[dict], key: str) -> dict[int, tuple[float, float, int]]:
    """iteration -> (mean, standard error, pairs) of rows[key] minus the base row's of the same (prompt, seed,
    iteration); rows without a partner or a value are left out."""
    base = {(r.get("prompt"), r["seed"], r["iteration"]): r[key] for r in base_rows if r.get(key) is not None}
    diffs = defaultdict(list)
    for r in rows:
        partner = base.get((r.get("prompt"), r["seed"], r["iteration"]))
        if partner is not None and r.get(key) is not None:
            diffs[r["iteration"]].append(r[key] - partner)
    return {it: _mean_sem(v) for it, v in sorted(diffs.items())}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values))


def _mean_sem(values: list[float]) -> tuple[float, float, int]:
    """Mean, standard error of the mean (sample std / sqrt(n); 0 for one value) and n."""
    n = len(values)
    sem = float(np.std(values, ddof=1) / np.sqrt(n)) if n > 1 else 0.0
    return float(np.mean(values)), sem, n


def _reached(s: dict, key: str) -> str:
    """An arm's "reaches ... at" iteration for the table: "never" where it does not, "-" without a vanilla arm."""
    if key not in s:
        return "-"
    return "never" if s[key] is None else str(s[key])


def markdown(summary: dict, unfinished: int) -> str:
    lines = ["| arm | runs | iteration | raw IoU | aligned IoU | colour error | toy CLIP | best shape right | "
             "nearest colour right | ... through the prior's autoencoder | mean aligned IoU first >= vanilla's final "
             "at | ... >= vanilla's best at | mean toy CLIP first >= vanilla's final at | ... >= vanilla's best at |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm, s in summary.items():
        lines.append(f"| {arm} | {s['runs']} | {s['iteration']} | {s['iou'][0]:.3f} +- {s['iou'][1]:.3f} | "
                     f"{s['aligned_iou'][0]:.3f} +- {s['aligned_iou'][1]:.3f} | "
                     f"{s['colour_error'][0]:.3f} +- {s['colour_error'][1]:.3f} | "
                     f"{s['toy_clip'][0]:.2f} +- {s['toy_clip'][1]:.2f} | {s['shape_ok']:.0%} | "
                     f"{s['colour_ok']:.0%} | {s['round_trip_colour_ok']:.0%} | "
                     + " | ".join(_reached(s, f"{pre}reaches_vanilla_{level}_at")
                                  for pre in ("", "clip_") for level in ("final", "best")) + " |")
    iters = sorted({it for s in summary.values() for it in s["iou_curve"]})
    for title, key, fmt in (("Mean aligned IoU", "aligned_curve", ".3f"), ("Mean raw IoU", "iou_curve", ".3f"),
                            ("Mean colour error", "colour_curve", ".3f"), ("Mean toy-CLIP score", "clip_curve", ".2f")):
        lines += ["", f"{title} along training:", "", "| arm | " + " | ".join(map(str, iters)) + " |",
                  "|---|" + "---|" * len(iters)]
        for arm, s in summary.items():
            lines.append(f"| {arm} | " + " | ".join(format(s[key][it], fmt) if it in s[key] else "-"
                                                      for it in iters) + " |")
    for key, _, title in PAIRED:
        paired = {arm: s[key] for arm, s in summary.items() if s.get(key)}
        if not paired:
            continue
        its = sorted({it for p in paired.values() for it in p})
        lines += ["", f"{title} minus vanilla's on the same prompt and seed (mean +- standard error, pairs):", "",
                  "| arm | " + " | ".join(map(str, its)) + " |", "|---|" + "---|" * len(its)]
        for arm, p in paired.items():
            lines.append(f"| {arm} | " + " | ".join(f"{p[it][0]:+.3f} +- {p[it][1]:.3f} ({p[it][2]})"
                                                      if it in p else "-" for it in its) + " |")
    if any(s["loss_curve"] for s in summary.values()):
        its = sorted({it for s in summary.values() for it in s["loss_curve"]})
        lines += ["", "Mean matching loss along training (metrics.jsonl):", "",
                  "| arm | " + " | ".join(map(str, its)) + " |", "|---|" + "---|" * len(its)]
        for arm, s in summary.items():
            lines.append(f"| {arm} | " + " | ".join(f"{s['loss_curve'][it]:.4f}" if it in s["loss_curve"] else "-"
                                                      for it in its) + " |")
    if any(s["current_loss_curve"] for s in summary.values()):
        its = sorted({it for s in summary.values() for it in s["current_loss_curve"]})
        lines += ["", "Mean matching loss along training, App. H's protocol (references sampled from each iteration's "
                  "network; toyworld.study --app-h):", "",
                  "| arm | " + " | ".join(map(str, its)) + " |", "|---|" + "---|" * len(its)]
        for arm, s in summary.items():
            c = s["current_loss_curve"]
            lines.append(f"| {arm} | " + " | ".join(f"{c[it]:.4f}" if it in c else "-" for it in its) + " |")
    diff = [s["posthoc_max_diff"] for s in summary.values() if "posthoc_max_diff" in s]
    if diff:
        lines += ["", f"Check: the saved models re-measured afterwards with the prior's references reproduce the "
                  f"monitor's records to {diff[0]:.1e} at most."]
    if unfinished:
        lines += ["", f"{unfinished} run(s) not finished yet (skipped)."]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.5))
    for arm, s in summary.items():
        line, = axes[0].plot(list(s["aligned_curve"]), list(s["aligned_curve"].values()), marker="o", label=arm)
        axes[0].plot(list(s["iou_curve"]), list(s["iou_curve"].values()), ls="--", color=line.get_color())
        axes[1].plot(list(s["clip_curve"]), list(s["clip_curve"].values()), marker="o", color=line.get_color(),
                     label=arm)
        current = s.get("current_loss_curve")
        if current:
            axes[2].plot(list(current), list(current.values()), marker=".", color=line.get_color(), label=arm)
        if s["loss_curve"]:
            axes[2].plot(list(s["loss_curve"]), list(s["loss_curve"].values()), ls="--" if current else "-",
                         marker=None if current else ".", color=line.get_color(), label=None if current else arm)
    axes[0].set(title="silhouette IoU vs ground truth (dashed: raw)", xlabel="iteration")
    axes[1].set(title="toy-CLIP score (16 views)", xlabel="iteration")
    axes[2].set(title="matching loss (App. H refs; dashed: prior's refs)" if any(
        s.get("current_loss_curve") for s in summary.values()) else "matching loss", xlabel="iteration")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:  # the loss panel is empty for runs without metrics
            ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


PROJECT_ROOT = Path(__file__).resolve().parents[1]
PROBE_REPORT = "matching_loss_prior.json"  # probe_ood.py's report with --network prior and its defaults


def probe_prompts(out: Path, prompts: list[str], opt: str) -> list[dict]:
    """probe_ood.py for each prompt (skipped where its report exists), each in its own process (an entry script, as
    batch.py runs them); the reports."""
    import subprocess

    from utils.prompts import slugify

    reports = []
    for prompt in tqdm(prompts, desc="§3 probe", unit="prompt"):
        slug = slugify(prompt, 40)
        path = out / "probe" / slug / "probe" / PROBE_REPORT
        if not path.is_file():
            code = subprocess.call([sys.executable, str(PROJECT_ROOT / "probe_ood.py"), "--opt", opt,
                                    f"GuidanceParams.text={prompt}", f"ModelParams.output_root={out / 'probe'}",
                                    f"ModelParams.workspace={slug}"])
            if code != 0:
                raise RuntimeError(f"probe_ood.py failed for '{prompt}' (exit {code})")
        reports.append(json.loads(path.read_text()))
    return reports


def probe_summary(reports: list[dict]) -> dict:
    """reading -> {"t": [...], "rendered"/"generated": [(mean, std) over prompts of the prompt means] per t, then
    "overall" likewise}; the ratio of the two means is the paper's §3 comparison."""
    summary = {}
    for reading in reports[0]["rows_by_reading"]:
        rows = [r["rows_by_reading"][reading] for r in reports]
        ts = [row["t"] for row in rows[0]["rendered"]["by_t"]]
        entry = {"t": ts}
        for kind in ("rendered", "generated"):
            per_t = [_mean_std([r[kind]["by_t"][i]["mean"] for r in rows]) for i in range(len(ts))]
            entry[kind] = per_t + [_mean_std([r[kind]["overall"]["mean"] for r in rows])]
        summary[reading] = entry
    return summary


def probe_markdown(summary: dict, reports: list[dict]) -> str:
    r0 = reports[0]
    lines = [f"§3 probe over {len(reports)} prompts ({', '.join(r['prompt'] for r in reports)}): matching loss "
             f"(Eq. 5, {r0['space']} space, {r0['norm']}) of noisy renders of the initial model vs held-out prior "
             f"samples, {r0['num_generated']} each per prompt, {r0['num_refs']} reference samples; mean +- std over "
             "prompts of each prompt's mean.", ""]
    for reading, e in summary.items():
        lines += [f"Reading: {reading}", "", "| t | rendered | generated | ratio |", "|---|---|---|---|"]
        for t, ren, gen in zip([*e["t"], "overall"], e["rendered"], e["generated"]):
            lines.append(f"| {t} | {ren[0]:.4f} +- {ren[1]:.4f} | {gen[0]:.4f} +- {gen[1]:.4f} | "
                         f"{ren[0] / gen[0]:.3f} |")
        lines.append("")
    return "\n".join(lines)


def write_tables(out: Path, rows: list[dict], unfinished: int) -> None:
    """<out>/toy_study.md (printed too) and <out>/toy_study.png from a study's rows."""
    summary = summarise(rows)
    text = markdown(summary, unfinished)
    write_text_atomic(out / "toy_study.md", text)
    plot(summary, out / "toy_study.png")
    print(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="a batch.py output folder of toy-world prompts")
    p.add_argument("--probe", action="store_true", help="also the §3 probe over --prompts (see above)")
    p.add_argument("--app-h", action="store_true",
                   help="also the matching loss of every saved model with references sampled from the network of its "
                        "iteration (App. H's protocol; one DDIM sampling per distinct network, cached per run)")
    p.add_argument("--prompts", default=str(Path(__file__).parent / "study_prompts.txt"))
    p.add_argument("--opt", default=str(PROJECT_ROOT / "configs" / "toy_study.yaml"),
                   help="the config the probe runs with")
    p.add_argument("--from-csv", metavar="CSV",
                   help="make the tables and plot from this toy_study.csv (e.g. docs/toy_study.csv) instead of "
                        "run folders, into OUT/toy_study.md and OUT/toy_study.png")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.from_csv:
        try:
            rows = read_rows(Path(args.from_csv).read_text())
        except (OSError, ValueError) as e:
            print(f"error: --from-csv {args.from_csv}: cannot read it as a toy_study.csv ({e})", file=sys.stderr)
            return 2
        if not rows:
            print(f"error: --from-csv {args.from_csv} holds no row; give a toy_study.csv", file=sys.stderr)
            return 2
        out.mkdir(parents=True, exist_ok=True)
        write_tables(out, rows, 0)
        return 0
    if args.probe:
        prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
        if not prompts:
            print(f"error: {args.prompts} lists no prompt; give a file with one prompt per line", file=sys.stderr)
            return 2
        reports = probe_prompts(out, prompts, args.opt)
        text = probe_markdown(probe_summary(reports), reports)
        write_text_atomic(out / "toy_probe.md", text)
        print(text)
    if not (out / "runs").is_dir():
        if args.probe:
            return 0
        print(f"error: {out} holds no runs/ folder; run batch.py --out {out} first", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    rows, unfinished = collect(out, app_h=args.app_h)
    if not rows:
        print(f"error: no finished run in {out}/runs yet ({unfinished} unfinished)", file=sys.stderr)
        return 2
    write_text_atomic(out / "toy_study.csv", rows_csv(rows))
    write_tables(out, rows, unfinished)
    return 0


if __name__ == "__main__":
    sys.exit(main())
