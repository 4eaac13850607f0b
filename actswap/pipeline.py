"""File-to-file conversion, as the CLI runs it: plan first, then work.

:func:`plan_convert` does every check that needs no TensorFlow (input format,
options, output paths), so bad input fails fast and nothing is loaded;
:func:`run_convert` then converts, exports ONNX if asked (proven before
anything is written), and saves in the input's family.

Invariants: the input is scanned (:func:`actswap.scan.check`) before anything
loads it; nothing is written when a check fails; with ``strict``, nothing is
written when a ReLU-like site was skipped; when nothing was replaced, nothing
is written unless ``force``; the converted model's outputs are checked for
NaN/Inf before anything is written; what is written is read back and must
hold the expected squares/polynomials before it is moved into place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import gradients, registry, scan
from .errors import NonFiniteOutputError, UserError, first_line
from .formats import Backend, ConvertOptions, backend_for, base
from .formats.base import require
from .report import Report


@dataclass(frozen=True)
class ConvertPlan:
    model: Path
    backend: Backend  # reads the input, writes the output (its family)
    out: Path
    to: str
    grad: str
    signature: str | None
    force: bool
    onnx_out: Path | None
    sources: frozenset[str]
    degree: int | None
    interval: tuple[float, float] | None
    calibrate: Path | None = None
    margin: float = 0.1
    trainable: bool = False
    per_channel: bool = False
    pool: str | None = None
    trust_code: bool = False
    scan_report: scan.ScanReport | None = None


def _same_path(a: Path, b: Path) -> bool:
    try:
        if b.exists() and os.path.samefile(a, b):
            return True
    except OSError:
        pass
    return a.resolve() == b.resolve()


def plan_convert(
    model: str | os.PathLike[str],
    *,
    to: str,
    output: str | os.PathLike[str] | None = None,
    grad: str = "exact",
    signature: str | None = None,
    force: bool = False,
    onnx_out: str | os.PathLike[str] | None = None,
    sources: str = "relu",
    degree: int | None = None,
    interval: str | None = None,
    calibrate: str | os.PathLike[str] | None = None,
    margin: float = 0.1,
    trainable: bool = False,
    per_channel: bool = False,
    pool: str | None = None,
    trust_code: bool = False,
) -> ConvertPlan:
    """Validate everything that can be validated without loading the model,
    and scan it (refusing an unsafe file unless ``trust_code`` lets its code
    findings through)."""
    from . import paths

    model = Path(model)
    grad_mode = gradients.normalize(grad)
    bounds = parse_interval(interval)
    target = registry.get_target(
        to, degree=degree, interval=bounds, trainable=trainable, per_channel=per_channel
    )
    if pool not in (None, "avg"):
        raise UserError(f"--pool takes 'avg', got '{pool}'")
    if (trainable or per_channel) and target.coefficients is None:
        raise UserError(f"--trainable/--per-channel apply to fitted targets (approx, quad), not {to}")
    chosen = registry.resolve_sources(sources)
    if sources.strip() != "all":
        registry.check_pairs(chosen, target)
    backend = backend_for(model)
    report = scan.check(model, trust_code=trust_code, backend=backend)
    if signature is not None:
        require(backend, base.SIGNATURE, model)
    if to != "square" or chosen != frozenset({"relu"}):
        require(backend, base.ANY_TARGET, model)
    out = Path(output) if output is not None else backend.default_output(model, to)
    if _same_path(model, out):
        raise UserError(f"output '{out}' is the input; choose another -o path")
    backend.check_output(model, out, force)
    if pool is not None:
        require(backend, base.POOL, model)
    onnx_path = Path(onnx_out) if onnx_out is not None else None
    if onnx_path is not None:
        require(backend, base.ONNX, model)
        paths.check_output_onnx(onnx_path, overwrite=force)
    calib = Path(calibrate) if calibrate is not None else None
    if calib is not None:
        require(backend, base.CALIBRATE, model)
        if not calib.is_file():
            raise UserError(f"calibration data '{calib}' is not a file; pass an .npz (array x) or .npy")
        if not margin >= 0:
            raise UserError(f"--margin must be >= 0, got {margin}")
    return ConvertPlan(
        model, backend, out, to, grad_mode, signature, force, onnx_path, chosen, degree, bounds,
        calib, margin, trainable, per_channel, pool, trust_code, report,
    )


def parse_interval(text: str | None) -> tuple[float, float] | None:
    """``"-4,4"`` -> (-4.0, 4.0); None stays None (the target's default)."""
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--range must be LO,HI (e.g. -4,4), got '{text}'") from None
    if not lo < hi:
        raise UserError(f"--range must have LO < HI, got '{text}'")
    return lo, hi


def run_convert(
    plan: ConvertPlan,
    *,
    strict: bool = False,
    trust_code: bool | None = None,
    opset: int | None = None,
    sample: str | os.PathLike[str] | None = None,
    tol: float | None = None,
    allow_nonfinite: bool = False,
) -> tuple[Report, bool]:
    """Convert and write per ``plan``; return the report and whether --strict failed.

    When the converted model outputs NaN/Inf on the sample inputs (``sample``,
    else the calibration data, else seeded random ones) and the original
    does not (x² overflowing through a deep network), the model is written
    with a warning (``report.needs_recovery``) that gives the ``actswap
    recover`` command; with ``strict`` (and not ``allow_nonfinite``) that is a
    :class:`NonFiniteOutputError` instead (exit 1, nothing written)."""
    trust = plan.trust_code if trust_code is None else trust_code
    options = ConvertOptions(
        target=registry.get_target(
            plan.to, degree=plan.degree, interval=plan.interval, trainable=plan.trainable,
            per_channel=plan.per_channel,
        ),
        grad=plan.grad, sources=plan.sources, signature=plan.signature, trust_code=trust,
        calibrate=plan.calibrate, margin=plan.margin, pool=plan.pool,
    )
    converted, report = plan.backend.convert(plan.model, options)
    if strict and report.skipped_relu_like > 0:
        return report, True
    if report.replaced == 0 and not plan.force:
        _note_nothing(report, plan)
        return report, False
    _check_finite(plan, converted, report, sample if sample is not None else plan.calibrate,
                  allow_nonfinite or not strict, trust)
    exported: Any = None
    if plan.onnx_out is not None:  # proven before anything is written
        from .export import DEFAULT_TOL, export_onnx

        exported = export_onnx(
            converted, plan.onnx_out, opset=opset, sample=sample,
            tol=DEFAULT_TOL if tol is None else tol, overwrite=plan.force,
        )
    check = plan.backend.written_check(report, plan.sources, trust)
    report.output = str(plan.backend.save(converted, plan.out, overwrite=plan.force, check=check, trust_code=trust))
    if exported is not None:
        data = f" and its weights in {exported.data}" if exported.data else ""
        report.notes.append(f"ONNX: wrote {exported.output}{data}; parity: {exported.parity.describe()}")
        report.export = exported.to_dict()
    return report, False


def _note_nothing(report: Report, plan: ConvertPlan) -> None:
    if report.replaced == 0 and report.output is None:
        chosen = ", ".join(sorted(plan.sources))
        report.notes.append(
            f"nothing to replace: no {chosen} site in '{plan.model}'; nothing written "
            "(pass --force to write an unchanged copy)"
        )


def _check_finite(
    plan: ConvertPlan, converted: Any, report: Report, sample: Any, allow: bool, trust_code: bool
) -> None:
    """Run the converted model once; NaN/Inf outputs where the original's are
    finite fail the conversion (x² overflowed), unless ``allow``."""
    import numpy as np

    from .export import sample_inputs, tf_callable

    if not plan.backend.supports(base.RUN):
        note = getattr(plan.backend, "not_run_note", None)
        if note:
            report.notes.append(note)
        return
    where = "the sample data" if sample is not None else "seeded random inputs"
    try:
        call, keep = tf_callable(converted)
        inputs = sample_inputs(call.specs, sample)
        if sample is None:  # one random sample shows NaN/Inf as well as two, for half the cost
            inputs = [x[:1] if spec.shape.rank and spec.shape[0] is None else x for x, spec in zip(inputs, call.specs)]
        # Run once eagerly: tracing the tf.function (and optimizing its graph)
        # costs more time and memory than the run itself (profiled: issue 8).
        outputs = [np.asarray(t) for t in call.function.python_function(*inputs)]
    except UserError as e:
        if sample is not None:
            raise
        report.notes.append(f"outputs not checked for NaN/Inf ({e}); pass --sample data to check them")
        return
    except Exception as e:  # noqa: BLE001 - a model random inputs cannot drive
        if sample is not None:
            raise
        first = first_line(e)
        report.notes.append(f"outputs not checked for NaN/Inf (running on random inputs failed: {first}); pass --sample data")
        return
    del keep
    bad = [(call.output_names[i], int(np.size(o) - np.isfinite(o).sum())) for i, o in enumerate(outputs)
           if not np.all(np.isfinite(o))]
    if not bad:
        report.notes.append(f"outputs checked on {where}: all finite")
        return
    original = _original_outputs(plan, inputs, trust_code)
    if original is not None and not all(np.all(np.isfinite(o)) for o in original):
        report.notes.append(f"warning: the original model already outputs NaN/Inf on {where}")
        return
    name, n = bad[0]
    what = "x²" if report.target == "square" else "the polynomial"
    message = (
        f"the converted model outputs NaN/Inf on {where} ({n} value(s) of output '{name}'), where the "
        f"original's outputs are finite: {what} overflowed"
    )
    # actswap recover takes Keras 3 models; other formats are fine-tuned by their owner.
    keras3 = plan.backend.supports(base.KERAS_MODEL)
    if allow:
        report.needs_recovery = f"{message}; it needs accuracy recovery before use: " + (
            f"actswap recover {plan.model} {plan.out} --data train.npz" if keras3
            else "fine-tune it after the swap (actswap recover takes Keras 3 models)"
        )
        report.notes.append(f"warning: {report.needs_recovery}")
        return
    raise NonFiniteOutputError(
        f"{message}; nothing written (--strict); "
        + (f"recover accuracy in one step with `actswap recover {plan.model} --to {plan.to} --data train.npz`"
           if keras3 else "fine-tune it after the swap")
        + ", or drop --strict to write it anyway"
    )


def _original_outputs(plan: ConvertPlan, inputs: list[Any], trust_code: bool) -> list[Any] | None:
    import numpy as np

    from .export import tf_callable

    try:
        original, _ = plan.backend.load(plan.model, trust_code)
        call, keep = tf_callable(original)
        return [np.asarray(t) for t in call.function(*inputs)]
    except Exception:  # noqa: BLE001 - then the converted model's NaN/Inf is reported as such
        return None
