"""Accuracy recovery: move a trained model from its activations to polynomials
gradually, instead of swapping them all at once and watching training collapse.

Pieces, each usable in a user's own ``model.fit``:

* :class:`Blend` -- a layer computing ``(1 - a) * source(x) + a * p(x)`` whose
  blend factor ``a`` is a (non-trainable) weight: state, saved with the model,
  not a Python closure;
* :func:`blend_model` -- the original model with every selected site turned
  into a Blend (a = 0: the original function);
* :class:`BlendSchedule` -- a callback moving every Blend's factor from 0 to 1
  over ``ramp_epochs`` (per batch, linearly);
* :class:`NaNGuard` -- a callback that, when the loss or a weight stops being
  finite or grows by orders of magnitude, restores the last good weights and
  lowers the learning rate;
* :func:`distillation_loss` -- soft-target KL (Hinton et al.) blended with the
  hard-label loss, and :class:`Distiller` to train a student on it, one loss
  per output (:data:`LOSSES`: ``kl``, ``binary_kl``, ``mse``; chosen by
  :func:`heads_of` from what each output is), labels optional;
* :func:`finalize` -- the blended model with each Blend replaced by its
  polynomial (a must be 1), a converted model like any other;
* :func:`fit_squares` -- the range-aware start of each x² site, a shifted
  square ``s·(x + b)²`` (:mod:`.shifts` folds ``b`` into the layer before);
* :func:`reestimate_statistics` -- BatchNorm statistics recomputed at the end;
* :func:`check_recovery` -- the result against the original, output by
  output: finite outputs; accuracy within ``max_drop`` points (labels),
  agreement within ``max_disagreement`` points (no labels), or an error
  within ``max_error`` (other outputs); else :class:`RecoveryFailedError`;
* :func:`recover` -- all of the above in one call; :mod:`.files` runs it
  from files for ``actswap recover``.

Layout: :mod:`.blend` (the blended model and its two ends), :mod:`.training`
(schedule, guard, distillation), :mod:`.outputs` (what each output is: its
loss and its check metric), :mod:`.run` (``recover``), :mod:`.check` (the
gate) and :mod:`.metrics` (its figures), :mod:`.shifts`, :mod:`.data` and
:mod:`.files`.

Invariant: the models passed in are not modified.
"""

from __future__ import annotations

import importlib
from typing import Any

# Names are resolved on first use (PEP 562), so that importing a TensorFlow-free
# part of the package (``actswap.recover.files``, which the CLI needs before it
# imports TensorFlow quietly) does not import TensorFlow.
_HOMES = {
    "SQUARE": "blend", "Blend": "blend", "blend_model": "blend", "blends": "blend", "finalize": "blend",
    "fit_squares": "blend", "polynomials_of": "blend", "reestimate_statistics": "blend",
    "CALIBRATION_SAMPLES": "run", "CHECK_SAMPLES": "run", "MAX_DROP": "metrics", "REESTIMATE_BATCHES": "run",
    "accuracy": "check", "check_recovery": "check", "load_xy": "data", "recover": "run", "site_growth": "check",
    "Head": "outputs", "LOSSES": "outputs", "METRICS": "metrics", "heads_of": "outputs",
    "MAX_DISAGREEMENT": "metrics", "MAX_ERROR": "metrics",
    "BlendSchedule": "training", "Distiller": "training", "NaNGuard": "training",
    "distillation_loss": "training",
}
__all__ = sorted([*_HOMES, "RecoveryFailedError"])


def __getattr__(name: str) -> Any:
    if name == "RecoveryFailedError":
        from ..errors import RecoveryFailedError

        return RecoveryFailedError
    if name in _HOMES:
        value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
