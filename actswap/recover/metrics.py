"""The gate's figures: one record per check metric (:data:`METRICS`), each
accumulated over check batches and judged against its limit (:class:`Limits`,
the documented defaults below). Which metric an output gets is its loss
record's choice (:data:`.outputs.LOSSES`, ``labelled``/``fidelity``).

Invariant: a NaN figure is past any limit (a limit of None is not checked at all).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .outputs import Head

MAX_DROP = 1.0  # points of accuracy (vs labels) a recovery may lose against the original
# Points of disagreement with the original allowed without labels. A recovery
# the labelled gate passes disagrees more than its accuracy drop says: the
# committed fixture (94.55%) recovered with labels, 3 epochs, lost 0.70 points
# and disagreed on 3.15% of 2,000 test images; a starved one on 35%.
MAX_DISAGREEMENT = 5.0
MAX_ERROR = 0.25  # non-class outputs: relative error vs the original, or MSE increase vs targets


@dataclass(frozen=True)
class Limits:
    """The gate's tolerances (documented defaults above)."""

    max_drop: float | None = MAX_DROP
    max_disagreement: float | None = MAX_DISAGREEMENT
    max_error: float | None = MAX_ERROR


@dataclass(frozen=True)
class Metric:
    """A check figure, accumulated over batches: ``sums(pred, reference, y, head)``
    (reference: the original's outputs) -> additive sums; ``value(sums)``;
    ``judge(original, recovered, limits)`` -> why it fails, or ""."""

    name: str
    labels: bool  # it reads labels/targets (else the original's outputs)
    sums: Callable[[np.ndarray, np.ndarray, Any, Head], dict[str, float]]
    value: Callable[[dict[str, float]], float]
    judge: Callable[[float, float, Limits], str]
    percent: bool  # shown as a percentage


def _drop(original: float, recovered: float, limits: Limits) -> str:
    drop = 100.0 * (original - recovered)
    if limits.max_drop is None or drop <= limits.max_drop:
        return ""
    return (f"{100 * recovered:.2f}%, {drop:.2f} points below the original's {100 * original:.2f}% "
            f"(allowed: {limits.max_drop:g}, --max-drop)")


def _disagreement(original: float, recovered: float, limits: Limits) -> str:
    off = 100.0 * (1.0 - recovered)
    if limits.max_disagreement is None or off <= limits.max_disagreement:
        return ""
    return f"{100 * recovered:.2f}%: it disagrees on {off:.2f}% (allowed: {limits.max_disagreement:g}, --max-disagreement)"


def _relative(original: float, recovered: float, limits: Limits) -> str:
    if limits.max_error is None or recovered <= limits.max_error:  # NaN fails
        return ""
    return f"{recovered:.4g} (allowed: {limits.max_error:g}, --max-error)"


def _increase(original: float, recovered: float, limits: Limits) -> str:
    if limits.max_error is None or recovered <= original * (1.0 + limits.max_error):
        return ""
    return (f"{recovered:.4g} against the original's {original:.4g}, {100 * (recovered / original - 1):.1f}% more "
            f"(allowed: {100 * limits.max_error:g}%, --max-error)")


def _finite_rows(pred: np.ndarray) -> np.ndarray:
    return np.all(np.isfinite(pred.reshape(len(pred), -1)), axis=-1)


def _top1(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Per position (all axes but the last), argmax hits; NaN rows count as wrong."""
    hits = (np.argmax(pred, -1) == target.reshape(pred.shape[:-1])) & _finite_rows(pred).reshape(
        (-1,) + (1,) * (pred.ndim - 2))
    return {"hits": float(hits.sum()), "n": float(hits.size)}


def _labels_of(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Class indices from integer labels or one-hot rows."""
    y = np.asarray(y)
    return np.argmax(y, -1) if y.shape == pred.shape else y


def _bits(pred: np.ndarray, head: Head, probs: bool) -> np.ndarray:
    return pred > (0.5 if probs else 0.0)


def _jaccard(pred: np.ndarray, y: Any, head: Head) -> dict[str, float]:
    """Units on in both over units on in either (micro IoU; a NaN unit is off):
    what a mask is judged by, and blind to the empty units that dominate one,
    where agreement per unit would pass a model that predicts nothing."""
    p = _bits(pred, head, head.student_probs)
    t = np.asarray(y).reshape(p.shape) > 0.5
    return {"hits": float(np.sum(p & t)), "n": float(np.sum(p | t))}


def _iou(s: dict[str, float]) -> float:
    return s["hits"] / s["n"] if s["n"] else 1.0  # no unit on anywhere, and none predicted: perfect


def _ratio(s: dict[str, float]) -> float:
    return s["hits"] / s["n"] if s["n"] else float("nan")


def _sq(a: np.ndarray, b: Any) -> dict[str, float]:
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64).reshape(np.shape(a))
    return {"sse": float(np.sum(d * d)), "n": float(d.size)}


def _relative_sums(pred: np.ndarray, ref: np.ndarray, y: Any, head: Head) -> dict[str, float]:
    r = np.asarray(ref, np.float64)
    return {**_sq(pred, r), "sum": float(r.sum()), "sum2": float((r * r).sum())}


def _relative_value(s: dict[str, float]) -> float:
    """RMSE against the original over the original's standard deviation."""
    if not s["n"]:
        return float("nan")
    var = max(s["sum2"] / s["n"] - (s["sum"] / s["n"]) ** 2, 0.0)
    return float(np.sqrt(s["sse"] / s["n"]) / np.sqrt(var)) if var > 0 else float(np.sqrt(s["sse"] / s["n"]))


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("top-1 accuracy", True, lambda p, r, y, h: _top1(p, _labels_of(y, p)), _ratio, _drop, True),
    Metric("top-1 agreement", False, lambda p, r, y, h: _top1(p, np.argmax(r, -1)), _ratio, _disagreement, True),
    Metric("IoU against the labels", True, lambda p, r, y, h: _jaccard(p, y, h), _iou, _drop, True),
    Metric("MSE against the targets", True, lambda p, r, y, h: _sq(p, y),
           lambda s: s["sse"] / s["n"] if s["n"] else float("nan"), _increase, False),
    Metric("relative error against the original", False, _relative_sums, _relative_value, _relative, False),
)}
