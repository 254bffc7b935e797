"""Importers turn a dataset's own layout into the archive format; the CLI picks one by name."""

from __future__ import annotations

from collections.abc import Callable

from .cropharvest import import_cropharvest
from .generic import import_generic
from .lfmc import import_lfmc
from .mdico_netcdf import import_mdico_netcdf
from .presto import BUNDLED, bundled_path, import_presto
from .treesatai import import_treesatai
from .xarray_cube import import_xarray

IMPORTERS: dict[str, Callable[..., object]] = {
    "presto": import_presto,
    "generic": import_generic,
    "lfmc": import_lfmc,
    "cropharvest": import_cropharvest,
    "treesatai": import_treesatai,
    "mdico_netcdf": import_mdico_netcdf,
    "xarray": import_xarray,
}

__all__ = [
    "BUNDLED",
    "IMPORTERS",
    "bundled_path",
    "import_cropharvest",
    "import_generic",
    "import_lfmc",
    "import_mdico_netcdf",
    "import_presto",
    "import_treesatai",
    "import_xarray",
]
