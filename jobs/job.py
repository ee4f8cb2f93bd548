"""One job of a batch: a (prompt, arm, seed) turned into a resolved config, run in its own workspace.

batch.py makes the job list and schedules it (Ray tasks, or one after another with --local); what a job is and does
lives here:

- A job's config is the base config + the batch's overrides + the arm's overrides, with the prompt and the seed set.
  Its workspace, <out>/runs/<prompt slug>__<arm>__s<seed>__<hash>, is named from the hash of that config (where it
  is written left out), so the same inputs always land in the same folder and different inputs never share one.
- Its stages are the project's own commands, each a child process whose output goes to <workspace>/batch_job.log:
  `form_path` (PTD arms only: stock LucidDreamer has no stage 1), `train`, then `evaluate --matching-loss`. A stage
  that finished is never run again; an interrupted one resumes from its checkpoint (form_path/train --resume).
- A stage that exits with an error (bad input: its one-line message) fails the job for good: it is reported with that
  line and the batch goes on. A stage stopped by a signal (pre-emption, the OOM killer, a lost node) raises
  `JobInterrupted`; the scheduler retries the job and the retry resumes from the checkpoint.
- <workspace>/batch_done.json is the done marker: the job's result row, written last and atomically. A job whose
  marker holds its config hash is skipped by later invocations.
"""
from __future__ import annotations

import copy
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from arguments import Config, apply_override, config_from_dict, config_to_dict, run_dir, save_config
from utils.files import FolderBusy, lock_folder, stable_hash, write_json_atomic
from utils.prompts import slugify

# the arms known by name; others are defined with --arm NAME Section.key=value ...
ARM_PRESETS = {"vanilla": ("PTDParams.mode=off",), "ptd": ("PTDParams.mode=weighted",),
               "ptd-checkpoints": ("PTDParams.mode=checkpoints",)}
DONE_MARKER = "batch_done.json"
STATUS_FILE = "batch_status.json"
JOB_CONFIG = "batch_job.yaml"
LOG_FILE = "batch_job.log"
LOCK_FILE = "batch_job.lock"
EVAL_DIR = "eval"
# the checkout: the stage commands are its entry scripts (train.py, ...), which setup.py does not install
PROJECT_ROOT = Path(__file__).resolve().parents[1]


class JobInterrupted(RuntimeError):
    """A stage was stopped from outside (signal): retrying the job resumes it from its checkpoint."""


class JobFailed(RuntimeError):
    """A stage exited with an error: retrying would fail the same way. The message is the stage's error line."""


@dataclass(frozen=True)
class Job:
    name: str      # workspace folder name (deterministic from `key`)
    prompt: str
    arm: str
    seed: int
    key: str       # hash of the resolved config, output location left out
    config: dict   # the resolved config (arguments.config_to_dict), output_root and workspace set


# ------------------------------------------------------------------------------------------------- the job list
def parse_arms(names: str | None, custom: list[list[str]] | None = None) -> dict[str, tuple[str, ...]]:
    """The batch's arms, name -> overrides.

    Args:
        names: comma-separated arm names (default: the --arm ones if any, else vanilla,ptd).
        custom: each [NAME, Section.key=value, ...] from --arm; may redefine a preset.
    """
    defined = dict(ARM_PRESETS)
    for item in custom or []:
        name, overrides = item[0], tuple(item[1:])
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise ValueError(f"arm name '{name}' must be letters, digits, '_', '.' or '-' (it names folders)")
        if not overrides or any("=" not in o for o in overrides):
            raise ValueError(f"--arm {name}: give one or more Section.key=value overrides after the name, e.g. "
                             f"--arm {name} PTDParams.mode=weighted PTDParams.total_steps=500")
        defined[name] = overrides
    if names:
        chosen = [n.strip() for n in names.split(",") if n.strip()]
    else:
        chosen = [item[0] for item in custom] if custom else ["vanilla", "ptd"]
    for name in chosen:
        if name not in defined:
            raise ValueError(f"arm '{name}' is not defined; use {', '.join(ARM_PRESETS)} or define it with "
                             f"--arm {name} Section.key=value ...")
    if not chosen or len(set(chosen)) != len(chosen):
        raise ValueError(f"--arms '{names}' must name each arm once, e.g. --arms vanilla,ptd")
    unused = [item[0] for item in custom or [] if item[0] not in chosen]
    if unused:
        raise ValueError(f"--arm {unused[0]} is defined but not in --arms '{names}'; add it (--arms "
                         f"{','.join(chosen + unused)}) or drop its --arm")
    return {name: defined[name] for name in chosen}


def parse_seeds(spec: str) -> list[int]:
    """'0,1,2' | '0-4' | '0-2,7' -> sorted distinct seeds."""
    seeds: set[int] = set()
    for part in (p.strip() for p in spec.split(",")):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match or (match.group(2) and int(match.group(2)) < int(match.group(1))):
            raise ValueError(f"--seeds '{spec}': expected integers and ranges like 0,1,2 or 0-4")
        seeds.update(range(int(match.group(1)), int(match.group(2) or match.group(1)) + 1))
    return sorted(seeds)


def config_key(cfg: Config) -> str:
    """Hash of everything a job's result depends on: the resolved config without where it is written."""
    data = config_to_dict(cfg)
    for name in ("output_root", "workspace"):
        data["ModelParams"].pop(name)
    return stable_hash(data)


def job_name(prompt: str, arm: str, seed: int, key: str) -> str:
    return f"{slugify(prompt, 40)}__{arm}__s{seed}__{key[:8]}"


def make_jobs(base: Config, prompts: list[str], arms: dict[str, tuple[str, ...]], seeds: list[int],
              runs_root: Path) -> list[Job]:
    """One job per (prompt, arm, seed), in that nesting order; a repeated prompt gives no second job."""
    jobs: dict[str, Job] = {}
    for prompt in prompts:
        for arm, overrides in arms.items():
            for seed in seeds:
                cfg = copy.deepcopy(base)
                for override in overrides:
                    apply_override(cfg, override)
                if cfg.PTDParams.path_lora:
                    raise ValueError(f"PTDParams.path_lora is set ('{cfg.PTDParams.path_lora}', arm {arm}); every "
                                     f"batch job forms its own path: remove it from the config and the arm")
                cfg.seed, cfg.GuidanceParams.text = seed, prompt
                key = config_key(cfg)
                name = job_name(prompt, arm, seed, key)
                cfg.ModelParams.output_root, cfg.ModelParams.workspace = str(runs_root), name
                jobs.setdefault(name, Job(name, prompt, arm, seed, key, config_to_dict(cfg)))
    return list(jobs.values())


def read_json(path: Path) -> dict | None:
    """A JSON file's content, or None when it is missing or torn."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def evaluation_settings(clip_models: str, clip_resolution: int) -> dict:
    return {"clip_models": clip_models, "clip_resolution": int(clip_resolution)}


def done_row(job: Job, runs_root: Path, evaluation: dict | None = None) -> dict | None:
    """The job's result row when its done marker exists and was written for this very config (and, when given, these
    evaluation settings: other CLIP models re-run only the evaluate stage)."""
    row = read_json(runs_root / job.name / DONE_MARKER)
    if not row or row.get("key") != job.key or row.get("status") != "done":
        return None
    return row if evaluation is None or row.get("evaluation") == evaluation else None


# ------------------------------------------------------------------------------------------------- one job
def stage_argv(stage: str, cfg: Config, folder: Path, clip_models: str, clip_resolution: int) -> list[str]:
    """The module and arguments of a stage; train resumes when the workspace holds a checkpoint of it."""
    opt = ["--opt", str(folder / JOB_CONFIG)]
    if stage == "form_path":
        return ["form_path", *opt, "--resume", "--overwrite"]
    if stage == "train":
        resume = any((folder / "checkpoints").glob("iteration_*.pt"))
        return ["train", *opt, "--resume" if resume else "--overwrite"]
    return ["evaluate", str(folder), "--matching-loss", "--clip-models", clip_models, "--resolution",
            str(clip_resolution), "--out", str(folder / EVAL_DIR), "--device", cfg.device,
            "--backend", cfg.PipelineParams.backend]


def job_stages(cfg: Config) -> list[str]:
    return (["form_path"] if cfg.PTDParams.mode != "off" else []) + ["train", "evaluate"]


def stop_with_parent() -> Callable[[], None]:
    """A pre-exec hook (Linux): the stage gets SIGINT when the job's process dies (train then checkpoints and exits),
    never orphaned. Ray blocks SIGINT in its processes and the mask survives exec: the hook unblocks it and restores
    its default action. libc is resolved here, in the parent, not between fork and exec."""
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def hook() -> None:  # pragma: no cover - runs in the child between fork and exec
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        prctl(1, signal.SIGINT)  # 1 = PR_SET_PDEATHSIG
    return hook


def error_line(text: str) -> str | None:
    """The last 'error: ...' line a stage printed (our commands print exactly one on bad input)."""
    lines = [line for line in text.splitlines() if line.startswith("error: ")]
    return lines[-1][len("error: "):].strip() if lines else None


def run_stage(argv: list[str], log_path: Path, threads: int, on_start: Callable[[int], None]) -> None:
    """Run `python -m <argv>` with its output appended to the log; raise JobInterrupted or JobFailed unless it
    exits 0."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    with open(log_path, "a") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} python -m {' '.join(argv)}\n")
        log.flush()
        start = log.tell()
        proc = subprocess.Popen([sys.executable, "-m", *argv], stdout=log, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=stop_with_parent() if sys.platform.startswith("linux") else None)
        on_start(proc.pid)
        code = proc.wait()
    if code == 0:
        return
    if code < 0 or code in (130, 137, 143):  # a signal (or Python's exit code after SIGINT/SIGKILL/SIGTERM)
        raise JobInterrupted(f"{argv[0]} was stopped (exit {code}); a retry or the next batch run resumes it")
    with open(log_path) as log:
        log.seek(start)
        message = error_line(log.read())
    raise JobFailed(f"{argv[0]}: {message or f'exited with code {code}; see {log_path}'}")


def lock_job(folder: Path):
    """An exclusive lock on the job's workspace (flock on LOCK_FILE), held while the returned file is open; the
    kernel drops it when this process dies, SIGKILL included, and the stages (started with close_fds) never hold it.
    Raises JobFailed when another live process holds it: two batches writing the same --out at once."""
    try:
        return lock_folder(folder, LOCK_FILE)
    except FolderBusy as err:
        raise JobFailed(f"another process is running this job ({err}: two batches with the same --out at once?); "
                        f"let it finish, then run this batch again") from None


def run_job(job: Job, clip_models: str = "tiny", clip_resolution: int = 512, threads: int = 1) -> dict:
    """Run the job's remaining stages in its workspace; returns its result row (status done or failed).

    Raises JobInterrupted when a stage was stopped from outside (the caller retries: the retry resumes)."""
    cfg = config_from_dict(copy.deepcopy(job.config))
    folder = run_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        lock = lock_job(folder)
    except JobFailed as err:
        return failed_row(job, str(err))
    with lock:
        return run_stages(job, cfg, folder, clip_models, clip_resolution, threads)


def run_stages(job: Job, cfg: Config, folder: Path, clip_models: str, clip_resolution: int, threads: int) -> dict:
    """run_job's work, under the workspace lock."""
    status_path = folder / STATUS_FILE
    status = read_json(status_path) or {}
    wait_for_stage_exit(status)
    status.update(job=job.name, key=job.key, state="running", attempts=status.get("attempts", 0) + 1,
                  host=socket.gethostname(), pid=os.getpid(), started=time.time(), error=None)
    stages = status.setdefault("stages", {})

    def update(**changes) -> None:
        status.update(changes)
        write_json_atomic(status_path, status)

    evaluation = evaluation_settings(clip_models, clip_resolution)
    if stages.get("evaluate", {}).get("evaluation") != evaluation:
        stages.pop("evaluate", None)  # scored with other CLIP settings: score again
    save_config(cfg, folder / JOB_CONFIG)
    update()
    try:
        for stage in job_stages(cfg):
            if stage in stages:
                continue
            update(stage=stage, stage_pid=None)
            tic = time.perf_counter()
            run_stage(stage_argv(stage, cfg, folder, clip_models, clip_resolution), folder / LOG_FILE, threads,
                      on_start=lambda pid: update(stage_pid=pid))
            stages[stage] = {"wall_s": round(time.perf_counter() - tic, 3), "attempt": status["attempts"],
                             **({"evaluation": evaluation} if stage == "evaluate" else {})}
            update(stage=None, stage_pid=None)
        row = {**result_row(job, folder, status), "evaluation": evaluation}
    except JobFailed as err:
        update(state="failed", error=str(err), stage_pid=None)
        return failed_row(job, str(err), status)
    except JobInterrupted as err:
        update(state="interrupted", error=str(err), stage_pid=None)
        raise
    write_json_atomic(folder / DONE_MARKER, row)
    update(state="done", finished=time.time())
    return row


def wait_for_stage_exit(status: dict, timeout: float = 120.0) -> None:
    """When the previous attempt's process died on this host while a stage ran, that stage got SIGINT (train
    checkpoints, then exits): wait until it is gone, so that the retry resumes from its last checkpoint."""
    pid = status.get("stage_pid")
    if not pid or status.get("host") != socket.gethostname():
        return
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.5)
    try:  # still there: stop it if it is this job's stage (not a reused pid), so two never share the workspace
        cmdline = Path(f"/proc/{pid}/cmdline").read_text()
        if JOB_CONFIG in cmdline and status.get("job", "") in cmdline:
            os.kill(pid, signal.SIGKILL)
            time.sleep(1.0)
    except OSError:
        return


def result_row(job: Job, folder: Path, status: dict) -> dict:
    """The row of a finished job from what its stages wrote."""
    report = read_json(folder / EVAL_DIR / "clip_scores.json")
    if not report or not report.get("rows"):
        raise JobFailed(f"evaluate wrote no scores in {folder / EVAL_DIR}")
    scored = report["rows"][0]
    stage1 = read_json(folder / "path_lora" / "denoising_loss.json") or {}
    stage_s = {name: info["wall_s"] for name, info in status["stages"].items()}
    return {**base_row(job, folder, status), "status": "done",
            "clip": {label: s["mean"] for label, s in scored["scores"].items()},
            "matching_loss": scored["matching_loss"]["mean"], "matching_loss_std": scored["matching_loss"]["std"],
            "num_points": scored["num_points"], "stage1_loss_prior": stage1.get("prior_mean"),
            "stage1_loss_path": stage1.get("path_lora_mean"), "stage_s": stage_s,
            "wall_s": round(sum(stage_s.values()), 3)}


def failed_row(job: Job, error: str, status: dict | None = None) -> dict:
    return {**base_row(job, None, status or {}), "status": "failed", "error": error}


def lost_row(job: Job, error: str, runs_root: Path) -> dict:
    """The row of a job whose last attempt never returned a row (Ray's retries exhausted, worker or node lost):
    attempts and host as the job's status file last recorded them."""
    return failed_row(job, error, read_json(runs_root / job.name / STATUS_FILE) or {})


def base_row(job: Job, folder: Path | None, status: dict) -> dict:
    return {"job": job.name, "prompt": job.prompt, "arm": job.arm, "seed": job.seed, "key": job.key,
            "workspace": str(folder) if folder else job.name, "attempts": status.get("attempts", 0),
            "host": status.get("host"), "clip": {}, "matching_loss": None, "matching_loss_std": None,
            "num_points": None, "stage1_loss_prior": None, "stage1_loss_path": None, "stage_s": {}, "wall_s": None,
            "error": None}


def running_jobs(jobs: list[Job], runs_root: Path, since: float) -> int:
    """How many of `jobs` report a stage running that started after `since` (their status files)."""
    count = 0
    for job in jobs:
        status = read_json(runs_root / job.name / STATUS_FILE)
        count += bool(status and status.get("state") == "running" and status.get("started", 0) >= since)
    return count
