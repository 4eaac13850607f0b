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
  hard-label loss, and :class:`Distiller` to train a student on it;
* :func:`finalize` -- the blended model with each Blend replaced by its
  polynomial (a must be 1), a converted model like any other;
* :func:`fit_squares` -- the range-aware start of each x² site, a shifted
  square ``s·(x + b)²`` (:mod:`.shifts` folds ``b`` into the layer before);
* :func:`reestimate_statistics` -- BatchNorm statistics recomputed at the end;
* :func:`check_recovery` -- the result against the original: finite outputs,
  accuracy within ``max_drop`` points, or :class:`RecoveryFailedError`;
* :func:`recover` -- all of the above in one call; :mod:`.files` runs it
  from files for ``actswap recover``.

Layout: :mod:`.blend` (the blended model and its two ends), :mod:`.training`
(schedule, guard, distillation), :mod:`.run` (``recover`` and its check),
:mod:`.shifts`, :mod:`.files`.

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
    "CALIBRATION_SAMPLES": "run", "CHECK_SAMPLES": "run", "MAX_DROP": "run", "REESTIMATE_BATCHES": "run",
    "accuracy": "run", "check_recovery": "run", "load_xy": "run", "recover": "run", "site_growth": "run",
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
