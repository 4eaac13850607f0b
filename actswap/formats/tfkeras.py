"""Keras 2 (``tf_keras``) files: nested-model ``.h5`` files and Keras 2 SavedModels.

Keras 3 cannot read a Keras 2 SavedModel, and reads only flat legacy ``.h5``
files, so these are converted with ``tf_keras`` itself and written back in the
same family (``.h5`` in, ``.h5`` out; SavedModel directory in, SavedModel
directory out). The tf_keras-specific parts (reading configs as data, the
safety check before tf_keras loads anything, the objects, loading and saving)
are :mod:`actswap.legacy`; this backend wires them into the protocol.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..containers import Format
from ..errors import UserError
from ..readback import replaced_sites_check
from ..report import Report
from .base import Backend, ConvertOptions


class TfKerasH5Backend(Backend):
    """A Keras 2 ``.h5`` whose structure Keras 3 cannot rebuild (a model nested in the model)."""

    name = "tf_keras h5"
    description = "a Keras 2 (tf_keras) .h5 file"
    container = Format.H5
    suffix = ".h5"
    kind = "h5"

    def claims(self, path: Path, container: Format | None) -> bool:
        if container is not self.container:
            return False
        try:
            return self._claims(path)
        except Exception:  # noqa: BLE001 - unreadable here: the scan of the other backend reports it
            return False

    def _claims(self, path: Path) -> bool:
        from ..legacy import h5_needs_legacy

        return h5_needs_legacy(path)

    def _options(self, options: ConvertOptions) -> str:
        if options.target.name != "square" or options.sources != frozenset({"relu"}):
            raise UserError("Keras 2 (tf_keras) files convert with --to square --from relu only, for now")
        from ..gradients import normalize

        return normalize(options.grad)

    def inspect(self, path: Path, options: ConvertOptions) -> Report:
        from ..errors import naming
        from ..legacy import inspect_legacy

        with naming(path):
            return inspect_legacy(path, trust_code=options.trust_code)

    def convert(self, path: Path, options: ConvertOptions) -> tuple[Any, Report]:
        from ..errors import naming
        from ..legacy import convert_file

        with naming(path):
            return convert_file(path, self._options(options), options.trust_code)

    def holds(self, converted: Any) -> bool:
        tf_keras = sys.modules.get("tf_keras")
        return tf_keras is not None and isinstance(converted, tf_keras.Model)

    def save(
        self, converted: Any, path: Path, *, overwrite: bool = False, verify: bool = True,
        check: Callable[[Any], None] | None = None, trust_code: bool = True,
    ) -> Path:
        """Written as ``.h5`` when ``path`` ends in .h5/.hdf5, else as a Keras 2
        SavedModel directory (:func:`actswap.legacy.save_legacy`)."""
        from ..legacy import save_legacy

        return save_legacy(converted, path, overwrite=overwrite, verify=verify, check=check, trust_code=trust_code)

    def check_output(self, source: Path, out: Path, overwrite: bool) -> None:
        from ..legacy import check_output

        check_output(source, out, self.kind, overwrite)

    def written_check(self, report: Report, sources: frozenset[str], trust_code: bool) -> Callable[[Any], None]:
        return replaced_sites_check(report)


class TfKerasSavedModelBackend(TfKerasH5Backend):
    """A SavedModel directory written by Keras 2 (it has ``keras_metadata.pb``)."""

    name = "tf_keras savedmodel"
    description = "a Keras 2 (tf_keras) SavedModel directory"
    container = Format.SAVEDMODEL
    suffix = ""
    kind = "savedmodel"

    def _claims(self, path: Path) -> bool:
        from ..legacy import is_keras2_savedmodel

        return is_keras2_savedmodel(path)

    def default_output(self, source: Path, target: str) -> Path:
        return source.with_name(f"{source.name}.{target.split(':')[0]}")

    def holds(self, converted: Any) -> bool:
        return False  # TfKerasH5Backend.save writes both families, by the output's name
