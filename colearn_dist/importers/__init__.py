"""Importers turn a dataset's own layout into the archive format; the CLI picks one by name."""

from __future__ import annotations

from typing import Callable

from .generic import import_generic
from .presto import BUNDLED, bundled_path, import_presto

IMPORTERS: dict[str, Callable[..., object]] = {"presto": import_presto, "generic": import_generic}

__all__ = ["BUNDLED", "IMPORTERS", "bundled_path", "import_generic", "import_presto"]
