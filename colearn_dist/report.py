"""Tables and figures over runs: one method × one seed gives metrics per inference sensor set.

Input records look like
`{"dataset", "setting", "method", "seed", "sensors", "split", <metric>: float, ...}`;
`aggregate` turns them into one row per (dataset, setting, method, sensors, split) with
`<metric>_mean`, `<metric>_std` and `n_seeds`, which the table, CSV and figure functions take.
"""

from __future__ import annotations

import csv
import math
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from colearn_dist.metrics import metric_direction

GROUP_KEYS = ("dataset", "setting", "context", "method", "sensors", "split")
_TABLE_KEYS = ("dataset", "setting", "context", "split")  # one table / figure shows a single one of these
# How a table header says which way a metric is better (`metrics.metric_direction`).
_BETTER = {"lower": "lower", "higher": "higher", "zero": "closer to 0"}
_OPTIONAL_KEYS = ("context",)  # records written before the key existed group as None

PathLike = str | os.PathLike[str]


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


# ------------------------------------------------------------------------------------ aggregate


def aggregate(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample std (ddof=1) over seeds per (dataset, setting, method, sensors, split).

    Groups and metrics keep their order of first appearance, so tables follow the order in which
    runs were evaluated. A seed seen twice in one group is an error: it would silently double-weight
    a run. NaN values (a metric undefined for one seed) are left out of that metric's mean and std
    rather than poisoning them; the std of a single value is NaN, not 0, since one seed says nothing
    about spread.
    """
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for i, rec in enumerate(records):
        missing = [k for k in (*GROUP_KEYS, "seed") if k not in rec and k not in _OPTIONAL_KEYS]
        if missing:
            raise ValueError(f"record {i} lacks {missing}: {dict(rec)}")
        groups.setdefault(tuple(rec.get(k) for k in GROUP_KEYS), []).append(rec)

    rows = []
    for key, recs in groups.items():
        seeds = [r["seed"] for r in recs]
        if len(set(seeds)) != len(seeds):
            dup = sorted({s for s in seeds if seeds.count(s) > 1})
            raise ValueError(f"seed(s) {dup} appear more than once for {dict(zip(GROUP_KEYS, key))}")
        metrics: dict[str, list[float]] = {}
        for r in recs:
            for k, v in r.items():
                if k in GROUP_KEYS or k == "seed" or not _is_number(v):
                    continue
                metrics.setdefault(k, []).append(float(v))
        row: dict[str, Any] = {k: v for k, v in zip(GROUP_KEYS, key) if v is not None or k not in _OPTIONAL_KEYS}
        row["n_seeds"] = len(recs)
        for k, vals in metrics.items():
            a = np.asarray(vals, dtype=np.float64)
            a = a[np.isfinite(a)]
            row[f"{k}_mean"] = float(a.mean()) if a.size else math.nan
            row[f"{k}_std"] = float(a.std(ddof=1)) if a.size > 1 else math.nan
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------- cross-fold


def wilcoxon_signed_rank(diffs: Sequence[float] | np.ndarray) -> float:
    """Two-sided p-value of Wilcoxon's signed-rank test that paired differences centre on 0.

    Zero differences are dropped (Wilcoxon's convention), tied magnitudes get mid-ranks. Up to 25
    non-zero pairs the null distribution is exact (every sign assignment counted by dynamic
    programming over doubled ranks, so mid-ranks stay integers); beyond, the normal approximation
    with the tie correction. A k-fold table has k ≤ 25 pairs, where the approximation is poor.
    """
    d = np.asarray([float(x) for x in diffs if math.isfinite(float(x))], dtype=np.float64)
    d = d[d != 0]
    n = d.size
    if n == 0:
        return 1.0
    mags = np.abs(d)
    order = np.argsort(mags, kind="stable")
    ranks = np.empty(n, dtype=np.float64)
    sorted_mags = mags[order]
    i = 0
    while i < n:
        j = i
        while j + 1 < n and sorted_mags[j + 1] == sorted_mags[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    t_plus = float(ranks[d > 0].sum())
    if n <= 25:
        doubled = np.rint(ranks * 2).astype(np.int64)
        counts = np.zeros(int(doubled.sum()) + 1, dtype=np.float64)
        counts[0] = 1.0
        for r in doubled:  # each rank joins T+ or not: the subset-sum distribution
            counts[r:] = counts[r:] + counts[: counts.size - r].copy()
        probs = counts / counts.sum()
        t2 = int(round(t_plus * 2))
        p = 2 * min(probs[: t2 + 1].sum(), probs[t2:].sum())
        return float(min(1.0, p))
    mean = n * (n + 1) / 4
    _, tie_counts = np.unique(mags, return_counts=True)
    var = n * (n + 1) * (2 * n + 1) / 24 - float((tie_counts**3 - tie_counts).sum()) / 48
    z = (t_plus - mean) / math.sqrt(var) if var > 0 else 0.0
    return float(min(1.0, math.erfc(abs(z) / math.sqrt(2))))


def _better(a: float, b: float, direction: str) -> bool:
    if direction == "zero":
        return abs(a) < abs(b)
    return a < b if direction == "lower" else a > b


def cross_fold(records: Iterable[Mapping[str, Any]], metric: str, baseline: str = "single") -> list[dict[str, Any]]:
    """One row per (dataset, setting, method, sensors, split) over the folds of a k-fold experiment.

    Each fold's value is the mean over its seeds; the row has the mean and sample std over folds,
    the number of folds, the deployed epoch of every run (`epochs`, "fold:seed=epoch", so a run that
    stopped at epoch 1–3 is visible), and — for every method but `baseline`, on the folds both
    have — the paired difference method − baseline (`diff_mean`, `diff_std`), the folds where the
    method is better (`wins` of `n_paired`) and Wilcoxon's signed-rank p-value (`p_wilcoxon`).
    Records need a `fold` key; a fold × seed seen twice in one group is an error.
    """
    direction = metric_direction(metric)
    keys = GROUP_KEYS
    per_fold: dict[tuple, dict[Any, dict[Any, float]]] = {}
    epochs: dict[tuple, list[str]] = {}
    for i, rec in enumerate(records):
        missing = [k for k in (*keys, "seed", "fold", metric) if k not in rec]
        if missing:
            raise ValueError(f"record {i} lacks {missing}: {dict(rec)}")
        key = tuple(rec[k] for k in keys)
        seeds = per_fold.setdefault(key, {}).setdefault(rec["fold"], {})
        if rec["seed"] in seeds:
            raise ValueError(f"fold {rec['fold']} seed {rec['seed']} appears more than once for {dict(zip(keys, key))}")
        seeds[rec["seed"]] = float(rec[metric])
        if "epoch" in rec:
            epochs.setdefault(key, []).append(f"{rec['fold']}:{rec['seed']}={rec['epoch']}")
    fold_means = {k: {f: float(np.mean(list(s.values()))) for f, s in v.items()} for k, v in per_fold.items()}
    rows = []
    for key, folds in fold_means.items():
        vals = np.array(list(folds.values()))
        row: dict[str, Any] = dict(zip(keys, key))
        row.update(
            {
                "metric": metric,
                "n_folds": len(folds),
                "mean": float(vals.mean()),
                "std": float(vals.std(ddof=1)) if vals.size > 1 else math.nan,
                "epochs": " ".join(epochs.get(key, [])),
            }
        )
        base_key = tuple(baseline if k == "method" else v for k, v in zip(keys, key))
        if row["method"] != baseline and base_key in fold_means:
            base = fold_means[base_key]
            common = [f for f in folds if f in base]
            diffs = np.array([folds[f] - base[f] for f in common])
            row.update(
                {
                    "n_paired": len(common),
                    "diff_mean": float(diffs.mean()) if diffs.size else math.nan,
                    "diff_std": float(diffs.std(ddof=1)) if diffs.size > 1 else math.nan,
                    "wins": sum(_better(folds[f], base[f], direction) for f in common),
                    "p_wilcoxon": wilcoxon_signed_rank(diffs),
                }
            )
        rows.append(row)
    return rows


def cross_fold_markdown(
    rows: Sequence[Mapping[str, Any]],
    *,
    baseline: str = "single",
    methods: Sequence[str] | None = None,
    sensors: Sequence[str] | None = None,
    digits: int = 3,
) -> str:
    """Two tables for one (dataset, setting, split): mean ± std over folds per method × sensors
    (best per row in bold), then each method's paired difference against `baseline` with its win
    count and Wilcoxon p-value, and the deployed epochs (min–max over runs)."""
    if not rows:
        raise ValueError("no rows to show")
    combos = {tuple(r.get(k) for k in _TABLE_KEYS) for r in rows}
    if len(combos) > 1:
        raise ValueError(f"rows mix several {_TABLE_KEYS}: {sorted(map(str, combos))}; filter them to one first")
    metric = str(rows[0]["metric"])
    direction = metric_direction(metric)
    word = _BETTER[direction]
    cells = {(r["sensors"], r["method"]): r for r in rows}
    methods = list(methods or dict.fromkeys(r["method"] for r in rows))
    sensors = list(sensors or dict.fromkeys(r["sensors"] for r in rows))
    n_folds = max(int(r["n_folds"]) for r in rows)
    head = [f"sensors ({metric} over {n_folds} folds, {word} is better)", *map(_md_escape, methods)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([":---"] + ["---:"] * len(methods)) + "|"]
    for s in sensors:
        shown = [round(float(cells[(s, m)]["mean"]), digits) if (s, m) in cells else math.nan for m in methods]
        best = _best(shown, direction)
        out = [_md_escape(s)]
        for m, v in zip(methods, shown):
            r = cells.get((s, m))
            if r is None:
                out.append("–")
                continue
            text = f"{r['mean']:.{digits}f}" + (f" ± {r['std']:.{digits}f}" if math.isfinite(r["std"]) else "")
            out.append(f"**{text}**" if v == best else text)
        lines.append("| " + " | ".join(out) + " |")
    others = [m for m in methods if m != baseline]
    paired = [r for r in rows if "diff_mean" in r]
    if paired:
        lines += [
            "",
            f"| sensors: {metric} difference vs `{baseline}` (mean over folds; folds better; Wilcoxon p) | "
            + " | ".join(map(_md_escape, others))
            + " |",
            "|" + "|".join([":---"] + ["---:"] * len(others)) + "|",
        ]
        for s in sensors:
            out = [_md_escape(s)]
            for m in others:
                r = cells.get((s, m))
                if r is None or "diff_mean" not in r:
                    out.append("–")
                    continue
                out.append(f"{r['diff_mean']:+.{digits}f} ({r['wins']}/{r['n_paired']}; p={r['p_wilcoxon']:.3f})")
            lines.append("| " + " | ".join(out) + " |")
    with_epochs = [r for r in rows if r.get("epochs")]
    if with_epochs:
        lines += [
            "",
            "| sensors: deployed epoch (min–max over runs; runs at epoch ≤ 3) | " + " | ".join(map(_md_escape, methods)) + " |",
            "|" + "|".join([":---"] + ["---:"] * len(methods)) + "|",
        ]
        for s in sensors:
            out = [_md_escape(s)]
            for m in methods:
                r = cells.get((s, m))
                if r is None or not r.get("epochs"):
                    out.append("–")
                    continue
                ep = [int(e.rsplit("=", 1)[1]) for e in str(r["epochs"]).split()]
                out.append(f"{min(ep)}–{max(ep)} ({sum(e <= 3 for e in ep)})")
            lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ CSV


def write_csv(rows: Sequence[Mapping[str, Any]], path: PathLike) -> Path:
    """One CSV with the union of the rows' keys as columns (first-seen order); missing cells empty."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns: dict[str, None] = {}
    for r in rows:
        columns.update(dict.fromkeys(r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), restval="")
        w.writeheader()
        for r in rows:
            w.writerow({k: (v.item() if isinstance(v, np.generic) else v) for k, v in r.items()})
    return path


# ------------------------------------------------------------------------------ table and figure


def _single_table(rows: Sequence[Mapping[str, Any]], metric: str) -> dict[str, Any]:
    """The (dataset, setting, split) the rows share; mixing them in one table would mislead."""
    if not rows:
        raise ValueError("no rows to show")
    combos = {tuple(r.get(k) for k in _TABLE_KEYS) for r in rows}
    if len(combos) > 1:
        raise ValueError(f"rows mix several {_TABLE_KEYS}: {sorted(map(str, combos))}; filter them to one first")
    if not any(f"{metric}_mean" in r for r in rows):
        have = sorted({k[: -len("_mean")] for r in rows for k in r if k.endswith("_mean")})
        raise ValueError(f"no row has metric {metric!r}; available: {have}")
    return dict(zip(_TABLE_KEYS, combos.pop()))


def _layout(
    rows: Sequence[Mapping[str, Any]],
    metric: str,
    methods: Sequence[str] | None,
    sensors: Sequence[str] | None,
) -> tuple[list[str], list[str], dict[tuple[str, str], tuple[float, float, int]]]:
    cells: dict[tuple[str, str], tuple[float, float, int]] = {}
    for r in rows:
        if f"{metric}_mean" in r:
            cells[(r["sensors"], r["method"])] = (
                float(r[f"{metric}_mean"]),
                float(r.get(f"{metric}_std", math.nan)),
                int(r.get("n_seeds", 1)),
            )
    all_methods = list(dict.fromkeys(r["method"] for r in rows))
    all_sensors = list(dict.fromkeys(r["sensors"] for r in rows))
    return list(methods or all_methods), list(sensors or all_sensors), cells


def _best(values: Sequence[float], direction: str) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return None
    if direction == "lower":
        return min(finite)
    if direction == "zero":
        return min(finite, key=abs)
    return max(finite)


def _md_escape(s: Any) -> str:
    return str(s).replace("|", "\\|")


def markdown_table(
    rows: Sequence[Mapping[str, Any]],
    metric: str,
    reference: Mapping[str, float] | None = None,
    *,
    reference_name: str = "reference",
    methods: Sequence[str] | None = None,
    sensors: Sequence[str] | None = None,
    digits: int = 3,
) -> str:
    """Inference sensors as rows, methods as columns, "mean ± std" cells, the best per row in bold.

    The reference column (e.g. published random-forest numbers per sensor) takes part in the bold
    ranking, so a method is never shown as best in a row where the reference beats it. Ranking uses
    the rounded means as displayed, so equal-looking cells are all bold. Lower is better for
    errors, nearest to zero for bias, higher for the rest (`metrics.metric_direction`). A cell a run
    did not produce shows "–"; the ± is left out where there is a single seed.
    """
    _single_table(rows, metric)
    methods, sensors, cells = _layout(rows, metric, methods, sensors)
    direction = metric_direction(metric)
    word = _BETTER[direction]

    columns = [*methods, *([reference_name] if reference is not None else [])]
    header = [f"sensors ({metric}, {word} is better)", *map(_md_escape, columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * len(columns)) + "|"]
    for sensor in sensors:
        entries: list[tuple[float, float] | None] = [cells[(sensor, m)][:2] if (sensor, m) in cells else None for m in methods]
        if reference is not None:
            ref = reference.get(sensor)
            entries.append((float(ref), math.nan) if ref is not None else None)
        shown = [round(e[0], digits) if e is not None else math.nan for e in entries]
        best = _best(shown, direction)
        out = [_md_escape(sensor)]
        for e, v in zip(entries, shown):
            if e is None or not math.isfinite(e[0]):
                out.append("–")
                continue
            text = f"{e[0]:.{digits}f}" + (f" ± {e[1]:.{digits}f}" if math.isfinite(e[1]) else "")
            out.append(f"**{text}**" if best is not None and v == best else text)
        lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n"


def plot_scores(
    rows: Sequence[Mapping[str, Any]],
    metric: str,
    path: PathLike,
    reference: Mapping[str, float] | None = None,
    *,
    reference_name: str = "reference",
    methods: Sequence[str] | None = None,
    sensors: Sequence[str] | None = None,
) -> Path:
    """A PNG bar chart: one group per inference sensor, methods side by side, ± std error bars.

    Drawn on a bare `Figure` with the Agg canvas, so it neither needs a display nor touches
    pyplot's global state (safe from worker threads and alongside other plotting code).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    where = _single_table(rows, metric)
    methods, sensors, cells = _layout(rows, metric, methods, sensors)
    direction = metric_direction(metric)

    n_m = max(len(methods), 1)
    width = 0.8 / n_m
    fig = Figure(figsize=(max(6.0, 1.0 + len(sensors) * (0.45 * n_m + 0.6)), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = np.arange(len(sensors), dtype=np.float64)
    colors = [f"C{i % 10}" for i in range(n_m)]
    for i, m in enumerate(methods):
        mean = np.array([cells.get((s, m), (math.nan,))[0] for s in sensors])
        std = np.array([cells.get((s, m), (math.nan, math.nan))[1] for s in sensors])
        std = np.where(np.isfinite(std), std, 0.0)
        ax.bar(
            x + (i - (n_m - 1) / 2) * width,
            mean,
            width * 0.92,
            yerr=std,
            capsize=3,
            label=str(m),
            color=colors[i],
            error_kw={"elinewidth": 1, "ecolor": "0.2"},
        )
    if reference is not None:
        ref = np.array([float(reference.get(s, math.nan)) for s in sensors])
        ax.hlines(ref, x - 0.45, x + 0.45, colors="k", linestyles="--", linewidth=1.5, label=reference_name)
    if direction == "zero":
        ax.axhline(0.0, color="0.5", linewidth=0.8)
    ax.set_xticks(x, [str(s) for s in sensors], rotation=30 if len(sensors) > 6 else 0)
    ax.set_xlabel("sensors at inference")
    word = _BETTER[direction]
    ax.set_ylabel(f"{metric} ({word} is better)")
    title = " · ".join(str(v) for v in where.values() if v is not None)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize="small")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120)
    return path


# ----------------------------------------------------------------------------------- embeddings


def _tsv_cell(v: Any) -> str:
    # A tab or newline inside a value would shift every later column in the projector.
    return str(v).replace("\t", " ").replace("\n", " ").replace("\r", " ")


def write_embeddings(
    log_dir: PathLike,
    embeddings: Mapping[str, np.ndarray],
    metadata: Sequence[Sequence[Any]],
    header: Sequence[str],
    tag: str,
    *,
    global_step: int = 0,
) -> Path:
    """Test-set embeddings (shared / per-sensor specific) for TensorBoard's embedding projector.

    Each entry of `embeddings` is an [N, D] array stored as `<tag>/<name>`; all share `metadata`
    (N rows of `len(header)` columns, e.g. sensor and target) so points can be coloured by them.
    TensorBoard rewrites `projector_config.pbtxt` from scratch for each writer, which would drop
    what earlier calls wrote to the same `log_dir`; the earlier entries are merged back in.
    """
    from google.protobuf import text_format
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig
    from torch.utils.tensorboard import SummaryWriter

    log_dir = Path(log_dir)
    header = [str(h) for h in header]
    n = len(metadata)
    if not header:
        raise ValueError("header is empty; give one name per metadata column")
    for i, row in enumerate(metadata):
        if len(row) != len(header):
            raise ValueError(f"metadata row {i} has {len(row)} columns but header has {len(header)}")
    mats = {}
    for name, emb in embeddings.items():
        a = np.asarray(emb, dtype=np.float32)
        if a.ndim != 2 or a.shape[0] != n:
            raise ValueError(f"embedding {name!r} has shape {a.shape}; expected [{n}, D] to match metadata")
        mats[name] = a
    if not mats:
        raise ValueError("no embeddings given")

    # The projector reads a one-column TSV as labels without a header line.
    if len(header) == 1:
        meta: list[Any] = [_tsv_cell(row[0]) for row in metadata]
        meta_header = None
    else:
        meta = [[_tsv_cell(v) for v in row] for row in metadata]
        meta_header = [_tsv_cell(h) for h in header]

    config_path = log_dir / "projector_config.pbtxt"
    previous = ProjectorConfig()
    if config_path.exists():
        text_format.Parse(config_path.read_text(), previous)

    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for name, a in mats.items():
            writer.add_embedding(a, metadata=meta, metadata_header=meta_header, tag=f"{tag}/{name}", global_step=global_step)
    finally:
        writer.close()

    written = ProjectorConfig()
    text_format.Parse(config_path.read_text(), written)
    new_names = {e.tensor_name for e in written.embeddings}
    merged = ProjectorConfig()
    merged.embeddings.extend([e for e in previous.embeddings if e.tensor_name not in new_names])
    merged.embeddings.extend(written.embeddings)
    config_path.write_text(text_format.MessageToString(merged))
    return log_dir
