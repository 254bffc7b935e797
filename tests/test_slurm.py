"""Submission through Submitit: the local executor everywhere, and a real single-node Slurm
(tests/slurm/cluster.sh installs and starts it) for requeue, time limits and array jobs.
If Slurm cannot be started, the Slurm tests are skipped with the reason — never passed silently."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from colearn_dist import cli
from colearn_dist import slurm as slurm_module
from colearn_dist.slurm import requeue_refusal

from helpers import SMALL_MODEL, assert_same_weights, final_state, make_synthetic_archive, run_cli, write_config

CLUSTER = Path(__file__).resolve().parent / "slurm" / "cluster.sh"


@pytest.fixture(scope="module")
def shards(run_shards):
    return run_shards


@pytest.fixture(scope="module")
def slurm():
    if os.geteuid() != 0:
        pytest.skip("the Slurm tests start slurmctld/slurmd and need root")
    if not shutil.which("apt-get") and not shutil.which("slurmctld"):
        pytest.skip("no Slurm and no apt-get to install it")
    started = subprocess.run(["bash", str(CLUSTER), "start"], capture_output=True, text=True, timeout=900)
    if started.returncode != 0:
        pytest.skip(f"Slurm could not be started: {started.stderr.strip()[-500:]}")
    yield
    subprocess.run(["bash", str(CLUSTER), "stop"], capture_output=True, timeout=60)


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60).stdout


def job_state(job_id: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    for word in out.split():
        if word.startswith("JobState="):
            return word.split("=", 1)[1]
    return "GONE"


def wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def release_if_pending(job_id: str) -> None:
    """A requeued job waits (BeginTime) before it may start again; a test has no time to wait."""
    if job_state(job_id) == "PENDING":
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True)


def submit(cfg: Path, *extra: str) -> list[str]:
    proc = run_cli(["submit", str(cfg), *extra], stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    return [line.split()[1] for line in out.splitlines() if line.startswith("submitted ")]


def slurm_sets(tasks: int, time_min: int = 10, signal_delay_s: int = 120) -> dict:
    return {"tasks_per_node": tasks, "cpus_per_task": 1, "mem_gb": 2, "time_min": time_min, "signal_delay_s": signal_delay_s}


def test_local_executor_runs_the_same_job(shards, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", shards, tmp_path / "run", train={"epochs": 1})
    proc = run_cli(["submit", str(cfg), "--local", "--wait"], stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "finished" in out, out
    assert json.loads((tmp_path / "run" / "jobs.json").read_text())[0]["cluster"] == "local"
    status = subprocess.run([sys.executable, "-m", "colearn_dist.cli", "status", str(tmp_path / "run")], capture_output=True, text=True)
    assert "last checkpoint step" in status.stdout and "test s1" in status.stdout


def test_several_configs_times_seeds_form_one_array(shards, tmp_path, monkeypatch):
    submitted = []

    def fake_submit_runs(jobs, run_dirs, slurm, *, local=False, after=None):
        submitted.append((jobs, run_dirs, slurm))
        return [type("Job", (), {"job_id": f"7_{i}"})() for i in range(len(jobs))]

    monkeypatch.setattr(slurm_module, "submit_runs", fake_submit_runs)
    folds = [write_config(tmp_path / f"fold{k}.yaml", shards, tmp_path / f"run{k}", train={"epochs": 1}) for k in (0, 1)]
    args = ["submit", *map(str, folds), "--seeds", "0", "1", "--methods", "mdico", "--root", str(tmp_path / "runs")]
    assert cli.main(args + ["--allow-config-change"]) == 0
    ((jobs, run_dirs, _),) = submitted  # one array
    assert sorted(map(str, run_dirs)) == sorted(str(tmp_path / "runs" / f"fold{k}" / "mdico" / f"seed{s}") for k in (0, 1) for s in (0, 1))
    assert {job.config for job in jobs} == set(map(str, folds)) and all(job.allow_config_change for job in jobs)

    submitted.clear()  # without --methods / --seeds: one element per config, in its own run_dir
    assert cli.main(["submit", *map(str, folds)]) == 0
    assert submitted[0][1] == [tmp_path / "run0", tmp_path / "run1"] and not submitted[0][0][0].allow_config_change

    other = write_config(tmp_path / "other.yaml", shards, tmp_path / "run2", slurm={"time_min": 5})
    assert cli.main(["submit", str(folds[0]), str(other)]) == 2  # one array, one allocation shape


def test_requeue_stops_at_max_requeues_with_how_to_continue():
    assert requeue_refusal(2, "runs/x", {}) is None
    assert requeue_refusal(2, "runs/x", {"SLURM_RESTART_COUNT": "1"}) is None
    refusal = requeue_refusal(2, "runs/x", {"SLURM_RESTART_COUNT": "2"})
    assert "stopped at its checkpoint" in refusal and "slurm.max_requeues is 2" in refusal
    assert "colearn-dist submit --resume runs/x" in refusal
    assert requeue_refusal(0, "runs/x", {}) is not None


def test_command_jobs_shard_then_verify_on_the_local_executor(tmp_path):
    make_synthetic_archive(tmp_path / "a.zarr", n=120, t=4, groups=12)
    out = tmp_path / "shards"
    logs = ["--local", "--wait", "--root", str(tmp_path / "jobs"), "--set", "slurm.cpus_per_task=1"]

    def submit_command(command: str) -> tuple[int, str, str]:
        proc = run_cli(["submit", "--command", command, *logs], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate(timeout=300)
        return proc.returncode, out, err

    code, stdout, err = submit_command(f"shard {tmp_path / 'a.zarr'} {out} --samples-per-shard 40 --workers 1")
    assert code == 0 and (out / "manifest.json").exists(), stdout + err
    job = stdout.splitlines()[0].split()[1]
    assert f"{job}: finished" in stdout
    code, stdout, err = submit_command(f"shards verify {tmp_path / 'shard*'}")  # expanded when the job runs
    assert code == 0 and "finished" in stdout, stdout + err
    job = stdout.splitlines()[0].split()[1]
    assert f"{out}: OK" in next((tmp_path / "jobs").glob(f"{job}_0_log.out")).read_text()

    code, stdout, err = submit_command(f"archive info {tmp_path / 'missing.zarr'}")
    assert code == 2 and "missing.zarr" in err and "colearn-dist archive info" in err, stdout + err


def test_command_jobs_take_only_slurm_settings_and_valid_commands(tmp_path):
    assert cli.main(["submit", "--command", "archive info x.zarr", "--set", "train.lr=1", "--local"]) == 2
    with pytest.raises(SystemExit):
        cli.main(["submit", "--command", "shardd x.zarr", "--local"])
    assert slurm_module.command_slurm(["slurm.cpus_per_task=4"], "shard").cpus_per_task == 4
    assert slurm_module.command_slurm(["slurm.gpus_per_node=1"], "evaluate").tasks_per_node == 1
    assert slurm_module.command_slurm([], "shard").job_name == "colearn-shard"


@pytest.mark.slurm
def test_requeued_two_task_job_resumes_and_ends_like_an_uninterrupted_run(slurm, shards, tmp_path):
    train = {"epochs": 4, "checkpoint_every_steps": 3}
    ref = write_config(tmp_path / "ref.yaml", shards, tmp_path / "ref", train=train)
    assert run_cli(["launch", "--nproc", "2", str(ref)]).wait(timeout=300) == 0

    cfg = write_config(tmp_path / "c.yaml", shards, tmp_path / "run", train=train, slurm=slurm_sets(2))
    (job,) = submit(cfg)
    latest = tmp_path / "run" / "checkpoints" / "latest"
    wait_for(lambda: latest.exists() and int(latest.read_text()[4:]) >= 6, 240, "a checkpoint at step ≥ 6")
    sh("scontrol", "requeue", job)
    wait_for(lambda: job_state(job) in ("PENDING", "RUNNING"), 120, "the job to come back", poll=1)
    release_if_pending(job)
    wait_for(lambda: job_state(job) in ("COMPLETED", "FAILED", "CANCELLED", "GONE"), 400, "the job to end", poll=1)
    assert job_state(job) in ("COMPLETED", "GONE")
    log = (tmp_path / "run" / "train.log").read_text()
    assert "resumed step" in log and "resumed step000000000" not in log
    assert_same_weights(final_state(tmp_path / "ref"), final_state(tmp_path / "run"))


@pytest.mark.slurm
def test_time_limit_warning_checkpoints_requeues_and_finishes(slurm, shards, tmp_path):
    # ~150 s of training under a 2-minute limit, warned 60 s before it: it cannot finish in one
    # allocation. (slurmctld checks time limits about every 30 s, so the warning comes 60–90 s after
    # the start; a 1-minute limit warned 30 s before could signal a task still importing torch.)
    model = {**SMALL_MODEL, "embedding_dim": 64, "encoders": {"default": {"type": "tempcnn", "hidden": 32, "depth": 3}}}
    cfg = write_config(
        tmp_path / "c.yaml",
        shards,
        tmp_path / "run",
        model=model,
        train={"epochs": 450, "log_every_steps": 200},
        slurm=slurm_sets(1, time_min=2, signal_delay_s=60),
    )
    (job,) = submit(cfg)
    deadline = time.time() + 900
    while time.time() < deadline and job_state(job) not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "GONE"):
        release_if_pending(job)
        time.sleep(2)
    log = (tmp_path / "run" / "train.log").read_text()
    assert job_state(job) in ("COMPLETED", "GONE"), log[-2000:]
    assert "stop requested (signal 12)" in log  # SIGUSR2, Submitit's warning before the time limit
    assert "resumed step" in log
    assert (tmp_path / "run" / "metrics_test.json").exists()
    checkpoints = tmp_path / "run" / "checkpoints"
    state = json.loads((checkpoints / (checkpoints / "latest").read_text().strip() / "state.json").read_text())
    assert state["epoch"] == 450


@pytest.mark.slurm
def test_array_job_over_two_seeds(slurm, shards, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", shards, tmp_path / "run", train={"epochs": 1}, slurm=slurm_sets(1))
    jobs = submit(cfg, "--seeds", "0", "1", "--methods", "mdico", "--root", str(tmp_path / "runs"))
    assert len(jobs) == 2 and len({j.split("_")[0] for j in jobs}) == 1  # one array, two elements
    for job in jobs:
        wait_for(lambda job=job: job_state(job) in ("COMPLETED", "FAILED", "GONE"), 300, f"array element {job}", poll=1)
    for seed in (0, 1):
        run = tmp_path / "runs" / "mdico" / f"seed{seed}"
        assert json.loads((run / "metrics_test.json").read_text())[0]["seed"] == seed
    w0 = final_state(tmp_path / "runs" / "mdico" / "seed0")
    w1 = final_state(tmp_path / "runs" / "mdico" / "seed1")
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)
