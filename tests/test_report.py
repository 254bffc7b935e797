"""report.py: aggregation maths, Markdown table, CSV round trip, PNG figure, projector embeddings."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest

from colearn_dist.report import (
    aggregate,
    markdown_table,
    plot_scores,
    write_csv,
    write_embeddings,
)

from helpers import read_csv

SENSORS = ("s1", "s2", "all")
METHODS = ("mdico", "single", "early_fusion")


def _records(seeds=(0, 1, 2)):
    """Deterministic records with known per-cell values: rmse = base[method][sensor] + seed."""
    base = {
        "mdico": {"s1": 10.0, "s2": 8.0, "all": 6.0},
        "single": {"s1": 12.0, "s2": 7.0, "all": 9.0},
        "early_fusion": {"s1": 14.0, "s2": 9.0, "all": 5.0},
    }
    return [
        {
            "dataset": "fuel_moisture",
            "setting": "presto",
            "method": m,
            "seed": seed,
            "sensors": s,
            "split": "test",
            "rmse": base[m][s] + seed,
            "r2": 0.5 + 0.1 * seed,
            "bias": (-1.0 if m == "single" else 2.0) + 0.0 * seed,
            "note": "strings are not aggregated",
        }
        for seed in seeds
        for m in METHODS
        for s in SENSORS
    ]


def _row(rows, method, sensors):
    (r,) = [r for r in rows if r["method"] == method and r["sensors"] == sensors]
    return r


# ------------------------------------------------------------------------------------ aggregate


def test_aggregate_mean_std_over_seeds():
    rows = aggregate(_records())
    assert len(rows) == len(METHODS) * len(SENSORS)
    r = _row(rows, "mdico", "s2")
    assert r["n_seeds"] == 3
    assert r["rmse_mean"] == pytest.approx(9.0)  # 8 + mean(0, 1, 2)
    assert r["rmse_std"] == pytest.approx(np.std([8, 9, 10], ddof=1))
    assert r["r2_mean"] == pytest.approx(0.6)
    assert "note_mean" not in r and "seed_mean" not in r
    assert {k: r[k] for k in ("dataset", "setting", "method", "sensors", "split")} == {
        "dataset": "fuel_moisture",
        "setting": "presto",
        "method": "mdico",
        "sensors": "s2",
        "split": "test",
    }
    # first-appearance order of groups
    assert [(r["method"], r["sensors"]) for r in rows[:3]] == [("mdico", s) for s in SENSORS]


def test_aggregate_single_seed_nan_and_duplicates():
    rows = aggregate(_records(seeds=(4,)))
    r = _row(rows, "single", "all")
    assert r["n_seeds"] == 1 and r["rmse_mean"] == 13.0 and math.isnan(r["rmse_std"])

    recs = _records(seeds=(0, 1))
    recs[0]["rmse"] = float("nan")  # undefined for one seed: left out, not poisoning the mean
    r = _row(aggregate(recs), "mdico", "s1")
    assert r["rmse_mean"] == 11.0 and math.isnan(r["rmse_std"]) and r["n_seeds"] == 2

    with pytest.raises(ValueError, match="more than once"):
        aggregate(_records(seeds=(0, 0)))
    with pytest.raises(ValueError, match="lacks"):
        aggregate([{"dataset": "d", "method": "m", "seed": 0}])


# ------------------------------------------------------------------------------------------ CSV


def test_csv_round_trip(tmp_path):
    rows = aggregate(_records())
    rows[0]["extra"] = "only here"  # heterogeneous keys survive
    path = write_csv(rows, tmp_path / "sub" / "scores.csv")
    back = read_csv(path)
    assert len(back) == len(rows)
    for a, b in zip(rows, back):
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], float) and math.isnan(a[k]):
                assert math.isnan(b[k])
            else:
                assert a[k] == b[k] and type(a[k]) is type(b[k]), k


# ---------------------------------------------------------------------------------------- table


def _cells(table: str) -> dict[str, dict[str, str]]:
    lines = table.strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    out = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        out[cells[0]] = dict(zip(header[1:], cells[1:]))
    return out


def test_markdown_table_lower_is_better_and_reference():
    rows = aggregate(_records())
    ref = {"s1": 9.5, "s2": 11.0}
    table = markdown_table(rows, "rmse", reference=ref, reference_name="RF (Presto paper)")
    cells = _cells(table)
    assert list(cells) == list(SENSORS)
    assert list(cells["s1"]) == [*METHODS, "RF (Presto paper)"]
    # s1: the reference (9.5) beats every method (best mean 11.0) and takes the bold
    assert cells["s1"]["RF (Presto paper)"] == "**9.500**"
    assert cells["s1"]["mdico"] == "11.000 ± 1.000"
    # s2: lowest rmse wins (single, 7 + 1); reference is worse
    assert cells["s2"]["single"] == "**8.000 ± 1.000**"
    assert cells["s2"]["RF (Presto paper)"] == "11.000"
    # all: early fusion; no reference number for that sensor
    assert cells["all"]["early_fusion"] == "**6.000 ± 1.000**"
    assert cells["all"]["RF (Presto paper)"] == "–"
    assert sum(c.count("**") for row in cells.values() for c in row.values()) == 2 * 3
    assert "lower is better" in table.splitlines()[0]


def test_markdown_table_higher_ties_missing_and_bias():
    recs = [r for r in _records() if not (r["method"] == "single" and r["sensors"] == "s1")]
    rows = aggregate(recs)
    cells = _cells(markdown_table(rows, "r2", digits=2))
    assert "reference" not in cells["s1"]
    assert cells["s1"]["single"] == "–"
    # equal r2 everywhere: every method bold (ties on the displayed value)
    assert cells["s2"] == {m: "**0.60 ± 0.10**" for m in METHODS}
    cells = _cells(markdown_table(rows, "bias", digits=1))
    assert cells["s2"]["single"] == "**-1.0 ± 0.0**"  # closest to zero, not highest
    assert cells["s2"]["mdico"] == "2.0 ± 0.0"
    cells = _cells(markdown_table(rows, "rmse", methods=["early_fusion", "mdico"], sensors=["all"]))
    assert list(cells) == ["all"] and list(cells["all"]) == ["early_fusion", "mdico"]


def test_markdown_table_refuses_mixed_tables_and_unknown_metric():
    recs = _records() + [dict(r, dataset="algae_blooms") for r in _records()]
    with pytest.raises(ValueError, match="filter"):
        markdown_table(aggregate(recs), "rmse")
    with pytest.raises(ValueError, match="available"):
        markdown_table(aggregate(_records()), "f1_macro")


# --------------------------------------------------------------------------------------- figure


def test_plot_scores_writes_png(tmp_path):
    rows = aggregate(_records())
    path = plot_scores(rows, "rmse", tmp_path / "fig" / "rmse.png", reference={"s1": 9.5, "s2": 11.0})
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 400 and height >= 300
    assert len(data) > 10_000  # bars, labels and legend, not a blank canvas


# ----------------------------------------------------------------------------------- embeddings


def test_write_embeddings_projector(tmp_path):
    from google.protobuf import text_format
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

    rng = np.random.default_rng(0)
    n = 20
    meta = [[("s1" if i % 2 else "s2"), f"{rng.uniform(0, 100):.1f}", "a\tb"] for i in range(n)]
    emb = {"shared": rng.normal(size=(n, 8)), "specific_s1": rng.normal(size=(n, 4)).astype(np.float32)}
    write_embeddings(tmp_path, emb, meta, ["sensor", "target", "odd"], tag="mdico")
    # a second call to the same log_dir keeps the first call's entries
    write_embeddings(tmp_path, {"shared": rng.normal(size=(n, 8))}, [[m[0]] for m in meta], ["sensor"], tag="single")

    config = ProjectorConfig()
    text_format.Parse((tmp_path / "projector_config.pbtxt").read_text(), config)
    names = sorted(e.tensor_name for e in config.embeddings)
    assert names == ["mdico/shared:00000", "mdico/specific_s1:00000", "single/shared:00000"]
    for e in config.embeddings:
        tensors = (tmp_path / e.tensor_path).read_text().strip().splitlines()
        metadata = (tmp_path / e.metadata_path).read_text().strip().splitlines()
        assert len(tensors) == n
        if e.tensor_name.startswith("mdico"):
            assert metadata[0] == "sensor\ttarget\todd" and len(metadata) == n + 1
            assert all(len(line.split("\t")) == 3 for line in metadata)
        else:  # one column: no header line, as the projector expects
            assert len(metadata) == n and metadata[0] in ("s1", "s2")
    assert len(tensors[0].split("\t")) == 8

    with pytest.raises(ValueError, match="expected"):
        write_embeddings(tmp_path, {"x": np.zeros((3, 2))}, meta, ["sensor", "target", "odd"], tag="t")


# ----------------------------------------------------------------------------------- cross-fold


def _fold_records(gain: float = 1.0, folds: int = 10, seeds=(0, 1)):
    """mdico = single − gain on every fold (plus fold noise shared by both), epochs known."""
    recs = []
    for f in range(folds):
        for seed in seeds:
            for method, offset in (("single", 0.0), ("mdico", -gain)):
                recs.append(
                    {
                        "dataset": "fm", "setting": "s1+s2", "context": "calendar", "method": method, "sensors": "s1",
                        "split": "test", "seed": seed, "fold": f, "epoch": 1 + f,
                        "rmse": 30.0 + f + 0.1 * seed + offset,
                    }
                )  # fmt: skip
    return recs


def test_wilcoxon_matches_scipy_exact_and_approx():
    from scipy import stats

    from colearn_dist.report import wilcoxon_signed_rank

    rng = np.random.default_rng(0)
    for n in (4, 7, 10, 16):
        d = rng.normal(0.4, 1.0, n)
        assert wilcoxon_signed_rank(d) == pytest.approx(stats.wilcoxon(d, method="exact").pvalue, abs=1e-12)
    d = rng.normal(0.4, 1.0, 40)
    assert wilcoxon_signed_rank(d) == pytest.approx(stats.wilcoxon(d, method="approx").pvalue, rel=1e-9)
    # all ten differences of one sign: the smallest two-sided p of n = 10 is 2 / 2**10
    assert wilcoxon_signed_rank(np.arange(1, 11)) == pytest.approx(2 / 1024)
    assert wilcoxon_signed_rank([0.0, 0.0]) == 1.0  # zeros are dropped: no evidence


def test_wilcoxon_ties_use_mid_ranks():
    from colearn_dist.report import wilcoxon_signed_rank

    # |d| = 1, 1, 2: ranks 1.5, 1.5, 3; T+ = 4.5. The 8 sign assignments give T+ in
    # {0, 1.5, 1.5, 3, 3, 4.5, 4.5, 6}: two-sided exact p = 2 · P(T+ ≥ 4.5) = 2 · 3/8
    assert wilcoxon_signed_rank([1.0, -1.0, 2.0]) == pytest.approx(0.75)


def test_cross_fold_pairs_folds_and_counts_wins():
    from colearn_dist.report import cross_fold

    rows = {r["method"]: r for r in cross_fold(_fold_records(gain=1.0), "rmse")}
    single, mdico = rows["single"], rows["mdico"]
    # fold means over seeds: 30 + f + 0.05 → mean over folds 34.55, std of 0..9
    assert single["n_folds"] == 10 and single["mean"] == pytest.approx(34.55)
    assert single["std"] == pytest.approx(np.std(np.arange(10), ddof=1))
    assert "diff_mean" not in single  # the baseline is not compared with itself
    assert mdico["diff_mean"] == pytest.approx(-1.0) and mdico["wins"] == 10 and mdico["n_paired"] == 10
    assert mdico["p_wilcoxon"] == pytest.approx(2 / 1024)
    assert "0:0=1" in mdico["epochs"] and "9:1=10" in mdico["epochs"]


def test_cross_fold_wins_follow_the_metric_direction():
    from colearn_dist.report import cross_fold

    recs = [dict(r, r2=r["rmse"]) for r in _fold_records(gain=1.0)]  # higher r2 is better: mdico's lower value loses
    mdico = next(r for r in cross_fold(recs, "r2") if r["method"] == "mdico")
    assert mdico["wins"] == 0 and mdico["diff_mean"] == pytest.approx(-1.0)


def test_cross_fold_refuses_a_fold_seed_twice():
    from colearn_dist.report import cross_fold

    recs = _fold_records()
    with pytest.raises(ValueError, match="fold 0 seed 0 appears more than once"):
        cross_fold(recs + recs[:1], "rmse")


def test_cross_fold_markdown_shows_means_differences_and_epochs():
    from colearn_dist.report import cross_fold, cross_fold_markdown

    text = cross_fold_markdown(cross_fold(_fold_records(gain=1.0), "rmse"), methods=["mdico", "single"])
    assert "| s1 | **33.550 ± 3.028** | 34.550 ± 3.028 |" in text
    assert "| s1 | -1.000 (10/10; p=0.002) |" in text
    assert "| s1 | 1–10 (6) | 1–10 (6) |" in text  # fold f deployed epoch f + 1: folds 0–2 × 2 seeds at ≤ 3
