"""The backend protocol: everything actswap does that depends on a model's format.

A backend reads and writes one kind of model file. Code above the backends
(the API, the file-to-file pipeline, the CLI, export) holds a backend and
asks it; it never asks "which format is this?".

Invariants every backend keeps:

* ``claims`` only looks (reads a few bytes or a directory listing); it never
  loads, deserializes or writes;
* ``scan`` reads the file as data and adds findings to the report; nothing
  the scan reads runs code;
* ``load``, ``inspect`` and ``convert`` scan before any loader sees the file,
  and never modify it;
* ``convert`` copies every weight bit-identically (checked) and reports every
  site, with the action taken and why;
* ``save`` is atomic (a temporary sibling, then a rename) and, with
  ``verify``, reads the written output back before it is moved into place;
  ``check(written)`` may refuse it, and then nothing is written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..containers import Format
from ..errors import UserError
from ..report import Report

# Optional features a backend may offer; the pipeline refuses an option the
# backend does not list, with the sentence of OPTION_NAMES.
SIGNATURE = "signature"  # --signature: rewrite one signature only
ONNX = "onnx"  # --onnx / actswap export
CALIBRATE = "calibrate"  # --calibrate: measure each site's input range
ANY_TARGET = "any_target"  # targets other than --to square --from relu
HE = "he"  # inspect --he
RUN = "run"  # the converted model can be run (NaN/Inf check of the outputs)
POOL = "pool"  # --pool avg: max pooling -> average pooling
KERAS_MODEL = "keras_model"  # loads as a Keras 3 model (recover, verify, fit, he-run)

OPTION_NAMES = {
    SIGNATURE: "--signature",
    ONNX: "ONNX export (--onnx, actswap export)",
    CALIBRATE: "--calibrate",
    ANY_TARGET: "--to/--from other than square/relu",
    HE: "--he",
    POOL: "--pool",
    KERAS_MODEL: "this command",
}


def require(backend: "Backend", feature: str, path: Any) -> None:
    """Refuse (UserError, exit 2) an option ``backend`` does not offer, naming
    the formats that do."""
    if backend.supports(feature):
        return
    from . import backends_with

    which = [b.description for b in backends_with(feature)]
    where = f"{', '.join(which[:-1])} and {which[-1]}" if len(which) > 1 else "".join(which) or "no format"
    raise UserError(
        f"{OPTION_NAMES.get(feature, feature)} is supported for {where}; '{path}' is {backend.description}"
    )


@dataclass
class ConvertOptions:
    """What to put in and where: the API's arguments, normalised."""

    target: Any  # a registry.Target
    grad: Any = "exact"  # "exact", "clip:C" or a registered function
    sources: frozenset[str] = frozenset({"relu"})
    signature: str | None = None
    trust_code: bool = False
    calibrate: Any = None
    margin: float = 0.1
    pool: str | None = None
    # inspect: the HE-readiness analysis of a loaded Keras model (actswap.he.he_report),
    # for backends with the HE feature; passed in so that no backend imports the HE stage.
    he_report: Callable[[Any], Any] | None = None


class Backend:
    """One model format. Subclasses set the class attributes and override the
    methods their format supports; the defaults refuse with a clear message."""

    #: short name, shown in messages ("keras", "savedmodel")
    name: ClassVar[str] = ""
    #: what the files are, for sentences: "a Keras 3 .keras archive"
    description: ClassVar[str] = ""
    #: the container the scan reads (:mod:`actswap.containers`); None for a
    #: format whose bytes are none of them (the scan report then uses ``name``)
    container: ClassVar[Format | None] = None
    #: the output's suffix ("" for a directory); default outputs are
    #: ``<stem>.<target><suffix>`` beside the input
    suffix: ClassVar[str] = ".keras"
    #: features beyond inspect/convert/save (the constants above)
    features: ClassVar[frozenset[str]] = frozenset()

    # --- finding the backend --------------------------------------------------

    def claims(self, path: Path, container: Format | None) -> bool:
        """Whether this backend reads ``path``; ``container`` is what
        :func:`actswap.containers.sniff` found there (None: none it knows)."""
        return self.container is not None and container is self.container

    def supports(self, feature: str) -> bool:
        return feature in self.features

    # --- reading --------------------------------------------------------------

    def scan(self, path: Path, report: Any) -> None:
        """Add the findings of reading ``path`` as data to ``report``: by default
        the scanner of this backend's container (:data:`actswap.safety.SCANNERS`)."""
        from ..safety import SCANNERS

        if self.container is None:
            raise NotImplementedError(f"{type(self).__name__} must define scan()")
        SCANNERS[self.container](path, report)

    def check(self, path: Path, trust_code: bool = False) -> Any:
        """Scan ``path`` with :meth:`scan` and refuse it (exit 2) on an error;
        ``trust_code`` lets code findings through. Return the scan report."""
        from ..safety import ScanReport, refuse

        report = ScanReport(str(path), self.container.value if self.container is not None else self.name)
        self.scan(path, report)
        return refuse(report, trust_code)

    def load(self, path: Path, trust_code: bool = False) -> tuple[Any, list[str]]:
        """The model, loaded after the scan, as something :func:`actswap.export.tf_callable`
        runs; and notes on what could not be restored."""
        raise self._unsupported("be loaded to run")

    def inspect(self, path: Path, options: ConvertOptions) -> Report:
        """Every activation site and whether ``options`` would replace it. Writes nothing."""
        raise NotImplementedError

    def convert(self, path: Path, options: ConvertOptions) -> tuple[Any, Report]:
        """The converted model, in memory, and the report."""
        raise NotImplementedError

    # --- writing --------------------------------------------------------------

    def holds(self, converted: Any) -> bool:
        """Whether ``converted`` (what some backend's ``convert`` returned) is this backend's to save."""
        return False

    def save(
        self, converted: Any, path: Path, *, overwrite: bool = False, verify: bool = True,
        check: Callable[[Any], None] | None = None, trust_code: bool = True,
    ) -> Path:
        raise NotImplementedError

    def check_output(self, source: Path, out: Path, overwrite: bool) -> None:
        """Refuse (UserError) an output path this format cannot be written to."""
        from ..paths import check_output_path

        check_output_path(out, overwrite=overwrite)

    def default_output(self, source: Path, target: str) -> Path:
        """Beside the input, same family: ``x.keras`` -> ``x.square.keras``."""
        target = target.split(":")[0]  # poly:0,0.5,0.25 -> poly
        stem = source.name[: -len(source.suffix)] if source.suffix else source.name
        return source.with_name(f"{stem}.{target}{self.suffix}")

    def written_check(self, report: Report, sources: frozenset[str], trust_code: bool) -> Callable[[Any], None]:
        """What the written output must hold, for ``save``'s ``check``: every
        replaced site is the target. Receives what ``save`` reads back."""
        return lambda written: None

    # --- messages -------------------------------------------------------------

    def _unsupported(self, what: str) -> Exception:
        from ..errors import UnsupportedFormatError

        return UnsupportedFormatError(f"{self.description} cannot {what}")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"
