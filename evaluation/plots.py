"""Every figure the project writes (matplotlib, Agg backend, PNG written atomically)."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch

from utils.files import atomic_path


@contextlib.contextmanager
def figure(path: Path, *args, **kwargs) -> Iterator[tuple]:
    """`with figure(path, 1, 2, figsize=...) as (fig, axes):` draw; on exit the PNG replaces `path` atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(*args, **kwargs)
    try:
        yield fig, axes
        fig.tight_layout()
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)


def plot_denoising_report(report: dict, path: Path, title: str) -> None:
    """Stage 1: the denoising loss (Eq. 6) of the prior and of the path LoRA on the renders, per timestep."""
    with figure(path, figsize=(5, 3.5)) as (_, ax):
        ax.plot(report["timesteps"], report["prior"], "o-", label=f"prior (mean {report['prior_mean']:.4f})")
        ax.plot(report["timesteps"], report["path_lora"], "o-",
                label=f"path LoRA (mean {report['path_lora_mean']:.4f})")
        ax.set_xlabel("timestep t")
        ax.set_ylabel("denoising loss (Eq. 6)")
        ax.set_title(title, fontsize=9)
        ax.legend()


def plot_matching_loss(report: dict, path: Path) -> None:
    """The OOD probe: matching loss (Eq. 5) of renders and of generated images per timestep, mean +- std, in the
    reading the report's `rows` hold (EvalParams.probe_include_self)."""
    with figure(path, figsize=(5.5, 3.8)) as (_, ax):
        for name, color in (("rendered", "tab:red"), ("generated", "tab:blue")):
            row = report["rows"][name]["by_t"]
            t = [r["t"] for r in row]
            mean = torch.tensor([r["mean"] for r in row])
            std = torch.tensor([r["std"] for r in row])
            overall = report["rows"][name]["overall"]["mean"]
            ax.plot(t, mean, "o-", color=color, label=f"{name} (overall {overall:.3f})")
            ax.fill_between(t, mean - std, mean + std, color=color, alpha=0.2)
        ax.set_xlabel("timestep t")
        norm = "RMS" if report.get("normalize", True) else "L2"
        ax.set_ylabel(f"matching loss ({report.get('space', 'eps')} space, {norm})")
        ax.set_title(f"{report['prompt'][:50]} [{report['network']}]", fontsize=9)
        ax.legend()


def plot_ab(arms: list[dict], path: Path) -> None:
    """A/B: matching loss and CLIP similarity vs iteration for each arm's metrics records, one PNG, two panels."""
    with figure(path, 1, 2, figsize=(10, 3.8)) as (_, (ax_m, ax_c)):
        for arm, color in zip(arms, ("tab:blue", "tab:green", "tab:red", "tab:purple")):
            its = [r["iteration"] for r in arm["records"]]
            ax_m.plot(its, [r["matching_loss"] for r in arm["records"]], "o-", ms=3, color=color,
                      label=f"{arm['label']} ({arm['mode']})")
            labels = sorted({k for r in arm["records"] for k in r.get("clip", {})})
            for label, style in zip(labels, ("o-", "s--", "^:", "d-.")):
                pts = [(r["iteration"], r["clip"][label]) for r in arm["records"] if label in r.get("clip", {})]
                ax_c.plot(*zip(*pts), style, ms=3, color=color, label=f"{arm['label']} {label}")
        ax_m.set_xlabel("iteration")
        ax_m.set_ylabel("matching loss (Eq. 5, eps space, RMS)")
        ax_m.set_title("matching loss under the iteration's network", fontsize=9)
        ax_m.legend(fontsize=8)
        ax_c.set_xlabel("iteration")
        ax_c.set_ylabel("CLIP similarity (100 x cos)")
        ax_c.set_title("CLIP snapshot (evaluation rig)", fontsize=9)
        if ax_c.lines:
            ax_c.legend(fontsize=8)
