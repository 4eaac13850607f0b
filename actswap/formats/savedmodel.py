"""TF2 SavedModel directories: every signature re-emitted with its activation ops replaced.

The graph work is :mod:`.tf_graphs` (policy) over :mod:`actswap.graph`
(mechanism); this backend wires it into the protocol. A Keras 2 SavedModel
(one with ``keras_metadata.pb``) is claimed first by
:mod:`actswap.formats.tfkeras`.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import registry
from ..containers import Format
from ..errors import InvariantError, UserError
from ..report import REPLACED, SKIPPED, Report
from . import base
from .base import Backend, ConvertOptions


def graph_sites_check(report: Report, count: Callable[[Path], Counter[str]]) -> Callable[[Path], None]:
    """A check of a written graph (temporary path): exactly the activation ops the
    report kept remain of each replaced kind. ``count(tmp)`` counts activations
    by name in the written graph."""
    replaced = {s.activation for s in report.sites if s.action == REPLACED}
    kept = Counter(s.activation for s in report.sites if s.action == SKIPPED)

    def check(tmp: Path) -> None:
        after = count(tmp)
        for act in sorted(replaced):
            if after[act] != kept[act]:
                raise InvariantError(
                    f"the written model still has {after[act]} {act} op(s) where {kept[act]} were "
                    "kept; nothing written"
                )

    return check


def _converted(graphs: Any, obj: Any) -> bool:
    try:
        return obj in graphs.REWRITTEN
    except TypeError:  # not weak-referenceable: not a loaded SavedModel
        return False


class SavedModelBackend(Backend):
    name = "savedmodel"
    description = "a TF SavedModel directory"
    container = Format.SAVEDMODEL
    suffix = ""
    features = frozenset({base.SIGNATURE, base.ONNX, base.ANY_TARGET, base.RUN})

    def load(self, path: Path, trust_code: bool = False) -> tuple[Any, list[str]]:
        from .tf_graphs import load_signatures

        return load_signatures(path, trust_code)[0], []

    def inspect(self, path: Path, options: ConvertOptions) -> Report:
        from .tf_graphs import inspect_savedmodel

        return inspect_savedmodel(path, options.sources, options.target, options.trust_code)

    def convert(self, path: Path, options: ConvertOptions) -> tuple[Any, Report]:
        from .tf_graphs import convert_savedmodel

        return convert_savedmodel(
            path, options.target, options.grad, sources=options.sources, signature=options.signature,
            trust_code=options.trust_code,
        )

    def holds(self, converted: Any) -> bool:
        graphs = sys.modules.get("actswap.formats.tf_graphs")  # not imported: nothing converted
        return graphs is not None and _converted(graphs, converted)

    def save(
        self, converted: Any, path: Path, *, overwrite: bool = False, verify: bool = True,
        check: Callable[[Any], None] | None = None, trust_code: bool = True,
    ) -> Path:
        from . import tf_graphs

        def check_dir(tmp: Path) -> None:
            from ..readback import read_back_savedmodel

            # Read as data first (protobuf and checkpoint): a load restores and
            # re-traces every function; it decides only what reading cannot confirm.
            done = tf_graphs.REWRITTEN[converted]
            if verify and not read_back_savedmodel(tmp, done.signatures, done.variables):
                _, sigs = tf_graphs.load_signatures(tmp, trust_code)
                if sorted(sigs) != sorted(done.signatures):
                    raise InvariantError(
                        f"the written SavedModel has signatures {sorted(sigs)}, expected {sorted(done.signatures)}"
                    )
            if check is not None:
                check(tmp)

        return tf_graphs.save_savedmodel(converted, path, overwrite=overwrite, check=check_dir)

    def check_output(self, source: Path, out: Path, overwrite: bool) -> None:
        from ..paths import check_output_dir

        if out.suffix == ".keras":
            raise UserError(
                f"-o '{out}': a SavedModel converts to a SavedModel directory, not a .keras file "
                "(its graph has no Keras layers to rebuild); give a directory path"
            )
        if source.resolve() in out.resolve().parents:
            raise UserError(f"output '{out}' is inside the input SavedModel '{source}'; write it elsewhere")
        check_output_dir(out, overwrite=overwrite)

    def default_output(self, source: Path, target: str) -> Path:
        """``dir`` -> ``dir.square/`` beside it."""
        return source.with_name(f"{source.name}.{target.split(':')[0]}")

    def written_check(self, report: Report, sources: frozenset[str], trust_code: bool) -> Callable[[Any], None]:
        def count(tmp: Path) -> Counter[str]:
            from ..readback import saved_op_counts
            from .tf_graphs import inspect_savedmodel

            # First read as protobuf (every function's ops); the load and
            # re-trace of inspect_savedmodel decides only on a difference.
            after: Counter[str] = Counter()
            for op, n in saved_op_counts(tmp).items():
                if op in registry.TF_OP_ACTIVATIONS:
                    after[registry.TF_OP_ACTIVATIONS[op]] += n
            kept = Counter(s.activation for s in report.sites if s.action == SKIPPED)
            if any(after[s.activation] != kept[s.activation] for s in report.sites if s.action == REPLACED):
                written = inspect_savedmodel(tmp, sources, trust_code=trust_code)
                after = Counter(s.activation for s in written.sites)
            return after

        return graph_sites_check(report, count)
