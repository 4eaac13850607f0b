"""Calibration: the input range each activation site actually sees.

The *original* model is rebuilt by the rewriting engine with a probe at every
site: a layer (or ``activation=`` object) that records the values reaching the
site and then applies the original activation, so everything downstream sees
exactly what the original model computes. The probed copy runs eagerly on the
samples; each site gets min, max and the 0.1/99.9 percentiles.

The probes are registered Keras objects that write into a per-run sink keyed
by an id, because the engine rebuilds layers from their configs. They are
never saved.

Invariant: the model is not modified (the engine works on a copy).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from .errors import UserError
from .report import REPLACED, SKIPPED, Site

PERCENTILES = (0.1, 99.9)
RESERVOIR = 200_000  # values kept per site for the percentiles

_SINKS: dict[str, dict[str, "_Stats"]] = {}
_RUNS = itertools.count()


@dataclass
class Range:
    min: float
    max: float
    p_low: float
    p_high: float
    count: int
    samples: Any = None  # a random subset of the values seen (for plots), not reported

    def to_dict(self) -> dict[str, Any]:
        return {
            "min": self.min, "max": self.max,
            f"p{PERCENTILES[0]:g}": self.p_low, f"p{PERCENTILES[1]:g}": self.p_high, "count": self.count,
        }


class _Stats:
    def __init__(self) -> None:
        self.lo, self.hi, self.n = np.inf, -np.inf, 0
        self.keep: list[np.ndarray] = []
        self.rng = np.random.default_rng(0)

    def add(self, values: np.ndarray) -> None:
        v = np.asarray(values, dtype=np.float64).ravel()
        v = v[np.isfinite(v)]
        if not v.size:
            return
        self.lo, self.hi = min(self.lo, float(v.min())), max(self.hi, float(v.max()))
        self.n += v.size
        if v.size > RESERVOIR:
            v = self.rng.choice(v, RESERVOIR, replace=False)
        self.keep.append(v)
        kept = np.concatenate(self.keep)
        if kept.size > RESERVOIR:
            kept = self.rng.choice(kept, RESERVOIR, replace=False)
        self.keep = [kept]

    def range(self) -> Range | None:
        if not self.n:
            return None
        kept = np.concatenate(self.keep)
        lo, hi = np.percentile(kept, PERCENTILES)
        return Range(self.lo, self.hi, float(lo), float(hi), self.n, kept)


def _record(run: str, path: str, x: Any) -> None:
    import tensorflow as tf

    # Only eager calls carry values; building the probed graph traces symbolically.
    if run in _SINKS and tf.executing_eagerly() and not isinstance(x, keras.KerasTensor):
        _SINKS[run].setdefault(path, _Stats()).add(keras.ops.convert_to_numpy(x))


@keras.saving.register_keras_serializable(package="actswap", name="CalibrationProbe")
class CalibrationProbe(keras.layers.Layer):
    """Records its input for site ``site`` of run ``run``, then applies ``inner``."""

    def __init__(self, run: str, site: str, inner: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.run, self.site, self.inner_config = run, site, inner
        self.inner = keras.saving.deserialize_keras_object(inner, safe_mode=True)

    def call(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        _record(self.run, self.site, inputs)
        return self.inner(inputs, *args, **kwargs)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "run": self.run, "site": self.site, "inner": self.inner_config}


@keras.saving.register_keras_serializable(package="actswap", name="CalibrationActivation")
class CalibrationActivation:
    """The ``activation=`` twin of :class:`CalibrationProbe`."""

    def __init__(self, run: str, path: str, inner: Any) -> None:
        self.run, self.path, self.inner_config = run, path, inner
        self.inner = keras.activations.get(inner)
        self.__name__ = "calibration_probe"

    def __call__(self, x: Any) -> Any:
        _record(self.run, self.path, x)
        return self.inner(x)

    def get_config(self) -> dict[str, Any]:
        return {"run": self.run, "path": self.path, "inner": self.inner_config}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> CalibrationActivation:
        return cls(**config)


def load_samples(data: Any) -> Any:
    """Arrays from an .npz/.npy path (``x`` or the only array), or arrays/a Dataset as given."""
    if isinstance(data, (str, os.PathLike)):
        from .paths import read_arrays

        arrays = read_arrays(data, "calibration data")
        if "x" in arrays:
            return arrays["x"]
        if len(arrays) == 1:
            return next(iter(arrays.values()))
        raise UserError(f"calibration data '{data}' has arrays {sorted(arrays)}; name the inputs array 'x'")
    return data


def _batches(data: Any, batch_size: int) -> Any:
    import tensorflow as tf

    if isinstance(data, tf.data.Dataset):
        for item in data:
            yield item[0] if isinstance(item, (tuple, list)) and len(item) == 2 else item
        return
    arrays = data if isinstance(data, (list, tuple)) else [data]
    n = len(arrays[0])
    for i in range(0, n, batch_size):
        chunk = [np.asarray(a[i : i + batch_size]) for a in arrays]
        yield chunk if len(chunk) > 1 else chunk[0]


def batches_of(data: Any, batch_size: int = 64) -> Any:
    """The input batches of calibration ``data`` (any form :func:`calibrate` takes)."""
    return _batches(load_samples(data), batch_size)


def calibrate(model: Any, sites: list[Site], data: Any, *, batch_size: int = 64) -> dict[str, Range]:
    """Input ranges, per site path, of ``model`` run on ``data`` (arrays, an .npz/.npy path,
    or a ``tf.data.Dataset`` of inputs or (inputs, labels))."""
    from .rewrite import rewrite

    run = f"run{next(_RUNS)}"
    _SINKS[run] = {}
    probed_sites = []
    for s in sites:
        c = Site(s.path, s.layer, s.form, s.activation, s.detail, leaf_id=s.leaf_id, pointer=s.pointer)
        c.action = REPLACED if not s.activation.startswith("custom") else SKIPPED
        probed_sites.append(c)

    def make_layer(site: Site, old_node: dict[str, Any]) -> Any:
        return CalibrationProbe(run, site.path, old_node, name=old_node["config"]["name"])

    def make_activation(site: Site, owner: dict[str, Any]) -> Any:
        # The pointer ends at the activation key; the engine passes only the site,
        # so the original value is read from the live config by the caller below.
        return CalibrationActivation(run, site.path, _original_values[site.path])

    _original_values: dict[str, Any] = {}
    import copy

    for s in probed_sites:
        leaf = _leaf_by_id(model, s.leaf_id)
        if leaf is not None:
            tree = keras.saving.serialize_keras_object(leaf)
            value = tree
            for key in s.pointer:
                value = value[key]
            # A layer node (form "layer") is probed whole; an activation= value is kept,
            # also when it is itself a layer (a trainable Polynomial as activation).
            if s.form == "activation=" or not (
                    isinstance(value, dict) and "class_name" in value and isinstance(value.get("config"), dict)
                    and "name" in value["config"]):
                _original_values[s.path] = copy.deepcopy(value)
    try:
        probed = rewrite(model, probed_sites, make_layer, make_activation)
        samples = load_samples(data)
        for batch in _batches(samples, batch_size):
            probed(batch, training=False)
        return {path: r for path, st in _SINKS[run].items() if (r := st.range()) is not None}
    finally:
        _SINKS.pop(run, None)


def _leaf_by_id(model: Any, leaf_id: int) -> Any:
    from .sites import is_graph_model, iter_nodes

    if not is_graph_model(model):
        return model if id(model) == leaf_id else None
    for _, obj in iter_nodes(model):
        if id(obj) == leaf_id:
            return obj
    return None
