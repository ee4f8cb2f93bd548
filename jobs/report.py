"""The results of a batch: one row per job as CSV and markdown, and the A/B summary of the arms next to the paper's
Table 1 (quoted, not measured here).

A/B protocol: arms are compared on the (prompt, seed) pairs that every arm finished, so a failed job removes its pair
from all arms alike. For each arm: the mean of each CLIP model's score (paper protocol, 16 views), of the final
matching loss (Eq. 5 under the prior) and of the job's wall time. Against the baseline arm: the paired mean
difference, its standard error (sample std of the differences / sqrt(n)) and how many pairs the arm wins.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from evaluation.ab_report import PAPER_TABLE1
from evaluation.clip import PAPER_MODELS
from evaluation.gallery import GALLERY_FILE, GalleryCell, GalleryRow, final_video, gallery_html, href
from evaluation import MATCHING
from utils.files import write_json_atomic, write_text_atomic

# our CLIP label of each paper column (evaluation.clip.model_label of the paper's scorers)
PAPER_COLUMNS = {f"{name}:{pretrained}": column for (name, pretrained), column in
                 zip(PAPER_MODELS, ("ViT-L/14", "ViT-bigG-14"))}
# the metric besides the CLIP scores and the matching loss (lower is better, as for the matching loss)
WALL = "wall_s"


def clip_labels(rows: list[dict]) -> list[str]:
    return sorted({label for r in rows for label in r.get("clip", {})})


def metric_value(row: dict, metric: str) -> float | None:
    return row["clip"].get(metric) if metric not in (MATCHING, WALL) else row.get(metric)


def better_sign(metric: str) -> int:
    return -1 if metric in (MATCHING, WALL) else 1


def paired_stats(diffs: list[float]) -> dict:
    """Mean and standard error (std with n-1 / sqrt(n); None below 2 pairs) of paired differences."""
    n = len(diffs)
    mean = sum(diffs) / n
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else None
    return {"n": n, "mean_diff": mean, "se": se}


def summarize(rows: list[dict], arms: list[str], baseline: str | None = None) -> dict:
    """The A/B summary of the rows (see the module docstring). `baseline` defaults to the first arm."""
    baseline = baseline or arms[0]
    metrics = clip_labels(rows) + [MATCHING, WALL]
    done = {(r["prompt"], r["seed"], r["arm"]): r for r in rows if r["status"] == "done"}
    pairs = sorted({(p, s) for p, s, _ in done if all((p, s, arm) in done for arm in arms)})
    counts = {arm: {"done": sum(r["status"] == "done" for r in rows if r["arm"] == arm),
                    "failed": sum(r["status"] == "failed" for r in rows if r["arm"] == arm)} for arm in arms}
    per_arm, versus = {}, {}
    for arm in arms:
        values = {m: [metric_value(done[(p, s, arm)], m) for p, s in pairs] for m in metrics}
        per_arm[arm] = {**counts[arm], "pairs": len(pairs),
                        **{m: (sum(v) / len(v) if v and None not in v else None) for m, v in values.items()}}
        if arm == baseline or not pairs:
            continue
        versus[arm] = {}
        for m in metrics:
            a = [metric_value(done[(p, s, arm)], m) for p, s in pairs]
            b = [metric_value(done[(p, s, baseline)], m) for p, s in pairs]
            if None in a or None in b:
                continue
            diffs = [x - y for x, y in zip(a, b)]
            versus[arm][m] = {**paired_stats(diffs), "wins": sum(better_sign(m) * d > 0 for d in diffs)}
    return {"arms": arms, "baseline": baseline, "metrics": metrics, "pairs": len(pairs), "per_arm": per_arm,
            "versus_baseline": versus}


# ------------------------------------------------------------------------------------------------- tables
def flat_row(row: dict, labels: list[str]) -> dict:
    """A row with one column per CLIP model and per stage, for CSV."""
    flat = {k: row[k] for k in ("prompt", "arm", "seed", "status")}
    flat.update({f"clip {label}": row["clip"].get(label) for label in labels})
    flat.update({k: row[k] for k in ("matching_loss", "matching_loss_std", "num_points", "stage1_loss_prior",
                                     "stage1_loss_path")})
    flat.update({f"{stage}_s": row["stage_s"].get(stage) for stage in ("form_path", "train", "evaluate")})
    flat.update({k: row[k] for k in ("wall_s", "attempts", "host", "job", "workspace", "error")})
    return flat


def results_csv(rows: list[dict]) -> str:
    labels = clip_labels(rows)
    flats = [flat_row(r, labels) for r in rows]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(flats[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(flats)
    return buffer.getvalue()


def fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else \
        f"{seconds / 3600:.2f} h"


def cell(text: str) -> str:
    """Free text (a prompt, an error message) as one markdown table cell: pipes escaped, line breaks as spaces."""
    return " ".join(str(text).replace("|", "\\|").split())


def jobs_markdown(rows: list[dict]) -> list[str]:
    labels = clip_labels(rows)
    head = ["prompt", "arm", "seed", "status"] + [f"CLIP {label}" for label in labels] + \
        ["matching loss", "stage 1 / 2 / eval", "wall", "attempts"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        stages = " / ".join(duration(r["stage_s"].get(s)) for s in ("form_path", "train", "evaluate"))
        cells = [cell(r["prompt"]) or "(empty)", r["arm"], str(r["seed"]),
                 r["status"] if r["status"] == "done" else f"**{r['status']}**: {cell(r['error'])}"]
        cells += [fmt(r["clip"].get(label)) for label in labels]
        cells += [fmt(r["matching_loss"], 4), stages if r["status"] == "done" else "-", duration(r["wall_s"]),
                  str(r["attempts"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def summary_markdown(summary: dict) -> list[str]:
    arms, metrics, labels = summary["arms"], summary["metrics"], summary["metrics"][:-2]
    lines = [f"## A/B summary: {len(arms)} arms on the {summary['pairs']} (prompt, seed) pairs every arm finished", ""]
    head = ["arm", "done", "failed"] + [f"CLIP {label}" for label in labels] + ["matching loss", "wall per job"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in arms:
        a = summary["per_arm"][arm]
        lines.append("| " + " | ".join([arm, str(a["done"]), str(a["failed"])] + [fmt(a[m]) for m in labels] +
                                        [fmt(a[MATCHING], 4), duration(a[WALL])]) + " |")
    if summary["versus_baseline"]:
        lines += ["", f"Paired differences against `{summary['baseline']}` (mean ± standard error; wins = pairs where "
                  f"the arm is better: higher CLIP, lower matching loss, less time):", ""]
        head = ["arm"] + [f"Δ CLIP {label}" for label in labels] + ["Δ matching loss", "Δ wall"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for arm, stats in summary["versus_baseline"].items():
            cells = [arm]
            for m in metrics:
                s = stats.get(m)
                digits = 4 if m == MATCHING else 1 if m == WALL else 2
                cells.append("-" if s is None else f"{s['mean_diff']:+.{digits}f}" +
                             (f" ± {s['se']:.{digits}f}" if s["se"] is not None else "") + f" ({s['wins']}/{s['n']})")
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def paper_markdown(summary: dict) -> list[str]:
    """The paper's Table 1 (quoted) with our arms in the columns whose CLIP model is the paper's."""
    lines = ["## Beside the paper's Table 1", "",
             "The paper's rows are QUOTED from its Table 1 (415 DreamFusion prompts, 16 views; baselines sourced from "
             "GaussianDreamer), not measured here. Our rows are this batch's means over its finished pairs.", "",
             "| method | ViT-L/14 | ViT-bigG-14 | source |", "|---|---|---|---|"]
    lines += [f"| {name} | {a:.2f} | {b:.2f} | paper Table 1 (quoted) |" for name, (a, b) in PAPER_TABLE1.items()]
    ours = {column: label for label, column in PAPER_COLUMNS.items() if label in summary["metrics"]}
    for arm in summary["arms"]:
        a = summary["per_arm"][arm]
        cells = [fmt(a[ours[c]]) if c in ours else "-" for c in ("ViT-L/14", "ViT-bigG-14")]
        lines.append(f"| {arm} (ours) | {cells[0]} | {cells[1]} | this batch, {summary['pairs']} pairs |")
    if not ours:
        lines += ["", "Our CLIP models are not the paper's (" + ", ".join(summary["metrics"][:-2] or ["none"]) +
                  "): our scores are in the A/B summary above and are not comparable with this table."]
    return lines


# ------------------------------------------------------------------------------------------------- gallery
def gallery_cell(row: dict, runs_root: Path, page_folder: Path) -> GalleryCell:
    """One job in the gallery: its final video (found in <runs_root>/<job>, wherever the batch folder now is), its
    CLIP scores and matching loss, or its error."""
    if row["status"] != "done":
        return GalleryCell(note=f"{row['status']}: {row['error']}", failed=True)
    video = final_video(runs_root / row["job"])
    numbers = [(f"CLIP {label}", fmt(score)) for label, score in sorted(row["clip"].items())]
    if row["matching_loss"] is not None:
        numbers.append(("matching loss", fmt(row["matching_loss"], 4) + (
            f" ± {row['matching_loss_std']:.4f}" if row.get("matching_loss_std") is not None else "")))
    numbers.append(("wall", duration(row["wall_s"])))
    return GalleryCell(video=href(video, page_folder) if video else None, numbers=tuple(numbers))


def gallery_rows(rows: list[dict], arms: list[str], runs_root: Path, page_folder: Path) -> list[GalleryRow]:
    """One gallery row per (prompt, seed) in the jobs' order, one cell per arm."""
    grouped: dict[tuple[str, int], dict[str, GalleryCell]] = {}
    for row in rows:
        cells = grouped.setdefault((row["prompt"], row["seed"]), {})
        cells[row["arm"]] = gallery_cell(row, runs_root, page_folder)
    return [GalleryRow(prompt, f"seed {seed}", {arm: cells[arm] for arm in arms if arm in cells})
            for (prompt, seed), cells in grouped.items()]


def write_results(out: Path, rows: list[dict], summary: dict, header: list[str]) -> None:
    """<out>/results.csv, results.md (jobs, A/B summary, paper table), results.json and gallery.html (every prompt's
    videos side by side, with every PNG of <out>), each written atomically."""
    write_text_atomic(out / "results.csv", results_csv(rows))
    text = "\n".join(header + [""] + jobs_markdown(rows) + [""] + summary_markdown(summary) + [""] +
                     paper_markdown(summary)) + "\n"
    write_text_atomic(out / "results.md", text)
    write_json_atomic(out / "results.json", {"rows": rows, "summary": summary})
    page = gallery_html(f"Batch gallery: {len(rows)} jobs", summary["arms"],
                        gallery_rows(rows, summary["arms"], out / "runs", out),
                        plots=[href(png, out) for png in sorted(out.glob("*.png"))],
                        notes=[line for line in header if line and not line.startswith("#")],
                        links=[(name, name) for name in ("results.md", "results.csv", "results.json")])
    write_text_atomic(out / GALLERY_FILE, page)
