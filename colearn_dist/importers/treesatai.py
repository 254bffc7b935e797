"""Import TreeSatAI-TS (Ahlswede et al. 2023; time series by Astruc et al. 2024): multilabel tree genera.

Layout of the dataset folder (as published, IGNF/TreeSatAI-Time-Series):

    aerial/**/<name>.tif          aerial patch, [H, W, 4] or [4, H, W] (R, G, B, NIR), 304 × 304 at 0.2 m
                                  (a pre-converted <name>.npy in either layout is read too)
    sentinel-ts/**/<name>_<year>.h5   per-sample HDF5 time series, each [T, C, H, W] with its own T:
                                  sen-1-asc-data [T, 2, 6, 6] (VV, VH, ascending orbit),
                                  sen-1-des-data [T, 2, 6, 6] (descending), sen-2-data [T, 10, 6, 6]
                                  (B02 … B12), sen-2-masks [T, 2, 6, 6] (snow, cloud probability)
    labels/TreeSatBA_v9_60m_multi_labels.json   {"<name>.tif": [["Abies", 0.8], ["Picea", 0.2]], …}
    split/{train,val,test}_filenames.lst        the official splits, one "<name>.tif" a line

A genus is a label when it covers more than `threshold` (0.07, as the paper) of the patch; samples left
without a label are dropped and counted. Sentinel series are averaged over their 6 × 6 pixels (one
vector per date for the temporal encoders); each sensor is padded at the front with NaN to the
longest series of the dataset, so the last step is the last observation and the loader's `valid` mask
marks the padding. S2 keeps its two mask channels (the paper's "S2 + mask" view). Aerial patches
become an `image` modality [N, 4, H, W]; `aerial_pool` > 1 averages p × p blocks (304 → 76 for p = 4)
to shrink the archive ~p² times.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..archive import SPLIT_CODES, ArchiveError, ModalitySpec, write_archive
from ._common import nanmean, note, open_h5, shape_text

GENERA = (
    "Abies", "Acer", "Alnus", "Betula", "Cleared", "Fagus", "Fraxinus", "Larix",
    "Picea", "Pinus", "Populus", "Prunus", "Pseudotsuga", "Quercus", "Tilia",
)  # fmt: skip
LABELS_FILE = Path("labels") / "TreeSatBA_v9_60m_multi_labels.json"
LISTS_DIR = Path("split")
AERIAL_DIR = "aerial"
SENTINEL_DIR = "sentinel-ts"
AERIAL_BANDS = ("R", "G", "B", "NIR")
S1_BANDS = ("VV", "VH")
S2_BANDS = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")
S2_MASK_BANDS = ("snow_prob", "cloud_prob")
# archive modality → (HDF5 key, channels); s2 also takes sen-2-masks (same T) as extra channels.
H5_KEYS = {"s1_asc": ("sen-1-asc-data", 2), "s1_des": ("sen-1-des-data", 2), "s2": ("sen-2-data", 10)}
H5_MASK_KEY = "sen-2-masks"
_YEAR_SUFFIX = re.compile(r"_\d{4}$")
_CHUNK_BYTES = 64 << 20  # archive chunk of the image modality: ~64 MB whatever the patch size
_IN_MEMORY_BYTES = 1 << 30  # larger aerial stacks are filled in a temporary .npy on disk (memory map)


def read_list(file: Path) -> list[str]:
    """Sample names (without .tif) of one split list."""
    try:
        lines = file.read_text().splitlines()
    except OSError as exc:
        raise ArchiveError(f"{file}: cannot read split list ({exc}); expected one '<name>.tif' per line") from exc
    return [Path(line.strip()).stem for line in lines if line.strip()]


def _index(folder: Path, suffixes: tuple[str, ...], strip_year: bool) -> dict[str, Path]:
    """name → file under `folder` (recursive): one directory walk instead of a glob per sample."""
    out: dict[str, Path] = {}
    for p in sorted(folder.rglob("*")):
        if p.suffix.lower() not in suffixes or not p.is_file():
            continue
        out.setdefault(p.stem, p)
        if strip_year:
            out.setdefault(_YEAR_SUFFIX.sub("", p.stem), p)
    return out


def _labels(path: Path, threshold: float) -> dict[str, np.ndarray]:
    """name → multi-hot [15] for every patch with at least one genus above `threshold`."""
    if not path.is_file():
        raise ArchiveError(f"{path}: missing (TreeSatAI multi-label JSON: {{'<name>.tif': [[genus, fraction], ...]}})")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ArchiveError(f"{path}: cannot read as JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ArchiveError(f"{path}: expected a mapping '<name>.tif' → [[genus, fraction], ...]")
    code = {g: k for k, g in enumerate(GENERA)}
    out: dict[str, np.ndarray] = {}
    for name, pairs in data.items():
        y = np.zeros(len(GENERA), dtype=np.uint8)
        if not isinstance(pairs, list):
            raise ArchiveError(f"{path}: key {name!r} holds {pairs!r}, expected [[genus, fraction], ...]")
        for pair in pairs:
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[1], (int, float))):
                raise ArchiveError(f"{path}: key {name!r} holds {pair!r}, expected [genus, fraction]")
            genus, fraction = pair
            if genus not in code:
                raise ArchiveError(f"{path}: key {name!r}: genus {genus!r} is not one of the 15 genera {list(GENERA)}")
            if fraction > threshold:
                y[code[genus]] = 1
        out[Path(name).stem] = y
    return out


def read_aerial(file: Path, channels: int = len(AERIAL_BANDS)) -> np.ndarray:
    """One aerial patch as [C, H, W] float32, from GeoTIFF (tifffile) or .npy, channels last or first."""
    if file.suffix.lower() == ".npy":
        try:
            arr = np.load(file, allow_pickle=False)
        except Exception as exc:
            raise ArchiveError(f"{file}: cannot read aerial patch as .npy ({exc})") from exc
    else:
        try:
            import tifffile
        except ImportError as exc:
            raise ArchiveError(f"{file}: reading GeoTIFF aerial patches needs tifffile (pip install tifffile)") from exc
        try:
            arr = tifffile.imread(file)
        except Exception as exc:  # tifffile raises several types (TiffFileError, ValueError, codec errors)
            raise ArchiveError(f"{file}: cannot read aerial patch as TIFF ({exc}); compressed TIFFs may need imagecodecs") from exc
    arr = np.asarray(arr)
    expected = f"[H, W, {channels}] or [{channels}, H, W] ({', '.join(AERIAL_BANDS)})"
    if arr.ndim != 3 or channels not in (arr.shape[0], arr.shape[-1]) or arr.dtype.kind not in "fiu":
        raise ArchiveError(f"{file}: aerial patch has shape {shape_text(arr.shape)} ({arr.dtype}), expected {expected}")
    if arr.shape[0] != channels:
        arr = np.moveaxis(arr, -1, 0)
    return arr.astype(np.float32)


def _pool(x: np.ndarray, p: int) -> np.ndarray:
    """Mean of p × p blocks of [C, H, W] (the remainder rows / columns dropped)."""
    if p == 1:
        return x
    c, h, w = x.shape
    h2, w2 = h // p, w // p
    return x[:, : h2 * p, : w2 * p].reshape(c, h2, p, w2, p).mean(axis=(2, 4))


def read_series(file: Path) -> dict[str, np.ndarray]:
    """One sample's Sentinel series, averaged over pixels: modality → [T, C] (T may differ per sensor)."""
    out: dict[str, np.ndarray] = {}
    what = "TreeSatAI-TS series: " + ", ".join(f"{k} [T, {c}, H, W]" for k, c in H5_KEYS.values()) + f", {H5_MASK_KEY} [T, 2, H, W]"
    with open_h5(file, what) as h5:
        raw = {}
        for name, (key, channels) in list(H5_KEYS.items()) + [("s2_mask", (H5_MASK_KEY, len(S2_MASK_BANDS)))]:
            if key not in h5:
                raise ArchiveError(f"{file}: key {key!r} is missing (found {sorted(h5.keys())}); expected shape [T, {channels}, H, W]")
            arr = np.asarray(h5[key][()])
            if arr.ndim != 4 or arr.shape[1] != channels or arr.dtype.kind not in "fiu":
                raise ArchiveError(f"{file}: key {key!r} has shape {shape_text(arr.shape)} ({arr.dtype}), expected [T, {channels}, H, W]")
            raw[name] = arr.astype(np.float32)
    if raw["s2_mask"].shape[0] != raw["s2"].shape[0]:
        raise ArchiveError(
            f"{file}: key {H5_MASK_KEY!r} has {raw['s2_mask'].shape[0]} steps but {H5_KEYS['s2'][0]!r} has "
            f"{raw['s2'].shape[0]}; expected shape [{raw['s2'].shape[0]}, 2, H, W]"
        )
    for name, arr in raw.items():
        out[name] = nanmean(arr, axis=(2, 3)) if arr.shape[0] else np.zeros((0, arr.shape[1]), np.float32)
    out["s2"] = np.concatenate([out["s2"], out.pop("s2_mask")], axis=1)
    return out


def _pad_front(series: list[np.ndarray]) -> np.ndarray:
    """[N, T_max, C] with each series right-aligned and NaN in front."""
    t = max(s.shape[0] for s in series)
    out = np.full((len(series), t, series[0].shape[1]), np.nan, dtype=np.float32)
    for i, s in enumerate(series):
        if s.shape[0]:
            out[i, t - s.shape[0] :] = s
    return out


def import_treesatai(
    src: str | Path,
    out_path: str | Path,
    *,
    lists: str | Path | None = None,
    labels: str | Path | None = None,
    threshold: float = 0.07,
    aerial_pool: int = 1,
    overwrite: bool = False,
) -> Path:
    """Write the TreeSatAI-TS archive (all three official splits in one archive)."""
    src = Path(src)
    out_path = Path(out_path)
    if not src.is_dir():
        raise ArchiveError(f"{src}: not a TreeSatAI-TS folder (expected {AERIAL_DIR}/, {SENTINEL_DIR}/, {LABELS_FILE}, {LISTS_DIR}/)")
    if aerial_pool < 1:
        raise ArchiveError(f"aerial_pool must be ≥ 1, got {aerial_pool}")
    lists_dir = Path(lists) if lists else src / LISTS_DIR
    labels_path = Path(labels) if labels else src / LABELS_FILE
    for folder in (src / AERIAL_DIR, src / SENTINEL_DIR):
        if not folder.is_dir():
            raise ArchiveError(f"{folder}: missing (TreeSatAI-TS {folder.name} files)")

    names: list[str] = []
    split_codes: list[int] = []
    where: dict[str, Path] = {}
    for split in ("train", "val", "test"):
        file = lists_dir / f"{split}_filenames.lst"
        if not file.exists():
            if split == "train":
                raise ArchiveError(f"{file}: missing (official train list, one '<name>.tif' a line)")
            note("treesatai", f"{file}: missing; no {split} split from the lists")
            continue
        for name in read_list(file):
            if name in where:
                raise ArchiveError(f"{file}: {name!r} is also listed in {where[name]}")
            where[name] = file
            names.append(name)
            split_codes.append(SPLIT_CODES[split])

    label_of = _labels(labels_path, threshold)
    unknown = [n for n in names if n not in label_of]
    if unknown:
        raise ArchiveError(
            f"{where[unknown[0]]}: {unknown[0]!r} has no entry in {labels_path} ({len(unknown)} listed sample(s) without labels)"
        )
    keep = [i for i, n in enumerate(names) if label_of[n].any()]
    note("treesatai", f"{len(keep)} samples; dropped {len(names) - len(keep)} without a genus above {threshold} of the patch")
    if not keep:
        raise ArchiveError(f"{labels_path}: no listed sample has a genus above {threshold}")
    names = [names[i] for i in keep]
    split = np.array([split_codes[i] for i in keep], dtype=np.uint8)
    target = np.stack([label_of[n] for n in names])

    aerial_files = _index(src / AERIAL_DIR, (".tif", ".tiff", ".npy"), strip_year=False)
    sentinel_files = _index(src / SENTINEL_DIR, (".h5", ".hdf5"), strip_year=True)
    for name in names:
        if name not in aerial_files:
            raise ArchiveError(f"{src / AERIAL_DIR}: no aerial patch {name + '.tif'!r} (listed in {where[name]})")
        if name not in sentinel_files:
            raise ArchiveError(f"{src / SENTINEL_DIR}: no series file {name + '_<year>.h5'!r} (listed in {where[name]})")

    series: dict[str, list[np.ndarray]] = {m: [] for m in H5_KEYS}
    tmp_dir: Path | None = None
    aerial: np.ndarray | None = None
    first_file: Path | None = None
    try:
        for j, name in enumerate(tqdm(names, desc="treesatai", unit="sample", disable=None)):
            for m, arr in read_series(sentinel_files[name]).items():
                series[m].append(arr)
            patch = _pool(read_aerial(aerial_files[name]), aerial_pool)
            if aerial is None:
                first_file = aerial_files[name]
                shape = (len(names),) + patch.shape
                if np.prod(shape) * 4 > _IN_MEMORY_BYTES:
                    out_path.parent.mkdir(parents=True, exist_ok=True)
                    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=out_path.parent))
                    aerial = np.lib.format.open_memmap(tmp_dir / "aerial.npy", mode="w+", dtype=np.float32, shape=shape)
                else:
                    aerial = np.empty(shape, dtype=np.float32)
            elif patch.shape != aerial.shape[1:]:
                raise ArchiveError(
                    f"{aerial_files[name]}: aerial patch has shape {shape_text(patch.shape)} after pooling, expected "
                    f"{shape_text(aerial.shape[1:])} like {first_file}"
                )
            aerial[j] = patch
        assert aerial is not None
        per_sample = int(np.prod(aerial.shape[1:])) * 4
        mods: dict[str, tuple[np.ndarray, ModalitySpec]] = {
            "s1_asc": (_pad_front(series["s1_asc"]), ModalitySpec("s1_asc", "series", S1_BANDS, time_step="date")),
            "s1_des": (_pad_front(series["s1_des"]), ModalitySpec("s1_des", "series", S1_BANDS, time_step="date")),
            "s2": (_pad_front(series["s2"]), ModalitySpec("s2", "series", S2_BANDS + S2_MASK_BANDS, time_step="date")),
            "aerial": (aerial, ModalitySpec("aerial", "image", AERIAL_BANDS)),
        }
        return write_archive(
            out_path,
            mods,
            target=target,
            task="multilabel",
            split=split,
            ids=np.array(names),
            class_names=GENERA,
            target_name="tree genera",
            description=(
                f"TreeSatAI-TS imported from {src.name}; genera above {threshold} of the patch; Sentinel series "
                f"averaged over pixels, front-padded with NaN; aerial pooled {aerial_pool}x{aerial_pool}"
            ),
            chunk_size=max(1, min(4096, _CHUNK_BYTES // per_sample)),
            overwrite=overwrite,
        )
    finally:
        del aerial
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)


__all__ = ["GENERA", "import_treesatai", "read_aerial", "read_list", "read_series"]
