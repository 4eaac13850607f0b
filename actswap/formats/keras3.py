"""Keras 3 files: ``.keras`` archives and the flat legacy ``.h5`` files Keras 3 reads.

Both load with ``keras.saving.load_model`` in safe mode after the scan, convert
with :mod:`actswap.formats.keras_model`, and are written as ``.keras``
archives (:func:`actswap.io.save`: atomic, read back before the rename).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..containers import Format
from ..readback import replaced_sites_check
from ..report import Report
from . import base
from .base import Backend, ConvertOptions


class KerasArchiveBackend(Backend):
    """Keras 3 ``.keras`` zip archives."""

    name = "keras"
    description = "a Keras 3 .keras archive"
    container = Format.KERAS
    suffix = ".keras"
    features = frozenset({
        base.ONNX, base.CALIBRATE, base.ANY_TARGET, base.HE, base.RUN, base.KERAS_MODEL, base.POOL,
    })

    def load(self, path: Path, trust_code: bool = False) -> tuple[Any, list[str]]:
        from .keras_file import load_keras

        return load_keras(path, trust_code, self.container)

    def inspect(self, path: Path, options: ConvertOptions) -> Report:
        from .keras_model import inspect_model

        model, notes = self.load(path, options.trust_code)
        return inspect_model(model, options, notes=notes, source=str(path))

    def convert(self, path: Path, options: ConvertOptions) -> tuple[Any, Report]:
        from .keras_model import convert_model

        # The load scans again even when the pipeline's plan already did: the
        # file may have changed since (it is untrusted input), and the scan
        # closest to the loader is the one that protects it. Cost: ~1.5% of a
        # ResNet50 conversion (docs/benchmarks.md).
        model, notes = self.load(path, options.trust_code)
        # Loaded here, ours alone: unchanged layers can move into the result.
        return convert_model(model, options, notes=notes, source=str(path), consume=True)

    def holds(self, converted: Any) -> bool:
        keras = sys.modules.get("keras")  # not imported: cannot be a Keras model
        return keras is not None and isinstance(converted, keras.Model)

    def save(
        self, converted: Any, path: Path, *, overwrite: bool = False, verify: bool = True,
        check: Callable[[Any], None] | None = None, trust_code: bool = True,
    ) -> Path:
        from .keras_file import save_keras

        return save_keras(converted, path, overwrite=overwrite, verify=verify, check=check, trust_code=trust_code)

    def written_check(self, report: Report, sources: frozenset[str], trust_code: bool) -> Callable[[Any], None]:
        return replaced_sites_check(report)


class KerasH5Backend(KerasArchiveBackend):
    """Flat legacy ``.h5`` model files that Keras 3 reads; written as ``.keras``."""

    name = "h5"
    description = "a legacy Keras .h5 file"
    container = Format.H5

    def holds(self, converted: Any) -> bool:
        return False  # a Keras model is written as a .keras archive
