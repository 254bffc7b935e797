"""Submission through Submitit: the local executor everywhere, and a real single-node Slurm
(tests/slurm/cluster.sh installs and starts it) for requeue, time limits and array jobs.
If Slurm cannot be started, the Slurm tests are skipped with the reason — never passed silently."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from colearn_dist import cli
from colearn_dist import slurm as slurm_module
from colearn_dist.slurm import requeue_refusal, stop_action

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
    state = Path(os.environ.get("SLURM_TEST_DIR", "/tmp/colearn-slurm"))
    # Clients (sbatch, squeue, Submitit) find the test cluster's config; the jobs inherit both
    # variables: gloo between the two "nodes" talks over loopback only.
    env = {"SLURM_CONF": str(state / "slurm.conf"), "GLOO_SOCKET_IFNAME": "lo"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    started = subprocess.run(["bash", str(CLUSTER), "start"], capture_output=True, text=True, timeout=900)
    try:
        if started.returncode != 0:
            pytest.skip(f"Slurm could not be started: {started.stderr.strip()[-500:]}")
        yield
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop"], capture_output=True, timeout=60)
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


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
    """A requeued job waits (BeginTime) before it may start again; a test has no time to wait. Not
    within the second of the requeue, though: slurmd refuses a launch whose credential is as old as
    the requeue's revocation ("Job credential revoked", seen here) and the job fails."""
    if job_state(job_id) == "PENDING":
        time.sleep(2)
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True)


def submit(cfg: Path, *extra: str, env: dict[str, str] | None = None) -> list[str]:
    proc = run_cli(["submit", str(cfg), *extra], env, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    return [line.split()[1] for line in out.splitlines() if line.startswith("submitted ")]


def slurm_sets(tasks: int, time_min: int = 10, signal_delay_s: int = 120, nodes: int = 1) -> dict:
    return {
        "nodes": nodes,
        "tasks_per_node": tasks,
        "cpus_per_task": 1,
        "mem_gb": 2,
        "time_min": time_min,
        "signal_delay_s": signal_delay_s,
    }


ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "GONE")


def wait_until_ended(job_id: str, timeout: float = 400) -> str:
    """The job's final state, releasing it at once whenever it is requeued."""

    def ended():
        release_if_pending(job_id)
        return job_state(job_id) in ENDED

    wait_for(ended, timeout, f"job {job_id} to end", poll=1)
    return job_state(job_id)


def wait_for_checkpoint(run: Path, step: int, timeout: float = 240) -> None:
    latest = run / "checkpoints" / "latest"
    wait_for(lambda: latest.exists() and int(latest.read_text()[4:]) >= step, timeout, f"a checkpoint at step ≥ {step}")


# 4 epochs of the small model (32 steps) with a checkpoint every 3 steps, to interrupt mid-run; a
# test that interrupts it from outside slows its steps (the run trains the same), or on a fast
# machine all 32 steps end in a second, before Slurm's signal arrives.
INTERRUPTIBLE = {"epochs": 4, "checkpoint_every_steps": 3}
SLOW_STEPS = {"COLEARN_STEP_DELAY_S": "0.25"}


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """The uninterrupted run of INTERRUPTIBLE on one machine with two processes (world size 2)."""
    root = tmp_path_factory.mktemp("reference")
    cfg = write_config(root / "ref.yaml", shards, root / "ref", train=INTERRUPTIBLE)
    assert run_cli(["launch", "--nproc", "2", str(cfg)]).wait(timeout=300) == 0
    return final_state(root / "ref")


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


def test_only_a_time_limit_or_preemption_requeues_a_stopped_job():
    """What follows the checkpoint after a stop request (the states as Slurm 22.05 shows them to the
    job's own SIGTERM handler, seen on the test cluster: COMPLETING for all three)."""
    job = {"SLURM_JOB_ID": "7"}

    def shows(**fields):
        return lambda job_id: {"JobState": "COMPLETING", "Reason": "None", "Restarts": "0", **fields}

    assert stop_action(signal.SIGUSR2, "runs/x", job, shows())[0] == "requeue"  # Submitit's time-limit warning
    assert stop_action(signal.SIGUSR1, "runs/x", job, shows())[0] == "requeue"  # sbatch_direct.sh's warning
    assert stop_action(None, "runs/x", job, shows())[0] == "requeue"  # COLEARN_STOP_AFTER_STEPS stands in for a warning
    action, why = stop_action(signal.SIGTERM, "runs/x", job, shows())  # scancel
    assert action == "end" and "cancelled" in why and "colearn-dist submit --resume runs/x" in why
    assert stop_action(signal.SIGTERM, "runs/x", job, shows(Reason="TimeLimit"))[0] == "requeue"  # the limit, unwarned
    assert stop_action(signal.SIGTERM, "runs/x", job, shows(Restarts="1"))[0] == "wait"  # preemption, scontrol requeue
    assert stop_action(signal.SIGTERM, "runs/x", {**job, "SLURM_RESTART_COUNT": "1"}, shows(Restarts="1"))[0] == "end"
    assert stop_action(signal.SIGTERM, "runs/x", job, lambda job_id: {})[0] == "end"  # scontrol failed: no guess
    assert stop_action(signal.SIGTERM, "runs/x", {}, shows())[0] == "end"  # outside Slurm


def test_job_state_explains_pending_and_failed_jobs(monkeypatch):
    shown = {}
    monkeypatch.setattr(slurm_module, "show_job", lambda job_id: shown)
    monkeypatch.setattr(slurm_module.shutil, "which", lambda name: None)  # no sacct
    for fields, state in [
        ({"JobState": "PENDING", "Reason": "Resources"}, "PENDING (Resources)"),
        ({"JobState": "FAILED", "Reason": "NonZeroExitCode", "ExitCode": "1:0"}, "FAILED (NonZeroExitCode, exit 1:0)"),
        ({"JobState": "CANCELLED", "Reason": "None", "ExitCode": "0:15"}, "CANCELLED"),
        ({"JobState": "RUNNING", "Reason": "None"}, "RUNNING"),
        ({}, "unknown: Slurm no longer lists it (ended more than MinJobAge ago) and accounting (sacct) has no record of it"),
    ]:
        shown.clear()
        shown.update(fields)
        assert slurm_module.job_state("7") == state


def test_submit_refuses_missing_shards_and_unknown_modalities(shards, tmp_path, monkeypatch, capsys):
    submitted = []
    monkeypatch.setattr(
        slurm_module, "submit_runs", lambda jobs, run_dirs, slurm, **kw: submitted.append(run_dirs) or [type("J", (), {"job_id": "7"})()]
    )
    missing = write_config(tmp_path / "missing.yaml", tmp_path / "no-shards", tmp_path / "run")
    assert cli.main(["submit", str(missing)]) == 2
    assert f"data.shards: {tmp_path / 'no-shards' / 'manifest.json'}: no shard manifest" in capsys.readouterr().err
    unknown = write_config(tmp_path / "unknown.yaml", shards, tmp_path / "run", data={"modalities": ["s1", "sentinel3"]})
    assert cli.main(["submit", str(unknown)]) == 2
    assert "data.modalities: ['sentinel3'] not in the shards" in capsys.readouterr().err
    assert not submitted
    assert cli.main(["submit", str(missing), "--after", "6"]) == 0  # the shards may come from job 6: a warning
    assert "warning:" in capsys.readouterr().err and submitted == [[tmp_path / "run"]]


def test_time_limits_reach_sbatch_in_minutes(tmp_path):
    from colearn_dist.config import SlurmConfig

    executor = slurm_module.make_executor(tmp_path, SlurmConfig(time_min="1-0:30"), local=True)
    assert executor._executor.parameters["timeout_min"] == 1470


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
def test_two_nodes_one_task_each_train_like_one_node_two_tasks(slurm, shards, reference, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", shards, tmp_path / "run", train=INTERRUPTIBLE, slurm=slurm_sets(1, nodes=2))
    (job,) = submit(cfg)
    wait_for(lambda: job_state(job) != "PENDING", 120, "the job to start", poll=1)
    assert slurm_module.show_job(job)["NodeList"] == "n[1-2]"  # one task on each slurmd
    assert wait_until_ended(job) == "COMPLETED", (tmp_path / "run" / "train.log").read_text()[-2000:]
    assert "world size 2" in (tmp_path / "run" / "train.log").read_text()
    assert_same_weights(reference, final_state(tmp_path / "run"))


@pytest.mark.slurm
def test_preempted_two_node_job_is_requeued_by_slurm_and_ends_like_an_uninterrupted_run(slurm, shards, reference, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", shards, tmp_path / "run", train=INTERRUPTIBLE, slurm=slurm_sets(1, nodes=2))
    (job,) = submit(cfg, env=SLOW_STEPS)
    wait_for_checkpoint(tmp_path / "run", 6)
    # A job in the higher-priority partition takes node n2: Slurm (PreemptMode=REQUEUE) sends
    # SIGTERM and requeues ours; every rank checkpoints first, none requeues it a second time.
    urgent = sh(
        "sbatch", "--parsable", "-p", "urgent", "-w", "n2", "--exclusive", "-o", str(tmp_path / "urgent.out"), "--wrap", "sleep 1"
    ).strip()
    wait_for(lambda: job_state(urgent) in ("COMPLETED", "GONE"), 120, "the preempting job", poll=1)
    assert wait_until_ended(job) == "COMPLETED"
    assert slurm_module.show_job(job)["Restarts"] == "1"
    log = (tmp_path / "run" / "train.log").read_text()
    assert "stop requested (signal 15)" in log and "Slurm is requeueing job" in log
    assert "resumed step" in log and "resumed step000000000" not in log
    assert_same_weights(reference, final_state(tmp_path / "run"))


@pytest.mark.slurm
def test_scancel_ends_the_job_at_a_checkpoint_and_it_resumes_onto_one_node(slurm, shards, reference, tmp_path):
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", shards, run, train=INTERRUPTIBLE, slurm=slurm_sets(1, nodes=2))
    (job,) = submit(cfg, env=SLOW_STEPS)
    wait_for_checkpoint(run, 6)
    sh("scancel", job)
    wait_for(lambda: job_state(job) not in ("RUNNING", "COMPLETING"), 120, "the cancelled job to end", poll=0.5)
    shown = slurm_module.show_job(job)
    assert (shown["JobState"], shown["Restarts"]) == ("CANCELLED", "0")  # not requeued, not restarted
    log = (run / "train.log").read_text()
    assert "stop requested (signal 15): checkpoint" in log and f"job {job} cancelled" in log
    status = subprocess.run([sys.executable, "-m", "colearn_dist.cli", "status", str(run)], capture_output=True, text=True).stdout
    assert f"job {job} (slurm, submitted" in status and ": CANCELLED" in status
    assert f"error log: {run / 'slurm' / f'{job}_0_log.err'}" in status

    resumed = submit_resume(run)
    assert wait_until_ended(resumed) == "COMPLETED"
    assert slurm_module.show_job(resumed)["NodeList"] in ("n1", "n2")
    assert "resumed step" in (run / "train.log").read_text()
    assert_same_weights(reference, final_state(run))


def submit_resume(run: Path) -> str:
    """`submit --resume` onto one node with two tasks: the same world size, on half the nodes."""
    proc = run_cli(
        ["submit", "--resume", str(run), "--set", "slurm.nodes=1", "--set", "slurm.tasks_per_node=2"], stdout=subprocess.PIPE, text=True
    )
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    return next(line.split()[1] for line in out.splitlines() if line.startswith("submitted "))


@pytest.mark.slurm
def test_status_says_why_a_job_pends_and_where_a_failed_one_logged(slurm, shards, tmp_path):
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", shards, run, train={"epochs": 1}, slurm={**slurm_sets(1), "extra": {"begin": "now+1hour"}})
    (job,) = submit(cfg)

    def status() -> str:
        return subprocess.run([sys.executable, "-m", "colearn_dist.cli", "status", str(run)], capture_output=True, text=True).stdout

    assert f"job {job} (slurm, submitted" in status() and ": PENDING (BeginTime)" in status()
    # The job reads its config when it starts: shards gone by then fail the job, and status shows why.
    text = cfg.read_text().replace(str(shards), str(tmp_path / "gone"))
    cfg.write_text(text)
    sh("scontrol", "update", f"JobId={job}", "StartTime=now")
    assert wait_until_ended(job, 300) == "FAILED"
    shown = status()
    err = run / "slurm" / f"{job}_0_log.err"
    assert ": FAILED (NonZeroExitCode, exit 1:0)" in shown and f"error log: {err}" in shown
    assert "no shard manifest" in shown  # the error's last lines, from the log


@pytest.mark.slurm
def test_sbatch_direct_script_survives_a_warning_during_start_up(slurm, shards, tmp_path):
    """launchers/sbatch_direct.sh as shipped (its #SBATCH lines overridden on the command line):
    USR1 while the ranks still import torch checkpoints at the first step, requeues, and finishes."""
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", shards, run, train={"epochs": 2})
    script = Path(__file__).resolve().parents[1] / "launchers" / "sbatch_direct.sh"
    job = sh(
        "sbatch",
        "--parsable",
        "--nodes=1",
        "--ntasks-per-node=1",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        "--mem=2G",
        "--time=10",
        f"--output={tmp_path / 'job.out'}",
        f"--chdir={tmp_path}",
        str(script),
        str(cfg),
    ).strip()

    def task_started() -> bool:
        out = subprocess.run(["scontrol", "listpids", job], capture_output=True, text=True).stdout.split()
        return any(
            "colearn" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
            for pid in out
            if pid.isdigit() and Path(f"/proc/{pid}").exists()
        )

    wait_for(task_started, 120, "the training task to start", poll=0.1)
    time.sleep(1.0)  # inside `import torch` (seconds): before the trainer's handler exists
    sh("scancel", "--signal=USR1", job)
    assert wait_until_ended(job) == "COMPLETED", (tmp_path / "job.out").read_text()[-2000:]
    log = (run / "train.log").read_text()
    assert "stop requested (signal 10)" in log and "resumed step" in log
    assert json.loads((run / "metrics_test.json").read_text())


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
