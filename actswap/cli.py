"""The ``actswap`` command: parse, call the API, render the report.

No logic lives here beyond argument checks that must happen before TensorFlow
is imported (so that ``--help``, ``--version`` and bad input stay fast).

Exit codes: 0 success; 2 bad input or usage (one line on stderr, no
traceback unless ``--debug``); 1 anything else that failed.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import __version__, registry
from . import scan as scanning
from .errors import ActswapError, UserError
from .formats import Format, detect
from .paths import check_output_onnx
from .pipeline import legacy_kind, plan_convert, run_convert
from .policy import PARITY_TOL as DEFAULT_TOL

app = typer.Typer(
    name="actswap",
    help="Swap ReLU activations of trained Keras models for polynomials (x²), keeping them trainable.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"actswap {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
) -> None:
    _state["debug"] = debug


def _import_tensorflow_quietly(debug: bool) -> None:
    """Import TensorFlow with its C++ start-up banners kept off stderr.

    TF 2.21 logs oneDNN/CUDA banners through absl before its log level applies,
    and a user error must stay one line on stderr. Python-level failures still
    raise normally once stderr is restored.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if debug or "tensorflow" in sys.modules:
        import tensorflow  # noqa: F401
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            import tensorflow as tf

            tf.config.list_physical_devices()  # device probing logs too (cuInit)
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _run(debug: bool, body: Callable[[], int]) -> None:
    """Run a command body, mapping failures to one stderr line and an exit code."""
    debug = debug or _state["debug"]
    try:
        code = body()
    except ActswapError as e:
        if debug:
            raise
        _fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted; nothing was written", 130)
    except typer.Exit:
        raise
    except Exception as e:  # noqa: BLE001 - the last line of defence
        if debug:
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        _fail(f"unexpected failure: {type(e).__name__}: {first} (rerun with --debug for the traceback)", 1)
    else:
        if code:
            raise typer.Exit(code)


def _console() -> Console:
    # Piped output is not wrapped at 80 columns: a report is read in full.
    probe = Console()
    return probe if probe.is_terminal else Console(width=160)


def _sites_table(title: str, sites: list[dict[str, Any]], columns: list[str]) -> Table:
    table = Table(title=title, show_lines=False)
    for col in columns:
        table.add_column(col)
    for s in sites:
        row = []
        for col in columns:
            value = s.get(col, "")
            if col == "path" and s.get("also_at"):
                value = f"{value} (+{len(s['also_at'])} shared)"
            row.append("yes" if value is True else "no" if value is False else str(value))
        table.add_row(*row)
    return table


def _warn_trust_code() -> None:
    typer.echo(
        "WARNING: --trust-code: code stored in the model file (e.g. Lambda layers) WILL RUN "
        "with your permissions; use it only for files whose author you trust",
        err=True,
    )


def _warn_code_findings(report: scanning.ScanReport) -> None:
    """With --trust-code: say, loudly and one line each, which code will run."""
    code = [f for f in report.errors if f.kind == scanning.CODE]
    for f in code[:5]:
        typer.echo(f"WARNING: --trust-code: '{report.path}': {f.message}; this WILL RUN", err=True)
    if len(code) > 5:
        typer.echo(f"WARNING: --trust-code: '{report.path}': and {len(code) - 5} more (actswap scan lists them)", err=True)


def _scan_first(path: Path, trust_code: bool = False) -> scanning.ScanReport:
    """Scan before anything loads ``path`` (and before TensorFlow is imported);
    refuse (exit 2) unless --trust-code lets code findings through."""
    report = scanning.check(path, trust_code=trust_code)
    if trust_code:
        _warn_code_findings(report)
    return report


@app.command()
def convert(
    model: Path = typer.Argument(
        ..., help="Model: .keras, legacy .h5, SavedModel directory or frozen .pb (detected from content)."
    ),
    to: str = typer.Option(
        ..., "--to", help=f"Target: {', '.join(registry.target_names())} (poly:c0,c1,... ascending)."
    ),
    sources: str = typer.Option(
        "relu", "--from", help="Source activations to replace, comma-separated, or 'all'."
    ),
    degree: Optional[int] = typer.Option(None, "--degree", help="approx: polynomial degree [default: 2]."),
    fit_range: Optional[str] = typer.Option(None, "--range", help="approx: fit interval LO,HI [default: -4,4]."),
    calibrate: Optional[Path] = typer.Option(
        None, "--calibrate", help="Sample inputs (.npz with x, or .npy): measure each site's input range."
    ),
    margin: float = typer.Option(0.1, "--margin", help="Widen calibrated ranges by this fraction per side."),
    trainable: bool = typer.Option(False, "--trainable", help="approx: make the fitted coefficients trainable."),
    per_channel: bool = typer.Option(False, "--per-channel", help="quad/--trainable: coefficients per channel."),
    pool: Optional[str] = typer.Option(None, "--pool", help="'avg': swap max pooling for average pooling."),
    output: Optional[Path] = typer.Option(
        None, "-o", "--output",
        help="Output path, same family as MODEL [default: <stem>.<target>.keras|.pb, or <dir>.<target>/ beside MODEL].",
    ),
    grad: str = typer.Option("exact", "--grad", help="Gradient of the new activation: exact | clip:C."),
    signature: Optional[str] = typer.Option(
        None, "--signature", help="SavedModel only: rewrite this signature, keep the others as they are."
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite OUTPUT if it exists."),
    trust_code: bool = typer.Option(
        False, "--trust-code", help="DANGEROUS: load a file although the scan found code in it (Lambda, custom ops...)."
    ),
    strict: bool = typer.Option(
        False, "--strict", help="Exit 1, writing nothing, if any ReLU-like site was skipped."
    ),
    allow_nonfinite: bool = typer.Option(
        False, "--allow-nonfinite", help="Write the output even if it computes NaN/Inf where the original does not."
    ),
    onnx_out: Optional[Path] = typer.Option(
        None, "--onnx", help="Also export the converted model to this .onnx file, checked for parity."
    ),
    opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset [default: tf2onnx's preferred]."),
    sample: Optional[Path] = typer.Option(
        None, "--sample", help="Parity inputs: .npz (arrays named like the inputs, or x) or .npy."
    ),
    tol: float = typer.Option(DEFAULT_TOL, "--tol", help="Parity tolerance, relative to the output's largest value."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
) -> None:
    """Replace every plain ReLU in MODEL and write a model that loads and trains."""

    def body() -> int:
        plan = plan_convert(
            model, to=to, output=output, grad=grad, signature=signature, force=force, onnx_out=onnx_out,
            sources=sources, degree=degree, interval=fit_range, calibrate=calibrate, margin=margin,
            trainable=trainable, per_channel=per_channel, pool=pool, trust_code=trust_code,
        )
        if trust_code:
            _warn_trust_code()
            if plan.scan_report is not None:
                _warn_code_findings(plan.scan_report)
        _import_tensorflow_quietly(debug or _state["debug"])
        report, failed = run_convert(
            plan, strict=strict, trust_code=trust_code, opset=opset, sample=sample, tol=tol,
            allow_nonfinite=allow_nonfinite,
        )
        data = report.to_dict()
        if as_json:
            if failed:
                data["error"] = "strict"
            typer.echo(json.dumps(data))
        else:
            console = _console()
            console.print(
                _sites_table(
                    f"{model} -> {to}", data["sites"],
                    ["path", "layer", "form", "activation", "action", "reason"],
                )
            )
            for note in report.notes:
                if report.needs_recovery is None or report.needs_recovery not in note:
                    console.print(f"note: {note}")
            nothing = "nothing to replace; " if report.replaced == 0 else ""
            console.print(
                f"replaced {report.replaced}, skipped {report.skipped} "
                f"({report.skipped_relu_like} ReLU-like); {nothing}"
                + (f"wrote {report.output}" if report.output else "nothing written")
            )
        if report.needs_recovery is not None:
            typer.echo(f"warning: {report.needs_recovery}", err=True)
        if failed:
            typer.echo(
                f"error: --strict: {report.skipped_relu_like} ReLU-like site(s) were skipped "
                "(see the report); nothing was written",
                err=True,
            )
            return 1
        return 0

    _run(debug, body)


@app.command()
def inspect(
    model: Path = typer.Argument(
        ..., help="Model: .keras, legacy .h5, SavedModel directory or frozen .pb (detected from content)."
    ),
    to: str = typer.Option("square", "--to", help="Target used to judge 'replaceable'."),
    sources: str = typer.Option("relu", "--from", help="Source activations, comma-separated, or 'all'."),
    he: bool = typer.Option(False, "--he", help="Add the HE-readiness report: non-polynomial ops, multiplicative depth."),
    trust_code: bool = typer.Option(
        False, "--trust-code", help="DANGEROUS: load a file although the scan found code in it (Lambda, custom ops...)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
) -> None:
    """List every activation site in MODEL and whether it can be replaced. Writes nothing."""

    def body() -> int:
        target = registry.get_target(to)
        chosen = registry.resolve_sources(sources)
        fmt = detect(model)
        if trust_code:
            _warn_trust_code()
        _scan_first(model, trust_code)
        legacy = legacy_kind(model, fmt)
        if he and (legacy is not None or fmt in (Format.SAVEDMODEL, Format.GRAPHDEF)):
            raise UserError("--he reports on Keras 3 models (.keras/.h5) only, for now")
        _import_tensorflow_quietly(debug or _state["debug"])
        if legacy is not None:
            from .legacy import inspect_legacy

            report = inspect_legacy(model, trust_code=trust_code)
        else:
            from . import api

            report = api.inspect(model, to=target, sources=chosen, trust_code=trust_code, he=he)
        data = report.to_dict()
        if as_json:
            typer.echo(json.dumps(data))
            return 0
        console = _console()
        console.print(
            _sites_table(str(model), data["sites"], ["path", "layer", "form", "activation", "replaceable"])
        )
        for note in report.notes:
            console.print(f"note: {note}")
        counts = ", ".join(f"{k}: {v}" for k, v in data["counts"].items()) or "none"
        replaceable = sum(s.replaceable for s in report.sites)
        console.print(
            f"{len(report.sites)} activation sites ({counts}); {replaceable} replaceable by {target.name}"
        )
        if report.he is not None:
            for item in report.he["non_polynomial"]:
                console.print(f"not polynomial: {item['path']}: {item['op']} ({item['why']})")
            d = report.he["multiplicative_depth"]
            console.print(
                f"multiplicative depth {d['depth']}: {d['ct_ct']} ciphertext x ciphertext, "
                f"{d['ct_pt']} ciphertext x plaintext; "
                + ("HE-ready" if report.he["he_ready"] else "not HE-ready")
            )
        return 0

    _run(debug, body)


def _export_error_data(e: Exception) -> dict[str, Any]:
    report = getattr(e, "report", None)
    data = report.to_dict() if report is not None else {}
    data["error"] = str(e)
    return data


@app.command()
def export(
    model: Path = typer.Argument(..., help="Keras file (.keras/.h5) or SavedModel directory."),
    out: Path = typer.Argument(..., help="Output .onnx file."),
    opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset [default: tf2onnx's preferred]."),
    sample: Optional[Path] = typer.Option(
        None, "--sample", help="Parity inputs: .npz (arrays named like the inputs, or x) or .npy."
    ),
    tol: float = typer.Option(DEFAULT_TOL, "--tol", help="Parity tolerance, relative to the output's largest value."),
    signature: Optional[str] = typer.Option(None, "--signature", help="SavedModel signature to export."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUT if it exists."),
    trust_code: bool = typer.Option(
        False, "--trust-code", help="DANGEROUS: load a file although the scan found code in it (Lambda, custom ops...)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
) -> None:
    """Export MODEL to ONNX; the export is checked (standard ops only, onnx.checker,
    onnxruntime parity with TensorFlow) and written only if every check passes."""

    def body() -> int:
        fmt = detect(model)
        check_output_onnx(out, overwrite=force)
        if fmt is Format.GRAPHDEF:
            raise UserError("export takes a Keras file or a SavedModel directory, not a frozen graph")
        if trust_code:
            _warn_trust_code()
        _scan_first(model, trust_code)
        _import_tensorflow_quietly(debug or _state["debug"])
        from .export import ExportCheckError, export_onnx

        if fmt is Format.SAVEDMODEL:
            from .savedmodel import load_signatures

            obj, _ = load_signatures(model, trust_code)
        else:
            from .io import load_with_notes

            obj, _ = load_with_notes(model, trust_code=trust_code)
        try:
            report = export_onnx(obj, out, opset=opset, sample=sample, tol=tol, signature=signature, overwrite=force)
        except ExportCheckError as e:
            if as_json:
                typer.echo(json.dumps(_export_error_data(e)))
            raise
        data = report.to_dict()
        if as_json:
            typer.echo(json.dumps(data))
            return 0
        console = _console()
        counts = ", ".join(f"{k} {v}" for k, v in data["op_counts"].items())
        console.print(f"ops: {counts}")
        console.print(f"Relu nodes: {data['relu_nodes']}, Pow nodes: {data['pow_nodes']}, Mul nodes: {data['mul_nodes']}")
        console.print(f"parity: {report.parity.describe()}")
        console.print(f"wrote {report.output} (opset {report.opset})")
        return 0

    _run(debug, body)


@app.command()
def verify(
    original: Path = typer.Argument(..., help="The model before conversion (.keras/.h5)."),
    converted: Path = typer.Argument(..., help="The converted model (.keras)."),
    onnx: Optional[Path] = typer.Option(None, "--onnx", help="Also check this ONNX export against CONVERTED."),
    sample: Optional[Path] = typer.Option(None, "--sample", help="Inputs: .npz or .npy [default: seeded random]."),
    tol: float = typer.Option(DEFAULT_TOL, "--tol", help="Tolerance, relative to the output's largest value."),
    trust_code: bool = typer.Option(
        False, "--trust-code", help="DANGEROUS: load files although the scan found code in them (Lambda...)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
) -> None:
    """Check a conversion independently: which sites differ, weights bit-identical,
    outputs equal ORIGINAL with squares at those sites and finite (and ONNX parity). Exit 1 if any fails."""

    def body() -> int:
        detect(original)
        detect(converted)
        if trust_code:
            _warn_trust_code()
        _scan_first(original, trust_code)
        _scan_first(converted, trust_code)
        _import_tensorflow_quietly(debug or _state["debug"])
        from .verify import verify as run_verify

        report = run_verify(original, converted, onnx_path=onnx, sample=sample, tol=tol, trust_code=trust_code)
        data = report.to_dict()
        if as_json:
            typer.echo(json.dumps(data))
        else:
            console = _console()
            table = Table(title=f"verify {original} -> {converted}")
            for col in ("check", "result", "detail"):
                table.add_column(col)
            for c in report.checks:
                table.add_row(c.name, "ok" if c.ok else "FAILED", c.detail)
            console.print(table)
            for d in report.differences:
                console.print(f"difference: {d}")
        if not report.ok:
            typer.echo(f"error: verify failed: {', '.join(report.failed)}", err=True)
            return 1
        return 0

    _run(debug, body)


@app.command("scan")
def scan_command(
    model: Path = typer.Argument(
        ..., help="Model: .keras, legacy .h5, SavedModel directory or frozen .pb (detected from content)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of lines."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
) -> None:
    """Check MODEL without loading it (no TensorFlow): code it would run, a malformed or
    hostile container, low precision. Exit 2 if convert/inspect/export would refuse it."""

    def body() -> int:
        report = scanning.scan(model)
        if as_json:
            typer.echo(json.dumps(report.to_dict()))
        else:
            for f in report.findings:
                typer.echo(f"{f.severity:<8} {f.kind:<10} {f.message}")
            if report.not_listed:
                typer.echo(f"{'':<8} {'':<10} ... and {report.not_listed} more finding(s) not listed")
            for line in report.checked:
                typer.echo(f"checked  {line}")
            errors, warnings = len(report.errors), len(report.warnings)
            verdict = "refused" if errors else "ok"
            typer.echo(f"{model}: {report.format}, {errors} error(s), {warnings} warning(s): {verdict}")
        if report.errors:
            code_only = all(f.kind == scanning.CODE for f in report.errors)
            hint = (
                "--trust-code would load it anyway: only if you trust its author"
                if code_only else "--trust-code does not override this"
            )
            typer.echo(
                f"error: '{model}' would be refused: {report.errors[0].message}"
                + (f" (and {len(report.errors) - 1 + report.not_listed} more)" if len(report.errors) > 1 else "")
                + f"; {hint}",
                err=True,
            )
            return 2
        return 0

    _run(debug, body)


@app.command()
def fit(
    source: str = typer.Argument(..., help="Source activation to fit, e.g. relu, gelu, silu, sigmoid."),
    degree: int = typer.Option(2, "--degree", help="Polynomial degree."),
    fit_range: str = typer.Option("-4,4", "--range", help="Fit interval LO,HI (without --calibrate)."),
    model: Optional[Path] = typer.Option(None, "--model", help="With --calibrate: fit a site of this model."),
    calibrate: Optional[Path] = typer.Option(None, "--calibrate", help="Samples (.npz x / .npy) for the site's range."),
    site: Optional[str] = typer.Option(None, "--site", help="Site path [default: the first SOURCE site]."),
    margin: float = typer.Option(0.1, "--margin", help="Widen the calibrated range by this fraction per side."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG of the fit (needs matplotlib)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
) -> None:
    """Fit SOURCE with a polynomial (what --to approx puts in) and show how good it is."""

    def body() -> int:
        from .fitplot import fit_summary, plot_fit
        from .pipeline import parse_interval

        name = registry.canonical(source)
        interval = parse_interval(fit_range)
        if not 1 <= degree <= 32:
            raise UserError(f"--degree must be between 1 and 32, got {degree}")
        samples, title = None, None
        if (model is None) != (calibrate is None):
            raise UserError("--model and --calibrate go together")
        if model is not None:
            detect(model)
            _scan_first(model)
            _import_tensorflow_quietly(debug or _state["debug"])
            from .fitplot import calibrated_site

            where, interval, samples = calibrated_site(model, calibrate, name, site, margin)
            title = f"{name} at '{where}' on its calibrated range"
        summary = fit_summary(name, degree, interval)
        if plot is not None:
            summary["plot"] = str(plot_fit(plot, name, summary["coefficients"], interval, samples, title))
        if as_json:
            typer.echo(json.dumps(summary))
            return 0
        coeffs = ", ".join(f"{c:.6g}" for c in summary["coefficients"])
        typer.echo(f"{name} on [{interval[0]:g}, {interval[1]:g}], degree {degree}: coefficients {coeffs}")
        typer.echo(
            f"max error {summary['max_error']:.4g} (numpy's plain least squares: "
            f"{summary['numpy_lstsq_max_error']:.4g})"
        )
        if plot is not None:
            typer.echo(f"wrote {plot}")
        return 0

    _run(debug, body)


@app.command()
def recover(
    original: Path = typer.Argument(..., help="The trained model before conversion (.keras/.h5)."),
    converted: Optional[Path] = typer.Argument(
        None, help="Its conversion (.keras): which sites, which polynomials. Omit it and give --to instead."
    ),
    data: Path = typer.Option(..., "--data", help="Training data: .npz with x (inputs) and y (integer labels)."),
    val: Optional[Path] = typer.Option(
        None, "--val", help="Validation data, same keys [default: the last tenth of --data, held out]."
    ),
    to: Optional[str] = typer.Option(
        None, "--to", help="Without CONVERTED: the target, as for convert (square, poly:..., approx) [default: square]."
    ),
    sources: str = typer.Option("relu", "--from", help="Without CONVERTED: source activations, as for convert."),
    degree: Optional[int] = typer.Option(None, "--degree", help="Without CONVERTED, approx: polynomial degree."),
    fit_range: Optional[str] = typer.Option(None, "--range", help="Without CONVERTED, approx: fit interval LO,HI."),
    epochs: int = typer.Option(2, "--epochs", help="Epochs of recovery."),
    ramp: float = typer.Option(0.5, "--ramp", help="Epochs over which each site blends into its polynomial."),
    batch_size: int = typer.Option(128, "--batch-size"),
    learning_rate: float = typer.Option(2e-3, "--lr", help="Adam learning rate (gradients clipped to norm 1)."),
    no_distill: bool = typer.Option(False, "--no-distill", help="Train on labels only, without the original as teacher."),
    plain: bool = typer.Option(
        False, "--plain", help="Blend x² sites towards plain x² (no fitted scale and shift s·(x + b)²)."
    ),
    max_drop: float = typer.Option(
        1.0, "--max-drop", help="Fail (exit 1) if the recovered accuracy is more than this many points below the original's."
    ),
    output: Optional[Path] = typer.Option(
        None, "-o", "--output",
        help="Output .keras [default: <converted>.recovered.keras, or <original>.<target>.recovered.keras].",
    ),
    force: bool = typer.Option(
        False, "--force", help="Overwrite OUTPUT if it exists; write it even if the recovery failed (still exit 1)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
) -> None:
    """Fine-tune ORIGINAL into polynomials gradually (blend, distil, guard); fail if it does not recover."""

    def body() -> int:
        from .paths import check_output_path
        from .recover.files import default_output

        if converted is not None and (to is not None or degree is not None or fit_range is not None):
            raise UserError("give either CONVERTED or --to (with --from/--degree/--range), not both")
        detect(original)
        _scan_first(original)
        if converted is not None:
            detect(converted)
            _scan_first(converted)
        out = output if output is not None else default_output(original, converted, to)
        check_output_path(out, overwrite=force)
        if epochs < 1 or not 0 <= ramp <= epochs:
            raise UserError(f"--epochs must be >= 1 and --ramp between 0 and --epochs; got {epochs}, {ramp}")
        if max_drop < 0:
            raise UserError(f"--max-drop must be >= 0 (points of accuracy), got {max_drop}")
        conversion = None
        if converted is None:
            from .pipeline import parse_interval

            target, bounds = to or "square", parse_interval(fit_range)
            chosen = registry.resolve_sources(sources)
            if sources.strip() != "all":
                registry.check_pairs(chosen, registry.get_target(target, degree=degree, interval=bounds))
            conversion = {"to": target, "sources": chosen, "degree": degree, "interval": bounds}
        _import_tensorflow_quietly(debug or _state["debug"])
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        import keras

        from .errors import RecoveryFailedError
        from .recover.files import run

        class Bar(keras.callbacks.Callback):
            def __init__(self, progress: Any) -> None:
                super().__init__()
                self.progress, self.task = progress, None

            def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
                self.task = self.progress.add_task(f"epoch {epoch + 1}/{epochs}", total=self.params.get("steps"))

            def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
                self.progress.advance(self.task)

        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
        failure: RecoveryFailedError | None = None
        with Progress(*columns, console=Console(stderr=True), disable=as_json) as progress:
            try:
                result = run(
                    original, converted, data, val=val, output=out, force=force, conversion=conversion,
                    callbacks=[Bar(progress)], epochs=epochs, ramp_epochs=ramp, distill=not no_distill,
                    learning_rate=learning_rate, batch_size=batch_size, fit=not plain,
                    max_drop=max_drop,
                )
            except RecoveryFailedError as e:
                failure, result = e, e.result
        if as_json:
            if failure is not None:
                result = {**result, "error": str(failure)}
            typer.echo(json.dumps(result))
        else:
            table = Table(title=f"recover {converted or original}")
            for col in ("epoch", "loss", "val accuracy"):
                table.add_column(col)
            for e in result["epochs"]:
                acc = e["val_accuracy"]
                table.add_row(str(e["epoch"]), f"{e['loss']:.4g}", "" if acc is None else f"{acc:.4f}")
            console = _console()
            console.print(table)
            restores = "" if result["nan_restores"] is None else (
                f"; restores {result['nan_restores']} ({result['explosions']} finite explosions)")
            written = f"wrote {result['output']}" if result["output"] else "nothing written"
            console.print(
                f"accuracy on {result['check_samples']} check samples: original {result['original_accuracy']:.4f}, "
                f"converted {result['converted_accuracy']:.4f}, recovered {result['recovered_accuracy']:.4f}"
                f"{restores}; {written}"
            )
        if failure is not None:
            where = f"; written anyway (--force): {result['output']}" if result["output"] else "; nothing written"
            typer.echo(f"error: {failure}{where}", err=True)
            return 1
        return 0

    _run(debug, body)


@app.command("he-run")
def he_run(
    model: Path = typer.Argument(..., help="Converted model (.keras/.h5): affine layers and polynomial activations."),
    data: Path = typer.Option(..., "--data", help="Samples: .npz with x (inputs) and, for accuracies, y (labels)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Run only the first N samples."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
) -> None:
    """Run MODEL on CKKS-encrypted samples (TenSEAL) and compare with plaintext."""

    def body() -> int:
        from .paths import read_arrays

        detect(model)
        arrays = read_arrays(data, "data")
        if "x" not in arrays:
            raise UserError(f"data '{data}' has arrays {sorted(arrays)}; it needs 'x' (inputs), and 'y' for accuracies")
        x, y = arrays["x"], arrays.get("y")
        if y is not None and len(y) != len(x):
            raise UserError(f"data '{data}': x has {len(x)} rows but y has {len(y)}")
        if limit is not None and limit < 1:
            raise UserError(f"--limit must be at least 1, got {limit}")
        try:
            # Before TensorFlow: loaded after it, TenSEAL's serialize() crashes (protobuf clash).
            import tenseal  # noqa: F401
        except ImportError:
            raise UserError("he-run needs TenSEAL: pip install 'actswap[he]'") from None
        _import_tensorflow_quietly(debug or _state["debug"])
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from .encrypted import run as run_encrypted

        console = _console()
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        progress = Progress(*columns, console=Console(stderr=True), disable=as_json)
        task = progress.add_task("encrypted samples", total=min(len(x), limit or len(x)))

        def parameters_chosen(p: Any) -> None:
            # The bar starts only now: a refusal before this point stays one line on stderr.
            if not as_json:
                console.print(p.describe())
            progress.start()

        try:
            report = run_encrypted(
                model, x, y, limit=limit, on_parameters=parameters_chosen,
                progress=lambda done, total: progress.update(task, completed=done),
            )
        finally:
            progress.stop()
        r = report.to_dict()
        if as_json:
            typer.echo(json.dumps(r))
            return 0
        lat, size = r["latency_seconds"], r["ciphertext_bytes"]
        table = Table(title=f"he-run {model} ({r['samples']} samples)")
        table.add_column("figure")
        table.add_column("value")
        table.add_row("top-1 agreement", f"{r['top1_agreement']:.4f} ({len(r['disagreements'])} differ)")
        table.add_row("max abs logit error", f"{r['max_abs_logit_error']:.3g} (relative {r['max_rel_logit_error']:.2g})")
        if r["plaintext_accuracy"] is not None:
            table.add_row("accuracy plaintext / encrypted", f"{r['plaintext_accuracy']:.4f} / {r['encrypted_accuracy']:.4f}")
        table.add_row("latency encrypt / evaluate / decrypt", " / ".join(f"{lat[k]['mean']:.3g} s" for k in lat))
        if size:
            table.add_row("ciphertext in / out, public context",
                          f"{size['input']:,} / {size['output']:,}, {size['public_context']:,} bytes")
        table.add_row("key generation", f"{r['setup_seconds']:.2g} s")
        console.print(table)
        for i, stage in enumerate(r["stages"]):
            console.print(f"stage {i + 1}: {stage}")
        for note in r["notes"]:
            console.print(f"note: {note}")
        return 0

    _run(debug, body)


def main(argv: Optional[list[str]] = None) -> None:
    """Console-script entry point; usage errors become one line and exit code 2."""
    try:
        code = app(args=argv, standalone_mode=False)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        sys.exit(130)
    except Exception as e:
        # Usage errors come from the click that typer ships (vendored in recent
        # typer), so they are recognised by shape, not by class.
        if not callable(getattr(e, "format_message", None)) or not isinstance(
            getattr(e, "exit_code", None), int
        ):
            raise
        ctx = getattr(e, "ctx", None)
        command = ctx.command_path if ctx is not None else "actswap"
        message = e.format_message().strip().rstrip(".")
        if message:  # empty when no arguments were given and help was shown
            typer.echo(f"error: {message}; see '{command} --help'", err=True)
        sys.exit(e.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
