"""Methods × seeds from one config: the comparison the project exists for.

A sweep is a list of ordinary runs (one config each, differing by method, sensor and seed), so the
same list can run here one after another or become a Slurm array. Finished runs (those with test
metrics) are skipped, so an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .archive import describe, open_archive
from .config import RunConfig, load_config
from .engine import train
from .evaluate import evaluate_runs
from .launch import cli_command, launch_local
from .manifest import load_manifest
from .methods import TRAIN_ORDER, method
from .runs import RunDir
from .shards import write_shards

# The shipped configs (package data; the repository's top-level configs/ links here).
CONFIGS = Path(__file__).resolve().parent / "configs"


@dataclass
class PlannedRun:
    config: str
    run_dir: Path
    method: str
    seed: int
    modality: str | None = None
    overrides: list[str] = field(default_factory=list)

    def load(self) -> RunConfig:
        return load_config(self.config, self.overrides)

    @property
    def done(self) -> bool:
        return RunDir(self.run_dir).metrics("test").exists()


def plan_sweep(
    config: str | Path,
    methods: list[str],
    seeds: list[int],
    overrides: list[str] | None = None,
    root: str | Path | None = None,
) -> list[PlannedRun]:
    overrides = list(overrides or [])
    base = load_config(config, overrides)
    root = Path(root or base.run_dir)
    modalities = base.data.modalities or _manifest_modalities(base)
    unknown = sorted(set(methods) - set(TRAIN_ORDER))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {list(TRAIN_ORDER)}")
    runs: list[PlannedRun] = []
    for seed in seeds:
        for name in sorted(methods, key=TRAIN_ORDER.index):
            how = method(name)
            for modality in modalities if how.per_sensor else [None]:
                run_name = f"{name}-{modality}" if modality else name
                run_dir = root / run_name / f"seed{seed}"
                sets = [f"model.method={name}", f"train.seed={seed}", f"run_dir={run_dir}", f"name={run_name}-seed{seed}"]
                if modality:
                    sets.append(f"model.modality={modality}")
                if how.teacher:
                    if how.teacher not in methods:
                        raise ValueError(f"method {name!r} needs {how.teacher!r} in the same sweep (its teacher)")
                    sets.append(f"model.teacher={root / how.teacher / f'seed{seed}'}")
                runs.append(PlannedRun(str(config), run_dir, name, seed, modality, overrides + sets))
    return runs


def _manifest_modalities(cfg: RunConfig) -> list[str]:
    return list(load_manifest(cfg.data.shards).modalities)


def run_sweep(runs: list[PlannedRun], nproc: int = 1, out: str | Path | None = None, reference: str | None = None, jobs: int = 1) -> int:
    """Train the runs not finished yet, then evaluate them all. `jobs` > 1 trains that many at once,
    each in its own process on its own cores (`run_parallel`); otherwise one after another."""
    if jobs > 1:
        failed = run_parallel(runs, jobs, nproc)
        if failed:
            print(f"{len(failed)} run(s) failed, nothing evaluated: " + ", ".join(map(str, failed)), file=sys.stderr)
            return 3
    else:
        code = _run_in_turn(runs, nproc)
        if code:
            return code
    if not runs:
        return 0
    out = Path(out) if out else runs[0].run_dir.parent.parent / "results"
    print(evaluate_runs([r.run_dir for r in runs], out, reference=load_reference(reference)))
    print(f"tables and figures in {out}")
    return 0


def _run_in_turn(runs: list[PlannedRun], nproc: int) -> int:
    for i, run in enumerate(runs, 1):
        if run.done:
            print(f"[{i}/{len(runs)}] {run.run_dir}: done, skipped")
            continue
        print(f"[{i}/{len(runs)}] {run.run_dir}")
        if nproc > 1:
            code = launch_local(nproc, ["train", run.config] + [a for s in run.overrides for a in ("--set", s)])
            if code:
                return code
        else:
            result = train(run.load())
            if result["status"] != "finished":
                return 3
    return 0


def core_slots(jobs: int, nproc: int = 1, cores: list[int] | None = None) -> list[set[int]]:
    """`jobs` disjoint sets of the cores this process may use, one per concurrent run. A run pinned
    to its own cores sizes its threads from them (`distributed.threads_per_rank`), so concurrent
    runs never oversubscribe the machine; cores left over by the division stay idle."""
    cores = sorted(cores if cores is not None else os.sched_getaffinity(0))
    per = len(cores) // max(1, jobs)
    if jobs < 1 or per < nproc:
        raise ValueError(f"--jobs {jobs} × --nproc {nproc} needs {max(1, jobs) * nproc} cores; this process may use {len(cores)}")
    return [set(cores[j * per : (j + 1) * per]) for j in range(jobs)]


def run_parallel(runs: list[PlannedRun], jobs: int, nproc: int = 1, poll_s: float = 1.0) -> list[Path]:
    """Train the unfinished runs `jobs` at a time, each a `colearn-dist train` process pinned to its
    own cores, its console in RUN_DIR/console.log; a distillation run starts once its teacher has
    finished. Returns the run directories that failed (or whose teacher failed)."""
    slots = core_slots(jobs, nproc)
    pending = [r for r in runs if not r.done]
    teachers = {r.run_dir: Path(t) if (t := r.load().model.teacher) else None for r in pending}
    unfinished = {r.run_dir for r in pending}
    running: dict[subprocess.Popen[bytes], tuple[PlannedRun, set[int], float]] = {}
    failed: list[Path] = []
    total, started = len(runs), len(runs) - len(pending)
    print(f"{started} of {total} runs done already; {len(pending)} to train, {jobs} at a time")
    try:
        while pending or running:
            for run in list(pending):
                teacher = teachers[run.run_dir]
                if teacher in failed:
                    pending.remove(run)
                    failed.append(run.run_dir)
                    print(f"{run.run_dir}: not trained, its teacher {teacher} failed", file=sys.stderr)
                elif slots and (teacher is None or teacher not in unfinished):
                    pending.remove(run)
                    slot = slots.pop()
                    running[_start(run, slot, nproc)] = (run, slot, time.monotonic())
                    started += 1
                    print(f"[{started}/{total}] {run.run_dir}: started on cores {_cores(slot)}", flush=True)
            if not running and pending:
                raise RuntimeError(f"{pending[0].run_dir} waits for a teacher that is not in the sweep")
            time.sleep(poll_s)
            for proc in [p for p in running if p.poll() is not None]:
                run, slot, start = running.pop(proc)
                slots.append(slot)
                unfinished.discard(run.run_dir)
                took = f"{time.monotonic() - start:.0f} s"
                if proc.returncode == 0 and run.done:
                    print(f"{run.run_dir}: finished in {took}", flush=True)
                else:
                    failed.append(run.run_dir)
                    print(
                        f"{run.run_dir}: FAILED (exit code {proc.returncode}) after {took}; see {run.run_dir / 'console.log'}",
                        file=sys.stderr,
                    )
    finally:
        for proc in running:
            proc.terminate()  # it checkpoints on SIGTERM (signals.py) and resumes in the next sweep
        for proc in running:
            proc.wait()
    return failed


def _start(run: PlannedRun, cores: set[int], nproc: int) -> subprocess.Popen[bytes]:
    run.run_dir.mkdir(parents=True, exist_ok=True)
    argv = ["train", run.config] + [a for s in run.overrides for a in ("--set", s)]
    with open(run.run_dir / "console.log", "ab") as console:
        return subprocess.Popen(
            cli_command(argv, nproc if nproc > 1 else None),
            stdout=console,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: os.sched_setaffinity(0, cores),
        )


def _cores(cores: set[int]) -> str:
    ordered = sorted(cores)
    return f"{ordered[0]}-{ordered[-1]}" if len(ordered) > 1 else str(ordered[0])


def load_reference(path: str | None) -> dict[str, dict[str, float]] | None:
    """Reference scores per dataset and inference sensor set (e.g. the random forests of configs/reference.yaml)."""
    if not path:
        return None
    data: Any = yaml.safe_load(Path(path).read_text())
    return {str(k): {str(s): float(v) for s, v in d.items()} for k, d in (data or {}).items()}


def demo(datasets: list[str], seeds: list[int], methods: list[str], quick: bool = False, jobs: int = 1) -> int:
    """The main job on the bundled data: import → shard → train every method (`jobs` runs at once, see
    `run_parallel`) → evaluate → print the table."""
    from .importers.presto import BUNDLED, import_presto

    configs = CONFIGS
    for name in datasets:
        if name not in BUNDLED:
            raise ValueError(f"unknown bundled dataset {name!r}; have {sorted(BUNDLED)}")
        archive = Path("archives") / f"{name}.zarr"
        if not archive.exists():
            import_presto(BUNDLED[name], archive)
        print(describe(open_archive(archive)))
        shards = Path("shards") / name
        if not (shards / "manifest.json").exists():
            write_shards(archive, shards, samples_per_shard=256, seed=0)
        overrides = [f"data.shards={shards}"]
        if quick:
            overrides += ["train.epochs=3", "train.patience=0"]
        root = Path("runs") / ("demo-quick" if quick else "demo") / name
        runs = plan_sweep(configs / f"{name}.yaml", methods, seeds, overrides, root)
        code = run_sweep(runs, out=root / "results", reference=str(configs / "reference.yaml"), jobs=jobs)
        if code:
            return code
    return 0
