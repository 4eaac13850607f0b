"""What each output of a model is, and how a recovery trains and judges it.

One record per loss (:data:`LOSSES`) says how a student output is distilled
from the original's, how it is fitted to labels or targets when there are
some, and which check metric the gate reads with labels and without
(:data:`.metrics.METRICS`, by name). :func:`heads_of` reads what each output of the original is
(the activation that produces it) and picks its record (:func:`choose_loss`,
the policy); the Distiller and the gate only walk the heads.

Defaults, read from the model:

* softmax, or logits with integer class labels -> ``kl``: KL at a temperature
  (Hinton et al.), cross-entropy with labels, or without labels with the
  original's top-1 classes (pseudo-labels); checked by top-1 accuracy
  (labels) or top-1 agreement with the original (none);
* sigmoid -> ``binary_kl``: per-unit binary KL, binary cross-entropy with
  labels; checked by the IoU of the units on at 0.5 against the labels
  (multi-label sets, masks), or, without labels, by the relative error of
  its probabilities against the original's;
* anything else -> ``mse``: squared error over the original's output
  variance, so heads of any magnitude weigh alike; checked by the MSE against
  targets (relative to the original's) or, without, by the relative error
  against the original's outputs.

Invariants: the models are only read, never changed; a head's ``variance``
is measured on the original's outputs, never on the student's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UserError

@dataclass(frozen=True)
class Head:
    """One output of the model, as a recovery sees it."""

    name: str
    index: int  # its place among the flattened outputs (keras.tree order)
    activation: str  # what produces it in the original: softmax, sigmoid, linear, ...
    loss: str  # a key of LOSSES
    teacher_probs: bool  # the original's values are probabilities (softmax/sigmoid applied)
    student_probs: bool
    variance: float = 1.0  # the original's output variance (the mse scale)
    labelled: bool = False  # the training data has labels or targets for it


@dataclass(frozen=True)
class LossKind:
    """How one kind of output is trained and judged. ``distil(teacher, student,
    head, temperature)`` and ``fit(y, student, head)`` return one loss per
    example (Keras tensors); ``labelled``/``fidelity`` name the check metric
    with and without labels. ``pseudo(teacher, head)``, where set, is the
    label the original's output stands for (a classifier's top-1 class): an
    output without labels is then trained as if it had that one, distillation
    and labels mixed; without ``pseudo`` it is distilled alone."""

    name: str
    summary: str
    distil: Callable[[Any, Any, Head, float], Any]
    fit: Callable[[Any, Any, Head], Any]
    labelled: str
    fidelity: str
    pseudo: Callable[[Any, Head], Any] | None = None


def _per_example(t: Any) -> Any:
    """Mean over every axis but the first (the batch)."""
    from keras import ops

    return ops.mean(ops.reshape(t, (ops.shape(t)[0], -1)), axis=-1)


def _logits(values: Any, probs: bool) -> Any:
    from keras import ops

    return ops.log(ops.clip(values, 1e-12, 1.0)) if probs else values


def _kl(teacher: Any, student: Any, head: Head, temperature: float) -> Any:
    from keras import ops

    t = ops.softmax(_logits(teacher, head.teacher_probs) / temperature, axis=-1)
    log_s = ops.log_softmax(_logits(student, head.student_probs) / temperature, axis=-1)
    kl = ops.sum(t * (ops.log(ops.clip(t, 1e-12, 1.0)) - log_s), axis=-1)
    return temperature**2 * (_per_example(kl) if len(kl.shape) > 1 else kl)


def _ce(y: Any, student: Any, head: Head) -> Any:
    from keras import losses, ops

    logits = _logits(student, head.student_probs)
    if len(y.shape) == len(logits.shape) and y.shape[-1] == logits.shape[-1]:
        ce = losses.categorical_crossentropy(ops.cast(y, logits.dtype), logits, from_logits=True)
    else:
        ce = losses.sparse_categorical_crossentropy(ops.reshape(y, ops.shape(logits)[:-1]), logits, from_logits=True)
    return _per_example(ce) if len(ce.shape) > 1 else ce


def _top1(teacher: Any, head: Head) -> Any:
    from keras import ops

    return ops.argmax(teacher, axis=-1)  # softmax keeps the order: probabilities or logits alike


def _binary_logits(values: Any, probs: bool) -> Any:
    from keras import ops

    if not probs:
        return values
    p = ops.clip(values, 1e-7, 1.0 - 1e-7)
    return ops.log(p) - ops.log1p(-p)


def _bce(target: Any, logits: Any) -> Any:
    """Binary cross-entropy of probabilities ``target`` against ``logits``, per unit (stable form)."""
    from keras import ops

    return ops.maximum(logits, 0.0) - logits * target + ops.log1p(ops.exp(-ops.abs(logits)))


def _binary_kl(teacher: Any, student: Any, head: Head, temperature: float) -> Any:
    from keras import ops

    t = teacher if head.teacher_probs else ops.sigmoid(teacher)
    t = ops.clip(t, 1e-7, 1.0 - 1e-7)
    entropy = -(t * ops.log(t) + (1.0 - t) * ops.log1p(-t))
    return _per_example(_bce(t, _binary_logits(student, head.student_probs)) - entropy)


def _binary_fit(y: Any, student: Any, head: Head) -> Any:
    from keras import ops

    logits = _binary_logits(student, head.student_probs)
    return _per_example(_bce(ops.reshape(ops.cast(y, logits.dtype), ops.shape(logits)), logits))


def _mse(teacher: Any, student: Any, head: Head, temperature: float) -> Any:
    from keras import ops

    return _per_example(ops.square(student - teacher)) / head.variance


def _mse_fit(y: Any, student: Any, head: Head) -> Any:
    from keras import ops

    y = ops.reshape(ops.cast(y, student.dtype), ops.shape(student))
    return _per_example(ops.square(student - y)) / head.variance


LOSSES: dict[str, LossKind] = {k.name: k for k in (
    LossKind("kl", "KL divergence at the temperature (soft targets); cross-entropy with labels "
             "(without labels: with the original's top-1 classes)",
             _kl, _ce, "top-1 accuracy", "top-1 agreement", pseudo=_top1),
    LossKind("binary_kl", "per-unit binary KL; binary cross-entropy with labels",
             _binary_kl, _binary_fit, "IoU against the labels", "relative error against the original"),
    LossKind("mse", "squared error over the original's output variance; against targets too when given",
             _mse, _mse_fit, "MSE against the targets", "relative error against the original"),
)}


def activation_of(layer: Any) -> str:
    """The activation a layer ends with, by name: ``softmax``, ``sigmoid``, ... or ``linear``."""
    if layer is None:
        return "linear"
    if type(layer).__name__ == "Softmax":
        return "softmax"
    act = getattr(layer, "activation", None)
    if act is None:
        return "linear"
    return str(getattr(act, "__name__", None) or type(act).__name__).lower()


def _output_layers(model: Any, n: int) -> list[Any]:
    """The layer producing each of ``n`` flattened outputs, where the model says."""
    try:
        layers = [t._keras_history.operation for t in model.outputs]
    except (AttributeError, TypeError, ValueError):
        return [None] * n
    return layers if len(layers) == n else [None] * n


def output_names(model: Any, outputs: Any) -> list[str]:
    """A name per flattened output: the dict keys of a dict-output model (sorted,
    keras.tree's order), else the producing layers' names."""
    import keras

    if isinstance(outputs, Mapping):
        return [str(k) for k in sorted(outputs)]
    flat = keras.tree.flatten(outputs)
    layers = _output_layers(model, len(flat))
    names = [getattr(layer, "name", None) or f"output_{i}" for i, layer in enumerate(layers)]
    return names if len(set(names)) == len(names) else [f"output_{i}" for i in range(len(flat))]


@dataclass(frozen=True)
class LabelInfo:
    """What the labels of one output are: integer classes or real values, and their rank."""

    integer: bool
    rank: int


def label_info(y: Any) -> LabelInfo:
    """From an array, a tensor or a TensorSpec."""
    dtype = getattr(y, "dtype", None)
    if dtype is None:
        y = np.asarray(y)
        dtype = y.dtype
    name = getattr(dtype, "name", str(dtype))
    shape = getattr(y, "shape", ())
    return LabelInfo(integer=("int" in name or name == "bool"), rank=len(shape))


def labels_per_head(y: Any, names: Sequence[str]) -> list[Any]:
    """``y`` (None, one array, a list or a dict keyed by output name) as one entry
    per output (None where it has none). Structure only: arrays or tensors."""
    n = len(names)
    if y is None:
        return [None] * n
    if isinstance(y, Mapping):
        unknown = sorted(set(map(str, y)) - set(names))
        if unknown:
            raise UserError(f"labels for {unknown}: the model's outputs are {list(names)}")
        return [y.get(name) for name in names]
    if isinstance(y, (list, tuple)):
        if len(y) != n:
            raise UserError(f"{len(y)} label arrays for {n} model output(s) {list(names)}; give one per output")
        return list(y)
    if n != 1:
        raise UserError(
            f"one label array for {n} model outputs {list(names)}: give one per output (a dict by output name, "
            "or arrays y_<output> in an .npz), or train without labels (--no-labels)"
        )
    return [y]


def choose_loss(activation: str, width: int | None, rank: int, labels: LabelInfo | None) -> str:
    """The default loss of an output (the policy): softmax -> kl; sigmoid ->
    binary_kl; logits (no activation, several units) with integer class labels
    -> kl; anything else -> mse."""
    if activation == "softmax":
        return "kl"
    if activation == "sigmoid":
        return "binary_kl"
    if activation == "linear" and labels is not None and labels.integer and (width or 0) > 1 and labels.rank == rank - 1:
        return "kl"
    return "mse"


def parse_losses(text: str | None) -> str | dict[str, str] | None:
    """``--loss``: ``KIND`` for every output, or ``OUTPUT=KIND,...``."""
    if text is None or not text.strip():
        return None
    if "=" not in text:
        kinds: str | dict[str, str] = text.strip()
    else:
        kinds = {}
        for part in text.split(","):
            name, sep, kind = part.partition("=")
            if not sep or not name.strip() or not kind.strip():
                raise UserError(f"--loss takes KIND or OUTPUT=KIND,...; got '{text}'")
            kinds[name.strip()] = kind.strip()
    for kind in ([kinds] if isinstance(kinds, str) else kinds.values()):
        _known(kind)
    return kinds


def _known(kind: str) -> None:
    if kind not in LOSSES:
        raise UserError(f"--loss: unknown loss '{kind}'; choose from {', '.join(LOSSES)}")


def _override(losses: str | Mapping[str, str] | None, names: Sequence[str]) -> dict[str, str]:
    if losses is None:
        return {}
    chosen = {name: losses for name in names} if isinstance(losses, str) else dict(losses)
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        raise UserError(f"--loss names output(s) {unknown}; the model's outputs are {list(names)}")
    for kind in chosen.values():
        _known(kind)
    return chosen


def heads_of(teacher: Any, student: Any, outputs: Any, labels: Any = None,
             losses: str | Mapping[str, str] | None = None) -> list[Head]:
    """The heads of ``teacher`` from its ``outputs`` on some inputs (their names,
    widths and variances), ``labels`` (a sample of the training labels, or
    None) and the user's ``losses`` (one kind, or a kind per output name)."""
    import keras

    flat = [np.asarray(o) for o in keras.tree.flatten(outputs)]
    names = output_names(teacher, outputs)
    per_head = labels_per_head(labels, names)
    chosen = _override(losses, names)
    t_layers, s_layers = _output_layers(teacher, len(flat)), _output_layers(student, len(flat))
    heads = []
    for i, (name, value, y) in enumerate(zip(names, flat, per_head)):
        act = activation_of(t_layers[i])
        info = label_info(y) if y is not None else None
        kind = chosen.get(name) or choose_loss(act, value.shape[-1] if value.ndim > 1 else None, value.ndim, info)
        var = float(np.var(value)) if value.size else 0.0
        heads.append(Head(
            name=name, index=i, activation=act, loss=kind,
            teacher_probs=act in ("softmax", "sigmoid"),
            student_probs=activation_of(s_layers[i]) in ("softmax", "sigmoid") if s_layers[i] is not None
            else act in ("softmax", "sigmoid"),
            variance=var if np.isfinite(var) and var > 1e-12 else 1.0, labelled=y is not None,
        ))
    return heads


def classifier_heads(teacher: Any, student: Any) -> list[Head]:
    """Heads for a model trained as today's classifiers are (a :class:`Distiller`
    built without heads): integer class labels assumed for every output."""
    import keras

    n = len(keras.tree.flatten(teacher.outputs)) if hasattr(teacher, "outputs") else 1
    t_layers, s_layers = _output_layers(teacher, n), _output_layers(student, n)
    names = [getattr(layer, "name", None) or f"output_{i}" for i, layer in enumerate(t_layers)]
    out = []
    for i in range(n):
        act = activation_of(t_layers[i])
        kind = {"softmax": "kl", "sigmoid": "binary_kl"}.get(act, "kl")
        out.append(Head(names[i], i, act, kind, act in ("softmax", "sigmoid"),
                        activation_of(s_layers[i]) in ("softmax", "sigmoid"), labelled=True))
    return out
