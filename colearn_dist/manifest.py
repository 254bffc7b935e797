"""The shards' `manifest.json` (format: docs/DESIGN.md "Shards") and the one typed description of a
modality that the loader, the encoders and the exported models read from it."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .archive import SPLITS

FORMAT = "colearn-shards"
VERSION = 1
MANIFEST_NAME = "manifest.json"


class ShardError(ValueError):
    """Shards or a manifest that cannot be used; the message names the file and the problem."""


KINDS = ("series", "static", "categorical", "image")


@dataclass(frozen=True)
class Modality:
    """One modality's per-sample tensors, as the manifest describes them: what the loader decodes,
    the encoders are built for and an exported model takes."""

    name: str
    kind: str  # "series" [B,T,C] float | "static" [B,C] float | "categorical" [B,T] int64 | "image" [B,C,H,W] float
    steps: int | None  # T; None for static and image
    channels: int  # C; 1 for categorical
    num_classes: int | None = None
    missing_value: int | None = None
    height: int | None = None  # image only
    width: int | None = None  # image only
    # Band names, and the per-band train mean / std the loader z-scored with (float modalities):
    # encoders that need raw values (Presto) undo the z-scoring with them.
    bands: tuple[str, ...] = ()
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"modality {self.name!r}: kind {self.kind!r} is not one of {list(KINDS)}")
        if self.kind in ("series", "categorical") and (self.steps is None or self.steps < 1):
            raise ValueError(f"modality {self.name!r} ({self.kind}) needs steps ≥ 1, got {self.steps}")
        if self.kind == "categorical" and (self.num_classes is None or self.num_classes < 1):
            raise ValueError(f"modality {self.name!r} (categorical) needs num_classes ≥ 1, got {self.num_classes}")
        if self.channels < 1:
            raise ValueError(f"modality {self.name!r}: channels must be ≥ 1, got {self.channels}")
        if self.kind == "image" and not (self.height and self.width and self.height >= 1 and self.width >= 1):
            raise ValueError(f"modality {self.name!r} (image) needs height and width ≥ 1, got {self.height} × {self.width}")

    @property
    def shape(self) -> tuple[int, ...]:
        """The per-sample shape: series [T, C], static [C], categorical [T], image [C, H, W]."""
        if self.kind == "series":
            return (int(self.steps or 0), self.channels)
        if self.kind == "categorical":
            return (int(self.steps or 0),)
        if self.kind == "image":
            return (self.channels, int(self.height or 0), int(self.width or 0))
        return (self.channels,)


def modality_inputs(
    manifest_modalities: Mapping[str, Mapping[str, Any]],
    names: Sequence[str] | None = None,
    stats: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
) -> dict[str, Modality]:
    """Build the inputs from the manifest's "modalities" mapping; `names` (None or empty = all) picks and
    orders them; `stats` (the manifest's per-band mean / std) go with each float modality."""
    names = list(names) if names else list(manifest_modalities)
    out: dict[str, Modality] = {}
    for name in names:
        if name not in manifest_modalities:
            raise KeyError(f"modality {name!r} is not in the manifest (have {list(manifest_modalities)})")
        meta = manifest_modalities[name]
        kind = meta.get("kind")
        shape = list(meta.get("shape") or [])
        layout = {"series": 2, "static": 1, "categorical": 1, "image": 3}
        if kind not in layout:
            raise ValueError(f"modality {name!r}: kind {kind!r} is not one of {list(KINDS)}")
        if len(shape) != layout[kind]:
            expected = {"series": "[T, C]", "static": "[C]", "categorical": "[T]", "image": "[C, H, W]"}[kind]
            raise ValueError(f"modality {name!r} ({kind}): manifest shape {shape} is not {expected}")
        height = width = None
        if kind == "series":
            steps, channels = int(shape[0]), int(shape[1])
        elif kind == "static":
            steps, channels = None, int(shape[0])
        elif kind == "image":
            steps, channels, height, width = None, int(shape[0]), int(shape[1]), int(shape[2])
        else:
            steps, channels = int(shape[0]), 1
        num_classes = meta.get("num_classes")
        missing = meta.get("missing_value")
        band_stats = (stats or {}).get(name)
        out[name] = Modality(
            name=name,
            kind=kind,
            steps=steps,
            channels=channels,
            num_classes=None if num_classes is None else int(num_classes),
            missing_value=None if missing is None else int(missing),
            height=height,
            width=width,
            bands=tuple(str(b) for b in meta.get("bands") or ()),
            mean=None if band_stats is None else tuple(float(v) for v in band_stats["mean"]),
            std=None if band_stats is None else tuple(float(v) for v in band_stats["std"]),
        )
    return out


# --------------------------------------------------------------------------------------------
# Manifest


@dataclass
class Manifest:
    """The parsed `manifest.json`: everything the loader and the model builder need about the shards.

    Fields (JSON key in brackets where it differs):

    * `path`: the shard directory (not stored; where the manifest was read from / written to).
    * `task`: "binary" | "multiclass" | "multilabel" | "regression"; `class_names`: list[str].
    * `target_name`, `target_unit`: str; `target_shape`: [] (one value per sample) or [K] (multilabel).
    * `modalities`: name -> {"kind": "series"|"static"|"categorical"|"image", "shape": per-sample shape
      ([T, C], [C], [T] or [C, H, W]), "dtype": numpy dtype name, "bands", "units", "time_step",
      "num_classes", "missing_value"}; in archive order.
    * `has_month`: whether each sample has a `month.npy` member (int64 [T], 1..12).
    * `has_latlon`: whether each sample has a `latlon.npy` member (float64 [2], degrees); absent in
      manifests written before latlon was carried (read as false).
    * `stats`: modality -> {"mean": [C], "std": [C]} per band (images: per channel over H×W; NaN-aware, train split only,
      std floored to 1 for constant bands); categorical modalities are absent.
    * `target_stats`: regression {"mean", "std"}; binary/multiclass {"class_counts": [K]};
      multilabel {"positive_counts": [K], "num_samples"}; all on the train split.
    * `splits`: split -> {"num_samples": n, "shards": [{"name", "num_samples", "sha256"}]} for
      train, val and test (an empty split has no shards).
    * `seed`, `samples_per_shard`, `shuffle_window`, `archive` (the archive path): with the archive
      they determine every byte of the shards; `val_split` (how val was made:
      {"source": "archive"|"carved"|"none", "by": "group"|"random"|null, "fraction", "num_groups"});
      `fold` (only in shards of a cross-validation fold: {"dataset", "index", "of", "by", "seed"}).
    """

    path: Path
    task: str
    class_names: list[str]
    target_name: str
    target_unit: str
    target_shape: list[int]
    modalities: dict[str, dict[str, Any]]
    has_month: bool
    stats: dict[str, dict[str, list[float]]]
    target_stats: dict[str, Any]
    splits: dict[str, dict[str, Any]]
    seed: int
    samples_per_shard: int
    archive: str = ""
    shuffle_window: int = 0
    val_split: dict[str, Any] = field(default_factory=dict)
    version: int = VERSION
    # Exact float64 train sums behind `stats` / `target_stats`, so parts sharded by separate jobs
    # merge exactly (`merge_shards`): {"modalities": {m: {"sum", "sumsq", "count"}}, "target": {...}}.
    train_sums: dict[str, Any] = field(default_factory=dict)
    # [start, stop) archive rows these shards hold (`write_shards(row_range=...)`); None = all rows.
    rows: list[int] | None = None
    # Shards of one fold of a k-fold experiment (`crossval`): {"dataset", "index", "of", "by", "seed"},
    # carried from the archive's `fold` attribute; None for ordinary shards (and absent from their JSON).
    fold: dict[str, Any] | None = None
    has_latlon: bool = False

    def modality(self, name: str) -> Modality:
        """The typed description of one modality."""
        return modality_inputs(self.modalities, [name], self.stats)[name]

    def split_size(self, split: str) -> int:
        self._check_split(split)
        return int(self.splits[split]["num_samples"])

    def shard_sizes(self, split: str) -> list[int]:
        """Samples per shard, for splitting shards evenly over ranks and loader workers."""
        self._check_split(split)
        return [int(s["num_samples"]) for s in self.splits[split]["shards"]]

    def _check_split(self, split: str) -> None:
        if split not in self.splits:
            raise ShardError(f"{self.path / MANIFEST_NAME}: no split {split!r}; splits are {list(self.splits)}")

    def identity(self) -> dict[str, str]:
        """Per split, a digest of its shard names and sha256: what a checkpoint records, so a run is
        never resumed on shards regenerated or replaced under it."""
        return {
            split: hashlib.sha256(json.dumps([split, [(e["name"], e["sha256"]) for e in info["shards"]]]).encode()).hexdigest()[:16]
            for split, info in self.splits.items()
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": self.version,
            "archive": self.archive,
            "seed": self.seed,
            "samples_per_shard": self.samples_per_shard,
            "shuffle_window": self.shuffle_window,
            "task": self.task,
            "class_names": list(self.class_names),
            "target_name": self.target_name,
            "target_unit": self.target_unit,
            "target_shape": list(self.target_shape),
            "modalities": self.modalities,
            "has_month": self.has_month,
            "has_latlon": self.has_latlon,
            "stats": self.stats,
            "target_stats": self.target_stats,
            "val_split": self.val_split,
            "splits": self.splits,
            "train_sums": self.train_sums,
            "rows": self.rows,
        } | ({"fold": self.fold} if self.fold else {})

    def summary(self) -> str:
        """A short human summary, for the CLI."""
        lines = [f"{self.path}: {self.task} shards of {self.archive or '?'} (seed {self.seed})"]
        for split, info in self.splits.items():
            lines.append(f"  {split:<5} {info['num_samples']:>9} samples in {len(info['shards'])} shards")
        for name, mod in self.modalities.items():
            lines.append(f"  {name:<8} {mod['kind']:<11} {str(mod['shape']):<10} {mod['dtype']}")
        return "\n".join(lines)


_REQUIRED_KEYS = (
    "task", "class_names", "target_name", "target_unit", "target_shape", "modalities",
    "has_month", "stats", "target_stats", "splits", "seed", "samples_per_shard",
)  # fmt: skip


def load_manifest(out_dir: str | Path) -> Manifest:
    """Read and check `manifest.json` (`out_dir` may also be the manifest file itself)."""
    out_dir = Path(out_dir)
    file = out_dir if out_dir.name == MANIFEST_NAME else out_dir / MANIFEST_NAME
    if not file.exists():
        raise ShardError(f"{file}: no shard manifest (write shards first: write_shards / `colearn-dist shard`)")
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ShardError(f"{file}: not readable JSON ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ShardError(f"{file}: key 'format' is {got!r}, expected {FORMAT!r}")
    if data.get("version") != VERSION:
        raise ShardError(f"{file}: key 'version' is {data.get('version')!r}, this code reads version {VERSION}")
    missing = [k for k in _REQUIRED_KEYS if k not in data]
    if missing:
        raise ShardError(f"{file}: missing key(s) {missing}")
    _check_splits(file, data["splits"])
    return Manifest(
        path=file.parent,
        task=data["task"],
        class_names=list(data["class_names"]),
        target_name=data["target_name"],
        target_unit=data["target_unit"],
        target_shape=list(data["target_shape"]),
        modalities=dict(data["modalities"]),
        has_month=bool(data["has_month"]),
        stats=data["stats"],
        target_stats=data["target_stats"],
        splits=data["splits"],
        seed=int(data["seed"]),
        samples_per_shard=int(data["samples_per_shard"]),
        archive=str(data.get("archive", "")),
        shuffle_window=int(data.get("shuffle_window", 0)),
        val_split=dict(data.get("val_split") or {}),
        fold=data.get("fold"),
        version=int(data["version"]),
        train_sums=dict(data.get("train_sums") or {}),
        rows=list(data["rows"]) if data.get("rows") is not None else None,
        has_latlon=bool(data.get("has_latlon", False)),
    )


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _check_splits(file: Path, splits: Any) -> None:
    """Every split lists its shards with a plain file name, a sample count and a sha256 (integrity
    checks rely on it), and the counts add up; the error names the entry."""
    if not isinstance(splits, dict):
        raise ShardError(f"{file}: key 'splits' must be a mapping, got {type(splits).__name__}")
    for split in SPLITS:
        if split not in splits:
            raise ShardError(f"{file}: key 'splits' has no {split!r} entry")
        info = splits[split]
        if not isinstance(info, dict) or not isinstance(info.get("shards"), list) or not _is_count(info.get("num_samples")):
            raise ShardError(f"{file}: splits.{split} needs 'num_samples' (an integer ≥ 0) and 'shards' (a list)")
        total = 0
        for k, entry in enumerate(info["shards"]):
            where = f"{file}: splits.{split}.shards[{k}]"
            if not isinstance(entry, dict):
                raise ShardError(f"{where}: expected a mapping with name, num_samples and sha256, got {entry!r}")
            name = entry.get("name")
            if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
                raise ShardError(f"{where}: 'name' must be a file name inside the shard folder, got {name!r}")
            where += f" ({name})"
            if not _is_count(entry.get("num_samples")) or entry["num_samples"] < 1:
                raise ShardError(f"{where}: 'num_samples' must be an integer ≥ 1, got {entry.get('num_samples')!r}")
            if not isinstance(entry.get("sha256"), str) or not _SHA256.fullmatch(entry["sha256"]):
                raise ShardError(f"{where}: 'sha256' must be the shard's 64-hex-digit digest, got {entry.get('sha256')!r}")
            total += entry["num_samples"]
        if total != info["num_samples"]:
            raise ShardError(f"{file}: splits.{split}: its shards hold {total} samples in all but 'num_samples' says {info['num_samples']}")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


__all__ = ["FORMAT", "KINDS", "MANIFEST_NAME", "VERSION", "Manifest", "Modality", "ShardError", "load_manifest", "modality_inputs"]
