"""``actswap fit``: a polynomial fit of an activation, optionally on a model's measured range."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .. import registry
from ..errors import UserError
from .base import (
    Debug, _import_tensorflow_quietly, _run, _scan_first, _state, app,
)


@app.command()
def fit(
    source: str = typer.Argument(..., help="Source activation to fit, e.g. relu, gelu, silu, sigmoid."),
    degree: int = typer.Option(2, "--degree", help="Polynomial degree."),
    fit_range: str = typer.Option("-4,4", "--range", help="Fit interval LO,HI (without --calibrate)."),
    model: Optional[Path] = typer.Option(None, "--model", help="With --calibrate: fit a site of this model."),
    calibrate: Optional[Path] = typer.Option(None, "--calibrate", help="Samples (.npz x / .npy) for the site's range."),
    site: Optional[str] = typer.Option(None, "--site", help="Site path (default: the first SOURCE site)."),
    margin: float = typer.Option(0.1, "--margin", help="Widen the calibrated range by this fraction per side."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG of the fit (needs matplotlib)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    debug: Debug = False,
) -> None:
    """Fit SOURCE with a polynomial (what --to approx puts in) and show how good it is."""

    def body() -> int:
        from ..formats.base import KERAS_MODEL  # the formats package: not on --help's path

        from ..fitplot import fit_summary, plot_fit
        from ..pipeline import parse_interval

        name = registry.canonical(source)
        interval = parse_interval(fit_range)
        if not 1 <= degree <= 32:
            raise UserError(f"--degree must be between 1 and 32, got {degree}")
        samples, title = None, None
        if (model is None) != (calibrate is None):
            raise UserError("--model and --calibrate go together")
        if model is not None:
            _scan_first(model, needs=KERAS_MODEL)
            _import_tensorflow_quietly(debug or _state["debug"])
            from ..fitplot import calibrated_site

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
