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
