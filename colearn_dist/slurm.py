"""Slurm through Submitit: submit runs, survive time limits and preemption, resume in a new allocation.

Submitit's own signal handler checkpoints by calling a method *inside* the signal handler, on rank 0
only. A DeepSpeed checkpoint is collective and must happen between steps, so instead the engine
catches Slurm's signals on every rank (colearn_dist.signals), all ranks agree at the next step
boundary and write the checkpoint together. Then `stop_action` decides: a time-limit warning (USR2)
or a time limit reached → rank 0 requeues the job; a preemption or `scontrol requeue` → Slurm
requeues it already; `scancel` → the job ends there. The requeued job runs the same pickled
`TrainJob`, which finds `latest` in the run directory and continues.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from .config import ConfigError, RunConfig, SlurmConfig, apply_override, from_dict, load_config, slurm_minutes, validate_slurm
from .engine import train
from .manifest import ShardError, load_manifest
from .methods import method
from .runs import RunDir, resolve_modalities
from .signals import WARNING_SIGNALS, catch_early, ignore_from_now
from .sweep import PlannedRun, plan_sweep


@dataclass
class TrainJob:
    """A picklable callable: one run, one rank per Slurm task."""

    config: str
    overrides: list[str]
    allow_config_change: bool = False

    def __call__(self) -> dict[str, Any]:
        # Submitit's own handlers cover the start-up (USR2: requeue, SIGTERM: ignored); from here
        # until the trainer's handler exists, stop signals are kept for it.
        catch_early()
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        cfg = load_config(self.config, self.overrides)
        result = train(cfg, allow_config_change=self.allow_config_change)
        if result["status"] == "stopped":
            self._after_stop(cfg, result)
        ignore_from_now()  # finished (or cancelled, checkpoint written): a late warning must not kill the exit
        return result

    def _after_stop(self, cfg: RunConfig, result: dict[str, Any]) -> None:
        env = submitit.JobEnvironment()
        if env.cluster != "slurm":
            return  # local executor: the run simply stops, `submit --resume` continues it
        action, why = stop_action(result.get("signal"), cfg.run_dir)
        if env.global_rank == 0:
            note(cfg.run_dir, why)
        if action == "end":
            result["status"] = "cancelled"
            return  # the job ends here; its checkpoint is written
        if action == "wait":
            time.sleep(120)  # Slurm requeues and ends this allocation; returning would read as "job finished"
            sys.exit(-1)
        refusal = requeue_refusal(cfg.slurm.max_requeues, cfg.run_dir)
        if refusal:
            if env.global_rank == 0:
                print(refusal, file=sys.stderr, flush=True)
            raise RuntimeError(refusal)  # every rank: the job ends as failed
        if env.global_rank == 0:
            # Fails harmlessly when Slurm is already requeueing the job (scontrol requeue, preemption).
            done = subprocess.run(["scontrol", "requeue", env.job_id], capture_output=True, text=True, timeout=60)
            print(f"checkpointed; requeue {env.job_id}: {done.stderr.strip() or 'ok'}", file=sys.stderr, flush=True)
        time.sleep(120)  # Slurm ends this allocation; exiting now would read as "job finished"
        sys.exit(-1)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Submitit's fallback (should our handler not have run): requeue the same job; it resumes from `latest`."""
        return submitit.helpers.DelayedSubmission(dataclasses.replace(self))


def stop_action(
    signum: int | None,
    run_dir: str | Path,
    environ: Mapping[str, str] = os.environ,
    show: Callable[[str], dict[str, str]] | None = None,
) -> tuple[str, str]:
    """What a Slurm job does after a stop request made it checkpoint: ("requeue", why) — it
    requeues itself (a time-limit warning, a time limit reached, or COLEARN_STOP_AFTER_STEPS's
    stand-in for one); ("wait", why) — Slurm requeues it already (preemption with
    PreemptMode=REQUEUE, `scontrol requeue`); ("end", why) — cancelled (`scancel`, or a SIGTERM
    Slurm gives no reason for): the job ends, `submit --resume` continues it.
    SIGTERM says none of this by itself; `scontrol show job` does: a requeue has already counted
    one more restart than this allocation started with, a time limit shows Reason=TimeLimit."""
    if signum is None or signum in WARNING_SIGNALS:
        name = signal.Signals(signum).name if signum else "COLEARN_STOP_AFTER_STEPS"
        return "requeue", f"stopped by {name} (time limit or preemption ahead): checkpointed, requeueing"
    job_id = environ.get("SLURM_JOB_ID")
    if not job_id:
        return "end", f"stopped by signal {signum} outside Slurm: checkpointed; continue it with the same command"
    job = (show or show_job)(job_id)
    restarts, started_with = int(job.get("Restarts") or 0), int(environ.get("SLURM_RESTART_COUNT") or 0)
    if restarts > started_with:
        return "wait", f"SIGTERM: Slurm is requeueing job {job_id} (preemption or scontrol requeue, restart {restarts}): checkpointed"
    if job.get("Reason") == "TimeLimit" or job.get("JobState") in ("TIMEOUT", "PREEMPTED"):
        return "requeue", f"SIGTERM at {job.get('Reason') or job.get('JobState')}: checkpointed, requeueing"
    seen = f"JobState {job['JobState']}, Reason {job.get('Reason')}" if job else "scontrol show job failed"
    return "end", (
        f"SIGTERM: job {job_id} cancelled ({seen}, no requeue): checkpointed, not requeued; "
        f"continue it with: colearn-dist submit --resume {run_dir}"
    )


def show_job(job_id: str) -> dict[str, str]:
    """`scontrol show job`'s fields (JobState, Reason, Restarts, StdErr, …) of a job Slurm still
    remembers (MinJobAge, 300 s by default, after its end); {} when it does not or scontrol fails."""
    if shutil.which("scontrol") is None:
        return {}
    try:
        out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return {}
    if out.returncode != 0:
        return {}
    first = out.stdout.strip().split("\n")[0]  # an array job lists its elements: the first is asked for
    return dict(word.split("=", 1) for word in first.split() if "=" in word)


def note(run_dir: str | Path, text: str) -> None:
    """One line in the run's train.log (as the engine writes them) and on stderr (the job's error log)."""
    print(text, file=sys.stderr, flush=True)
    with open(RunDir(run_dir).log, "a") as log:
        log.write(time.strftime("%Y-%m-%d %H:%M:%S ") + text + "\n")


def requeue_refusal(max_requeues: int, run_dir: str | Path, environ: Mapping[str, str] = os.environ) -> str | None:
    """None when a checkpointed job may requeue itself once more; else why not and how to continue."""
    restarts = int(environ.get("SLURM_RESTART_COUNT") or 0)
    if restarts < max_requeues:
        return None
    return (
        f"{run_dir}: stopped at its checkpoint and not requeued: the job was requeued {restarts} time(s), "
        f"slurm.max_requeues is {max_requeues}. Continue it in a new allocation with: colearn-dist submit --resume {run_dir}"
    )


def command_slurm(overrides: list[str], command: str) -> SlurmConfig:
    """The config-less Slurm settings of a `submit --command` job: SlurmConfig's defaults, `slurm.*`
    overrides, one task on one node."""
    data: dict[str, Any] = {}
    for item in overrides:
        if not item.startswith("slurm."):
            raise ConfigError(f"--command runs without a config: only slurm.* settings apply, got --set {item!r}")
        apply_override(data, item.removeprefix("slurm."), "--set")
    slurm = validate_slurm(from_dict(SlurmConfig, data, "--set: slurm"), "--set: slurm")
    name = slurm.job_name if "job_name" in data else f"{slurm.job_name}-{command}"
    return dataclasses.replace(slurm, nodes=1, tasks_per_node=1, job_name=name)


def make_executor(folder: Path, slurm: SlurmConfig, local: bool = False) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=str(folder), cluster="local" if local else None, slurm_max_num_timeout=slurm.max_requeues)
    tasks = slurm.tasks_per_node or max(1, slurm.gpus_per_node)
    params: dict[str, Any] = {
        "nodes": slurm.nodes,
        "tasks_per_node": tasks,
        "cpus_per_task": slurm.cpus_per_task,
        "mem_gb": slurm.mem_gb * tasks,
        "timeout_min": slurm_minutes(slurm.time_min),
        "name": slurm.job_name,
    }
    if slurm.gpus_per_node:
        params["gpus_per_node"] = slurm.gpus_per_node
    if executor.cluster == "slurm":
        params["slurm_signal_delay_s"] = slurm.signal_delay_s
        params["slurm_additional_parameters"] = dict(slurm.extra)
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(slurm, key):
                params[f"slurm_{key}"] = getattr(slurm, key)
    executor.update_parameters(**params)
    return executor


def _with_dependency(executor: submitit.AutoExecutor, job_ids: list[str]) -> None:
    if job_ids and executor.cluster == "slurm":
        extra = dict(executor.parameters.get("additional_parameters", {}) or {})
        extra["dependency"] = "afterok:" + ":".join(job_ids)
        executor.update_parameters(slurm_additional_parameters=extra)


def submit_jobs(
    fns: list[Callable[[], Any]],
    folder: Path,
    slurm: SlurmConfig,
    *,
    local: bool = False,
    after: list[str] | None = None,
) -> tuple[str, list[submitit.Job]]:
    """Submit callables as one job (one callable) or one array job, after `after` succeeded; (cluster, jobs)."""
    executor = make_executor(folder, slurm, local)
    _with_dependency(executor, list(after or []))
    if len(fns) == 1:
        return executor.cluster, [executor.submit(fns[0])]
    with executor.batch():
        submitted = [executor.submit(fn) for fn in fns]
    return executor.cluster, submitted


def submit_runs(
    jobs: list[TrainJob],
    run_dirs: list[Path],
    slurm: SlurmConfig,
    *,
    local: bool = False,
    after: list[str] | None = None,
) -> list[submitit.Job]:
    """Submit runs as one job (one run) or one array job; records job ids in each run directory."""
    if len(set(run_dirs)) < len(run_dirs):
        raise ValueError(f"two runs would share a run directory: {sorted(map(str, run_dirs))}")
    folder = run_dirs[0] / "slurm" if len(run_dirs) == 1 else Path(os.path.commonpath([d.resolve() for d in run_dirs])) / "slurm"
    cluster, submitted = submit_jobs(list(jobs), folder, slurm, local=local, after=after)
    for job, run_dir in zip(submitted, run_dirs):
        run_dir.mkdir(parents=True, exist_ok=True)
        record = RunDir(run_dir).jobs
        history = json.loads(record.read_text()) if record.exists() else []
        history.append(
            {"job_id": job.job_id, "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"), "cluster": cluster, "stderr": str(job.paths.stderr)}
        )
        record.write_text(json.dumps(history, indent=1))
    return submitted


def status(run_dir: str | Path) -> str:
    """Job state, last checkpoint and the last logged lines of a run, as text."""
    run = RunDir(run_dir)
    lines = [f"run {run.path}"]
    if run.jobs.exists():
        last = json.loads(run.jobs.read_text())[-1]
        state = job_state(last["job_id"]) if last["cluster"] == "slurm" else f"{last['cluster']} executor (no Slurm state)"
        lines.append(f"  job {last['job_id']} ({last['cluster']}, submitted {last['submitted']}): {state}")
        err = Path(last.get("stderr") or run.slurm / f"{last['job_id']}_0_log.err")
        if err.exists():
            lines.append(f"  error log: {err}")
            if state.split()[0] in _FAILED:
                lines += ["  | " + t for t in err.read_text(errors="replace").strip().splitlines()[-3:]]
    else:
        lines.append("  no job submitted from here")
    latest = run.checkpointer().latest()
    if latest is None:
        lines.append("  no checkpoint yet")
    else:
        state = json.loads((latest / "state.json").read_text())
        lines.append(f"  last checkpoint {latest.name}: step {state['step']}, epoch {state['epoch']}, world size {state['world_size']}")
        if state.get("history"):
            h = state["history"][-1]
            shown = ", ".join(f"{k} {v:.4g}" for k, v in h["scores"].items())
            lines.append(f"  last validation (epoch {h['epoch']}, higher is better): {shown}")
    metrics = run.metrics("test")
    if metrics.exists():
        for rec in json.loads(metrics.read_text()):
            shown = ", ".join(f"{k} {v:.4g}" for k, v in list(rec["metrics"].items())[:4])
            lines.append(f"  test {rec['sensors']}: {shown}")
    if run.log.exists():
        tail = run.log.read_text().splitlines()[-3:]
        lines += ["  log: " + t for t in tail]
    return "\n".join(lines)


_FAILED = ("FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE")


def job_state(job_id: str) -> str:
    """A job's state with what explains it: "PENDING (Resources)", "FAILED (exit 1:0)", "CANCELLED".
    Slurm's controller remembers ended jobs for MinJobAge (300 s by default) without accounting:
    `scontrol show job` first, then sacct (accounting on) for jobs that ended earlier."""
    job = show_job(job_id)
    if job.get("JobState"):
        state, reason = job["JobState"], job.get("Reason", "None")
        if state in ("PENDING", "REQUEUED") or state in _FAILED:
            detail = reason if reason not in ("None", "") else ""
            if state in _FAILED and job.get("ExitCode", "0:0") != "0:0":
                detail = ", ".join(d for d in (detail, f"exit {job['ExitCode']}") if d)
            return f"{state} ({detail})" if detail else state
        return state
    if shutil.which("sacct") is not None:
        out = subprocess.run(["sacct", "-n", "-X", "-j", job_id, "-o", "State"], capture_output=True, text=True)
        state = out.stdout.strip().split("\n")[0].strip() if out.returncode == 0 else ""
        if state:
            return state
    return "unknown: Slurm no longer lists it (ended more than MinJobAge ago) and accounting (sacct) has no record of it"


def preflight(cfg: RunConfig) -> list[str]:
    """What would make this run fail as soon as its job starts, found before it waits in the queue:
    shards that are not there, modalities they do not have."""
    try:
        manifest = load_manifest(cfg.data.shards)
    except ShardError as exc:
        return [f"{cfg.run_dir}: data.shards: {exc}"]
    try:
        resolve_modalities(cfg, manifest)
    except ValueError as exc:
        return [f"{cfg.run_dir}: {exc}"]
    return []


def resume_config(run_dir: str | Path) -> tuple[str, RunConfig]:
    """The config a run was started with (its run_dir/config.yaml), to continue it in a new allocation."""
    run = RunDir(run_dir)
    return str(run.config_file), run.config()


def plan_submission(
    configs: list[str],
    overrides: list[str],
    methods: str | None = None,
    seeds: list[int] | None = None,
    root: str | None = None,
) -> tuple[list[list[PlannedRun]], SlurmConfig]:
    """CONFIG… (× methods × seeds) as runs grouped into array jobs: students wait for their
    teachers in a second array after the first. Every config must ask for the same allocation."""
    planned: list[PlannedRun] = []
    slurm: SlurmConfig | None = None
    for config in configs:
        base = load_config(config, overrides)
        if slurm is not None and base.slurm != slurm:
            raise ValueError(f"{config}: its slurm section differs from {configs[0]}'s; one array job has one allocation shape")
        slurm = base.slurm
        if methods or seeds:
            names = (methods or base.model.method).split(",")
            run_root = Path(root) / Path(config).stem if root and len(configs) > 1 else root
            planned += plan_sweep(config, names, seeds or [base.train.seed], overrides, run_root)
        else:
            planned.append(PlannedRun(config, Path(base.run_dir), base.model.method, base.train.seed, overrides=list(overrides)))
    assert slurm is not None
    groups = [[r for r in planned if not method(r.method).teacher], [r for r in planned if method(r.method).teacher]]
    return [g for g in groups if g], slurm


def submit_planned(
    groups: list[list[PlannedRun]],
    slurm: SlurmConfig,
    *,
    allow_config_change: bool = False,
    local: bool = False,
    after: list[str] | None = None,
) -> list[tuple[submitit.Job, Path]]:
    """Each group as one array job, each after the previous one (and after `after`)."""
    waits = list(after or [])
    submitted = []
    for group in groups:
        jobs = [TrainJob(r.config, r.overrides, allow_config_change) for r in group]
        done = submit_runs(jobs, [r.run_dir for r in group], slurm, local=local, after=waits)
        waits = [done[0].job_id.split("_")[0]]
        submitted += [(job, run.run_dir) for job, run in zip(done, group)]
    return submitted


__all__ = [
    "TrainJob",
    "command_slurm",
    "job_state",
    "make_executor",
    "plan_submission",
    "preflight",
    "requeue_refusal",
    "resume_config",
    "show_job",
    "status",
    "stop_action",
    "submit_jobs",
    "submit_planned",
    "submit_runs",
]
