"""Independent check of a conversion that someone else made, or edited afterwards.

Given ORIGINAL and CONVERTED (Keras models), it checks, each as a named check:

* ``sites``: which activation sites differ. ReLU sites of ORIGINAL that are
  squares in CONVERTED are the expected change; a plain ReLU left in CONVERTED,
  or any other difference (a site added, removed, or changed to something
  else), fails.
* ``weights``: every weight of CONVERTED is bit-identical to ORIGINAL's.
* ``outputs``: CONVERTED's outputs are finite (no NaN/Inf) and equal ORIGINAL
  evaluated with squares at exactly the sites that are squares in CONVERTED
  (rebuilt here from ORIGINAL).
* ``onnx`` (optional): an ONNX export of CONVERTED matches it in onnxruntime.

Invariant: neither model is modified; nothing is written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import UserError
from .policy import PARITY_TOL


@dataclass
class Check:
    name: str
    ok: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


@dataclass
class VerifyReport:
    checks: list[Check] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.checks if not c.ok]

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "failed": self.failed,
            "checks": [c.to_dict() for c in self.checks],
            "replaced": list(self.replaced),
            "differences": list(self.differences),
        }


def _site_map(model: Any) -> dict[str, str]:
    from .sites import find_sites

    return {s.path: s.activation for s in find_sites(model)}


def _check_sites(original: Any, converted: Any, report: VerifyReport) -> set[str]:
    before, after = _site_map(original), _site_map(converted)
    squares = set()
    for path in sorted(set(before) | set(after)):
        a, b = before.get(path), after.get(path)
        if a == b:
            if a == "relu":
                report.differences.append(f"'{path}': relu left in CONVERTED")
            continue
        if a == "relu" and b == "square":
            report.replaced.append(path)
            squares.add(path)
        else:
            report.differences.append(f"'{path}': {a or 'no activation'} -> {b or 'no activation'}")
    ok = not report.differences and bool(report.replaced)
    detail = f"{len(report.replaced)} ReLU site(s) are squares"
    if report.differences:
        detail += f"; {len(report.differences)} other difference(s), first {report.differences[0]}"
    elif not report.replaced:
        detail = "no ReLU site of ORIGINAL is a square in CONVERTED"
    report.checks.append(Check("sites", ok, detail))
    return squares


def _check_weights(original: Any, converted: Any, report: VerifyReport) -> None:
    from .rewrite import copied_weights

    ow, cw = copied_weights(original), copied_weights(converted)
    if len(ow) != len(cw):
        report.checks.append(Check("weights", False, f"ORIGINAL has {len(ow)} weights, CONVERTED {len(cw)}"))
        return
    for o, c in zip(ow, cw):
        a, b = np.asarray(o.numpy()), np.asarray(c.numpy())
        if a.shape != b.shape or a.dtype != b.dtype or a.tobytes() != b.tobytes():
            where = c.path
            if a.shape == b.shape:
                n = int(np.sum(a != b))
                report.checks.append(Check("weights", False, f"weight '{where}' differs in {n} value(s)"))
            else:
                report.checks.append(Check("weights", False, f"weight '{where}' is {b.shape}, was {a.shape}"))
            return
    report.checks.append(Check("weights", True, f"{len(ow)} weights bit-identical"))


def _check_outputs(
    original: Any, converted: Any, squares: set[str], sample: Any, tol: float, report: VerifyReport
) -> None:
    import keras

    from . import registry
    from .export import compare, sample_inputs, tf_callable
    from .report import REPLACED, SKIPPED
    from .rewrite import rewrite
    from .sites import find_sites

    target = registry.get_target("square")
    sites = find_sites(original)
    for s in sites:
        s.action = REPLACED if s.path in squares else SKIPPED
    reference = rewrite(
        original, sites,
        lambda site, node: target.layer("exact", name=node["config"]["name"]),
        lambda site, owner: target.activation("exact"),
    )
    call_ref, keep_ref = tf_callable(reference, what="verify")
    call_new, keep_new = tf_callable(converted, what="verify")
    if [tuple(s.shape) for s in call_ref.specs] != [tuple(s.shape) for s in call_new.specs]:
        report.checks.append(Check("outputs", False, "input shapes differ between ORIGINAL and CONVERTED"))
        return
    inputs = sample_inputs(call_new.specs, sample)
    ref = [np.asarray(t) for t in call_ref.function(*inputs)]
    got = [np.asarray(t) for t in call_new.function(*inputs)]
    bad = [(call_new.output_names[i], int(np.size(g) - np.isfinite(g).sum())) for i, g in enumerate(got)
           if not np.all(np.isfinite(g))]
    if bad:
        where = "the sample data" if sample is not None else "seeded random inputs"
        ref_finite = all(np.all(np.isfinite(r)) for r in ref)
        report.checks.append(Check(
            "outputs", False,
            f"CONVERTED outputs NaN/Inf on {where}: {bad[0][1]} value(s) of output '{bad[0][0]}'"
            + (" (ORIGINAL with squares at those sites too: x² overflowed)" if not ref_finite else ""),
        ))
        return
    parity = compare(ref, got, tol, int(inputs[0].shape[0]) if inputs[0].ndim else 1)
    del keep_ref, keep_new, keras
    report.checks.append(Check("outputs", parity.ok, parity.describe()))


def verify(
    original: Any,
    converted: Any,
    *,
    onnx_path: str | os.PathLike[str] | None = None,
    sample: str | os.PathLike[str] | None = None,
    tol: float = PARITY_TOL,
    trust_code: bool = False,
) -> VerifyReport:
    """Run the checks; see the module docstring. Models or paths to Keras files
    (scanned before loading; ``trust_code`` lets code findings through)."""
    from .formats import load_keras_model as load_with_notes

    if isinstance(original, (str, os.PathLike)):
        original = load_with_notes(original, trust_code=trust_code)[0]
    if isinstance(converted, (str, os.PathLike)):
        converted = load_with_notes(converted, trust_code=trust_code)[0]
    import keras

    if not (isinstance(original, keras.Model) and isinstance(converted, keras.Model)):
        raise UserError("verify compares two Keras models (.keras or .h5 files)")
    report = VerifyReport()
    squares = _check_sites(original, converted, report)
    _check_weights(original, converted, report)
    _check_outputs(original, converted, squares, sample, tol, report)
    if onnx_path is not None:
        report.checks.append(_check_onnx(converted, onnx_path, sample, tol))
    return report


def _check_onnx(converted: Any, onnx_path: str | os.PathLike[str], sample: Any, tol: float) -> Check:
    import onnx

    from .export import check_parity, tf_callable
    from .onnx_build import non_standard_ops

    try:  # the graph only: onnxruntime reads the weights (an external data file too) itself
        proto = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot read ONNX file '{onnx_path}': {e}") from None
    foreign = non_standard_ops(proto)
    if foreign:
        return Check("onnx", False, f"non-standard op {foreign[0]}")
    call, keep = tf_callable(converted, what="verify")
    parity = check_parity(call, str(onnx_path), sample, tol)
    del keep
    return Check("onnx", parity.ok, parity.describe())


# --- reading back a .keras file actswap wrote, without loading it -----------------
