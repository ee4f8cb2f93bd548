"""Run a benchmark: every (prompt, arm, seed) of a prompt list as an independent job, on Ray or one after another.

    python batch.py --prompts FILE.txt|FILE.json:KEY --opt configs/x.yaml [Section.key=value ...]
                    [--arms vanilla,ptd] [--arm NAME Section.key=value ...] [--seeds 0,1 | 0-4] [--out DIR]
                    [--address auto|ray://HOST:10001 | --local] [--workers N] [--cpus-per-job N]
                    [--gpus-per-job N|0.25] [--max-retries 3] [--clip-models NAME:PRETRAINED,...|tiny|none]
                    [--clip-resolution 512] [--baseline ARM] [--limit N] [--list]

Each job (jobs/job.py) runs form_path (PTD arms) + train + evaluate --matching-loss in its own workspace
<out>/runs/<prompt>__<arm>__s<seed>__<config hash>. Jobs are Ray tasks (one GPU each when the cluster has GPUs, or
--gpus-per-job: 0.25 packs four on a GPU; else --cpus-per-job CPUs) on the cluster at --address, or on a local Ray
instance sized to this machine (--workers caps it); --local runs them one after another in this process, without Ray.
A finished job (done marker) is skipped, an interrupted one resumes from its checkpoint (Ray retries a job whose stage
was killed; a rerun of the same command resumes the rest), and a failing job is reported, never stops the batch. Arms:
vanilla (PTDParams.mode=off, stock LucidDreamer), ptd (mode=weighted), ptd-checkpoints, or any `--arm NAME
overrides...` (its overrides end at the next option; the batch-wide overrides go right after --opt). Writes
<out>/results.csv, results.md (per job, the A/B summary, the paper's Table 1 beside it), results.json and gallery.html
(each prompt's arms' 360-degree videos side by side with their numbers; self-contained, open it as a file). Exit code
0 when every job is done, 1 when some failed.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from arguments import Config, RunError, parse_cli, run_dir
from evaluation.clip import PAPER_MODELS, parse_clip_models
from jobs.job import (PROJECT_ROOT, JobInterrupted, done_row, evaluation_settings, failed_row, lost_row, make_jobs,
                     parse_arms, parse_seeds, run_job, running_jobs)
from jobs.report import summarize, write_results
from jobs.resources import gpu_slots, jobs_per_gpu, parse_gpus_per_job
from stages.run import check_writable, run_entry
from utils.prompts import read_prompts


@dataclass
class BatchOptions:
    """What a batch runs and how (the command-line flags; `batch.py --help` says what each means)."""
    prompts: str
    opt: str | None = None
    overrides: list[str] = dataclasses.field(default_factory=list)
    arms: str | None = None
    arm: list[list[str]] | None = None
    seeds: str | None = None
    out: str | None = None
    address: str | None = None
    local: bool = False
    workers: int | None = None
    cpus_per_job: int | None = None
    gpus_per_job: float | None = None  # a share of one GPU (0.25) or whole GPUs, as Ray's num_gpus
    max_retries: int = 3
    clip_models: str = ",".join(f"{n}:{p}" for n, p in PAPER_MODELS)
    clip_resolution: int = 512
    baseline: str | None = None
    limit: int | None = None
    list_only: bool = False  # --list


def plan(cfg: Config, options: BatchOptions) -> tuple[Path, list]:
    """The output folder and the job list."""
    if not (PROJECT_ROOT / "train.py").is_file():
        raise RunError(f"the stage scripts are not beside the installed packages ({PROJECT_ROOT}); run batch.py from "
                       f"a checkout installed with `pip install -e .`")
    prompts = read_prompts(options.prompts, keep_empty=True)[:options.limit]
    arms = parse_arms(options.arms, options.arm)
    seeds = parse_seeds(options.seeds) if options.seeds else [cfg.seed]
    if options.baseline is not None and options.baseline not in arms:
        raise RunError(f"--baseline '{options.baseline}' is not one of the arms ({', '.join(arms)})")
    out = Path(options.out) if options.out else run_dir(cfg).parent / f"batch_{Path(options.opt or 'defaults').stem}"
    out = out.resolve()  # Ray workers on other nodes do not start in this folder
    check_writable(out)
    return out, make_jobs(cfg, prompts, arms, seeds, out / "runs")


def one_line(err: BaseException) -> str:
    """A Ray error (which carries the remote traceback) or any other error as one line."""
    cause = getattr(err, "cause", None) or err
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"


def run_local(jobs: list, options: BatchOptions, threads: int, bar) -> dict:
    """The jobs one after another in this process; an interrupted job is retried (resumed) up to --max-retries."""
    rows = {}

    def show(running: int) -> None:
        bar.set_postfix(running=running, failed=sum(r["status"] == "failed" for r in rows.values()))

    for job in jobs:
        show(1)
        for attempt in range(options.max_retries + 1):
            try:
                rows[job.name] = run_job(job, options.clip_models, options.clip_resolution, threads)
                break
            except JobInterrupted as err:
                rows[job.name] = failed_row(job, f"{err} (after {attempt + 1} attempts)")
            except Exception as err:  # noqa: BLE001 - e.g. the disk filled up: this job failed, the batch goes on
                rows[job.name] = failed_row(job, one_line(err))
                break
        bar.update(1)
    show(0)
    return rows


def start_ray(options: BatchOptions):
    try:
        import ray
    except ImportError:
        raise RunError("Ray is not installed; pip install '.[batch]' (or 'ray>=2.9'), or run with --local") from None
    try:
        if options.address:
            ray.init(address=options.address, log_to_driver=False)
        else:  # a new instance, even when RAY_ADDRESS or a `ray start` cluster exists on this machine
            workers = options.workers * (options.cpus_per_job or 1) if options.workers else None
            ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False)
    except ConnectionError as err:
        raise RunError(f"cannot reach the Ray cluster at --address {options.address} ({err}); start it with "
                       f"`ray start` or drop --address for a local instance") from None
    return ray


def job_resources(cluster: dict, options: BatchOptions) -> tuple[int, float]:
    """(CPUs, GPUs) of one job: one GPU each when the cluster has GPUs, unless --gpus-per-job says otherwise (a
    share of a GPU, or whole GPUs)."""
    gpus = options.gpus_per_job if options.gpus_per_job is not None else int(cluster.get("GPU", 0) >= 1)
    cpus = options.cpus_per_job or 1
    if (gpus and not gpu_slots(int(cluster.get("GPU", 0)), gpus)) or cpus > cluster.get("CPU", 0):
        raise RunError(f"a job asks for {cpus} CPUs and {gpus} GPUs but the Ray cluster has {cluster.get('CPU', 0):g} "
                       f"CPUs and {cluster.get('GPU', 0):g} GPUs; lower --cpus-per-job/--gpus-per-job")
    return cpus, gpus


def jobs_at_once(cluster: dict, cpus: int, gpus: float) -> int:
    """How many jobs of (cpus, gpus) the cluster runs at once, its resources counted as one machine's (across nodes,
    an upper bound): a share f of a GPU puts floor(1 / f) jobs on each GPU."""
    by_cpus = int(cluster.get("CPU", 0)) // cpus
    return min(by_cpus, len(gpu_slots(int(cluster.get("GPU", 0)), gpus))) if gpus else by_cpus


def run_ray(jobs: list, options: BatchOptions, runs_root: Path, bar) -> dict:
    """The jobs as Ray tasks; Ray retries a task whose stage was killed (JobInterrupted) or whose worker died."""
    ray = start_ray(options)
    try:
        cluster = ray.cluster_resources()
        cpus, gpus = job_resources(cluster, options)
        print(f"Ray: {cpus} CPUs and {gpus:g} GPUs per job, at most {jobs_at_once(cluster, cpus, gpus)} jobs at once"
              + (f" ({jobs_per_gpu(gpus)} per GPU)" if 0 < gpus < 1 else ""), file=sys.stderr)
        task = ray.remote(run_job).options(num_cpus=cpus, num_gpus=gpus, max_retries=options.max_retries,
                                           retry_exceptions=[JobInterrupted])
        started = time.time()
        pending = {task.remote(job, options.clip_models, options.clip_resolution, cpus): job for job in jobs}
        rows, shown = {}, None
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=2.0)
            for ref in ready:
                job = pending.pop(ref)
                try:
                    rows[job.name] = ray.get(ref)
                except Exception as err:  # noqa: BLE001 - retries exhausted, worker or node lost: the job failed
                    rows[job.name] = lost_row(job, one_line(err), runs_root)
            bar.update(len(ready))
            counts = {"running": running_jobs(list(pending.values()), runs_root, started),
                      "failed": sum(r["status"] == "failed" for r in rows.values())}
            if counts != shown:
                bar.set_postfix(counts)
                shown = counts
        return rows
    finally:
        ray.shutdown()


def main(cfg: Config, options: BatchOptions) -> int:
    """Run (or list) the batch; returns the exit code (0: every job done, 1: some failed)."""
    from tqdm import tqdm

    out, jobs = plan(cfg, options)
    runs_root = out / "runs"
    evaluation = evaluation_settings(options.clip_models, options.clip_resolution)
    finished = {job.name: row for job in jobs if (row := done_row(job, runs_root, evaluation))}
    todo = [job for job in jobs if job.name not in finished]
    arms = list(dict.fromkeys(job.arm for job in jobs))
    print(f"batch: {len(jobs)} jobs ({len({j.prompt for j in jobs})} prompts x {len(arms)} arms x "
          f"{len({j.seed for j in jobs})} seeds) in {out}; {len(finished)} done before, {len(todo)} to run"
          + ("" if not todo else " (locally, one at a time)" if options.local else " on Ray"))
    if options.list_only:
        for job in jobs:
            print(f"{'done' if job.name in finished else 'todo'}  {job.name}")
        return 0
    rows = dict(finished)
    if todo:
        threads = options.cpus_per_job or os.cpu_count() or 1  # --local; on Ray a job's threads are its CPUs
        with tqdm(total=len(todo), desc="batch", unit="job", file=sys.stderr) as bar:
            try:
                rows.update(run_local(todo, options, threads, bar) if options.local
                            else run_ray(todo, options, runs_root, bar))
            except KeyboardInterrupt:
                print(f"\ninterrupted; rerun the same command to resume ({out})", file=sys.stderr)
                raise
    ordered = [rows[job.name] for job in jobs]
    summary = summarize(ordered, arms, options.baseline)
    header = [f"# Batch results: {len(jobs)} jobs", "",
              f"config: {options.opt} {' '.join(options.overrides)}".rstrip() + f"; arms: {', '.join(arms)}; written "
              f"{time.strftime('%Y-%m-%d %H:%M')}; CLIP: {options.clip_models}, {options.clip_resolution} px"]
    write_results(out, ordered, summary, header)
    failed = [row for row in ordered if row["status"] != "done"]
    print(f"results: {out / 'results.md'} (+ results.csv, results.json, gallery.html); "
          f"{len(ordered) - len(failed)} done, {len(failed)} failed")
    for row in failed:
        print(f"failed: {row['job']}: {row['error']}", file=sys.stderr)
    return 1 if failed else 0


def _gpus_per_job(text: str) -> float:
    try:
        return parse_gpus_per_job(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None  # argparse shows the reason, not "invalid value"


def cli(argv=None) -> int:
    parser = argparse.ArgumentParser(description="run a prompt list x arms x seeds as independent jobs (Ray)")
    parser.add_argument("--prompts", required=True, help="FILE.txt (one per line) or FILE.json:KEY (threestudio's "
                        "load/prompt_library.json:dreamfusion: the paper's 415)")
    parser.add_argument("--arms", default=None, help="comma-separated arms (default vanilla,ptd)")
    parser.add_argument("--arm", nargs="+", action="append", metavar="NAME_OR_OVERRIDE",
                        help="define an arm: NAME Section.key=value ...")
    parser.add_argument("--seeds", default=None, help="e.g. 0,1,2 or 0-4 (default: the config's seed)")
    parser.add_argument("--out", default=None, help="batch folder (default <output_root>/batch_<config name>)")
    parser.add_argument("--address", default=None, help="an existing Ray cluster ('auto' or ray://HOST:10001); "
                        "default: a local Ray instance")
    parser.add_argument("--local", action="store_true", help="no Ray: run the jobs one after another here")
    parser.add_argument("--workers", type=int, default=None, help="local Ray instance: at most N jobs at once")
    parser.add_argument("--cpus-per-job", type=int, default=None,
                        help="CPUs (and torch threads) per job (default 1 on Ray, all cores with --local)")
    parser.add_argument("--gpus-per-job", type=_gpus_per_job, default=None,
                        help="Ray's num_gpus of a job: a share of one GPU (0.25: four jobs per GPU), whole GPUs "
                        "(2) or 0 (none); default 1 when the cluster has GPUs, else 0")
    parser.add_argument("--max-retries", type=int, default=BatchOptions.max_retries,
                        help="retries of a job whose stage was killed")
    parser.add_argument("--clip-models", default=BatchOptions.clip_models,
                        help="NAME:PRETRAINED,... (default the paper's ViT-L/14 and "
                        "ViT-bigG-14), 'tiny' (offline toy scorer) or 'none'")
    parser.add_argument("--clip-resolution", type=int, default=BatchOptions.clip_resolution,
                        help="render size of the 16 CLIP views")
    parser.add_argument("--baseline", default=None, help="arm the others are compared with (default the first)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    parser.add_argument("--list", dest="list_only", action="store_true",
                        help="list the jobs and whether they are done; run nothing")
    cfg, args = parse_cli(argv, parser)
    if args.local and args.address:
        parser.error("--local runs without Ray; drop --address")
    if min(v for v in (args.workers, args.cpus_per_job, args.limit, 1) if v is not None) < 1 or \
            args.max_retries < 0:
        parser.error("--workers, --cpus-per-job and --limit must be >= 1; --max-retries >= 0")
    if args.local and args.gpus_per_job is not None:
        parser.error("--gpus-per-job is Ray's share of a GPU per job; --local runs one job at a time on this "
                     "machine's devices: drop it")
    if (args.local or args.address) and args.workers:
        parser.error("--workers sizes the local Ray instance; it has no effect with --local or --address")
    if args.clip_resolution < 1:
        parser.error("--clip-resolution must be >= 1 (the paper's protocol: 512)")
    try:  # checked now, not after hours of training
        parse_clip_models(args.clip_models)
    except ValueError as err:
        parser.error(str(err))
    options = BatchOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BatchOptions)})
    status: list[int] = []
    code = run_entry(lambda: status.append(main(cfg, options)))
    return code or (status[0] if status else 1)


if __name__ == "__main__":
    sys.exit(cli())
