"""A/B report of a vanilla and a PTD run (paper Fig. 8 and Table 1 context): the metrics each run recorded during
training (<run>/metrics.jsonl, `evaluation.monitor`) plotted against the iteration in one PNG, and the final
numbers in a markdown table next to the paper's Table 1, which is quoted, not measured here."""
from __future__ import annotations

from pathlib import Path

from arguments import RunError, load_config
from evaluation.gallery import GALLERY_FILE, GalleryCell, GalleryRow, final_video, gallery_html, href
from evaluation.monitor import METRICS_FILE, read_metrics
from evaluation.plots import plot_ab
from stages.run import finished_ply
from utils.files import write_json_atomic, write_text_atomic

# paper Table 1 (CLIP similarity on the 415 DreamFusion prompts; baselines sourced from GaussianDreamer):
# method -> (ViT-L/14, ViT-bigG-14)
PAPER_TABLE1 = {"DreamFusion": (23.60, 37.46), "ProlificDreamer": (27.39, 42.98), "Instant3D": (26.87, 41.77),
                "LucidDreamer": (25.99, 40.27), "PTD (paper)": (27.16, 42.36)}


def load_arm(run: Path, label: str) -> dict:
    """One arm: its metrics records (sorted by iteration), prompt and PTD mode."""
    path = Path(run) / METRICS_FILE
    if not path.is_file():
        raise RunError(f"run '{run}' has no {METRICS_FILE}; train it with EvalParams.metrics_interval=K (K > 0)")
    records = sorted(read_metrics(path), key=lambda r: r["iteration"])
    if not records:
        raise RunError(f"{path} holds no records; the run stopped before its first metrics record")
    if not (Path(run) / "config.yaml").is_file():
        raise RunError(f"run '{run}' has no config.yaml; pass run folders written by train.py")
    cfg = load_config(Path(run) / "config.yaml")
    if finished_ply(Path(run), cfg) is None:
        raise RunError(f"run '{run}' is unfinished (last metrics record at iteration {records[-1]['iteration']} of "
                       f"{cfg.OptimizationParams.iterations}); finish it with train.py --resume before an A/B")
    return {"label": label, "run": str(run), "prompt": cfg.GuidanceParams.text, "mode": records[-1].get("mode"),
            "records": records, "iterations": cfg.OptimizationParams.iterations}


def final_numbers(arm: dict) -> dict:
    """First and last matching loss, last CLIP snapshot per model."""
    first, last = arm["records"][0], arm["records"][-1]
    return {"first_iteration": first["iteration"], "final_iteration": last["iteration"],
            "matching_loss_first": first["matching_loss"], "matching_loss_final": last["matching_loss"],
            "matching_loss_final_std": last.get("matching_loss_std", 0.0), "clip_final": dict(last.get("clip", {}))}


def ab_markdown(arms: list[dict], finals: list[dict], protocol: dict | None = None) -> str:
    """Our final numbers per arm, then the paper's Table 1 for context (clearly labelled as quoted)."""
    clip_labels = sorted({k for f in finals for k in f["clip_final"]})
    prompts = {a["prompt"] for a in arms}
    lines = ["# A/B report: vanilla vs PTD (our runs)", ""]
    lines.append(f"prompt: {arms[0]['prompt']}" if len(prompts) == 1 else
                 "WARNING: the arms have different prompts: " + " | ".join(str(a["prompt"]) for a in arms))
    head = ["arm", "mode", "iterations", "matching loss (first)", "matching loss (final)"]
    head += [f"CLIP {c} (final snapshot)" for c in clip_labels]
    protocol_labels = sorted({k for p in (protocol or {}).values() for k in p})
    head += [f"CLIP {c} (16 views, final PLY)" for c in protocol_labels]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, f in zip(arms, finals):
        row = [arm["label"], str(arm["mode"]), f"{f['first_iteration']}-{f['final_iteration']}",
               f"{f['matching_loss_first']:.4f}",
               f"{f['matching_loss_final']:.4f} ± {f['matching_loss_final_std']:.4f}"]
        row += [f"{f['clip_final'][c]:.2f}" if c in f["clip_final"] else "-" for c in clip_labels]
        scores = (protocol or {}).get(arm["label"], {})
        row += [f"{scores[c]:.2f}" if c in scores else "-" for c in protocol_labels]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## For context: the paper's Table 1 (quoted from the paper, NOT our measurements)", "",
              "CLIP similarity over the 415 DreamFusion prompts, 16 views per prompt; the baselines' numbers are "
              "sourced by the paper from GaussianDreamer. One prompt on our side is not comparable with a "
              "415-prompt mean.", "", "| method (paper's numbers) | ViT-L/14 | ViT-bigG-14 |", "|---|---|---|"]
    lines += [f"| {name} | {a:.2f} | {b:.2f} |" for name, (a, b) in PAPER_TABLE1.items()]
    return "\n".join(lines) + "\n"


def ab_gallery(arms: list[dict], finals: list[dict], out: Path, protocol: dict | None = None) -> str:
    """The two runs' final videos side by side with their final numbers, and the A/B plot (gallery.html in `out`)."""
    cells = {}
    for arm, f in zip(arms, finals):
        numbers = [("matching loss (final)", f"{f['matching_loss_final']:.4f} ± {f['matching_loss_final_std']:.4f}")]
        numbers += [(f"CLIP {c} (snapshot)", f"{v:.2f}") for c, v in sorted(f["clip_final"].items())]
        scores = (protocol or {}).get(arm["label"], {})
        numbers += [(f"CLIP {c} (16 views)", f"{v:.2f}") for c, v in sorted(scores.items())]
        video = final_video(arm["run"])
        cells[arm["label"]] = GalleryCell(video=href(video, out) if video else None, numbers=tuple(numbers),
                                          note=f"{Path(arm['run']).name} ({arm['mode']})")
    prompt = " | ".join(dict.fromkeys(str(a["prompt"]) for a in arms))
    return gallery_html("A/B gallery: vanilla vs PTD", [a["label"] for a in arms],
                        [GalleryRow(prompt, f"{arms[0]['iterations']} iterations", cells)],
                        plots=["ab_report.png"], links=[("ab_report.md", "ab_report.md")])


def write_ab_report(vanilla: Path, ptd: Path, out: Path, protocol: dict | None = None) -> dict:
    """Writes <out>/ab_report.{png,md,json} and gallery.html; returns the JSON content. `protocol`: label -> {model:
    score}."""
    arms = [load_arm(Path(vanilla), "vanilla"), load_arm(Path(ptd), "PTD")]
    if arms[0]["iterations"] != arms[1]["iterations"]:
        raise RunError(f"the arms ran different numbers of iterations ({arms[0]['iterations']} vs "
                       f"{arms[1]['iterations']}); an A/B compares runs of the same length")
    finals = [final_numbers(a) for a in arms]
    out = Path(out)
    plot_ab(arms, out / "ab_report.png")
    text = ab_markdown(arms, finals, protocol)
    write_text_atomic(out / "ab_report.md", text)
    report = {"arms": [{k: a[k] for k in ("label", "run", "prompt", "mode")} | {"final": f}
                       for a, f in zip(arms, finals)],
              "protocol_clip": protocol or {}, "paper_table1": {k: list(v) for k, v in PAPER_TABLE1.items()}}
    write_json_atomic(out / "ab_report.json", report)
    write_text_atomic(out / GALLERY_FILE, ab_gallery(arms, finals, out, protocol))
    print(text)
    return report
