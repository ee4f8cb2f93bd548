"""Out-of-distribution probe (paper §3, Eq. 5, App. G): is the prior's score worse on renders than on its own samples?

    python probe_ood.py --opt configs/x.yaml [--network prior|path] [--num-refs N] [--num-generated M]
                        [--timesteps 50,150,...] [--draws K] [--ddim-steps S] [--space eps|score] [--no-normalize]
                        [--raw] [Section.key=value ...]

Three sets of clean latents x_0, all reaching the latent space through the same VAE encoder (posterior mean):
- references x_0^ref: n samples for the prompt (DDIM, CFG with the guidance's scale and negative prompt; seed =
  cfg.seed) of the prior, or with EvalParams.probe_refs=current of the probed network (App. H), the reference batch
  of the Stable Target Field estimate (Eq. 11);
- "generated": M held-out samples of the prior (seed cfg.seed + 1), the in-distribution baseline;
- "rendered": M renders of the INITIAL 3D model (<run>/init_points3d.ply, written by form_path.py or train.py, or
  built here for --network prior) from the training camera distribution (its own camera stream, so not the views the
  path LoRA was fitted on).
For each set, Eq. 5 per sample: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps with the same eps for both sets,
eps_pred = eps_phi(x_t, t, y) with the PLAIN prompt y and no CFG (the conditional score of p(x | y), whose samples are
the references; view prompts would condition on something the references do not have), against the STF estimate
eps_approx of the references. Measurement choices (the paper states none of them):
- the reference set, BOTH readings side by side: "refs only" (Eq. 11 as written: the n references) and "self incl."
  (Xu et al.'s STF: each scored x_0 also in its own set); `rows` of the JSON is EvalParams.probe_include_self's;
- space and norm: eps space (scores x -sigma_t, so every t weighs alike), per-sample L2 divided by sqrt(dim) (RMS);
  `--space score --no-normalize` (or `--raw`) gives the raw score-space L2 of Eq. 5, written with suffix _score_raw;
- t ~ U: a grid of timesteps, one per equal-width bin (default the 10 bin centres 50, 150, ..., 950); each t is
  reported as its own bin (mean +- std over images x draws) and "overall" is the mean +- std over images of each
  image's loss averaged over the grid (the midpoint-rule estimate of E_{t ~ U}).
- network: `prior` is s_pretrain; `path` is the prior + the path LoRA at weight 1 (stage 2's network at iteration 1).
The paper's 3.234 +- 0.042 (rendered) vs 1.687 +- 0.075 (generated) are in an unstated space/norm, with SD 2.1 and
an unstated reference batch: compare our two rows with each other (their ratio, the trend over t), not with those
numbers. Outputs: <run>/probe/matching_loss_<network>[_<space>[_raw]].{json,md,png} (no suffix for eps + RMS);
sample caches <run>/probe/{refs,gen}_<hash>.pt.
"""
from __future__ import annotations

import argparse
import sys

from arguments import Config, RunError, parse_cli, run_dir
from arguments.checks import check_timesteps
from evaluation.ood import (PROBE_CAMERA_OFFSET, READINGS, cached_prior_latents, matching_losses_by_reading,
                            reading_name)
from evaluation.plots import plot_matching_loss
from gaussian_renderer import render_views
from guidance.lora_merge import set_scale
from guidance.lora_training import METADATA_NAME
from guidance.stf import aggregate_by_timestep
from stages.run import (PATH_ADAPTER, background, initial_model, load_path_lora, make_guidance, make_sampler,
                        path_lora_dir, run_entry, validate)
from utils.device import resolve_device
from utils.files import write_json_atomic, write_text_atomic
from utils.rng import seed_everything

NETWORKS = ("prior", "path")
SPACES = ("eps", "score")
READING_LABELS = {"refs_only": "refs only", "self_included": "self incl."}
# the paper's §3 numbers, for context only (unstated space/norm/model details)
PAPER_RENDERED, PAPER_GENERATED = (3.234, 0.042), (1.687, 0.075)


def check_inputs(cfg: Config, network: str, num_refs: int, num_generated: int, timesteps: list[int],
                 draws: int, space: str = "eps") -> None:
    """One-line errors before any model is loaded."""
    if network not in NETWORKS:
        raise RunError(f"--network '{network}' is not one of {', '.join(NETWORKS)}")
    if space not in SPACES:
        raise RunError(f"--space '{space}' is not one of {', '.join(SPACES)}")
    if num_refs < 1 or num_generated < 1 or draws < 1:
        raise RunError("--num-refs, --num-generated and --draws must be >= 1")
    check_timesteps(timesteps, "--timesteps")
    if network == "path" and not (path_lora_dir(cfg) / METADATA_NAME).is_file():
        raise RunError(f"no path LoRA in {path_lora_dir(cfg)}; run form_path.py --opt CONFIG first or use "
                       f"--network prior")


def norm_label(normalize: bool) -> str:
    """The report's wording of `normalize`."""
    return "per-sample L2 / sqrt(dim) (RMS)" if normalize else "per-sample L2 (raw, no sqrt(dim) normalisation)"


def output_stem(network: str, space: str, normalize: bool) -> str:
    """matching_loss_<network>, suffixed _<space>[_raw] unless eps space + RMS (the default)."""
    suffix = "" if (space, normalize) == ("eps", True) else f"_{space}" + ("" if normalize else "_raw")
    return f"matching_loss_{network}{suffix}"


def measure(cfg: Config, network: str, num_refs: int, num_generated: int, timesteps: list[int], draws: int,
            ddim_steps: int, space: str = "eps", normalize: bool = True) -> dict:
    """Load, sample (cached), render, encode and measure; returns the report dict."""
    device = resolve_device(cfg.device)
    validate(cfg, device)
    # Gaussians or a NeRF (ModelParams.representation): the run's own initial model; for the prior alone, built (the
    # same seeded one form_path.py and train.py build) where no stage has run yet; then the seed, either way alike
    gaussians = initial_model(cfg, device, create=network == "prior")
    seed_everything(cfg.seed)
    guidance = make_guidance(cfg, device)
    c, folder = cfg.GenerateCamParams, run_dir(cfg) / "probe"
    generated = cached_prior_latents(folder, guidance, num_generated, cfg.seed + 1, c.image_h, c.image_w,
                                     ddim_steps, "gen")
    # M renders of the initial model from the training camera distribution (the probe's own camera stream)
    views = make_sampler(cfg, device, seed_offset=PROBE_CAMERA_OFFSET).next_views(num_generated)
    rendered = guidance.encode(render_views(views, gaussians, background(cfg, device), cfg.PipelineParams.backend),
                               mean=True)
    if network == "path":  # stage 2's network at iteration 1: the prior + the path LoRA at weight 1
        load_path_lora(cfg, guidance)
        set_scale(guidance.unet, 1.0, PATH_ADAPTER)
    # the references, of the prior or (probe_refs=current) of the network probed; "generated" stays the prior's
    refs = cached_prior_latents(folder, guidance, num_refs, cfg.seed, c.image_h, c.image_w, ddim_steps, "refs",
                                cfg.EvalParams.probe_refs)
    emb = guidance.embeddings["text"]
    by_reading = {name: {} for name in READINGS}
    for name, x0 in (("rendered", rendered), ("generated", generated)):  # the same eps for both sets (same seed)
        losses = matching_losses_by_reading(guidance, x0, refs, timesteps, emb, cfg.seed, draws,
                                            readings=tuple(READINGS.values()), space=space, normalize=normalize)
        for reading, include_self in READINGS.items():
            by_reading[reading][name] = aggregate_by_timestep(losses[include_self], timesteps)
    default = reading_name(cfg.EvalParams.probe_include_self)
    return {"prompt": cfg.GuidanceParams.text, "model": cfg.GuidanceParams.model_key, "network": network,
            "num_refs": num_refs, "refs": cfg.EvalParams.probe_refs, "num_generated": num_generated, "draws": draws,
            "ddim_steps": ddim_steps, "timesteps": list(timesteps), "space": space, "normalize": normalize,
            "norm": norm_label(normalize), "embedding": "plain prompt, no CFG", "reading": default,
            "rows": by_reading[default], "rows_by_reading": by_reading}


def markdown(report: dict) -> str:
    """Both readings of the reference set side by side: per timestep and overall, rendered / generated / ratio."""
    readings = list(report["rows_by_reading"])

    def cell(d: dict) -> str:
        return f"{d['mean']:.4f} ± {d['std']:.4f}"

    def cells(rows: dict, pick) -> list[str]:
        r, g = pick(rows["rendered"]), pick(rows["generated"])
        return [cell(r), cell(g), f"{r['mean'] / max(g['mean'], 1e-12):.3f}"]
    space = "eps (scores x -sigma_t)" if report["space"] == "eps" else "score"
    lines = [f"# Matching loss (paper Eq. 5), network: {report['network']}", "",
             f"prompt: {report['prompt']}  ", f"model: {report['model']}; {report['num_refs']} reference samples of "
             f"the {'prior' if report['refs'] == 'prior' else 'probed network'}, {report['num_generated']} generated "
             f"/ rendered images x {report['draws']} noise draws  ",
             f"space: {space}, norm: {report['norm']}, eps_pred: {report['embedding']}  ",
             "readings of the STF reference set: refs only = the n references (App. G, Eq. 11 as written); self "
             "incl. = each scored x_0 also in its own set (Xu et al.'s STF). EvalParams.probe_include_self (monitor, "
             f"evaluate.py) uses: {READING_LABELS[report['reading']]}", "",
             "| t | " + " | ".join(f"rendered ({READING_LABELS[k]}) | generated ({READING_LABELS[k]}) | "
                                   f"ratio ({READING_LABELS[k]})" for k in readings) + " |",
             "|---|" + "---|---|---|" * len(readings)]
    by = report["rows_by_reading"]
    for i, t in enumerate(report["timesteps"]):
        row = [c for k in readings for c in cells(by[k], lambda d: d["by_t"][i])]
        lines.append(f"| {t} | " + " | ".join(row) + " |")
    row = [c for k in readings for c in cells(by[k], lambda d: d["overall"])]
    lines += ["| overall (t ~ U) | " + " | ".join(row) + " |", "",
              f"For context only, the paper's §3 reports {PAPER_RENDERED[0]} ± {PAPER_RENDERED[1]} (rendered) vs "
              f"{PAPER_GENERATED[0]} ± {PAPER_GENERATED[1]} (generated) in an unstated space, norm and reading: not "
              "directly comparable with the numbers above.", ""]
    return "\n".join(lines)


def main(cfg: Config, *, network: str = "prior", num_refs: int | None = None, num_generated: int = 16,
         timesteps: list[int] | None = None, draws: int = 1, ddim_steps: int | None = None, space: str = "eps",
         normalize: bool = True) -> dict:
    """Run the probe; writes <run>/probe/<output_stem>.{json,md,png} and returns the report."""
    e = cfg.EvalParams
    num_refs = e.probe_num_refs if num_refs is None else int(num_refs)
    timesteps = list(e.probe_timesteps if timesteps is None else timesteps)
    ddim_steps = e.probe_ddim_steps if ddim_steps is None else int(ddim_steps)
    check_inputs(cfg, network, num_refs, num_generated, timesteps, draws, space)
    report = measure(cfg, network, num_refs, num_generated, timesteps, draws, ddim_steps, space, normalize)
    folder, stem = run_dir(cfg) / "probe", output_stem(network, space, normalize)
    write_json_atomic(folder / f"{stem}.json", report)
    text = markdown(report)
    write_text_atomic(folder / f"{stem}.md", text)
    plot_matching_loss(report, folder / f"{stem}.png")
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
    parser.add_argument("--space", default=None, choices=SPACES,
                        help="eps (default): -sigma_t x score, every t alike; score: the scores themselves (Eq. 5)")
    parser.add_argument("--no-normalize", action="store_true",
                        help="raw per-sample L2 (default: divided by sqrt(dim), an RMS)")
    parser.add_argument("--raw", action="store_true",
                        help="the paper's raw score-space L2: --space score --no-normalize")
    cfg, args = parse_cli(argv, parser)
    if args.raw and args.space == "eps":
        print("error: --raw is --space score --no-normalize; drop --space eps", file=sys.stderr)
        return 1
    space = "score" if args.raw else (args.space or "eps")
    return run_entry(main, cfg, network=args.network, num_refs=args.num_refs, num_generated=args.num_generated,
                     timesteps=args.timesteps, draws=args.draws, ddim_steps=args.ddim_steps, space=space,
                     normalize=not (args.raw or args.no_normalize))


if __name__ == "__main__":
    sys.exit(cli())
