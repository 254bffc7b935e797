"""STAC MLM items beside exported models: valid against the extension's JSON schema (shipped in
tests/data, resolved locally: no network), and saying what a deployment must feed the model."""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from pathlib import Path

import jsonschema
import pytest

DATA = Path(__file__).parent / "data"
# the URIs MLM v1.3.0 refers to → the shipped texts (tests/data/README.md says which versions)
SCHEMAS = {
    "https://stac-extensions.github.io/mlm/v1.3.0/schema.json": "stac-mlm-schema.json",
    "https://stac-extensions.github.io/raster/v1.1.0/schema.json": "stac-raster-schema.json",
    "https://stac-extensions.github.io/classification/v1.1.0/schema.json": "stac-classification-schema.json",
    "https://stac-extensions.github.io/processing/v1.1.0/schema.json": "stac-processing-schema.json",
}


@lru_cache(maxsize=1)
def _validator() -> jsonschema.protocols.Validator:
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT7

    def retrieve(uri: str):
        if uri not in SCHEMAS:
            raise LookupError(f"schema {uri} is not shipped in tests/data (no download at test time)")
        return Resource.from_contents(json.loads((DATA / SCHEMAS[uri]).read_text()), default_specification=DRAFT7)

    registry = Registry(retrieve=retrieve)  # type: ignore[call-arg]
    schema = json.loads((DATA / SCHEMAS["https://stac-extensions.github.io/mlm/v1.3.0/schema.json"]).read_text())
    return jsonschema.Draft7Validator(schema, registry=registry)


def errors(item: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in _validator().iter_errors(item)]


def validate(model_path: Path) -> dict:
    """The item beside `model_path`: schema-valid, STAC core fields present, the asset is the model."""
    from colearn_dist.stac import stac_path

    item = json.loads(stac_path(model_path).read_text())
    assert errors(item) == []
    for key in ("type", "stac_version", "id", "geometry", "properties", "links", "assets"):
        assert key in item, key
    assert item["properties"]["datetime"].endswith("Z")
    assert item["assets"]["model"]["href"] == Path(model_path).name and (Path(model_path).parent / item["assets"]["model"]["href"]).exists()
    return item


@pytest.fixture(scope="module")
def item_pair(tmp_path_factory):
    """One binary run's s1 model in both formats, with their items."""
    from colearn_dist.export import export_sensor

    from helpers import DEFAULT_MODALITIES, make_synthetic_archive, train_run

    root = tmp_path_factory.mktemp("stac")
    modalities = dict(DEFAULT_MODALITIES)
    kind, bands, extra = modalities["s1"]
    modalities["s1"] = (kind, bands, {**extra, "sensor": "Sentinel-1 C-SAR", "processing_level": "GRD"})
    archive = make_synthetic_archive(root / "a.zarr", n=120, t=4, groups=6, task="binary", modalities=modalities)
    run = train_run(root, archive, train={"epochs": 1})
    return run, {fmt: export_sensor(run, "s1", root / f"s1.{fmt}", fmt=fmt) for fmt in ("pt2", "onnx")}


def test_items_are_valid_and_describe_the_contract(item_pair):
    from colearn_dist.runs import load_trained

    run, paths = item_pair
    trained = load_trained(run, "s1")
    for fmt, path in paths.items():
        item = validate(path)
        p = item["properties"]
        assert p["mlm:framework"] == {"pt2": "PyTorch", "onnx": "ONNX"}[fmt]
        assert p["mlm:tasks"] == ["classification"] and p["mlm:accelerator"] == "amd64"
        x, month = p["mlm:input"]
        assert x["bands"] == ["VV", "VH"] and x["input"]["dim_order"] == ["batch", "time", "channel"]
        assert x["input"]["shape"] == [-1, 4, 2] and x["input"]["data_type"] == "float32"
        stats = trained.manifest.stats["s1"]
        assert [v["mean"] for v in x["value_scaling"]] == pytest.approx(stats["mean"])
        assert [v["stddev"] for v in x["value_scaling"]] == pytest.approx(stats["std"])
        assert {v["type"] for v in x["value_scaling"]} == {"z-score"}
        assert month["name"] == "month" and month["input"]["shape"] == [-1, 4]
        out = p["mlm:output"][0]
        assert [c["name"] for c in out["classification:classes"]] == ["negative", "positive"]
        assert out["result"]["shape"] == [-1, 2]
        assert p["colearn:run"] == str(run) and p["colearn:sensor"] == "Sentinel-1 C-SAR" and p["processing:level"] == "GRD"
        assert "https://stac-extensions.github.io/processing/v1.1.0/schema.json" in item["stac_extensions"]
        assert [b["name"] for b in p["bands"]] == ["VV", "VH"]
    assert json.loads(paths["onnx"].with_name("s1.onnx.stac.json").read_text())["properties"]["colearn:onnx_opset"] == 18


def test_schema_rejects_broken_items(item_pair):
    """The validator is not a rubber stamp: each mutation breaks a rule of the extension."""
    from colearn_dist.stac import stac_path

    item = json.loads(stac_path(item_pair[1]["pt2"]).read_text())
    broken = []
    for mutate in (
        lambda i: i["properties"].pop("mlm:input"),
        lambda i: i["properties"]["mlm:input"][0]["input"].__setitem__("data_type", "float"),
        lambda i: i["properties"].__setitem__("mlm:tasks", ["forecasting"]),
        lambda i: i["properties"].__setitem__("mlm:unknown", 1),
        lambda i: i["properties"]["mlm:input"][0].__setitem__("value_scaling", [{"type": "z-score", "mean": 1.0}]),
        lambda i: i["properties"]["mlm:output"][0]["classification:classes"][0].pop("value"),
        lambda i: i["assets"]["model"].__setitem__("roles", ["data"]),
        lambda i: i.__setitem__("stac_extensions", []),
    ):
        copy_ = copy.deepcopy(item)
        mutate(copy_)
        broken.append(bool(errors(copy_)))
    assert all(broken), broken
