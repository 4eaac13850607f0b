"""Sites and reports: what actswap found, what it did, and why.

Pure data; no TensorFlow.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from . import registry

REPLACED = "replaced"
SKIPPED = "skipped"


@dataclass
class Site:
    """One place in a model where an activation is applied.

    ``path`` names it from the model down (``outer/inner/dense_2``); a layer
    shared by several models is one site, its other paths in ``also_at``.
    ``layer`` is the class that holds the activation; ``form`` how it is
    written (``Activation layer``, ``ReLU layer``, ``activation argument``,
    ``ops call`` ...); ``activation`` the canonical source name, ``detail`` its
    non-default arguments. ``action``/``reason`` are set by a conversion.
    """

    path: str
    layer: str
    form: str
    activation: str
    detail: str = ""
    replaceable: bool = False
    action: str | None = None
    reason: str = ""
    also_at: list[str] = field(default_factory=list)
    # Calibration: the measured input range (min, max, percentiles) and the
    # interval a fitted target used (the range widened by the margin).
    input_range: dict[str, Any] | None = None
    fit_interval: tuple[float, float] | None = None
    # The polynomial put at a replaced site, ascending coefficients.
    coefficients: tuple[float, ...] | None = None
    # With calibration: the largest |output| of the site after the swap.
    output_max: float | None = None
    # The layer produces one of the model's outputs (a final softmax is the
    # client's work after decryption, not the network's).
    at_output: bool = False
    # Where the site lives, for the engine: the leaf layer object's id and a
    # key path into that leaf's serialized config. Not part of the report.
    leaf_id: int = field(default=0, repr=False, compare=False)
    pointer: tuple[Any, ...] = field(default=(), repr=False, compare=False)

    @property
    def is_argument(self) -> bool:
        """An ``activation=``-style argument of a layer (form ``key=``), rather than
        a whole layer or op that is the activation."""
        return self.form.endswith("=")

    @property
    def relu_like(self) -> bool:
        return registry.family(self.activation) == "relu"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "path": self.path,
            "layer": self.layer,
            "form": self.form,
            "activation": self.activation,
            "detail": self.detail,
            "replaceable": self.replaceable,
        }
        if self.action is not None:
            d["action"] = self.action
            d["reason"] = self.reason
        if self.also_at:
            d["also_at"] = list(self.also_at)
        if self.input_range is not None:
            d["input_range"] = dict(self.input_range)
        if self.fit_interval is not None:
            d["fit_interval"] = list(self.fit_interval)
        if self.coefficients is not None:
            d["coefficients"] = list(self.coefficients)
        if self.output_max is not None:
            d["output_max"] = self.output_max
        if self.at_output:
            d["at_output"] = True
        return d


@dataclass
class Report:
    """The outcome of a conversion (or, with no actions, of an inspection)."""

    sites: list[Site]
    target: str | None = None
    grad: str | None = None
    notes: list[str] = field(default_factory=list)
    source: str | None = None
    output: str | None = None
    export: dict[str, Any] | None = None  # ONNX export figures, when one was made
    he: dict[str, Any] | None = None  # HE-readiness (inspect --he)
    # Set when the converted model overflows (NaN/Inf) where the original does
    # not: the one-line warning, with the recover command, that a user must see.
    needs_recovery: str | None = None

    @property
    def replaced(self) -> int:
        return sum(s.action == REPLACED for s in self.sites)

    @property
    def skipped(self) -> int:
        return sum(s.action == SKIPPED for s in self.sites)

    @property
    def skipped_relu_like(self) -> int:
        return sum(s.action == SKIPPED and s.relu_like for s in self.sites)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.sites:
            out[s.activation] = out.get(s.activation, 0) + 1
        return dict(sorted(out.items()))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "input": self.source,
            "sites": [s.to_dict() for s in self.sites],
            "counts": self.counts(),
            "notes": list(self.notes),
        }
        if self.target is not None:
            d.update(
                target=self.target,
                grad=self.grad,
                replaced=self.replaced,
                skipped=self.skipped,
                skipped_relu_like=self.skipped_relu_like,
                output=self.output,
            )
        if self.export is not None:
            d["onnx"] = self.export
        if self.he is not None:
            d["he"] = self.he
        if self.needs_recovery is not None:
            d["needs_recovery"] = self.needs_recovery
        return d


@contextlib.contextmanager
def warnings_as_notes(notes: list[str], who: str) -> Iterator[None]:
    """Collect the Python warnings raised inside the block (Keras or TensorFlow
    reading a user's file: "Do not pass an `input_shape`...") into ``notes``,
    once each, as ``"<who> warned: <first line>"``, instead of letting them
    print on stderr between actswap's own lines."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    seen: set[str] = set()
    for w in caught:
        text = str(w.message).strip().splitlines()[0] if str(w.message).strip() else w.category.__name__
        if text not in seen:
            seen.add(text)
            notes.append(f"{who} warned: {text}")
