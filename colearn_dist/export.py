"""Per-sensor deployment: one self-contained model file per sensor, torch.export (.pt2) or ONNX.

The exported graph takes the sensor's raw, un-normalised input (NaN where a step or band is
missing; the integer class with its missing value for a categorical layer) plus the context the
run's model reads (the calendar month of each step), and returns predictions in target units
(probabilities for classification). Normalisation and the missing-value rule of training (zero
after normalisation) are inside, so the deployment side needs neither this package nor the
shard manifest: `torch.export.load(...).module()` or an onnxruntime session is enough. Every
model file gets a STAC Machine Learning Model item beside it (`stac.py`).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import zarr
from torch import nn

from .archive import FORMAT as ARCHIVE_FORMAT
from .archive import open_archive
from .batch import norm_stats, normalise
from .context import context_label
from .importers.xarray_cube import cube_latlon, open_cube, sensor_array
from .loader import ShardLoader
from .manifest import load_manifest
from .runs import RunDir, Trained, load_trained
from .stac import write_stac_item

FORMATS = ("pt2", "onnx")
ONNX_OPSET = 18  # the opset the dynamo exporter writes; onnxruntime ≥ 1.14 runs it
META_KEY = "colearn.json"  # the metadata inside the model file (extra file / ONNX metadata_props)
# Context inputs an exported model may take after the sensor's `x`, in this order: the calendar
# month of each step [B, T] int64 and the location [B, 2] float32 (latitude, longitude in degrees).
CONTEXT_DTYPES = {"month": np.int64, "latlon": np.float32}
OUTPUT_NAME = "prediction"


def context_inputs(trained: Trained, modality: str) -> tuple[str, ...]:
    """The context the run's model reads besides the sensor's input, in `CONTEXT_DTYPES` order:
    what `model.context` names ("calendar" → month, "location" → latlon), for every sensor kind.
    Without the key (runs made before it), the month of each step when the archive has months and
    the sensor is time-indexed (only attention encoders read it then)."""
    context = trained.cfg.model.context
    if context is None:
        mod = trained.manifest.modality(modality)
        return ("month",) if trained.manifest.has_month and mod.steps is not None else ()
    return tuple(name for kind, name in (("calendar", "month"), ("location", "latlon")) if kind in context)


class SensorModel(nn.Module):
    """Normalisation → one sensor's path of a trained model → target units."""

    def __init__(self, trained: Trained, modality: str) -> None:
        super().__init__()
        self.model = trained.model
        self.modality = modality
        norm = norm_stats(trained.manifest, modality)
        self.categorical = norm is None
        mean, std = norm if norm is not None else (np.zeros(1, np.float32), np.ones(1, np.float32))
        self.register_buffer("mean", torch.from_numpy(mean))
        self.register_buffer("std", torch.from_numpy(std))
        self.spec = trained.spec
        self.context = context_inputs(trained, modality)

    def forward(self, x: torch.Tensor, c0: Optional[torch.Tensor] = None, c1: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`x` raw, then the context tensors named by `self.context`, in that order."""
        context = dict(zip(self.context, (c0, c1)))
        if not self.categorical:
            x, _ = normalise(x, self.mean, self.std)  # type: ignore[arg-type]  # the loader's formula: missing → 0
        extra = {"latlon": context["latlon"]} if "latlon" in context else {}
        pred = self.model.predict({self.modality: x}, context.get("month"), modalities=[self.modality], **extra)  # type: ignore[operator]
        return self.spec.to_target_units(pred)


def example_input(trained: Trained, modality: str, batch: int = 4) -> tuple[torch.Tensor, ...]:
    """Inputs of the right shapes and dtypes (random values) for export: x, then the context."""
    mod = trained.manifest.modality(modality)
    shape = (batch, *mod.shape)
    gen = torch.Generator().manual_seed(0)
    x = (
        torch.randint(0, int(mod.num_classes or 1), shape, generator=gen)
        if mod.kind == "categorical"
        else torch.randn(shape, generator=gen)
    )
    steps = [m.steps for m in (trained.manifest.modality(n) for n in trained.manifest.modalities) if m.steps is not None]
    context = {
        "month": lambda: torch.randint(1, 13, (batch, mod.steps or steps[0]), generator=gen),
        "latlon": lambda: torch.rand(batch, 2, generator=gen) * torch.tensor([180.0, 360.0]) - torch.tensor([90.0, 180.0]),
    }
    return (x, *(context[name]() for name in context_inputs(trained, modality)))


def model_meta(trained: Trained, modality: str, fmt: str, example: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    """What `predict` needs to feed the file (stored inside it) — the STAC item says the same for people."""
    return {
        "modality": modality,
        "format": fmt,
        "onnx_opset": ONNX_OPSET if fmt == "onnx" else None,
        "input": trained.manifest.modalities[modality],
        "inputs": ["x", *context_inputs(trained, modality)],  # the file's inputs, in order
        "context_shapes": {name: list(t.shape[1:]) for name, t in zip(context_inputs(trained, modality), example[1:])},
        "task": trained.manifest.task,
        "class_names": list(trained.manifest.class_names),
        "target_name": trained.manifest.target_name,
        "target_unit": trained.manifest.target_unit,
        "method": trained.cfg.model.method,
        "context": context_label(trained.cfg.model.context),
        "run": str(trained.run_dir),
    }


def export_sensor(run_dir: str | Path, modality: str, out: str | Path | None = None, fmt: str = "pt2") -> Path:
    """Export the weights validation chose for `modality` as `fmt` (pt2 | onnx), batch dimension
    dynamic, and write its STAC MLM item beside it (`<file>.stac.json`). Returns the model path."""
    if fmt not in FORMATS:
        raise ValueError(f"export format {fmt!r} is not one of {list(FORMATS)}")
    trained = load_trained(run_dir, modality)
    if modality not in trained.manifest.modalities or modality == "all":
        raise ValueError(f"{run_dir}: {modality!r} is not a sensor of the run (sensors {list(trained.manifest.modalities)})")
    module = SensorModel(trained, modality).eval()
    module.requires_grad_(False)  # the loaded program then returns plain tensors (no autograd graph)
    example = example_input(trained, modality)
    names = ("x", *module.context)
    batch = torch.export.Dim("batch", min=1)
    dynamic = {arg: {0: batch} for arg in ("x", "c0", "c1")[: len(example)]}
    out = Path(out) if out else RunDir(run_dir).exported(modality, fmt)
    if out.suffix != f".{fmt}":
        raise ValueError(f"{out}: a {fmt} model file must end in .{fmt}")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = model_meta(trained, modality, fmt, example)
    with torch.no_grad():
        if fmt == "pt2":
            program = torch.export.export(module, example, dynamic_shapes=dynamic)
            torch.export.save(program, str(out), extra_files={META_KEY: json.dumps(meta)})
        else:
            _export_onnx(module, example, names, dynamic, out, meta)
    write_stac_item(out, trained, modality, meta)
    return out


def _export_onnx(
    module: nn.Module, example: tuple[torch.Tensor, ...], names: tuple[str, ...], dynamic: dict, out: Path, meta: dict
) -> None:
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter's dependency)
    except ImportError as exc:
        raise RuntimeError("ONNX export needs onnx and onnxscript: pip install 'colearn_dist[onnx]'") from exc
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)  # "torchvision is not installed. Skipping torchvision::nms" ×4
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation and progress notes
            program = torch.onnx.export(
                module,
                example,
                dynamo=True,
                opset_version=ONNX_OPSET,
                input_names=list(names),
                output_names=[OUTPUT_NAME],
                dynamic_shapes=dynamic,
                verbose=False,
            )
    finally:
        registration.setLevel(level)
    assert program is not None
    program.model.metadata_props[META_KEY] = json.dumps(meta)
    program.save(str(out))


@dataclass
class Exported:
    """A loaded model file: `run(x, *context)` → predictions (numpy), and its metadata
    (`meta["inputs"]` names the inputs in order)."""

    path: Path
    meta: dict[str, Any]
    run: Callable[..., np.ndarray]


def load_exported(path: str | Path) -> Exported:
    """Open a .pt2 (torch) or .onnx (onnxruntime) model file written by `export_sensor`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model file")
    if path.suffix == ".pt2":
        return _load_pt2(path)
    if path.suffix == ".onnx":
        return _load_onnx(path)
    if path.suffix == ".pt":
        raise ValueError(f"{path}: TorchScript models are no longer supported; export again (colearn-dist export RUN --format pt2|onnx)")
    raise ValueError(f"{path}: unknown model format {path.suffix!r}; expected one of {['.' + f for f in FORMATS]}")


def _load_pt2(path: Path) -> Exported:
    files = {META_KEY: ""}
    program = torch.export.load(str(path), extra_files=files)
    if not files[META_KEY]:
        raise ValueError(f"{path}: no {META_KEY} inside; not a model written by colearn-dist export")
    module = program.module()

    @torch.no_grad()
    def run(*inputs: np.ndarray) -> np.ndarray:
        return module(*(torch.from_numpy(a) for a in inputs)).numpy()

    return Exported(path, json.loads(files[META_KEY]), run)


def _load_onnx(path: Path) -> Exported:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise RuntimeError(f"{path}: running ONNX models needs onnxruntime: pip install 'colearn_dist[onnx]'") from exc
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the project's thread budget, not every core
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    meta_text = session.get_modelmeta().custom_metadata_map.get(META_KEY)
    if not meta_text:
        raise ValueError(f"{path}: no {META_KEY} metadata; not a model written by colearn-dist export")
    meta = json.loads(meta_text)

    def run(*inputs: np.ndarray) -> np.ndarray:
        return session.run([OUTPUT_NAME], dict(zip(meta["inputs"], inputs)))[0]

    return Exported(path, meta, run)


# (ids, raw sensor input, context arrays by name)
Batches = Iterable[tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]]


def _missing_context(meta: dict[str, Any], have: dict[str, Any], where: str, model_path: Any) -> None:
    absent = [name for name in meta["inputs"][1:] if have.get(name) is None]
    if absent:
        raise ValueError(f"{where}: model {model_path} takes {absent} (the run's context), the data has none")


def predict(
    model_path: str | Path,
    data: Any,
    split: str | None = None,
    batch_size: int = 4096,
    **cube: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Apply an exported sensor model to an archive, a shards folder (it has `manifest.json`) or an
    xarray datacube (a Dataset, or a zarr / netCDF path that is not an archive; `cube` holds
    `predict_cube`'s dimension names); returns (ids, predictions in target units)."""
    if not isinstance(data, (str, Path)):
        return predict_cube(model_path, data, batch_size=batch_size, **cube)
    path = Path(data)
    if (path / "manifest.json").exists():
        return predict_shards(model_path, path, split, batch_size)
    if path.is_dir() and (path / "zarr.json").exists():
        if zarr.open_group(str(path), mode="r").attrs.get("format") == ARCHIVE_FORMAT:
            return predict_archive(model_path, path, split, batch_size)
    return predict_cube(model_path, path, batch_size=batch_size, **cube)


def predict_archive(
    model_path: str | Path, archive_path: str | Path, split: str | None = None, batch_size: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """The model on the raw arrays of an archive (`split`, or every sample), in archive order."""
    model = load_exported(model_path)
    meta = model.meta
    archive = open_archive(archive_path, check_values=False)
    modality = meta["modality"]
    if modality not in archive.modalities:
        raise ValueError(f"{archive_path}: no modality {modality!r} for model {model_path} (has {list(archive.modalities)})")
    rows = archive.split_indices(split) if split else np.arange(archive.num_samples)
    arr = archive.array(modality)
    sources = {"month": archive.month, "latlon": archive.latlon}
    _missing_context(meta, sources, str(archive_path), model_path)

    def take(a: Any, idx: np.ndarray) -> np.ndarray:
        return np.asarray(a.oindex[idx]) if hasattr(a, "oindex") else np.asarray(a[idx])

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]]:
        for start in range(0, len(rows), batch_size):
            idx = rows[start : start + batch_size]
            yield archive.ids[idx], take(arr, idx), {name: take(sources[name], idx) for name in meta["inputs"][1:]}

    return apply(model, batches())


def predict_shards(
    model_path: str | Path, shards_dir: str | Path, split: str | None, batch_size: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """The model on one split of shards, in the shards' order: the loader's normalised inputs are
    turned back into raw values (NaN where missing) and go through the exported model as raw
    archive values would."""
    model = load_exported(model_path)
    meta = model.meta
    manifest = load_manifest(shards_dir)
    modality = meta["modality"]
    if modality not in manifest.modalities:
        raise ValueError(f"{shards_dir}: no modality {modality!r} for model {model_path} (has {list(manifest.modalities)})")
    if not split:
        raise ValueError(f"{shards_dir}: shards need a split (--split): one of {sorted(manifest.splits)}")
    loader = ShardLoader(shards_dir, split, batch_size=batch_size, modalities=[modality], shuffle=False)

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]]:
        for batch in loader:
            _missing_context(meta, batch, str(shards_dir), model_path)
            x = loader.denormalise(modality, batch["inputs"][modality], batch["valid"][modality])
            yield np.asarray(batch["id"]), x, {name: batch[name].numpy() for name in meta["inputs"][1:]}

    return apply(model, batches())


def predict_cube(
    model_path: str | Path,
    cube: Any,
    *,
    variable: str | None = None,
    sample_dim: str = "sample",
    time_dim: str = "time",
    band_dim: str = "band",
    batch_size: int = 4096,
) -> tuple[np.ndarray, np.ndarray]:
    """The model on an xarray datacube of per-pixel time series (a Dataset or a zarr / netCDF path):
    `variable` (default: the model's sensor name) with dims named by the flags, bands picked by name
    in the model's order, months from a datetime `time_dim` coordinate. Ids are the sample coordinate."""
    model = load_exported(model_path)
    meta = model.meta
    ds = open_cube(cube)
    name = variable or meta["modality"]
    where = str(cube) if isinstance(cube, (str, Path)) else "dataset"
    x, month, ids = sensor_array(
        ds, name, kind=meta["input"]["kind"], bands=meta["input"]["bands"], sample_dim=sample_dim, time_dim=time_dim,
        band_dim=band_dim, need_month="month" in meta["inputs"], where=where,
        missing_value=meta["input"].get("missing_value"),
    )  # fmt: skip
    sources = {"month": month, "latlon": cube_latlon(ds, name, sample_dim) if "latlon" in meta["inputs"] else None}
    _missing_context(meta, sources, where, model_path)
    shape = tuple(meta["input"]["shape"])
    if tuple(x.shape[1:]) != shape:
        raise ValueError(f"{where}: variable {name!r} has per-sample shape {list(x.shape[1:])}, model {model_path} takes {list(shape)}")

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]]:
        for start in range(0, len(ids), batch_size):
            sl = slice(start, start + batch_size)
            yield ids[sl], x[sl], {name: sources[name][sl] for name in meta["inputs"][1:]}  # type: ignore[index]

    return apply(model, batches())


def apply(model: Exported, batches: Batches) -> tuple[np.ndarray, np.ndarray]:
    """(ids, raw input, context by name) batches through an exported model → (ids, predictions)."""
    categorical = model.meta["input"]["kind"] == "categorical"
    ids, preds = [], []
    for batch_ids, x, context in batches:
        x = np.ascontiguousarray(x, dtype=np.int64 if categorical else np.float32)
        extra = [np.ascontiguousarray(context[name], dtype=CONTEXT_DTYPES[name]) for name in model.meta["inputs"][1:]]
        ids.append(np.asarray(batch_ids))
        preds.append(model.run(x, *extra))
    if not preds:
        return np.zeros(0, dtype=str), np.zeros(0)
    return np.concatenate(ids), np.concatenate(preds)
