"""The gate of a recovery: the recovered model against the original on check
data, one metric per output (:mod:`.outputs`), and a failure that looks like
one -- :class:`~actswap.errors.RecoveryFailedError` naming the output, the
metric and the sites whose inputs grew the most.

Invariants: the models are only called; the check data is read once, batch
by batch (a Dataset streams); non-finite outputs always fail, whatever the
limits (None skips a metric's limit, never the finite test).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import keras
import numpy as np

from ..sites import find_sites
from .metrics import MAX_DISAGREEMENT, MAX_DROP, MAX_ERROR, METRICS, Limits
from .outputs import LOSSES, Head, heads_of, labels_per_head


def batches(data: Any, batch_size: int) -> Iterable[tuple[Any, Any]]:
    """(x, y) batches of ``data``: (x, y) arrays, (x, None), or a Dataset of
    ``x``, ``(x,)`` or ``(x, y)`` batches, streamed; y is None without labels."""
    import tensorflow as tf

    if isinstance(data, tf.data.Dataset):
        for item in data:
            x, y, _ = keras.utils.unpack_x_y_sample_weight(item)
            yield keras.tree.map_structure(np.asarray, x), (None if y is None else keras.tree.map_structure(np.asarray, y))
        return
    x, y = data
    n = len(keras.tree.flatten(x)[0])
    for i in range(0, n, batch_size):
        cut = keras.tree.map_structure(lambda a: np.asarray(a[i: i + batch_size]), x)
        yield cut, (None if y is None else keras.tree.map_structure(lambda a: np.asarray(a[i: i + batch_size]), y))


def predict(model: Any, x: Any) -> Any:
    """``model`` on one batch, whatever strategy its variables live under
    (``predict_on_batch`` returns one replica's share under MirroredStrategy)."""
    n = len(keras.tree.flatten(x)[0])
    return keras.tree.map_structure(np.asarray, model.predict(x, batch_size=n, verbose=0))


def accuracy(model: Any, x: Any, y: Any = None, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` (one class output) on (x, y) arrays, or on a
    Dataset of (x, y) batches passed as ``x``, read batch by batch; NaN outputs
    count as wrong."""
    data = x if y is None else (x, y)
    n = hits = 0
    for xb, yb in batches(data, batch_size):
        pred = np.asarray(keras.tree.flatten(predict(model, xb))[0])
        finite = np.all(np.isfinite(pred), axis=-1)
        hits += int((finite & (np.argmax(pred, -1) == np.asarray(yb).reshape(-1))).sum())
        n += len(pred)
    return hits / n if n else float("nan")


def check_recovery(original: Any, recovered: Any, data: Any, *, max_drop: float | None = MAX_DROP,
                   batch_size: int = 256, heads: list[Head] | None = None,
                   max_disagreement: float | None = MAX_DISAGREEMENT, max_error: float | None = MAX_ERROR,
                   converted: Any = None) -> dict[str, Any]:
    """Compare ``recovered`` with ``original`` on ``data`` (as :func:`batches`
    reads it), each output by its metric (:mod:`.metrics`): with labels, top-1
    accuracy or IoU within ``max_drop`` points of the original's, or an MSE
    against the targets at most ``max_error`` (a fraction) above the
    original's; without, top-1 agreement with the original within
    ``max_disagreement`` points, or a relative error against the original's
    outputs of at most ``max_error``.
    Any NaN/Inf output fails. ``heads`` default: read from ``original`` and the
    first batch. ``converted`` (optional) is measured alongside, for the
    report. Returns the figures; raises
    :class:`~actswap.errors.RecoveryFailedError` when a limit is passed."""
    from ..errors import RecoveryFailedError

    limits = Limits(max_drop, max_disagreement, max_error)
    models = {"original": original, "recovered": recovered, **({"converted": converted} if converted is not None else {})}
    n = nonfinite = 0
    metrics: list[Any] = []
    sums: dict[str, list[dict[str, float]]] = {k: [] for k in models}
    first: list[Any] = []
    for xb, yb in batches(data, batch_size):
        outs = {k: predict(m, xb) for k, m in models.items()}
        if heads is None:
            heads = heads_of(original, recovered, outs["original"], yb)
        labels = labels_per_head(yb, [h.name for h in heads])
        if not metrics:  # chosen on the first batch: with its labels, or the original as the reference
            metrics = [METRICS[LOSSES[h.loss].labelled if y is not None else LOSSES[h.loss].fidelity]
                       for h, y in zip(heads, labels)]
            sums = {k: [{} for _ in heads] for k in models}
        ref = keras.tree.flatten(outs["original"])
        for k in models:
            flat = keras.tree.flatten(outs[k])
            for j, (h, m) in enumerate(zip(heads, metrics)):
                if m.labels and labels[j] is None:
                    raise RecoveryFailedError(
                        f"recovery cannot be checked: some check batches have labels for output '{h.name}' and "
                        "others not", model=recovered, result={})
                add = m.sums(np.asarray(flat[h.index]), np.asarray(ref[h.index]), labels[j], h)
                for key, v in add.items():
                    sums[k][j][key] = sums[k][j].get(key, 0.0) + v
        pred = keras.tree.flatten(outs["recovered"])
        nonfinite += sum(int(np.size(p) - np.isfinite(p).sum()) for p in pred)
        n += len(pred[0])
        if not isinstance(xb, (dict, list, tuple)) and sum(len(f) for f in first) < 512:
            first.append(xb)
    if n == 0 or heads is None:
        raise RecoveryFailedError("recovery cannot be checked: the check data is empty", model=recovered, result={})
    result: dict[str, Any] = {"samples": n, "nonfinite_outputs": nonfinite, "max_drop": max_drop,
                              "max_disagreement": max_disagreement, "max_error": max_error, "outputs": []}
    failures = []
    for j, (h, m) in enumerate(zip(heads, metrics)):
        values = {k: m.value(sums[k][j]) for k in models}
        why = m.judge(values["original"], values["recovered"], limits)
        result["outputs"].append({"output": h.name, "loss": h.loss, "metric": m.name, "percent": m.percent,
                                  **values, "passed": not why})
        if why:
            failures.append(f"its {m.name} on the check data (output '{h.name}', loss {h.loss}) is {why}")
    top1 = next((o for o in result["outputs"] if o["metric"] == "top-1 accuracy"), None)
    for k in models:
        result[f"{k}_accuracy"] = top1[k] if top1 is not None else None
    if nonfinite:
        why = f"its outputs on the check data hold {nonfinite} NaN/Inf value(s)"
    elif failures:
        why = "; ".join(failures)
    else:
        return result
    grown = site_growth(original, recovered, np.concatenate(first)[:512]) if first else []
    result["site_growth"] = grown
    worst = ", ".join(f"'{g['site']}' |x| {g['recovered']:.3g} vs {g['original']:.3g}" for g in grown[:3])
    raise RecoveryFailedError(
        f"recovery failed: {why} ({n} samples); largest input growth per site: {worst or 'none'}; "
        "try more epochs, a lower --lr, or more data",
        model=recovered, result=result,
    )


def site_growth(original: Any, recovered: Any, x: Any) -> list[dict[str, Any]]:
    """Per replaced site, the largest |input| in ``recovered`` against that in
    ``original`` on inputs ``x``, largest ratio first."""
    from ..calibrate import calibrate

    new_sites = [s for s in find_sites(recovered) if s.activation in ("square", "poly")]
    names = {s.path for s in new_sites}
    old_sites = [s for s in find_sites(original) if s.path in names]
    try:
        before, after = calibrate(original, old_sites, x), calibrate(recovered, new_sites, x)
    except Exception:  # noqa: BLE001 - the failure is reported either way; this only adds detail
        return []

    def peak(r: Any) -> float:
        return max(abs(r.min), abs(r.max)) if r is not None else float("inf")

    rows = []
    for path in sorted(names):
        b, a = before.get(path), after.get(path)
        o, n = peak(b), peak(a)
        rows.append({"site": path, "original": o, "recovered": n, "ratio": n / o if o else float("inf")})
    return sorted(rows, key=lambda r: -r["ratio"] if np.isfinite(r["ratio"]) else float("-inf"))
