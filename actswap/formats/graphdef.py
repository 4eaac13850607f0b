"""Frozen TF1 GraphDefs (``.pb``): activation nodes get the target's op type.

A frozen graph has no variables: the result is for inference and export, not
training, and it is not run here (no NaN/Inf check), which the report says.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..containers import Format
from ..report import Report
from . import base
from .base import Backend, ConvertOptions
from .savedmodel import graph_sites_check


class GraphDefBackend(Backend):
    name = "graphdef"
    description = "a frozen TF GraphDef (.pb)"
    container = Format.GRAPHDEF
    suffix = ".pb"
    features = frozenset({base.ANY_TARGET})
    #: said in the report instead of checking the outputs for NaN/Inf
    not_run_note = "outputs not checked for NaN/Inf: a frozen graph is not run"

    def inspect(self, path: Path, options: ConvertOptions) -> Report:
        from .tf_graphdef import inspect_graphdef

        return inspect_graphdef(path, options.sources, options.target, options.trust_code)

    def convert(self, path: Path, options: ConvertOptions) -> tuple[Any, Report]:
        from .tf_graphdef import convert_graphdef

        return convert_graphdef(path, options.target, sources=options.sources, trust_code=options.trust_code)

    def holds(self, converted: Any) -> bool:
        return type(converted).__name__ == "GraphDef"

    def save(
        self, converted: Any, path: Path, *, overwrite: bool = False, verify: bool = True,
        check: Callable[[Any], None] | None = None, trust_code: bool = True,
    ) -> Path:
        from ..errors import InvariantError
        from .tf_graphdef import save_graphdef

        def check_pb(tmp: Path) -> None:
            if verify and tmp.read_bytes() != converted.SerializeToString():
                raise InvariantError("the written graph differs from the converted one")
            if check is not None:
                check(tmp)

        return save_graphdef(converted, path, overwrite=overwrite, check=check_pb)

    def check_output(self, source: Path, out: Path, overwrite: bool) -> None:
        from ..paths import check_output_pb

        check_output_pb(out, overwrite=overwrite)

    def written_check(self, report: Report, sources: frozenset[str], trust_code: bool) -> Callable[[Any], None]:
        def count(tmp: Path) -> Counter[str]:
            from .tf_graphdef import inspect_graphdef

            written = inspect_graphdef(tmp, sources, trust_code=trust_code)
            return Counter(s.activation for s in written.sites)

        return graph_sites_check(report, count)
