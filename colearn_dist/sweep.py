"""Methods × seeds from one config: the comparison the project exists for.

A sweep is a list of ordinary runs (one config each, differing by method, sensor and seed), so the
same list can run here one after another or become a Slurm array. Finished runs (those with test
metrics) are skipped, so an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .archive import describe, open_archive
from .config import RunConfig, load_config
from .engine import train
from .evaluate import evaluate_runs
from .launch import launch_local
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


def run_sweep(runs: list[PlannedRun], nproc: int = 1, out: str | Path | None = None, reference: str | None = None) -> int:
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
    if not runs:
        return 0
    out = Path(out) if out else runs[0].run_dir.parent.parent / "results"
    print(evaluate_runs([r.run_dir for r in runs], out, reference=load_reference(reference)))
    print(f"tables and figures in {out}")
    return 0


def load_reference(path: str | None) -> dict[str, dict[str, float]] | None:
    """Reference scores per dataset and inference sensor set (e.g. the random forests of configs/reference.yaml)."""
    if not path:
        return None
    data: Any = yaml.safe_load(Path(path).read_text())
    return {str(k): {str(s): float(v) for s, v in d.items()} for k, d in (data or {}).items()}


def demo(datasets: list[str], seeds: list[int], methods: list[str], quick: bool = False) -> int:
    """The main job on the bundled data: import → shard → train every method → evaluate → print the table."""
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
        code = run_sweep(runs, out=root / "results", reference=str(configs / "reference.yaml"))
        if code:
            return code
    return 0
