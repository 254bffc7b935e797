"""Tables over methods and seeds: the scores of any number of runs (scoring.evaluate_run writes
each run's `metrics_<split>.json`), aggregated into CSV, Markdown and figures."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .context import context_label
from .methods import TABLE_ORDER
from .metrics import PRIMARY, TABLE_METRICS
from .report import aggregate, cross_fold, cross_fold_markdown, markdown_table, plot_scores, write_csv
from .runs import RunDir
from .scoring import evaluate_run, run_sensor_sets

REFERENCE_NAME = "random forest, month + same sensor"


def load_records(run_dirs: Iterable[str | Path], split: str = "test", extra_sets: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Records of finished runs: their metrics_<split>.json where it holds every sensor set asked
    for (each run's own, plus `extra_sets`), otherwise the run is evaluated (again)."""
    extra_sets = list(extra_sets or [])
    records = []
    for run in run_dirs:
        path = RunDir(run).metrics(split)
        wanted = set(run_sensor_sets(RunDir(run).config(), extra_sets)) if extra_sets else set()
        recs = json.loads(path.read_text()) if path.exists() else None
        if recs is None or not wanted <= {r["sensors"] for r in recs}:
            recs = evaluate_run(run, split, extra_sets=extra_sets)
        for r in recs:
            r.setdefault("context", context_label(None))  # written before the key existed
            records.append({k: v for k, v in r.items() if k != "metrics"} | r["metrics"])
    return records


def evaluate_runs(
    run_dirs: Iterable[str | Path],
    out_dir: str | Path,
    split: str = "test",
    reference: dict[str, dict[str, float]] | None = None,
    extra_sets: Iterable[str] | None = None,
) -> str:
    """Mean ± std over seeds for each method × inference sensor set (each run's own, plus
    `extra_sets` such as "s1+s2"): CSV (every metric), Markdown (a table per scalar metric of the
    task; per-class F1 stays in the CSV), PNG; returns the primary metric's Markdown, to print.
    Runs on the folds of a k-fold experiment (`crossval`) are aggregated over folds instead, into
    one table per dataset (`crossfold_<split>.md` / `.csv`, see `report.cross_fold`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = load_records(run_dirs, split, extra_sets)
    if not records:
        raise ValueError("no runs to evaluate")
    folded = [r for r in records if "fold" in r]
    texts = [_cross_fold_tables(folded, out_dir, split)] if folded else []
    plain = [r for r in records if "fold" not in r]
    if plain:
        texts.append(_seed_tables(plain, out_dir, split, reference))
    return "\n\n".join(texts)


def _cross_fold_tables(records: list[dict[str, Any]], out_dir: Path, split: str) -> str:
    """Runs of the folds of a k-fold experiment (crossval.py): one table per dataset and setting over
    the folds, with each method's paired difference against the single-sensor model."""
    task = records[0]["task"]
    task_metric = PRIMARY[task][0]
    rows: list[dict[str, Any]] = []
    sections: list[str] = []
    others: list[str] = []
    for dataset in sorted({r["dataset"] for r in records}):
        for setting, context in sorted({(r["setting"], str(r.get("context"))) for r in records if r["dataset"] == dataset}):
            sub = [r for r in records if r["dataset"] == dataset and r["setting"] == setting and str(r.get("context")) == context]
            methods = [m for m in TABLE_ORDER if any(r["method"] == m for r in sub)]
            for metric in TABLE_METRICS[task]:
                got = cross_fold([r for r in sub if metric in r], metric)
                rows += got
                folds = max(g["n_folds"] for g in got)
                title = f"### {dataset} — trained with {setting}, context {context}, {folds}-fold cross-validation ({split} {metric})"
                table = cross_fold_markdown(got, methods=methods, sensors=_sensor_order(sub))
                (sections if metric == task_metric else others).append(f"{title}\n\n{table}")
    write_csv(rows, out_dir / f"crossfold_{split}.csv")
    (out_dir / f"crossfold_{split}.md").write_text("\n\n".join(sections + others) + "\n")
    return "\n\n".join(sections) + "\n"


def _seed_tables(records: list[dict[str, Any]], out_dir: Path, split: str, reference: dict[str, dict[str, float]] | None) -> str:
    rows = aggregate(records)
    write_csv(rows, out_dir / f"results_{split}.csv")
    task = records[0]["task"]
    task_metric = PRIMARY[task][0]
    sections: list[str] = []
    others: list[str] = []
    for dataset in sorted({r["dataset"] for r in rows}):
        for setting, context in sorted({(r["setting"], str(r.get("context"))) for r in rows if r["dataset"] == dataset}):
            sub = [r for r in rows if r["dataset"] == dataset and r["setting"] == setting and str(r.get("context")) == context]
            ref = (reference or {}).get(dataset)
            if ref is not None and setting in ref:  # the row "all" of this setting is the setting's sensor set
                ref = {**ref, "all": ref[setting]}
            order: dict[str, Any] = {
                "methods": [m for m in TABLE_ORDER if any(r["method"] == m for r in sub)],
                "sensors": _sensor_order(sub),
            }
            for metric in TABLE_METRICS[task]:
                reference_column = ref if metric == task_metric else None  # reference scores are primary-metric scores
                table = markdown_table(sub, metric, reference_column, reference_name=REFERENCE_NAME, **order)
                title = f"### {dataset} — trained with {setting}, context: {context} ({split} {metric})"
                (sections if metric == task_metric else others).append(f"{title}\n\n" + table)
            slug = "" if context == context_label(None) else "_" + context.replace(" + ", "-").replace(" ", "-")
            png = out_dir / f"scores_{dataset}_{setting.replace('+', '-')}{slug}_{split}.png"
            plot_scores(sub, task_metric, png, reference=ref, reference_name=REFERENCE_NAME, **order)
    text = "\n\n".join(sections) + "\n"
    (out_dir / f"results_{split}.md").write_text("\n\n".join(sections + others) + "\n")
    return text


def _sensor_order(rows: list[dict[str, Any]]) -> list[str]:
    """Single sensors in the order runs list them (the archive's), then combinations."""
    by_method: dict[str, list[str]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r["sensors"])
    widest = max(by_method.values(), key=lambda sensors: len(set(sensors)))  # a multi-sensor run lists them in archive order
    seen = list(dict.fromkeys(widest + [r["sensors"] for r in rows]))
    return [s for s in seen if "+" not in s and s != "all"] + [s for s in seen if "+" in s or s == "all"]
