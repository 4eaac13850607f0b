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

from ..errors import RecoveryFailedError
from .blend import (
    SQUARE, Blend, blend_model, blends, finalize, fit_squares, polynomials_of, reestimate_statistics,
)
from .run import (
    CALIBRATION_SAMPLES, CHECK_SAMPLES, MAX_DROP, REESTIMATE_BATCHES, accuracy, check_recovery, load_xy, recover,
    site_growth,
)
from .training import BlendSchedule, Distiller, NaNGuard, distillation_loss

__all__ = [
    "CALIBRATION_SAMPLES", "CHECK_SAMPLES", "MAX_DROP", "REESTIMATE_BATCHES", "SQUARE", "Blend", "BlendSchedule",
    "Distiller", "NaNGuard", "RecoveryFailedError", "accuracy", "blend_model", "blends", "check_recovery",
    "distillation_loss", "finalize", "fit_squares", "load_xy", "polynomials_of", "recover",
    "reestimate_statistics", "site_growth",
]
