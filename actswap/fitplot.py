"""Inspecting a fit: its coefficients and errors, and a figure of it.

The figure (matplotlib, the optional ``plot`` extra) shows the source
activation, the fitted polynomial and, when calibration samples are given, the
histogram of the inputs the site actually sees, so the range and the fit can
be judged together.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from . import registry
from .errors import UserError


def fit_summary(activation: str, degree: int, interval: tuple[float, float], detail: str = "") -> dict[str, Any]:
    """Coefficients of actswap's fit, its max error, and numpy's plain least-squares error."""
    f = registry._source_function(activation, detail)
    if f is None:
        raise UserError(f"no reference function to fit for '{activation}'")
    coef = registry.fit_coefficients(activation, detail, degree, interval)
    dense = np.linspace(interval[0], interval[1], 20001)
    ours = float(np.max(np.abs(np.polynomial.Polynomial(coef)(dense) - f(dense))))
    plain = np.polynomial.Polynomial.fit(dense[::10], f(dense[::10]), degree)
    theirs = float(np.max(np.abs(plain(dense) - f(dense))))
    return {
        "activation": activation, "degree": degree, "interval": list(interval),
        "coefficients": list(coef), "max_error": ours, "numpy_lstsq_max_error": theirs,
    }


def plot_fit(
    out: str | os.PathLike[str],
    activation: str,
    coefficients: list[float],
    interval: tuple[float, float],
    samples: np.ndarray | None = None,
    title: str | None = None,
) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install 'actswap[plot]'") from None
    f = registry._source_function(activation, "")
    lo, hi = interval
    xs = np.linspace(lo - 0.15 * (hi - lo), hi + 0.15 * (hi - lo), 600)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if samples is not None and len(samples):
        ax2 = ax.twinx()
        ax2.hist(samples, bins=60, color="0.85", zorder=0)
        ax2.set_ylabel("calibrated inputs (count)")
        ax.set_zorder(ax2.get_zorder() + 1)
        ax.patch.set_visible(False)
    ax.plot(xs, f(xs), label=activation, color="C0", lw=2)
    ax.plot(xs, np.polynomial.Polynomial(coefficients)(xs), label=f"degree-{len(coefficients) - 1} fit", color="C3", lw=1.6, ls="--")
    ax.axvspan(lo, hi, color="C2", alpha=0.08, label="fit interval")
    ax.set_xlabel("input")
    ax.set_ylabel("output")
    ax.legend(loc="upper left")
    ax.set_title(title or f"{activation} on [{lo:g}, {hi:g}]")
    fig.tight_layout()
    dest = Path(out)
    fig.savefig(dest)
    plt.close(fig)
    return dest


def calibrated_site(
    model_path: str | os.PathLike[str], data: Any, activation: str, path: str | None, margin: float
) -> tuple[str, tuple[float, float], np.ndarray]:
    """The chosen site's path, calibrated fit interval and input samples."""
    from .calibrate import calibrate
    from .formats import load_keras_model
    from .sites import find_sites

    model = load_keras_model(model_path)[0]
    sites = [s for s in find_sites(model) if (s.path == path if path else s.activation == activation)]
    if not sites:
        wanted = f"site '{path}'" if path else f"a {activation} site"
        raise UserError(f"'{model_path}' has no {wanted}; see actswap inspect")
    site = sites[0]
    if site.activation != activation:
        raise UserError(f"site '{site.path}' is {site.activation}, not {activation}")
    r = calibrate(model, [site], data).get(site.path)
    if r is None:
        raise UserError(f"no values reached site '{site.path}' on the calibration data")
    width = max(r.max - r.min, 1e-6)
    return site.path, (r.min - margin * width, r.max + margin * width), r.samples
