"""Slurm through Submitit: submit runs, survive time limits and preemption, resume in a new allocation.

Submitit's own signal handler checkpoints by calling a method *inside* the signal handler, on rank 0
only. A DeepSpeed checkpoint is collective and must happen between steps, so instead the engine
catches Slurm's warning signal on every rank, all ranks agree at the next step boundary, write the
checkpoint together, and rank 0 requeues the job. The requeued job runs the same pickled `TrainJob`,
which finds `latest` in the run directory and continues.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import submitit

from .config import ConfigError, RunConfig, SlurmConfig, apply_override, from_dict, load_config


@dataclass
class TrainJob:
    """A picklable callable: one run, one rank per Slurm task."""

    config: str
    overrides: list[str]
    allow_config_change: bool = False

    def __call__(self) -> dict[str, Any]:
        from .engine import train

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        cfg = load_config(self.config, self.overrides)
        result = train(cfg, allow_config_change=self.allow_config_change)
        if result["status"] == "stopped":
            self._requeue_and_wait(cfg)
        return result

    def _requeue_and_wait(self, cfg: RunConfig) -> None:
        env = submitit.JobEnvironment()
        if env.cluster != "slurm":
            return  # local executor: the run simply stops, `submit --resume` continues it
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


def requeue_refusal(max_requeues: int, run_dir: str | Path, environ: Mapping[str, str] = os.environ) -> str | None:
    """None when a checkpointed job may requeue itself once more; else why not and how to continue."""
    restarts = int(environ.get("SLURM_RESTART_COUNT") or 0)
    if restarts < max_requeues:
        return None
    return (
        f"{run_dir}: stopped at its checkpoint and not requeued: the job was requeued {restarts} time(s), "
        f"slurm.max_requeues is {max_requeues}. Continue it in a new allocation with: colearn-dist submit --resume {run_dir}"
    )


@dataclass
class CommandJob:
    """A picklable callable: one colearn-dist sub-command (shard, evaluate, ...) as a Slurm job.
    Wildcards (`runs/*/seed*`) are expanded when the job runs, as a shell would (kept if nothing matches)."""

    argv: list[str]

    def __call__(self) -> dict[str, Any]:
        from .cli import main

        argv = [match for arg in self.argv for match in (sorted(glob.glob(arg)) if glob.has_magic(arg) else []) or [arg]]
        err = _Tee(sys.stderr)
        with contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse rejected the command line
                code = exc.code if isinstance(exc.code, int) else 2
        if code:
            raise RuntimeError(f"colearn-dist {shlex.join(self.argv)} exited with status {code}: {err.tail().strip()}")
        return {"status": "finished", "command": shlex.join(self.argv)}


class _Tee:
    """Writes through to a stream and keeps the end of what was written (for the job's error message)."""

    def __init__(self, stream: Any, keep: int = 4000) -> None:
        self._stream, self._keep, self._text = stream, keep, ""

    def write(self, text: str) -> int:
        self._text = (self._text + text)[-self._keep :]
        return self._stream.write(text)

    def tail(self) -> str:
        return self._text

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def command_slurm(overrides: list[str], command: str) -> SlurmConfig:
    """The config-less Slurm settings of a `submit --command` job: SlurmConfig's defaults, `slurm.*`
    overrides, one task on one node."""
    data: dict[str, Any] = {}
    for item in overrides:
        if not item.startswith("slurm."):
            raise ConfigError(f"--command runs without a config: only slurm.* settings apply, got --set {item!r}")
        apply_override(data, item.removeprefix("slurm."), "--set")
    slurm = from_dict(SlurmConfig, data, "--set: slurm")
    name = slurm.job_name if "job_name" in data else f"{slurm.job_name}-{command}"
    return dataclasses.replace(slurm, nodes=1, tasks_per_node=1, job_name=name)


def make_executor(folder: Path, slurm: SlurmConfig, local: bool = False) -> submitit.Executor:
    executor = submitit.AutoExecutor(folder=str(folder), cluster="local" if local else None, slurm_max_num_timeout=slurm.max_requeues)
    tasks = slurm.tasks_per_node or max(1, slurm.gpus_per_node)
    params: dict[str, Any] = {
        "nodes": slurm.nodes,
        "tasks_per_node": tasks,
        "cpus_per_task": slurm.cpus_per_task,
        "mem_gb": slurm.mem_gb * tasks,
        "timeout_min": slurm.time_min,
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


def _with_dependency(executor: submitit.Executor, job_ids: list[str]) -> None:
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
        record = run_dir / "jobs.json"
        history = json.loads(record.read_text()) if record.exists() else []
        history.append({"job_id": job.job_id, "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"), "cluster": cluster})
        record.write_text(json.dumps(history, indent=1))
    return submitted


def status(run_dir: str | Path) -> str:
    """Job state, last checkpoint and the last logged lines of a run, as text."""
    from .checkpoint import Checkpointer

    run_dir = Path(run_dir)
    lines = [f"run {run_dir}"]
    record = run_dir / "jobs.json"
    if record.exists():
        last = json.loads(record.read_text())[-1]
        lines.append(f"  job {last['job_id']} ({last['cluster']}, submitted {last['submitted']}): {job_state(last['job_id'])}")
    else:
        lines.append("  no job submitted from here")
    latest = Checkpointer(run_dir).latest()
    if latest is None:
        lines.append("  no checkpoint yet")
    else:
        state = json.loads((latest / "state.json").read_text())
        lines.append(f"  last checkpoint {latest.name}: step {state['step']}, epoch {state['epoch']}, world size {state['world_size']}")
        if state.get("history"):
            h = state["history"][-1]
            shown = ", ".join(f"{k} {v:.4g}" for k, v in h["scores"].items())
            lines.append(f"  last validation (epoch {h['epoch']}, higher is better): {shown}")
    metrics = run_dir / "metrics_test.json"
    if metrics.exists():
        for rec in json.loads(metrics.read_text()):
            shown = ", ".join(f"{k} {v:.4g}" for k, v in list(rec["metrics"].items())[:4])
            lines.append(f"  test {rec['sensors']}: {shown}")
    log = run_dir / "train.log"
    if log.exists():
        tail = log.read_text().splitlines()[-3:]
        lines += ["  log: " + t for t in tail]
    return "\n".join(lines)


def job_state(job_id: str) -> str:
    for cmd in (["squeue", "-h", "-j", job_id, "-o", "%T"], ["sacct", "-n", "-X", "-j", job_id, "-o", "State"]):
        if shutil.which(cmd[0]) is None:
            continue
        out = subprocess.run(cmd, capture_output=True, text=True)
        state = out.stdout.strip().split("\n")[0].strip() if out.returncode == 0 else ""
        if state:
            return state
    return "unknown (not in squeue/sacct)"


def resume_config(run_dir: str | Path) -> tuple[str, RunConfig]:
    """The config a run was started with (its run_dir/config.yaml), to continue it in a new allocation."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir}: no config.yaml (was this run started by colearn-dist?)")
    return str(path), load_config(path)


__all__ = [
    "CommandJob",
    "TrainJob",
    "command_slurm",
    "make_executor",
    "requeue_refusal",
    "resume_config",
    "status",
    "submit_jobs",
    "submit_runs",
]

