"""The Python API: load, inspect, convert, save.

Invariants every function here keeps:

* an input model object is never modified; a path is only read;
* ``convert`` copies every weight bit-identically and keeps input/output names,
  shapes and dtypes; a replaced ``Dense(activation='relu')`` keeps an
  activation (the target), nothing is dropped;
* every activation site is reported, with the action taken and why.

A path is handed to the backend that reads its format
(:func:`actswap.formats.backend_for`); a model in memory goes straight to the
Keras 3 conversion (:mod:`actswap.formats.keras_model`). Nothing here asks
which format a file is.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Union

from . import gradients, registry
from .errors import UnsupportedModelError, UserError
from .formats import backend_for, backend_of
from .formats.base import CALIBRATE, HE, POOL, SIGNATURE, Backend, ConvertOptions, require
from .formats.keras_model import convert_model, inspect_model
from .formats import load_keras_model
from .keras_setup import keras
from .report import Report

ModelOrPath = Union[keras.Model, str, os.PathLike]

__all__ = ["convert", "inspect", "load", "save"]


def load(path: str | os.PathLike[str]) -> keras.Model:
    """Load a ``.keras`` or legacy ``.h5`` model safely (scan, then Keras safe mode)."""
    return load_keras_model(path)[0]


def _backend(model_or_path: Any) -> Backend | None:
    """The backend of a path; None for a Keras model in memory."""
    if isinstance(model_or_path, keras.Model):
        return None
    if isinstance(model_or_path, (str, os.PathLike)):
        return backend_for(model_or_path)
    raise UnsupportedModelError(
        f"expected a keras.Model or a path to a model file, got {type(model_or_path).__name__}"
    )


def save(
    converted: Any,
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    verify: bool = True,
    check: Any = None,
    trust_code: bool = True,
) -> Path:
    """Write what :func:`convert` returned, atomically, in its family: a Keras
    model as ``.keras``, a rewritten SavedModel as a SavedModel directory, a
    frozen graph as ``.pb``. Refuses to overwrite unless ``overwrite``.

    With ``verify`` (default), the written output is read back before it is
    moved into place: a Keras model must reload (scanned, safe mode) with the
    same sites and bit-identical weights; a SavedModel must pass the scan and
    load with the same signatures; a frozen graph must parse to the same graph.
    ``check`` adds a check of the written output (for a Keras model, the
    list of sites read back from the file; else the path of the temporary
    SavedModel/graph). A failed check writes nothing.
    ``trust_code`` (default) lets the reload through the scan's code findings:
    the model is the caller's own, in memory, so a custom class of theirs is
    not refused when it is read back; the CLI passes False, so that what it
    writes must pass the scan it applies to its inputs."""
    return backend_of(converted).save(
        converted, Path(path), overwrite=overwrite, verify=verify, check=check, trust_code=trust_code
    )


def inspect(
    model_or_path: ModelOrPath,
    *,
    to: str = "square",
    sources: Iterable[str] | str = ("relu",),
    trust_code: bool = False,
    degree: int | None = None,
    interval: tuple[float, float] | None = None,
    he: bool = False,
) -> Report:
    """List every activation site of a model; ``replaceable`` says whether
    ``convert(..., to=to)`` would replace it. Writes nothing, modifies nothing.

    Takes a Keras model, or a path to a ``.keras``/``.h5`` file, a SavedModel
    directory (sites per signature, nested functions and control flow
    included) or a frozen GraphDef. ``he=True`` adds the HE-readiness report
    (remaining non-polynomial operations, multiplicative depth; see
    :mod:`actswap.he`) for Keras models."""
    target = registry.get_target(to, degree=degree, interval=interval)
    options = ConvertOptions(target=target, sources=registry.as_sources(sources), trust_code=trust_code)
    backend = _backend(model_or_path)
    if he:
        if backend is not None:
            require(backend, HE, model_or_path)
        from .he import he_report

        options.he_report = he_report
    if backend is None:
        return inspect_model(model_or_path, options, notes=[], source=None)
    return backend.inspect(Path(model_or_path), options)


def convert(
    model_or_path: ModelOrPath,
    to: str = "square",
    grad: Any = "exact",
    *,
    sources: Iterable[str] | str = ("relu",),
    signature: str | None = None,
    trust_code: bool = False,
    degree: int | None = None,
    interval: tuple[float, float] | None = None,
    calibrate: Any = None,
    margin: float = 0.1,
    trainable: bool = False,
    per_channel: bool = False,
    pool: str | None = None,
) -> tuple[Any, Report]:
    """Return a copy of the model with every plain ReLU site replaced by ``to``.

    ``grad`` is the backward pass of the new activation: ``"exact"``,
    ``"clip:C"``, or a function ``grad(x, dy) -> dx`` (register it with
    ``keras.saving.register_keras_serializable`` if the model is to be saved).
    ``to`` is ``"square"``, ``"poly:c0,c1,...,cn"`` (a fixed polynomial,
    ascending coefficients) or ``"approx"`` (each site's source activation
    fitted on ``interval`` with a degree-``degree`` Chebyshev least-squares
    polynomial; defaults in :mod:`actswap.registry`). ``sources`` names the
    activations to replace (default: plain ReLU; other members of the ReLU
    family are reported as skipped with a reason), as names or as one string
    like ``--from`` (``"all"``, ``"gelu,softmax"``).

    The input is never modified; weights are copied bit-identically (checked);
    input/output names, shapes and dtypes are unchanged (checked).

    A subclassed model is rewritten through its config (constructor arguments
    such as ``activation='relu'``), which is what rebuilds it on load; if its
    Python code still sets or calls a ReLU afterwards (a hard-coded layer
    argument, ``keras.ops.relu`` in ``call()``), the conversion is refused with
    :class:`~actswap.errors.UnsupportedModelError` naming the place, because a
    change made there would not survive saving.

    Paths to a SavedModel directory or a frozen GraphDef are rewritten at graph
    level (see :mod:`actswap.formats.tf_graphs`); the result is the loaded
    SavedModel object with every function and signature replaced (its
    attributes, variables and tables are the original's; call its functions as
    the original's) or a ``GraphDef``, which :func:`save` writes in the same
    family. ``signature`` restricts a SavedModel rewrite to one signature (the
    object's other functions are then kept as they were).
    ``calibrate`` (arrays, a ``tf.data.Dataset`` or an .npz/.npy path) runs the
    original model on samples and records each site's input range (in the
    report); fitted targets then use that range widened by ``margin`` (a
    fraction of its width on each side). ``"quad"`` (a·x²+b·x+c) and
    ``trainable=True`` make the fitted coefficients weights that train, one
    set per site or, with ``per_channel``, per channel of the last axis.
    ``pool="avg"`` also swaps every max pooling for average pooling (same
    window, strides and padding), each reported as a site.
    ``trust_code`` lets a file's stored code (Lambda layers) load: dangerous.
    """
    options = ConvertOptions(
        target=registry.get_target(to, degree=degree, interval=interval, trainable=trainable, per_channel=per_channel),
        grad=gradients.normalize(grad) if isinstance(grad, str) else grad,
        sources=registry.as_sources(sources), signature=signature, trust_code=trust_code,
        calibrate=calibrate, margin=margin, pool=pool,
    )
    backend = _backend(model_or_path)
    if backend is None:
        if signature is not None:
            raise UserError("--signature applies to SavedModel input only")
        return convert_model(model_or_path, options, notes=[], source=None)
    if signature is not None:
        require(backend, SIGNATURE, model_or_path)
    if calibrate is not None:
        require(backend, CALIBRATE, model_or_path)
    if pool is not None:
        require(backend, POOL, model_or_path)
    return backend.convert(Path(model_or_path), options)
