"""batch.py: the job list, one job's stages, the results and the A/B summary (fast), then whole batches on a local
Ray instance with 2 workers and with --local (slow): all jobs finish, a second invocation skips them, a job whose
stage is killed is retried by Ray and ends equal to an uninterrupted one, a failing prompt is reported while the
others finish."""
import csv
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

import batch
from arguments import load_config
from test_end_to_end import ROOT, SMOKE, TINY_RUN
from jobs import job as bj
from jobs.report import paper_markdown, results_csv, summarize

# 24 iterations with a checkpoint every 4: long enough to kill a job mid-way
JOB_RUN = [*TINY_RUN, "OptimizationParams.iterations=24", "OptimizationParams.checkpoint_interval=4",
           "save_video=false", "EvalParams.probe_num_refs=4", "EvalParams.probe_ddim_steps=3",
           "EvalParams.probe_num_views=2"]
PROMPTS = ["a DSLR photo of a hamburger", "a wooden chair"]


def batch_argv(out: Path, prompts: Path, *extra: str, overrides: tuple = ()) -> list[str]:
    return ["--opt", str(SMOKE), *JOB_RUN, *overrides, "--prompts", str(prompts), "--out", str(out),
            "--clip-models", "tiny", "--clip-resolution", "32", *extra]


def run_batch(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "batch.py"), *argv], capture_output=True, text=True,
                          cwd=ROOT, timeout=900)


def rows_of(out: Path) -> list[dict]:
    with open(out / "results.csv") as fh:
        return list(csv.DictReader(fh))


def job_dir(out: Path, prompt: str, arm: str) -> Path:
    (folder,) = (out / "runs").glob(f"{bj.slugify(prompt, 40)}__{arm}__s0__*")
    return folder


def final_ply(folder: Path) -> bytes:
    return (folder / "point_cloud" / "iteration_24" / "point_cloud.ply").read_bytes()


# ------------------------------------------------------------------------------------------------- the job list
def test_parse_arms():
    assert bj.parse_arms(None) == {"vanilla": ("PTDParams.mode=off",), "ptd": ("PTDParams.mode=weighted",)}
    arms = bj.parse_arms("vanilla,fast", [["fast", "PTDParams.mode=weighted", "PTDParams.total_steps=500"]])
    assert arms == {"vanilla": ("PTDParams.mode=off",),
                    "fast": ("PTDParams.mode=weighted", "PTDParams.total_steps=500")}
    assert list(bj.parse_arms(None, [["a", "seed=1"], ["b", "seed=2"]])) == ["a", "b"]  # --arm alone picks its arms
    for names, custom, message in (("vanila", None, "not defined"), ("ptd,ptd", None, "each arm once"),
                                   (None, [["bad/name", "seed=1"]], "names folders"),
                                   (None, [["lonely"]], "overrides after the name"),
                                   ("vanilla", [["fast", "seed=1"]], "--arm fast is defined but not in --arms")):
        with pytest.raises(ValueError, match=message):
            bj.parse_arms(names, custom)


def test_parse_seeds():
    assert bj.parse_seeds("2,0,1") == [0, 1, 2]
    assert bj.parse_seeds("0-3,7,3") == [0, 1, 2, 3, 7]
    for bad in ("3-1", "a", "1,,2", "-1"):
        with pytest.raises(ValueError, match="--seeds"):
            bj.parse_seeds(bad)


def test_make_jobs_names_follow_the_inputs(tmp_path):
    base = load_config(SMOKE)
    arms = bj.parse_arms("vanilla,ptd")
    jobs = bj.make_jobs(base, ["a cat", "a dog", "a cat"], arms, [0, 1], tmp_path / "runs")
    assert [(j.prompt, j.arm, j.seed) for j in jobs] == [(p, a, s) for p in ("a cat", "a dog") for a in arms
                                                        for s in (0, 1)]  # the repeated prompt adds no job
    assert len({j.name for j in jobs}) == len(jobs) == len({j.key for j in jobs})
    again = bj.make_jobs(load_config(SMOKE), ["a cat", "a dog"], arms, [0, 1], tmp_path / "elsewhere")
    assert [j.name for j in again] == [j.name for j in jobs]  # deterministic, and independent of where it is written
    cfg = bj.config_from_dict(jobs[3].config)  # a cat, ptd, seed 1
    assert (cfg.GuidanceParams.text, cfg.seed, cfg.PTDParams.mode) == ("a cat", 1, "weighted")
    assert bj.run_dir(cfg) == tmp_path / "runs" / jobs[3].name and jobs[3].name.startswith("a_cat__ptd__s1__")
    assert base.GuidanceParams.text == load_config(SMOKE).GuidanceParams.text  # the base config is not touched
    changed = bj.make_jobs(load_config(SMOKE, ["GuidanceParams.guidance_scale=5"]), ["a cat"], arms, [0], tmp_path)
    assert not {j.key for j in changed} & {j.key for j in jobs}  # any config change is a new job
    with pytest.raises(ValueError, match="path_lora"):
        bj.make_jobs(load_config(SMOKE, ["PTDParams.path_lora=/x"]), ["a cat"], arms, [0], tmp_path)
    with pytest.raises(ValueError, match="arm fixed"):  # an arm's own path LoRA would be overwritten by every job
        bj.make_jobs(load_config(SMOKE), ["a cat"], bj.parse_arms(None, [["fixed", "PTDParams.path_lora=/x"]]), [0],
                     tmp_path)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="flock")
def test_a_job_held_by_another_process_is_not_touched(tmp_path):
    import fcntl
    (job,) = bj.make_jobs(load_config(SMOKE), ["a cat"], bj.parse_arms("vanilla"), [0], tmp_path)
    folder = tmp_path / job.name
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                               str(folder / bj.LOCK_FILE)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        row = bj.run_job(job)  # a second batch on the same --out
        assert row["status"] == "failed" and "another process is running this job" in row["error"]
        assert not (folder / bj.STATUS_FILE).exists()  # nothing of the running job's was touched
    finally:
        holder.kill()
        holder.wait()
    with open(folder / bj.LOCK_FILE) as f:  # the holder died (SIGKILL): the lock is free again
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_done_row_needs_the_same_config(tmp_path):
    (job,) = bj.make_jobs(load_config(SMOKE), ["a cat"], bj.parse_arms("vanilla"), [0], tmp_path)
    assert bj.done_row(job, tmp_path) is None
    marker = tmp_path / job.name / bj.DONE_MARKER
    marker.parent.mkdir()
    marker.write_text(json.dumps({"key": "another config", "status": "done"}))
    assert bj.done_row(job, tmp_path) is None
    tiny = bj.evaluation_settings("tiny", 32)
    marker.write_text(json.dumps({"key": job.key, "status": "done", "wall_s": 1.0, "evaluation": tiny}))
    assert bj.done_row(job, tmp_path)["wall_s"] == 1.0 and bj.done_row(job, tmp_path, tiny)["wall_s"] == 1.0
    assert bj.done_row(job, tmp_path, bj.evaluation_settings("ViT-L-14:openai", 32)) is None  # other CLIP: not done
    marker.write_text('{"key": "torn')
    assert bj.done_row(job, tmp_path) is None
    (tmp_path / job.name / bj.STATUS_FILE).write_text(json.dumps({"attempts": 4, "host": "node7"}))
    row = bj.lost_row(job, "JobInterrupted: train was stopped (exit -9)", tmp_path)  # Ray's retries ran out
    assert (row["status"], row["attempts"], row["host"]) == ("failed", 4, "node7")


def test_run_stage_tells_failures_from_interruptions(tmp_path, monkeypatch):
    stages = {"ok_stage": "print('fine')",
              "bad_stage": "import sys; print('error: the prompt is empty; set it', file=sys.stderr); sys.exit(1)",
              "crash_stage": "raise RuntimeError('boom')",
              "killed_stage": "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"}
    for name, code in stages.items():
        (tmp_path / f"{name}.py").write_text(code + "\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    log, pids = tmp_path / "job.log", []
    bj.run_stage(["ok_stage"], log, 1, pids.append)
    assert "fine" in log.read_text() and len(pids) == 1
    with pytest.raises(bj.JobFailed, match=r"^bad_stage: the prompt is empty; set it$"):
        bj.run_stage(["bad_stage"], log, 1, pids.append)
    with pytest.raises(bj.JobFailed, match="crash_stage: exited with code 1"):
        bj.run_stage(["crash_stage"], log, 1, pids.append)
    with pytest.raises(bj.JobInterrupted, match="killed_stage was stopped"):
        bj.run_stage(["killed_stage"], log, 1, pids.append)
    assert "RuntimeError: boom" in log.read_text() and len(pids) == 4


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_stage_can_be_interrupted_where_ray_blocks_sigint(tmp_path, monkeypatch):
    """Ray blocks SIGINT in its workers and the mask survives exec: the stage must get it unblocked, or the SIGINT
    it receives when its job's process dies (train's checkpoint-and-exit) would wait forever."""
    (tmp_path / "mask_stage.py").write_text(
        "import signal\nprint('SIGINT blocked:', signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []))\n"
        "print('handler:', signal.getsignal(signal.SIGINT))\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    log = tmp_path / "job.log"
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        bj.run_stage(["mask_stage"], log, 1, lambda pid: None)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    text = log.read_text()
    assert "SIGINT blocked: False" in text and "default_int_handler" in text


# ------------------------------------------------------------------------------------------------- results
def row(prompt, arm, status="done", clip=None, matching=None, wall=None):
    return {"prompt": prompt, "arm": arm, "seed": 0, "status": status, "clip": clip or {}, "matching_loss": matching,
            "wall_s": wall}


def test_job_table_cells_stay_in_their_row():
    from jobs.report import jobs_markdown
    rows = [{**row("a | b\nc", "ptd", status="failed"), "error": "x|y\n  z", "stage_s": {}, "attempts": 1},
            {**row("plain", "vanilla", clip={"L": 1.0}, matching=0.5, wall=3.0), "stage_s": {}, "attempts": 1}]
    lines = jobs_markdown(rows)
    assert len(lines) == 4 and all(line.count(" | ") == lines[0].count(" | ") for line in lines[2:])
    assert lines[2].startswith("| a \\| b c | ptd | 0 | **failed**: x\\|y z |")


def test_summarize_pairs_by_prompt_against_hand_computation():
    rows = [row("p1", "vanilla", clip={"L": 20.0}, matching=1.5, wall=100.0),
            row("p1", "ptd", clip={"L": 23.0}, matching=1.2, wall=110.0),
            row("p2", "vanilla", clip={"L": 25.0}, matching=1.0, wall=90.0),
            row("p2", "ptd", clip={"L": 24.0}, matching=0.9, wall=95.0),
            row("p3", "vanilla", clip={"L": 30.0}, matching=2.0, wall=80.0),
            row("p3", "ptd", status="failed")]
    s = summarize(rows, ["vanilla", "ptd"])
    assert s["pairs"] == 2 and s["baseline"] == "vanilla"  # p3 left out of both arms
    assert s["per_arm"]["vanilla"] == {"done": 3, "failed": 0, "pairs": 2, "L": 22.5, "matching_loss": 1.25,
                                       "wall_s": 95.0}
    assert s["per_arm"]["ptd"]["failed"] == 1 and s["per_arm"]["ptd"]["L"] == 23.5
    clip = s["versus_baseline"]["ptd"]["L"]
    assert clip["mean_diff"] == pytest.approx(1.0)  # (+3, -1)
    assert clip["se"] == pytest.approx(statistics.stdev([3.0, -1.0]) / math.sqrt(2))
    assert clip["wins"] == 1 and clip["n"] == 2
    assert s["versus_baseline"]["ptd"]["matching_loss"]["wins"] == 2  # lower is better
    assert s["versus_baseline"]["ptd"]["wall_s"]["wins"] == 0 and "vanilla" not in s["versus_baseline"]
    assert summarize(rows, ["vanilla", "ptd"], baseline="ptd")["versus_baseline"]["vanilla"]["L"]["mean_diff"] == \
        pytest.approx(-1.0)


def test_results_tables_put_paper_models_in_the_paper_columns():
    labels = {"ViT-L-14:openai": 26.0, "ViT-bigG-14:laion2b_s39b_b160k": 41.0}
    full = {"job": "j", "key": "k", "workspace": "w", "attempts": 1, "host": "h", "error": None,
            "matching_loss_std": 0.1, "num_points": 5, "stage1_loss_prior": None, "stage1_loss_path": None,
            "stage_s": {"train": 3.0, "evaluate": 1.0}}
    rows = [{**full, **row("p", "vanilla", clip=labels, matching=1.0, wall=4.0)},
            {**full, **row("p", "ptd", status="failed"), "error": "train: boom", "stage_s": {}}]
    text = "\n".join(paper_markdown(summarize(rows, ["vanilla", "ptd"])))
    assert "| vanilla (ours) | - | - |" in text  # no finished pair: no mean
    rows[1] = {**full, **row("p", "ptd", clip={k: v + 1 for k, v in labels.items()}, matching=0.5, wall=5.0)}
    text = "\n".join(paper_markdown(summarize(rows, ["vanilla", "ptd"])))
    assert "| ptd (ours) | 27.00 | 42.00 | this batch, 1 pairs |" in text and "| LucidDreamer | 25.99 | 40.27 |" in text
    parsed = list(csv.DictReader(results_csv(rows).splitlines()))
    assert [r["arm"] for r in parsed] == ["vanilla", "ptd"] and parsed[1]["clip ViT-L-14:openai"] == "27.0"
    assert parsed[0]["train_s"] == "3.0" and parsed[0]["form_path_s"] == ""


# ------------------------------------------------------------------------------------------------- command line
def test_bad_input_is_one_line(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    for extra, overrides, message in ((["--arms", "vanila"], (), "arm 'vanila' is not defined"),
                                      (["--baseline", "nope"], (), "--baseline 'nope' is not one of the arms"),
                                      ([], ("PTDParams.path_lora=/x",), "PTDParams.path_lora is set")):
        assert batch.cli(batch_argv(tmp_path / "out", prompts, *extra, overrides=overrides)) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err
    assert batch.cli(batch_argv(tmp_path / "out", tmp_path / "missing.txt")) == 1
    assert "missing.txt' not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written


def test_list_runs_nothing(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\n")
    assert batch.cli(batch_argv(tmp_path / "out", prompts, "--list")) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("todo")]
    assert len(lines) == 4 and not (tmp_path / "out").exists()


def test_without_ray_it_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(batch.RunError, match=r"pip install '\.\[batch\]'.*--local"):
        batch.start_ray(batch.argparse.Namespace(address=None, workers=2, cpus_per_job=1))


# ------------------------------------------------------------------------------------------------- GPUs per job
def packed_by_first_fit(num_gpus: int, share: float) -> list[tuple[int, ...]]:
    """Reference: place jobs one by one, as Ray's scheduler does, on GPUs counted in 1/10000 units: a share <= 1 goes
    on the first GPU with room (never across two), a whole number n takes the first n untouched GPUs."""
    free = [10_000] * num_gpus
    need = round(share * 10_000)
    placed = []
    while True:
        if share <= 1:
            gpu = next((g for g in range(num_gpus) if free[g] >= need), None)
            if gpu is None:
                return placed
            free[gpu] -= need
            placed.append((gpu,))
        else:
            gpus = [g for g in range(num_gpus) if free[g] == 10_000][:int(share)]
            if len(gpus) < share:
                return placed
            for g in gpus:
                free[g] = 0
            placed.append(tuple(gpus))


def test_gpu_slots_pack_like_ray():
    from jobs.resources import gpu_slots, jobs_per_gpu

    assert gpu_slots(1, 0.25) == [(0,)] * 4 and gpu_slots(2, 0.5) == [(0,), (0,), (1,), (1,)]
    assert gpu_slots(5, 2) == [(0, 1), (2, 3)] and gpu_slots(1, 2) == [] and gpu_slots(0, 0.25) == []
    for share in (0.0001, 0.01, 0.1, 0.2, 0.25, 0.3, 1 / 3, 0.3333, 0.4, 0.5, 0.6, 0.99, 1, 2, 3):
        for num_gpus in range(4):
            assert gpu_slots(num_gpus, share) == packed_by_first_fit(num_gpus, share), (share, num_gpus)
        if share <= 1:
            assert jobs_per_gpu(share) == math.floor(1 / share + 1e-9)  # floor(1/f), exact where 1/f is whole
    with pytest.raises(ValueError):
        gpu_slots(1, 0)


def test_gpus_per_job_values():
    from jobs.resources import parse_gpus_per_job

    assert [parse_gpus_per_job(t) for t in ("0.25", "1", "2.0", "0", "1e-4")] == [0.25, 1, 2, 0, 0.0001]
    assert isinstance(parse_gpus_per_job("2.0"), int)
    for text, reason in (("1.5", "whole GPUs"), ("-1", "share of one GPU"), ("nan", "share of one GPU"),
                         ("inf", "share of one GPU"), ("half", "expected a number"), ("0.00001", "finest share")):
        with pytest.raises(ValueError, match=reason):
            parse_gpus_per_job(text)


def test_gpus_per_job_on_the_command_line(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    assert batch.cli(batch_argv(tmp_path / "out", prompts, "--gpus-per-job", "0.25", "--list")) == 0
    capsys.readouterr()
    for extra, message in ((["--gpus-per-job", "1.5"], "--gpus-per-job: 1.5 GPUs: above 1 a job takes whole GPUs"),
                           (["--gpus-per-job", "-0.5"], "--gpus-per-job: expected 0, a share of one GPU"),
                           (["--gpus-per-job", "0.5", "--local"], "--local runs one job at a time")):
        with pytest.raises(SystemExit) as done:
            batch.cli(batch_argv(tmp_path / "out", prompts, *extra))
        assert done.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]  # argparse's usage, then the one error line
        assert ": error: " in err and message in err, err
    assert not (tmp_path / "out").exists()


def test_job_resources_on_a_cluster():
    def options(gpus=None, cpus=None):
        return batch.BatchOptions(prompts="p.txt", gpus_per_job=gpus, cpus_per_job=cpus)

    one_gpu = {"CPU": 16.0, "GPU": 1.0}
    assert batch.job_resources(one_gpu, options()) == (1, 1)  # default: one GPU each
    assert batch.job_resources({"CPU": 4.0}, options()) == (1, 0)  # no GPU in the cluster
    assert batch.job_resources(one_gpu, options(0.25)) == (1, 0.25)
    assert batch.jobs_at_once(one_gpu, 1, 0.25) == 4 and batch.jobs_at_once(one_gpu, 8, 0.25) == 2
    assert batch.jobs_at_once({"CPU": 16.0, "GPU": 2.0}, 1, 0.3) == 6 and batch.jobs_at_once(one_gpu, 2, 0) == 8
    for cluster, gpus in (({"CPU": 4.0}, 0.25), (one_gpu, 2), ({"CPU": 4.0, "GPU": 3.0}, 4)):
        with pytest.raises(batch.RunError, match="lower --cpus-per-job/--gpus-per-job"):
            batch.job_resources(cluster, options(gpus))


# ------------------------------------------------------------------------------------------------- whole batches
@pytest.fixture(scope="module")
def batch_a(tmp_path_factory):
    """2 prompts x vanilla,ptd on a local Ray instance with 2 workers."""
    tmp = tmp_path_factory.mktemp("batch_a")
    prompts = tmp / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    argv = batch_argv(tmp / "out", prompts, "--workers", "2")
    proc = run_batch(*argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "out", argv, proc


@pytest.mark.slow
def test_ray_batch_finishes_every_job(batch_a):
    out, _, proc = batch_a
    assert "4 jobs (2 prompts x 2 arms x 1 seeds)" in proc.stdout and "4 done, 0 failed" in proc.stdout
    rows = rows_of(out)
    assert len(rows) == 4 and {r["status"] for r in rows} == {"done"}
    assert [(r["prompt"], r["arm"]) for r in rows] == [(p, a) for p in PROMPTS for a in ("vanilla", "ptd")]
    for r in rows:
        folder = Path(r["workspace"])
        assert math.isfinite(float(r["clip tiny"])) and float(r["matching_loss"]) > 0
        assert float(r["train_s"]) > 0 and r["attempts"] == "1" and (folder / bj.DONE_MARKER).is_file()
        assert final_ply(folder)
        assert (folder / "path_lora").is_dir() == (r["arm"] == "ptd") == (r["form_path_s"] != "")
    text = (out / "results.md").read_text()
    assert "## A/B summary: 2 arms on the 2 (prompt, seed) pairs" in text and "| PTD (paper) | 27.16 | 42.36 |" in text
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert summary["per_arm"]["ptd"]["tiny"] == pytest.approx(
        statistics.mean(float(r["clip tiny"]) for r in rows if r["arm"] == "ptd"))


@pytest.mark.slow
def test_second_invocation_skips_finished_jobs(batch_a):
    out, argv, _ = batch_a
    outputs = sorted((out / "runs").glob("*/point_cloud/iteration_24/point_cloud.ply"))
    before = {p: p.stat().st_mtime_ns for p in outputs}
    table = (out / "results.csv").read_text()
    proc = run_batch(*argv)
    assert proc.returncode == 0 and "4 done before, 0 to run" in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in outputs} == before and len(before) == 4
    assert (out / "results.csv").read_text() == table


@pytest.mark.slow
def test_killed_job_is_retried_and_ends_equal_and_bad_prompt_fails(batch_a, tmp_path):
    reference = job_dir(batch_a[0], PROMPTS[0], "ptd")
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([PROMPTS[0], ""]))  # the empty prompt is a job, which fails
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(ROOT / "batch.py"),
                             *batch_argv(out, prompts, "--arms", "ptd", "--workers", "2")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    folder = out / "runs" / reference.name  # the same inputs: the same workspace name
    deadline = time.time() + 600
    while not any((folder / "checkpoints").glob("iteration_*.pt")):
        assert proc.poll() is None and time.time() < deadline, "the job never reached a stage-2 checkpoint"
        time.sleep(0.05)
    status = json.loads((folder / bj.STATUS_FILE).read_text())
    assert status["stage"] == "train" and status["attempts"] == 1
    os.kill(status["stage_pid"], signal.SIGKILL)  # the stage dies mid-way, as on a pre-empted machine
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, output[-3000:]  # one job failed
    rows = {r["prompt"]: r for r in rows_of(out)}
    assert rows[PROMPTS[0]]["status"] == "done" and rows[PROMPTS[0]]["attempts"] == "2"
    assert rows[""]["status"] == "failed" and "GuidanceParams.text is empty" in rows[""]["error"]
    log = (folder / bj.LOG_FILE).read_text()
    assert log.count("python -m train") == 2 and "--resume" in log.split("python -m train")[2]
    assert final_ply(folder) == final_ply(reference)
    done, ref = (json.loads((f / bj.DONE_MARKER).read_text()) for f in (folder, reference))
    assert (done["clip"], done["matching_loss"]) == (ref["clip"], ref["matching_loss"])


@pytest.mark.slow
def test_local_runs_the_same_job_without_ray(batch_a, tmp_path):
    reference = job_dir(batch_a[0], PROMPTS[1], "vanilla")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS[1] + "\n")
    proc = run_batch(*batch_argv(tmp_path / "out", prompts, "--arms", "vanilla", "--local", "--cpus-per-job", "1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = tmp_path / "out" / "runs" / reference.name
    assert final_ply(folder) == final_ply(reference)
    done, ref = (json.loads((f / bj.DONE_MARKER).read_text()) for f in (folder, reference))
    assert (done["clip"], done["matching_loss"]) == (ref["clip"], ref["matching_loss"])
