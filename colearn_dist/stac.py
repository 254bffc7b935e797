"""The deployment contract of an exported sensor model as a STAC Machine Learning Model item.

One item (`<model file>.stac.json`) per exported file: the input bands in order with their
z-score statistics, dim order and dtype, the context inputs, the output (task, classes), the
framework, and where the model came from (sensor, processing level, training run). Written to
the MLM extension v1.3.0 (normalisation as `value_scaling`, the extension's replacement of
`norm_type` / `statistics`); tests/test_stac.py validates items against its JSON schema.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .runs import Trained

STAC_VERSION = "1.1.0"
MLM_SCHEMA = "https://stac-extensions.github.io/mlm/v1.3.0/schema.json"
PROCESSING_SCHEMA = "https://stac-extensions.github.io/processing/v1.1.0/schema.json"
CLASSIFICATION_SCHEMA = "https://stac-extensions.github.io/classification/v1.1.0/schema.json"
MEDIA_TYPES = {"pt2": "application/octet-stream; application=pytorch", "onnx": "application/octet-stream; framework=onnx"}
# what each kind's per-sample axes are, in MLM's dim names
DIM_ORDER = {
    "series": ["batch", "time", "channel"],
    "static": ["batch", "channel"],
    "categorical": ["batch", "time"],
    "image": ["batch", "channel", "height", "width"],
}


# the context inputs an exported model may take after its sensor's input (export.CONTEXT_DTYPES):
# name → (dim order, data type, description)
CONTEXT_INPUTS: dict[str, tuple[list[str], str, str]] = {
    "month": (["batch", "time"], "int64", "calendar month (1..12) of each time step"),
    "latlon": (["batch", "coordinate"], "float32", "latitude and longitude of the sample, degrees (WGS84)"),
}


def _context_input(name: str, shape: list[int]) -> dict[str, Any]:
    dims, dtype, text = CONTEXT_INPUTS[name]
    return {
        "name": name,
        "bands": [],
        "input": {"shape": [-1, *shape], "dim_order": dims, "data_type": dtype},
        "description": text,
        "value_scaling": None,
    }


def stac_path(model_path: str | Path) -> Path:
    """The item beside a model file: `model_s1.onnx` → `model_s1.onnx.stac.json`."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".stac.json")


def _semver(version: str) -> str:
    """'2.13.0+cpu' stays; '1.19' → '1.19.0' (MLM wants MAJOR.MINOR.PATCH)."""
    core, _, rest = version.partition("+")
    parts = (core.split(".") + ["0", "0"])[:3]
    return ".".join(re.sub(r"\D.*", "", p) or "0" for p in parts) + (f"+{rest}" if rest else "")


def _framework(fmt: str) -> tuple[str, str]:
    if fmt == "onnx":
        import onnx

        return "ONNX", _semver(onnx.__version__)
    return "PyTorch", _semver(torch.__version__)


def _name(text: str) -> str:
    """MLM names are [a-zA-Z][a-zA-Z0-9_.- ]+[a-zA-Z0-9]."""
    text = re.sub(r"[^a-zA-Z0-9_.\- ]", "-", text).strip("-_. ")
    return ("m" + text if not text[:1].isalpha() else text) or "model"


def stac_item(model_path: Path, trained: Trained, modality: str, meta: dict[str, Any]) -> dict[str, Any]:
    """The item as a dict (see the module docstring)."""
    manifest = trained.manifest
    info = manifest.modalities[modality]
    kind = info["kind"]
    fmt = meta["format"]
    framework, version = _framework(fmt)
    cfg = trained.cfg
    encoder = cfg.model.encoder_for(modality)
    bands = list(info["bands"])
    units = list(info.get("units") or [""] * len(bands))

    main_input: dict[str, Any] = {
        "name": modality,
        "bands": bands,
        "input": {
            "shape": [-1, *[int(s) for s in info["shape"]]],
            "dim_order": DIM_ORDER[kind],
            "data_type": "int64" if kind == "categorical" else "float32",
        },
    }
    if kind == "categorical":
        missing = info.get("missing_value")
        main_input["description"] = f"raw class codes 0..{int(info['num_classes']) - 1} of {bands[0]}" + (
            f"; {missing} marks a missing step (embedded as zero, as in training)" if missing is not None else ""
        )
        main_input["value_scaling"] = None
    else:
        stats = manifest.stats[modality]
        main_input["description"] = (
            "raw values in the archive's units; NaN marks a missing step or band (set to 0 after normalisation "
            "inside the model, as in training). The model applies the z-score below itself: feed raw values."
        )
        main_input["value_scaling"] = [
            {"type": "z-score", "mean": float(m), "stddev": float(s)} for m, s in zip(stats["mean"], stats["std"])
        ]
    inputs = [main_input] + [_context_input(name, meta["context_shapes"][name]) for name in meta["inputs"][1:]]

    task = manifest.task
    classes = list(manifest.class_names)
    output: dict[str, Any] = {"name": "prediction", "tasks": ["regression" if task == "regression" else "classification"]}
    if task == "regression":
        unit = f" ({manifest.target_unit})" if manifest.target_unit else ""
        output["result"] = {"shape": [-1], "dim_order": ["batch"], "data_type": "float32"}
        output["description"] = f"{manifest.target_name}{unit}, in target units"
        output["classification:classes"] = []
    else:
        k = int(manifest.target_shape[0]) if task == "multilabel" and manifest.target_shape else len(classes) or 2
        names = classes or [str(i) for i in range(k)]
        output["result"] = {"shape": [-1, len(names)], "dim_order": ["batch", "class"], "data_type": "float32"}
        output["description"] = (
            "independent probability of each label (sigmoid)" if task == "multilabel" else "class probabilities (softmax), summing to 1"
        )
        output["classification:classes"] = [{"value": i, "name": n, "description": n} for i, n in enumerate(names)]

    sensor = info.get("sensor") or modality
    level = info.get("processing_level") or ""
    properties: dict[str, Any] = {
        "datetime": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "description": f"{cfg.model.method} model for sensor {modality} ({sensor}), trained by colearn-dist; predicts {manifest.target_name}",
        "mlm:name": _name(f"colearn {cfg.name} {modality}"),
        "mlm:architecture": f"{cfg.model.method} {encoder.type} ({encoder.depth} layers, {encoder.hidden} hidden)",
        "mlm:tasks": output["tasks"],
        "mlm:framework": framework,
        "mlm:framework_version": version,
        "mlm:accelerator": "amd64",
        "mlm:accelerator_constrained": False,
        "mlm:accelerator_summary": "CPU (exported for CPU; the graph also runs on CUDA with torch / onnxruntime-gpu)",
        "mlm:batch_size_suggestion": 4096,
        "mlm:total_parameters": int(sum(p.numel() for p in trained.model.parameters())),
        "mlm:pretrained": bool(cfg.model.init_from),
        "mlm:pretrained_source": str(cfg.model.init_from) if cfg.model.init_from else None,
        "mlm:input": inputs,
        "mlm:output": [output],
        "bands": [{"name": b, **({"unit": u} if u else {})} for b, u in zip(bands, units)],
        "colearn:sensor": sensor,
        "colearn:run": str(trained.run_dir),
        "colearn:method": cfg.model.method,
        "colearn:epoch": int(trained.epoch),
        "colearn:shards": str(cfg.data.shards),
        "colearn:archive": str(getattr(manifest, "archive", "") or ""),
    }
    if level:
        properties["processing:level"] = level
    if meta.get("onnx_opset"):
        properties["colearn:onnx_opset"] = int(meta["onnx_opset"])
    extensions = [MLM_SCHEMA] + ([PROCESSING_SCHEMA] if level else []) + ([CLASSIFICATION_SCHEMA] if task != "regression" else [])
    return {
        "type": "Feature",
        "stac_version": STAC_VERSION,
        "stac_extensions": extensions,
        "id": _name(f"{cfg.name}-{modality}-{fmt}"),
        "geometry": None,
        "properties": properties,
        "links": [],
        "assets": {
            "model": {
                "href": model_path.name,
                "type": MEDIA_TYPES[fmt],
                "title": f"{framework} model for sensor {modality}",
                "roles": ["mlm:model"],
            }
        },
    }


def write_stac_item(model_path: str | Path, trained: Trained, modality: str, meta: dict[str, Any]) -> Path:
    model_path = Path(model_path)
    out = stac_path(model_path)
    out.write_text(json.dumps(stac_item(model_path, trained, modality, meta), indent=1) + "\n")
    return out


__all__ = ["MLM_SCHEMA", "stac_item", "stac_path", "write_stac_item"]
