"""`colearn-dist`: the command line. Each sub-command is a thin layer over one module."""

from __future__ import annotations

import argparse
import contextlib
import csv
import glob
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .signals import catch_early, ignore_from_now

# `colearn-dist train` may be a Slurm rank: a stop signal that arrives during the imports below
# (torch takes seconds) is kept for the trainer instead of killing the rank unsaved (exit 138).
if sys.argv[1:2] == ["train"]:
    catch_early()

from .archive import describe, open_archive
from .config import load_config
from .crossval import plan_crossval
from .engine import train
from .evaluate import evaluate_runs
from .export import export_sensor, load_exported, predict
from .launch import launch_local
from .shards import merge_shards, verify_shards, write_shards
from .slurm import command_slurm, note, plan_submission, preflight, resume_config, status, stop_action, submit_jobs, submit_planned
from .stac import stac_path
from .sweep import demo, load_reference, plan_sweep, run_sweep
from .synthetic import write_synthetic_archive


def _import(args: argparse.Namespace) -> int:
    fmt = args.format
    folds = dict(folds=args.folds, fold=args.fold, seed=args.seed)
    if fmt == "presto":
        from .importers.presto import BUNDLED, import_presto

        src = BUNDLED.get(args.src, args.src)
        path = import_presto(src, args.out, overwrite=args.overwrite)
    elif fmt == "lfmc":
        from .importers.lfmc import import_lfmc

        path = import_lfmc(
            args.src, args.out, modalities=args.modalities_yaml, group_folds=args.group_folds, overwrite=args.overwrite, **folds
        )
    elif fmt == "cropharvest":
        from .importers.cropharvest import import_cropharvest

        path = import_cropharvest(args.src, args.out, task=args.task or "binary", labels=args.labels, overwrite=args.overwrite, **folds)
    elif fmt == "treesatai":
        from .importers.treesatai import import_treesatai

        path = import_treesatai(
            args.src, args.out, lists=args.lists, labels=args.labels, aerial_pool=args.aerial_pool, overwrite=args.overwrite
        )
    elif fmt == "mdico_netcdf":
        from .importers.mdico_netcdf import import_mdico_netcdf

        path = import_mdico_netcdf(
            args.src,
            args.out,
            modalities=args.modalities.split(",") if args.modalities else None,
            kinds=args.modalities_yaml,
            task=args.task,
            heldout=args.heldout,
            overwrite=args.overwrite,
            **folds,
        )
    elif args.format == "xarray":
        from .importers.xarray_cube import import_xarray

        path = import_xarray(
            args.src,
            args.out,
            task=args.task or "regression",
            modalities=args.modalities.split(",") if args.modalities else None,
            sample_dim=args.sample_dim,
            time_dim=args.time_dim,
            band_dim=args.band_dim,
            target=args.target,
            class_names=tuple(args.class_names.split(",")) if args.class_names else (),
            overwrite=args.overwrite,
        )
    else:
        from .importers.generic import import_generic

        path = import_generic(
            args.src,
            args.out,
            modalities=args.modalities.split(",") if args.modalities else None,
            task=args.task or "regression",
            class_names=tuple(args.class_names.split(",")) if args.class_names else (),
            overwrite=args.overwrite,
        )
    print(describe(open_archive(path)))
    return 0


def _archive_info(args: argparse.Namespace) -> int:
    print(describe(open_archive(args.path)))
    return 0


def _shard(args: argparse.Namespace) -> int:
    out = args.out or str(Path("shards") / Path(args.archive).name.removesuffix(".zarr"))
    manifest = write_shards(
        args.archive,
        out,
        samples_per_shard=args.samples_per_shard,
        seed=args.seed,
        workers=args.workers,
        val_fraction=args.val_fraction,
        shuffle_window=args.shuffle_window,
        overwrite=args.overwrite,
        row_range=_row_range(args.rows),
    )
    for split, info in manifest.splits.items():
        print(f"{out}: {split:<5} {info['num_samples']:>8} samples in {len(info['shards'])} shard(s)")
    return 0


def _row_range(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        start, stop = (int(v) for v in text.split(":"))
    except ValueError:
        raise ValueError(f"--rows {text!r}: expected START:STOP (archive rows, STOP excluded)") from None
    return start, stop


def _shards_merge(args: argparse.Namespace) -> int:
    manifest = merge_shards(args.out, args.parts, overwrite=args.overwrite, copy=args.copy)
    print(manifest.summary())
    return 0


def _synth(args: argparse.Namespace) -> int:
    path = write_synthetic_archive(
        args.out,
        args.samples,
        seed=args.seed,
        chunk_size=args.chunk_size,
        t=args.steps,
        labelled=not args.unlabeled,
        overwrite=args.overwrite,
    )
    print(describe(open_archive(path, check_values=False)))
    return 0


def _shards_verify(args: argparse.Namespace) -> int:
    problems = verify_shards(args.out)
    for p in problems:
        print(p, file=sys.stderr)
    print(f"{args.out}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


def _train(args: argparse.Namespace) -> int:
    """Exit status 0: finished; 3: stopped at a checkpoint on a time-limit or preemption warning
    (the job should requeue: launchers/sbatch_direct.sh does); 4: stopped at a checkpoint because
    the job was cancelled or Slurm requeues it already (nothing to do)."""
    cfg = load_config(args.config, args.set)
    result = train(cfg, allow_config_change=args.allow_config_change, allow_shards_change=args.allow_shards_change)
    ignore_from_now()  # the run is saved: a stop signal while the process exits must not kill it
    if result["status"] == "finished":
        return 0
    action, why = stop_action(result.get("signal"), cfg.run_dir)
    if int(os.environ.get("RANK", "0")) == 0:
        note(cfg.run_dir, why)
    return 3 if action == "requeue" else 4


def _launch(args: argparse.Namespace) -> int:
    argv = ["train", args.config] + [a for s in args.set for a in ("--set", s)]
    if args.allow_config_change:
        argv.append("--allow-config-change")
    if args.allow_shards_change:
        argv.append("--allow-shards-change")
    return launch_local(args.nproc, argv)


JOBS_HELP = "runs trained at once, each in its own process on its own share of the cores (default 1: one after another)"


def _crossval(args: argparse.Namespace) -> int:
    runs = plan_crossval(
        args.config, args.archive, args.root, folds=args.folds, methods=args.methods.split(","), seeds=args.seeds,
        overrides=args.set, fold_seed=args.fold_seed, inner=args.inner,
    )  # fmt: skip
    return run_sweep(runs, nproc=args.nproc, out=Path(args.root) / "results", jobs=args.jobs)


def _sweep(args: argparse.Namespace) -> int:
    runs = plan_sweep(args.config, methods=args.methods.split(","), seeds=args.seeds, overrides=args.set, root=args.root)
    return run_sweep(runs, nproc=args.nproc, out=args.out, reference=args.reference, jobs=args.jobs)


def _evaluate(args: argparse.Namespace) -> int:
    text = evaluate_runs(args.runs, args.out, split=args.split, reference=load_reference(args.reference), extra_sets=args.sensors)
    print(text)
    return 0


def _export(args: argparse.Namespace) -> int:
    path = export_sensor(args.run, args.modality, args.out, fmt=args.format)
    print(path)
    print(stac_path(path))
    return 0


def _predict(args: argparse.Namespace) -> int:
    cube = {"variable": args.variable, "sample_dim": args.sample_dim, "time_dim": args.time_dim, "band_dim": args.band_dim}
    ids, preds = predict(args.model, args.data, split=args.split, batch_size=args.batch_size, **cube)
    classes = list(load_exported(args.model).meta.get("class_names") or [])
    out = open(args.out, "w", newline="") if args.out else sys.stdout
    writer = csv.writer(out)
    width = 0 if preds.ndim == 1 else preds.shape[1]
    columns = classes if len(classes) == width else [f"p{k}" for k in range(width)]
    writer.writerow(["id"] + (["prediction"] if preds.ndim == 1 else columns))
    for i, p in zip(ids, preds):
        writer.writerow([i] + ([f"{float(p):.6g}"] if preds.ndim == 1 else [f"{float(v):.6g}" for v in p]))
    if args.out:
        out.close()
        print(f"{len(ids)} predictions → {args.out}", file=sys.stderr)
    return 0


def _submit(args: argparse.Namespace) -> int:
    submitted = _submit_command(args) if args.command_line else _submit_training(args)
    for job, what in submitted:
        print(f"submitted {job.job_id} → {what}")
    if args.wait:
        for job, _ in submitted:
            print(f"{job.job_id}: {job.result().get('status')}")
    return 0


def _submit_training(args: argparse.Namespace) -> list:
    """CONFIG… (× --methods × --seeds) or --resume RUN_DIR: one array element per run."""
    if args.resume and args.config:
        raise ValueError("submit takes CONFIG files or --resume RUN_DIR, not both")
    configs = [resume_config(args.resume)[0]] if args.resume else args.config
    if not configs:
        raise ValueError("submit needs CONFIG, --resume RUN_DIR or --command")
    groups, slurm = plan_submission(configs, args.set, args.methods, args.seeds, args.root)
    problems = [p for group in groups for r in group for p in preflight(r.load())]
    if problems and not args.after:
        raise ValueError("; ".join(dict.fromkeys(problems)) + " (with --after JOB, for shards a job writes, this is only a warning)")
    for problem in dict.fromkeys(problems):
        print(f"colearn-dist submit: warning: {problem} (must be fixed by the time the job starts)", file=sys.stderr)
    return submit_planned(groups, slurm, allow_config_change=args.allow_config_change, local=args.local, after=list(args.after))


def _submit_command(args: argparse.Namespace) -> list:
    """--command "SUB-COMMAND ARGS": any colearn-dist sub-command as a single-task job (shard, evaluate …)."""
    if args.config or args.resume or args.methods or args.seeds or args.allow_config_change:
        raise ValueError("submit --command takes no CONFIG, --resume, --methods, --seeds or --allow-config-change")
    argv = shlex.split(args.command_line)
    build_parser().parse_args(argv)  # a mistyped command fails here, not after waiting in the queue
    _, jobs = submit_jobs(
        [CommandJob(argv)], Path(args.root or "slurm-jobs"), command_slurm(args.set, argv[0]), local=args.local, after=args.after
    )
    return [(jobs[0], f"colearn-dist {shlex.join(argv)}")]


@dataclass
class CommandJob:
    """A picklable callable: one colearn-dist sub-command (shard, evaluate, ...) as a Slurm job.
    Wildcards (`runs/*/seed*`) are expanded when the job runs, as a shell would (kept if nothing matches)."""

    argv: list[str]

    def __call__(self) -> dict[str, Any]:
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


def _status(args: argparse.Namespace) -> int:
    for run in args.runs:
        print(status(run))
    return 0


def _demo(args: argparse.Namespace) -> int:
    return demo(datasets=args.datasets.split(","), seeds=args.seeds, methods=args.methods.split(","), quick=args.quick, jobs=args.jobs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="colearn-dist", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("import", help="import a dataset into a zarr archive (benchmarks: docs/BENCHMARKS.md)")
    s.add_argument("format", choices=["presto", "generic", "lfmc", "cropharvest", "treesatai", "mdico_netcdf", "xarray"])
    s.add_argument(
        "src",
        help="presto: fuel_moisture | algae_blooms (bundled) or a folder; generic: a folder of .npy or an .npz; "
        "lfmc: the CSV / Parquet table; cropharvest / treesatai: the dataset folder; mdico_netcdf: a .nc file; "
        "xarray: a zarr store or netCDF file of per-pixel time series (one variable or group per sensor)",
    )
    s.add_argument("out", help="archive path (.zarr)")
    s.add_argument(
        "--task",
        choices=["binary", "multiclass", "multilabel", "regression"],
        help="generic / xarray: the task (default regression); cropharvest: binary (crop / non-crop, default) or multiclass "
        "(crop type); mdico_netcdf: inferred from the target unless given",
    )
    s.add_argument(
        "--modalities",
        help="generic / mdico_netcdf / xarray: comma-separated arrays / views / variables to use as modalities (mdico_netcdf: A_B concatenates views A and B)",
    )
    s.add_argument("--sample-dim", default="sample", help="xarray: the dimension of pixels / samples (default sample)")
    s.add_argument("--time-dim", default="time", help="xarray: the time dimension (default time)")
    s.add_argument("--band-dim", default="band", help="xarray: the band dimension (default band)")
    s.add_argument(
        "--target",
        default="target",
        help="xarray: the target variable (default target); split / group variables, when present, are 'split' and 'group'",
    )
    s.add_argument("--class-names", help="generic: comma-separated class names")
    s.add_argument(
        "--modalities-yaml",
        help="lfmc: YAML mapping modality → feature names (default: the paper's s1 and optical, plus static); "
        "mdico_netcdf: YAML mapping view → kind (series | static | image)",
    )
    s.add_argument("--labels", help="cropharvest: labels GeoJSON (default SRC/labels.geojson); treesatai: multi-label JSON")
    s.add_argument("--lists", help="treesatai: folder with {train,val,test}_filenames.lst (default SRC/split)")
    s.add_argument(
        "--folds",
        type=int,
        default=10,
        help="lfmc / cropharvest (mdico_netcdf without held-out samples): k of the k-fold test split (default 10, as the paper)",
    )
    s.add_argument("--fold", type=int, default=0, help="lfmc / cropharvest / mdico_netcdf: which fold is the test split (0..k-1)")
    s.add_argument("--seed", type=int, default=0, help="lfmc / cropharvest / mdico_netcdf: seed of the fold assignment")
    s.add_argument("--group-folds", action="store_true", help="lfmc: whole sites per fold (the paper uses random folds)")
    s.add_argument("--aerial-pool", type=int, default=1, help="treesatai: average p×p blocks of the aerial patches (304 → 304/p)")
    s.add_argument("--heldout", default="test", choices=["val", "test"], help="mdico_netcdf: where train_mask = false samples go")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=_import)

    s = sub.add_parser("archive", help="archive tools")
    ss = s.add_subparsers(dest="archive_command", required=True)
    a = ss.add_parser("info", help="validate an archive and describe it")
    a.add_argument("path")
    a.set_defaults(fn=_archive_info)

    s = sub.add_parser("shard", help="write WebDataset shards and a manifest from an archive")
    s.add_argument("archive")
    s.add_argument("out", nargs="?", help="output folder (default shards/<archive name>)")
    s.add_argument("--samples-per-shard", type=int, default=512)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=int, default=max(1, min(4, (os.cpu_count() or 2))))
    s.add_argument("--val-fraction", type=float, default=0.15, help="carved out of train (by group) when the archive has no val split")
    s.add_argument(
        "--shuffle-window",
        type=int,
        help="samples shuffled together before they are cut into shards (default 16 × samples per shard); "
        "larger mixes a location-sorted archive more, at the cost of worker memory",
    )
    s.add_argument(
        "--rows",
        metavar="START:STOP",
        help="shard only archive rows START..STOP-1 (one part of a parallel sharding; merge with `shards merge`)",
    )
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=_shard)

    s = sub.add_parser("synth", help="write a synthetic multi-sensor archive of any size (scale tests, docs/PRETRAINING.md)")
    s.add_argument("out", help="archive path (.zarr)")
    s.add_argument("--samples", type=int, required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--chunk-size", type=int, default=4096, help="samples per zarr chunk")
    s.add_argument("--steps", type=int, default=12, help="monthly time steps of the series sensors")
    s.add_argument("--unlabeled", action="store_true", help="NaN targets (an archive for pretraining only)")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=_synth)

    s = sub.add_parser("shards", help="shard tools")
    ss = s.add_subparsers(dest="shards_command", required=True)
    v = ss.add_parser("verify", help="check every shard against the manifest")
    v.add_argument("out")
    v.set_defaults(fn=_shards_verify)
    v = ss.add_parser("merge", help="one manifest over shard folders written by separate jobs (e.g. `shard --rows`)")
    v.add_argument("out", help="merged folder: the parts' shards are hard-linked (or copied) here, renamed per part")
    v.add_argument("parts", nargs="+", help="shard folders to merge")
    v.add_argument("--copy", action="store_true", help="copy the shards instead of hard-linking them")
    v.add_argument("--overwrite", action="store_true")
    v.set_defaults(fn=_shards_merge)

    def config_args(s: argparse.ArgumentParser) -> None:
        s.add_argument("config", help="experiment YAML (see configs/)")
        s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. train.seed=1")
        s.add_argument("--allow-config-change", action="store_true", help="resume even if the config changed")
        s.add_argument(
            "--allow-shards-change",
            action="store_true",
            help="resume on shards other than the checkpoint's (regenerated / replaced); the interrupted epoch starts afresh",
        )

    s = sub.add_parser("train", help="train one run (one process, or one rank of a launched job)")
    config_args(s)
    s.set_defaults(fn=_train)

    s = sub.add_parser("launch", help="train one run with N local processes (torchrun)")
    s.add_argument("--nproc", type=int, default=2)
    config_args(s)
    s.set_defaults(fn=_launch)

    s = sub.add_parser("sweep", help="train methods × seeds from one config, then evaluate them together")
    s.add_argument("config")
    s.add_argument("--methods", default="mdico,single,fusion,dropout,distill")
    s.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--root", help="runs go under ROOT/<method>/seed<k> (default: the config's run_dir)")
    s.add_argument("--nproc", type=int, default=1)
    s.add_argument("--jobs", type=int, default=1, help=JOBS_HELP)
    s.add_argument("--out", help="where the tables and figures go (default ROOT/results)")
    s.add_argument("--reference", help="YAML of reference scores per dataset and sensor set")
    s.set_defaults(fn=_sweep)

    s = sub.add_parser(
        "crossval",
        help="k-fold cross-validation: every sample in one fold (whole groups where the archive has them), "
        "methods × seeds trained per fold, one table over folds with paired tests against the single-sensor model",
    )
    s.add_argument("config")
    s.add_argument("archive", help="the zarr archive; its train, val and test samples are pooled and re-split into folds")
    s.add_argument(
        "--root", required=True, help="fold shards go to ROOT/data/, runs to ROOT/fold<i>/<method>/seed<k>, tables to ROOT/results"
    )
    s.add_argument("--folds", type=int, default=10)
    s.add_argument("--fold-seed", type=int, default=0, help="seed of the fold assignment")
    s.add_argument(
        "--inner",
        action="store_true",
        help="folds over the archive's train and val samples only, its test split left out: for choosing settings",
    )
    s.add_argument("--methods", default="mdico,single")
    s.add_argument("--seeds", type=int, nargs="+", default=[0])
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--nproc", type=int, default=1)
    s.add_argument("--jobs", type=int, default=1, help=JOBS_HELP)
    s.set_defaults(fn=_crossval)

    s = sub.add_parser("evaluate", help="score runs on the test split: per method × inference sensor, mean ± std over seeds")
    s.add_argument("runs", nargs="+")
    s.add_argument("--out", default="results")
    s.add_argument("--split", default="test")
    s.add_argument("--reference", help="YAML of reference scores per dataset and sensor set")
    s.add_argument(
        "--sensors",
        nargs="+",
        default=[],
        metavar="SET",
        help="also score these sensor subsets, e.g. s1+s2 s2+era5 (MDiCo averages their heads; fusion / dropout mask the others; single-sensor runs skip them)",
    )
    s.set_defaults(fn=_evaluate)

    s = sub.add_parser("export", help="write one sensor's self-contained model (torch.export .pt2 or ONNX) and its STAC MLM item")
    s.add_argument("run")
    s.add_argument("--modality", required=True, help="the sensor whose model to export")
    s.add_argument(
        "--format", choices=["pt2", "onnx"], default="pt2", help="pt2: torch.export (default); onnx: ONNX opset 18 (onnxruntime)"
    )
    s.add_argument("--out", help="model file (default RUN/model_<modality>.<format>); the item is written beside it as <file>.stac.json")
    s.set_defaults(fn=_export)

    s = sub.add_parser("predict", help="apply an exported sensor model (.pt2 / .onnx) to an archive, shards or an xarray datacube")
    s.add_argument("model")
    s.add_argument("data", metavar="PATH", help="a zarr archive, a shards folder (with manifest.json), or a zarr / netCDF datacube")
    s.add_argument("--split", help="train / val / test (archive: default every sample; shards: required)")
    s.add_argument("--batch-size", type=int, default=4096)
    s.add_argument("--variable", help="datacube: the sensor's variable (default: the model's sensor name)")
    s.add_argument("--sample-dim", default="sample", help="datacube: the dimension of pixels / samples (default sample)")
    s.add_argument("--time-dim", default="time", help="datacube: the time dimension (default time)")
    s.add_argument("--band-dim", default="band", help="datacube: the band dimension (default band)")
    s.add_argument("--out", help="CSV file (default: stdout)")
    s.set_defaults(fn=_predict)

    s = sub.add_parser("submit", help="submit runs (configs × methods × seeds as array jobs) or a command to Slurm through Submitit")
    s.add_argument("config", nargs="*", help="one array element per config (e.g. one per fold)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. slurm.nodes=2 slurm.gpus_per_node=4")
    s.add_argument("--resume", metavar="RUN_DIR", help="continue a run in a new allocation (its config.yaml)")
    s.add_argument("--allow-config-change", action="store_true", help="resume even if the config changed")
    s.add_argument(
        "--command",
        dest="command_line",
        metavar='"SUB-COMMAND ARGS"',
        help='any colearn-dist sub-command as a single-task CPU job, e.g. "shard archives/x.zarr shards/x" (only slurm.* --set apply)',
    )
    s.add_argument("--methods", help="comma-separated: one array element per method (and sensor for single/distill)")
    s.add_argument("--seeds", type=int, nargs="+", help="one array element per seed")
    s.add_argument(
        "--root",
        help="with --methods/--seeds: where the runs go (ROOT/<config name>/… for several configs); with --command: where the job logs go (default slurm-jobs)",
    )
    s.add_argument("--after", nargs="+", default=[], metavar="JOB_ID", help="start only after these jobs succeeded")
    s.add_argument("--local", action="store_true", help="Submitit's local executor instead of Slurm (laptop, CI)")
    s.add_argument("--wait", action="store_true", help="wait for the job and print its status")
    s.set_defaults(fn=_submit)

    s = sub.add_parser("status", help="job state, last checkpoint and last metrics of runs")
    s.add_argument("runs", nargs="+")
    s.set_defaults(fn=_status)

    s = sub.add_parser("demo", help="the main job on the bundled data: import, shard, train, evaluate, print the table")
    s.add_argument("--datasets", default="fuel_moisture,algae_blooms")
    s.add_argument("--methods", default="mdico,single,presto", help="the README's table (add fusion,dropout,distill for every baseline)")
    s.add_argument("--seeds", type=int, nargs="+", default=[0])
    s.add_argument("--quick", action="store_true", help="few epochs: checks the pipeline, not the science")
    s.add_argument("--jobs", type=int, default=1, help=JOBS_HELP)
    s.set_defaults(fn=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, OSError, RuntimeError) as exc:  # OSError: missing files, CorruptShardError, disk full …
        if os.environ.get("COLEARN_DEBUG"):
            raise
        print(f"colearn-dist {args.command}: error: {exc}", file=sys.stderr)
        return 2


def exit_rank(code: int) -> None:
    """End a torchrun rank without the interpreter's teardown once its command has returned (the run's
    files are closed and every rank has passed the run's last barrier): there gloo's threads aborted
    finished 2-rank runs here ("terminate called without an active exception", exit -6, two CI runs
    of 21cc487 and c6f68a2, after test scoring, with the process group already destroyed at exit in
    the second), which a scheduler counts as a failed job. Other processes exit normally."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_rank(main())
