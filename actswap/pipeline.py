"""File-to-file conversion, as the CLI runs it: plan first, then work.

:func:`plan_convert` does every check that needs no TensorFlow (input format,
options, output paths), so bad input fails fast and nothing is loaded;
:func:`run_convert` then converts, exports ONNX if asked (proven before
anything is written), and saves in the input's family.

Invariants: nothing is written when a check fails; with ``strict``, nothing
is written when a ReLU-like site was skipped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import gradients, registry
from .errors import UserError
from .formats import Format, detect
from .report import Report


@dataclass(frozen=True)
class ConvertPlan:
    model: Path
    fmt: Format
    legacy_kind: str | None  # "h5"/"savedmodel": a Keras 2 file for tf_keras
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


def legacy_kind(model: Path, fmt: Format) -> str | None:
    """"h5"/"savedmodel" for Keras 2 files that go to tf_keras, else None."""
    from . import legacy

    if fmt is Format.SAVEDMODEL and legacy.is_keras2_savedmodel(model):
        return "savedmodel"
    if fmt is Format.H5 and legacy.h5_needs_legacy(model):
        return "h5"
    return None


def default_output(model: Path, target: str, fmt: Format, legacy: str | None = None) -> Path:
    """Beside the input, same family: x.keras -> x.square.keras, dir -> dir.square/, x.pb -> x.square.pb."""
    target = target.split(":")[0]  # poly:0,0.5,0.25 -> poly
    if fmt is Format.SAVEDMODEL:
        return model.with_name(f"{model.name}.{target}")
    stem = model.name[: -len(model.suffix)] if model.suffix else model.name
    ext = {Format.GRAPHDEF: ".pb", Format.H5: ".h5" if legacy else ".keras"}.get(fmt, ".keras")
    return model.with_name(f"{stem}.{target}{ext}")


def _same_path(a: Path, b: Path) -> bool:
    try:
        if b.exists() and os.path.samefile(a, b):
            return True
    except OSError:
        pass
    return a.resolve() == b.resolve()


def _check_output(out: Path, fmt: Format, force: bool) -> None:
    from . import paths

    if fmt is Format.SAVEDMODEL:
        if out.suffix == ".keras":
            raise UserError(
                f"-o '{out}': a SavedModel converts to a SavedModel directory, not a .keras file "
                "(its graph has no Keras layers to rebuild); give a directory path"
            )
        paths.check_output_dir(out, overwrite=force)
    elif fmt is Format.GRAPHDEF:
        paths.check_output_pb(out, overwrite=force)
    else:
        paths.check_output_path(out, overwrite=force)


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
) -> ConvertPlan:
    """Validate everything that can be validated without loading the model."""
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
    fmt = detect(model)
    if signature is not None and fmt is not Format.SAVEDMODEL:
        raise UserError(f"--signature applies to SavedModel input; '{model}' is a {fmt.value} file")
    legacy = legacy_kind(model, fmt)
    out = Path(output) if output is not None else default_output(model, to, fmt, legacy)
    if _same_path(model, out):
        raise UserError(f"output '{out}' is the input; choose another -o path")
    if legacy is None:  # tf_keras has its own family rules, checked by convert_legacy
        _check_output(out, fmt, force)
    onnx_path = Path(onnx_out) if onnx_out is not None else None
    if onnx_path is not None:
        if legacy is not None or fmt is Format.GRAPHDEF:
            raise UserError("--onnx is supported for Keras 3 models and SavedModels")
        paths.check_output_onnx(onnx_path, overwrite=force)
    if legacy is not None and (to != "square" or chosen != frozenset({"relu"})):
        raise UserError("Keras 2 (tf_keras) files convert with --to square --from relu only, for now")
    calib = Path(calibrate) if calibrate is not None else None
    if calib is not None:
        if fmt not in (Format.KERAS, Format.H5) or legacy is not None:
            raise UserError("--calibrate is supported for Keras 3 models (.keras/.h5) only, for now")
        if not calib.is_file():
            raise UserError(f"calibration data '{calib}' is not a file; pass an .npz (array x) or .npy")
        if not margin >= 0:
            raise UserError(f"--margin must be >= 0, got {margin}")
    return ConvertPlan(
        model, fmt, legacy, out, to, grad_mode, signature, force, onnx_path, chosen, degree, bounds,
        calib, margin, trainable, per_channel, pool,
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
    trust_code: bool = False,
    opset: int | None = None,
    sample: str | os.PathLike[str] | None = None,
    tol: float | None = None,
) -> tuple[Report, bool]:
    """Convert and write per ``plan``; return the report and whether --strict failed."""
    if plan.legacy_kind is not None:
        from . import legacy  # Keras 2 family in, Keras 2 family out

        report = legacy.convert_legacy(
            plan.model, plan.out, plan.grad, overwrite=plan.force, trust_code=trust_code, strict=strict
        )
        return report, strict and report.skipped_relu_like > 0
    from . import api

    converted, report = api.convert(
        plan.model, to=plan.to, grad=plan.grad, signature=plan.signature, trust_code=trust_code,
        sources=plan.sources, degree=plan.degree, interval=plan.interval,
        calibrate=plan.calibrate, margin=plan.margin, trainable=plan.trainable, per_channel=plan.per_channel,
        pool=plan.pool,
    )
    if strict and report.skipped_relu_like > 0:
        return report, True
    exported: Any = None
    if plan.onnx_out is not None:  # proven before anything is written
        from .export import DEFAULT_TOL, export_onnx

        exported = export_onnx(
            converted, plan.onnx_out, opset=opset, sample=sample,
            tol=DEFAULT_TOL if tol is None else tol, overwrite=plan.force,
        )
    report.output = str(api.save(converted, plan.out, overwrite=plan.force))
    if exported is not None:
        report.notes.append(f"ONNX: wrote {exported.output}; parity: {exported.parity.describe()}")
        report.export = exported.to_dict()
    return report, False
