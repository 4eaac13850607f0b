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
from ..errors import ConversionError, InvariantError, UserError, first_line
from ..report import Report
from .base import Backend, ConvertOptions
from .keras3 import replaced_sites_check

H5_SUFFIXES = (".h5", ".hdf5")


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
        from .. import legacy

        try:
            return self._claims(path, legacy)
        except Exception:  # noqa: BLE001 - unreadable here: the scan of the other backend reports it
            return False

    def _claims(self, path: Path, legacy: Any) -> bool:
        return legacy.h5_needs_legacy(path)

    def _options(self, options: ConvertOptions) -> str:
        if options.target.name != "square" or options.sources != frozenset({"relu"}):
            raise UserError("Keras 2 (tf_keras) files convert with --to square --from relu only, for now")
        from ..gradients import normalize

        return normalize(options.grad)

    def inspect(self, path: Path, options: ConvertOptions) -> Report:
        from ..legacy import inspect_legacy

        return inspect_legacy(path, trust_code=options.trust_code)

    def convert(self, path: Path, options: ConvertOptions) -> tuple[Any, Report]:
        from .. import legacy

        grad = self._options(options)
        legacy._require_tf_keras()
        legacy.check_legacy_safe(path, trust_code=options.trust_code)
        model, compiled, notes = legacy._load(path)
        new, report = legacy.rewrite_legacy_model(model, grad)
        if compiled:
            from tf_keras.src.saving.legacy import saving_utils

            try:
                tc = legacy._training_config(path, self.kind)
                if tc is None:
                    raise ValueError("no training config stored")
                new.compile(**saving_utils.compile_args_from_training_config(tc))
            except Exception as e:  # noqa: BLE001 - reported, not fatal
                notes.append(f"could not restore the training configuration ({first_line(e)}); compile before fit")
            notes.append("optimizer state (e.g. Adam moments) is not carried over; it starts fresh")
        report.notes = notes + report.notes
        report.source = str(path)
        return new, report

    def holds(self, converted: Any) -> bool:
        tf_keras = sys.modules.get("tf_keras")
        return tf_keras is not None and isinstance(converted, tf_keras.Model)

    def save(
        self, converted: Any, path: Path, *, overwrite: bool = False, verify: bool = True,
        check: Callable[[Any], None] | None = None, trust_code: bool = True,
    ) -> Path:
        """Written as ``.h5`` when ``path`` ends in .h5/.hdf5, else as a Keras 2
        SavedModel directory (tf_keras picks the format from the name, too)."""
        from .. import legacy
        from ..paths import (
            check_output_dir, check_output_h5, disk_full, ensure_space, is_disk_full, remove_stale_temps,
        )

        dest = Path(path)
        h5 = dest.suffix.lower() in H5_SUFFIXES
        (check_output_h5 if h5 else check_output_dir)(dest, overwrite=overwrite)
        remove_stale_temps(dest)
        ensure_space(dest.parent, sum(len(w[2]) for w in legacy._weights(converted)), f"'{dest.name}'")

        def check_written(tmp: Path) -> None:
            from ..safety import check_container

            check_container(tmp, Format.H5 if h5 else Format.SAVEDMODEL, trust_code)
            reloaded, _, _ = legacy._load(tmp)
            after = legacy.find_legacy_sites(reloaded)
            if check is not None:
                check(after)
            if verify:
                # A layer can hold several sites (activation=, recurrent_activation=): keyed by form too.
                want = {(s.path, s.form): s.activation for s in legacy.find_legacy_sites(converted)}
                if want != {(s.path, s.form): s.activation for s in after}:
                    raise InvariantError(
                        "the written model does not reload with the sites that were written; nothing written"
                    )
                if legacy._weights(converted) != legacy._weights(reloaded):
                    raise InvariantError("the written model's weights do not reload bit-identically; nothing written")

        try:
            (legacy._save_h5 if h5 else legacy._save_savedmodel)(converted, dest, check_written)
        except (UserError, InvariantError):
            raise
        except Exception as e:  # noqa: BLE001
            if is_disk_full(e):
                raise disk_full(dest, e) from e
            raise ConversionError(f"could not write '{dest}' with tf_keras: {first_line(e)}") from e
        return dest

    def check_output(self, source: Path, out: Path, overwrite: bool) -> None:
        from .. import legacy

        legacy._check_output(source, out, self.kind, overwrite)

    def written_check(self, report: Report, sources: frozenset[str], trust_code: bool) -> Callable[[Any], None]:
        return replaced_sites_check(report)


class TfKerasSavedModelBackend(TfKerasH5Backend):
    """A SavedModel directory written by Keras 2 (it has ``keras_metadata.pb``)."""

    name = "tf_keras savedmodel"
    description = "a Keras 2 (tf_keras) SavedModel directory"
    container = Format.SAVEDMODEL
    suffix = ""
    kind = "savedmodel"

    def _claims(self, path: Path, legacy: Any) -> bool:
        return legacy.is_keras2_savedmodel(path)

    def default_output(self, source: Path, target: str) -> Path:
        return source.with_name(f"{source.name}.{target.split(':')[0]}")

    def holds(self, converted: Any) -> bool:
        return False  # TfKerasH5Backend.save writes both families, by the output's name
