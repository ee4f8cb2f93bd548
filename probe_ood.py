"""Out-of-distribution probe (paper §3, Eq. 5, App. G): is the prior's score worse on renders than on its own samples?

    python probe_ood.py --opt configs/x.yaml [--network prior|path] [--num-refs N] [--num-generated M]
                        [--timesteps 50,150,...] [--draws K] [--ddim-steps S] [Section.key=value ...]

Three sets of clean latents x_0, all reaching the latent space through the same VAE encoder (posterior mean):
- references x_0^ref: n samples of the prior for the prompt (DDIM, CFG with the guidance's scale and negative prompt;
  seed = cfg.seed), the reference batch of the Stable Target Field estimate (Eq. 11);
- "generated": M held-out samples of the prior (seed cfg.seed + 1), the in-distribution baseline;
- "rendered": M renders of the INITIAL 3D model (<run>/init_points3d.ply, written by form_path.py or train.py) from
  the training camera distribution (its own camera stream, so not the views the path LoRA was fitted on).
For each set, Eq. 5 per sample: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps with the same eps for both sets,
eps_pred = eps_phi(x_t, t, y) with the PLAIN prompt y and no CFG (the conditional score of p(x | y), whose samples are
the references; view prompts would condition on something the references do not have), against the STF estimate
eps_approx of the references. Measurement choices (the paper states none of them):
- space and norm: eps space (scores x -sigma_t, so every t weighs alike), per-sample L2 divided by sqrt(dim) (RMS);
- t ~ U: a grid of timesteps, one per equal-width bin (default the 10 bin centres 50, 150, ..., 950); each t is
  reported as its own bin (mean +- std over images x draws) and "overall" is the mean +- std over images of each
  image's loss averaged over the grid (the midpoint-rule estimate of E_{t ~ U}).
- network: `prior` is s_pretrain; `path` is the prior + the path LoRA at weight 1 (stage 2's network at iteration 1).
The paper's 3.234 +- 0.042 (rendered) vs 1.687 +- 0.075 (generated) are in an unstated space/norm, with SD 2.1 and
an unstated reference batch: compare our two rows with each other (their ratio, the trend over t), not with those
numbers. Outputs: <run>/probe/matching_loss_<network>.{json,md,png}; sample caches <run>/probe/{refs,gen}_<hash>.pt.
"""
from __future__ import annotations

import argparse
import sys

from arguments import Config, RunError, parse_cli, run_dir
from arguments.checks import check_timesteps
from evaluation.ood import PROBE_CAMERA_OFFSET, cached_prior_latents, matching_losses
from evaluation.plots import plot_matching_loss
from gaussian_renderer import render_views
from guidance.lora_merge import set_scale
from guidance.lora_training import METADATA_NAME
from guidance.stf import aggregate_by_timestep
from stages.run import (PATH_ADAPTER, background, initial_gaussians, load_path_lora, make_guidance, make_sampler,
                        path_lora_dir, run_entry, validate)
from utils.device import resolve_device
from utils.files import write_json_atomic, write_text_atomic
from utils.rng import seed_everything

NETWORKS = ("prior", "path")
# the paper's §3 numbers, for context only (unstated space/norm/model details)
PAPER_RENDERED, PAPER_GENERATED = (3.234, 0.042), (1.687, 0.075)


def check_inputs(cfg: Config, network: str, num_refs: int, num_generated: int, timesteps: list[int],
                 draws: int) -> None:
    """One-line errors before any model is loaded."""
    if network not in NETWORKS:
        raise RunError(f"--network '{network}' is not one of {', '.join(NETWORKS)}")
    if num_refs < 1 or num_generated < 1 or draws < 1:
        raise RunError("--num-refs, --num-generated and --draws must be >= 1")
    check_timesteps(timesteps, "--timesteps")
    if network == "path" and not (path_lora_dir(cfg) / METADATA_NAME).is_file():
        raise RunError(f"no path LoRA in {path_lora_dir(cfg)}; run form_path.py --opt CONFIG first or use "
                       f"--network prior")


def measure(cfg: Config, network: str, num_refs: int, num_generated: int, timesteps: list[int], draws: int,
            ddim_steps: int) -> dict:
    """Load, sample (cached), render, encode and measure; returns the report dict."""
    device = resolve_device(cfg.device)
    validate(cfg, device)
    seed_everything(cfg.seed)
    gaussians = initial_gaussians(cfg, device, create=False)
    guidance = make_guidance(cfg, device)
    c, folder = cfg.GenerateCamParams, run_dir(cfg) / "probe"
    refs = cached_prior_latents(folder, guidance, num_refs, cfg.seed, c.image_h, c.image_w, ddim_steps, "refs")
    generated = cached_prior_latents(folder, guidance, num_generated, cfg.seed + 1, c.image_h, c.image_w,
                                     ddim_steps, "gen")
    # M renders of the initial model from the training camera distribution (the probe's own camera stream)
    views = make_sampler(cfg, device, seed_offset=PROBE_CAMERA_OFFSET).next_views(num_generated)
    rendered = guidance.encode(render_views(views, gaussians, background(cfg, device), cfg.PipelineParams.backend),
                               mean=True)
    if network == "path":  # stage 2's network at iteration 1: the prior + the path LoRA at weight 1
        load_path_lora(cfg, guidance)
        set_scale(guidance.unet, 1.0, PATH_ADAPTER)
    emb = guidance.embeddings["text"]
    rows = {}
    for name, x0 in (("rendered", rendered), ("generated", generated)):  # the same eps for both sets (same seed)
        rows[name] = aggregate_by_timestep(matching_losses(guidance, x0, refs, timesteps, emb, cfg.seed, draws),
                                           timesteps)
    return {"prompt": cfg.GuidanceParams.text, "model": cfg.GuidanceParams.model_key, "network": network,
            "num_refs": num_refs, "num_generated": num_generated, "draws": draws, "ddim_steps": ddim_steps,
            "timesteps": list(timesteps), "space": "eps", "norm": "per-sample L2 / sqrt(dim) (RMS)",
            "embedding": "plain prompt, no CFG", "rows": rows}


def markdown(report: dict) -> str:
    rend, gen = report["rows"]["rendered"], report["rows"]["generated"]

    def cell(d: dict) -> str:
        return f"{d['mean']:.4f} ± {d['std']:.4f}"
    lines = [f"# Matching loss (paper Eq. 5), network: {report['network']}", "",
             f"prompt: {report['prompt']}  ", f"model: {report['model']}; {report['num_refs']} reference samples, "
             f"{report['num_generated']} generated / rendered images x {report['draws']} noise draws  ",
             f"space: {report['space']}, norm: {report['norm']}, eps_pred: {report['embedding']}", "",
             "| t | rendered | generated | rendered / generated |", "|---|---|---|---|"]
    for r, g in zip(rend["by_t"], gen["by_t"]):
        lines.append(f"| {r['t']} | {cell(r)} | {cell(g)} | {r['mean'] / max(g['mean'], 1e-12):.3f} |")
    ratio = rend["overall"]["mean"] / max(gen["overall"]["mean"], 1e-12)
    lines += [f"| overall (t ~ U) | {cell(rend['overall'])} | {cell(gen['overall'])} | {ratio:.3f} |", "",
              f"For context only, the paper's §3 reports {PAPER_RENDERED[0]} ± {PAPER_RENDERED[1]} (rendered) vs "
              f"{PAPER_GENERATED[0]} ± {PAPER_GENERATED[1]} (generated) in an unstated space and norm: not directly "
              "comparable with the numbers above.", ""]
    return "\n".join(lines)


def main(cfg: Config, *, network: str = "prior", num_refs: int | None = None, num_generated: int = 16,
         timesteps: list[int] | None = None, draws: int = 1, ddim_steps: int | None = None) -> dict:
    """Run the probe; writes <run>/probe/matching_loss_<network>.{json,md,png} and returns the report."""
    e = cfg.EvalParams
    num_refs = e.probe_num_refs if num_refs is None else int(num_refs)
    timesteps = list(e.probe_timesteps if timesteps is None else timesteps)
    ddim_steps = e.probe_ddim_steps if ddim_steps is None else int(ddim_steps)
    check_inputs(cfg, network, num_refs, num_generated, timesteps, draws)
    report = measure(cfg, network, num_refs, num_generated, timesteps, draws, ddim_steps)
    folder = run_dir(cfg) / "probe"
    write_json_atomic(folder / f"matching_loss_{network}.json", report)
    text = markdown(report)
    write_text_atomic(folder / f"matching_loss_{network}.md", text)
    plot_matching_loss(report, folder / f"matching_loss_{network}.png")
    print(text)
    return report


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


def cli(argv=None) -> int:
    parser = argparse.ArgumentParser(description="OOD probe: matching loss (paper Eq. 5) on renders vs samples")
    parser.add_argument("--network", default="prior", choices=NETWORKS,
                        help="prior: s_pretrain; path: prior + path LoRA at weight 1 (stage 2 at iteration 1)")
    parser.add_argument("--num-refs", type=int, default=None, help="reference samples (default EvalParams)")
    parser.add_argument("--num-generated", type=int, default=16, help="held-out samples and renders, each")
    parser.add_argument("--timesteps", type=_int_list, default=None,
                        help="comma-separated timestep grid, e.g. 50,150,250 (default EvalParams.probe_timesteps)")
    parser.add_argument("--draws", type=int, default=1, help="noise draws per image and timestep")
    parser.add_argument("--ddim-steps", type=int, default=None, help="DDIM steps of the sampling (default EvalParams)")
    cfg, args = parse_cli(argv, parser)
    return run_entry(main, cfg, network=args.network, num_refs=args.num_refs, num_generated=args.num_generated,
                     timesteps=args.timesteps, draws=args.draws, ddim_steps=args.ddim_steps)


if __name__ == "__main__":
    sys.exit(cli())
