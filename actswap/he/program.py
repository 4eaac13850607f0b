"""Compile a Keras model into a :class:`Program` of affine stages and polynomials.

See :mod:`actswap.he` for the method (each affine stretch by applying its own
layers to the zero input and every basis vector, then checked).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import registry
from ..errors import InvariantError
from . import layers
from .limits import MAX_SLOTS, OutOfScopeError, ParameterError


# A compiled stage may differ from the float32 layers it replaces by this much,
# relative to the largest value of the layers' output (at least 1): float32
# rounding of the layers is ~1e-6 of it; a wrong matrix is off by O(1).
COMPILE_TOL = 1e-4


# The affine layers the compiler runs: the HE table's, less those it does not compile yet.
AFFINE_LAYERS = set(layers.AFFINE_LAYERS) - layers.NOT_COMPILED


# keras.ops called on a KerasTensor in a functional graph: affine when every
# other argument is a constant (Multiply/Divide: at most one tensor).
AFFINE_OPS = {"Add", "Subtract", "Negative", "Reshape", "Transpose", "Multiply", "Divide", "TrueDivide"}


ONE_TENSOR_OPS = {"Multiply", "Divide", "TrueDivide"}


POOL_LAYERS = set(registry.POOL_SWAPS)


@dataclass
class Affine:
    """``y = x @ matrix + bias`` on flattened (row-major) vectors; float64."""

    matrix: np.ndarray  # (n_in, n_out)
    bias: np.ndarray  # (n_out,)
    layers: list[str]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    check_error: float = 0.0  # largest difference from the float32 layers on the probes

    def describe(self) -> str:
        names = ", ".join(self.layers) or "identity"
        return f"affine {self.matrix.shape[0]} -> {self.matrix.shape[1]} ({names})"


@dataclass
class Poly:
    """``y = sum_k coefficients[k] * x**k``; coefficients (d+1,) shared or (d+1, n) per element."""

    coefficients: np.ndarray
    layer: str
    size: int

    @property
    def degree(self) -> int:
        return self.coefficients.shape[0] - 1

    def describe(self) -> str:
        if self.coefficients.ndim == 1:
            c = ", ".join(f"{v:.4g}" for v in self.coefficients)
            return f"polynomial degree {self.degree} [{c}] ({self.layer})"
        return f"polynomial degree {self.degree}, per element ({self.layer})"

    def apply(self, x: np.ndarray) -> np.ndarray:
        c = self.coefficients
        y = np.broadcast_to(c[-1], x.shape).astype("float64")
        for k in range(c.shape[0] - 2, -1, -1):
            y = y * x + c[k]
        return y


@dataclass
class Program:
    """The model as stages on flat vectors. Invariant: ``plain(x)`` equals the
    model's logits (its output before a final softmax) within :data:`COMPILE_TOL`."""

    stages: list[Affine | Poly]
    input_shape: tuple[int, ...]
    output_size: int
    final_softmax: bool

    @property
    def input_size(self) -> int:
        return int(np.prod(self.input_shape))

    def plain(self, x: np.ndarray) -> np.ndarray:
        """Logits for a batch ``x`` of shape (N, *input_shape), in float64."""
        h = np.asarray(x, "float64").reshape(len(x), -1)
        for s in self.stages:
            h = h @ s.matrix + s.bias if isinstance(s, Affine) else s.apply(h)
        return h


# --- compiling a Keras model ---------------------------------------------------


class _Val:
    """A value inside one affine stretch (a *segment*): ``rows[0]`` is the stretch
    applied to 0, ``rows[1 + i]`` to basis vector i (float64, TF tensor);
    ``probe`` is the original float32 layers applied to the probe inputs."""

    def __init__(self, seg: int, rows: Any, probe: Any, softmaxed: str | None = None) -> None:
        self.seg, self.rows, self.probe, self.softmaxed = seg, rows, probe, softmaxed


@dataclass
class _Segment:
    in_shape: tuple[int, ...]
    probe_in: np.ndarray  # (P, n) float64
    layers: list[str] = field(default_factory=list)
    ended: bool = False


def _act_name(act: Any) -> str:
    return str(getattr(act, "__name__", type(act).__name__))


class _Compiler:
    def __init__(self, model: Any, probe: np.ndarray) -> None:
        import keras

        from ..recover import polynomials_of

        self.keras = keras
        self.model = model
        self.polys = polynomials_of(model)
        self.segments: list[_Segment] = []
        self.stages: list[Affine | Poly] = []
        self.probe = probe

    # segments
    def start(self, shape: tuple[int, ...], probe: Any) -> _Val:
        import tensorflow as tf

        n = int(np.prod(shape))
        if n > MAX_SLOTS:
            raise ParameterError(
                f"a vector of {n} values enters an affine stretch; CKKS at 128-bit security holds at most "
                f"{MAX_SLOTS} per ciphertext: pool or shrink the model first"
            )
        rows = np.concatenate([np.zeros((1, n)), np.eye(n)]).reshape((1 + n,) + shape)
        self.segments.append(_Segment(shape, np.asarray(probe, "float64").reshape(len(probe), -1)))
        return _Val(len(self.segments) - 1, tf.constant(rows, tf.float64), probe)

    def close(self, v: _Val, where: str) -> Affine:
        seg = self.segments[v.seg]
        if seg.ended:
            raise OutOfScopeError(
                f"'{where}': the model branches (a value is used after a polynomial activation "
                "consumed it); only chains of affine maps and polynomials run encrypted"
            )
        seg.ended = True
        rows = np.asarray(v.rows, "float64").reshape(v.rows.shape[0], -1)
        return Affine(rows[1:] - rows[0], rows[0].copy(), list(seg.layers), seg.in_shape,
                      tuple(int(d) for d in v.rows.shape[1:]))

    def check(self, stage_out: np.ndarray, reference: Any, what: str) -> float:
        ref = np.asarray(reference, "float64").reshape(len(stage_out), -1)
        err = float(np.abs(stage_out - ref).max()) if ref.size else 0.0
        scale = max(1.0, float(np.abs(ref).max()) if ref.size else 1.0)
        if not np.all(np.isfinite(ref)) or err > COMPILE_TOL * scale:
            raise InvariantError(
                f"compiled {what} differs from the layers' own output by {err:.3g} "
                f"(tolerance {COMPILE_TOL:g} x {scale:.3g}); this is a bug in actswap"
            )
        return err

    # leaves
    def poly_coefficients(self, obj: Any, name: str, size: int, shape: tuple[int, ...]) -> np.ndarray:
        from ..activations import Polynomial

        if isinstance(obj, Polynomial) and obj.coefficient_weights is not None:
            c = np.asarray(obj.coefficient_weights.numpy(), "float64")
        else:
            c = np.asarray(self.polys[name], "float64")
        if c.ndim == 2:  # per channel (last axis) -> per element of the flat vector
            c = np.stack([np.broadcast_to(row, shape).reshape(-1) for row in c])
            if np.all(c == c[:, :1]):
                c = c[:, 0].copy()
        while c.shape[0] > 2 and np.all(c[-1] == 0):
            c = c[:-1]
        return c

    def polynomial(self, v: _Val, poly_obj: Any, name: str, reference: Any) -> _Val:
        affine = self.close(v, name)
        size = affine.matrix.shape[1]
        poly = Poly(self.poly_coefficients(poly_obj, name, size, affine.out_shape), name, size)
        seg = self.segments[v.seg]
        affine.check_error = self.check(poly.apply(seg.probe_in @ affine.matrix + affine.bias), reference,
                                        f"stretch ending at '{name}'")
        if affine.layers or not _is_identity(affine):
            self.stages.append(affine)
        self.stages.append(poly)
        return self.start(affine.out_shape, reference)

    def float64_clone(self, layer: Any, args: Any, linear: bool) -> Any:
        keras = self.keras
        config = layer.get_config()
        config["dtype"] = "float64"
        if linear:
            config["activation"] = "linear"
        clone = type(layer).from_config(config)
        act = getattr(layer, "activation", None)
        skip = {id(w) for w in getattr(act, "weights", [])} if linear else set()
        weights = [w for w in layer.weights if id(w) not in skip]
        if weights:
            symbolic = keras.tree.map_structure(
                lambda t: keras.KerasTensor(t.shape, dtype="float64") if hasattr(t, "shape") else t, args
            )
            clone(*symbolic)
            clone.set_weights([np.asarray(w.numpy(), "float64") for w in weights])
        return clone

    def call(self, op: Any, *args: Any, **kwargs: Any) -> Any:
        keras = self.keras
        from ..sites import is_graph_model

        vals = [a for a in keras.tree.flatten((args, kwargs)) if isinstance(a, _Val)]
        name = getattr(op, "name", type(op).__name__)
        kind = type(op).__name__
        if not vals:
            raise OutOfScopeError(f"'{name}' ({kind}) does not depend on the input; not supported")
        for v in vals:
            if v.softmaxed:
                raise OutOfScopeError(
                    f"'{v.softmaxed}': softmax inside the network (its output feeds '{name}'); "
                    "CKKS has no softmax: only a final softmax is allowed, whose logits are compared"
                )
        if len({v.seg for v in vals}) > 1 or any(self.segments[v.seg].ended for v in vals):
            raise OutOfScopeError(
                f"'{name}' ({kind}) combines values from both sides of a polynomial activation "
                "(a branch that cannot be linearised); only chains run encrypted"
            )
        if is_graph_model(op):
            return self.walk(op, vals[0])
        is_layer = isinstance(op, keras.layers.Layer)
        kwargs = {k: w for k, w in kwargs.items() if k not in ("mask", "training")}
        if is_layer and getattr(op, "_call_has_training_arg", False):
            kwargs["training"] = False
        v = vals[0]
        if layers.polynomial_cost(op) is not None:  # one of actswap's polynomial layers
            return self.polynomial(v, op, name, op(v.probe))
        act = getattr(op, "activation", None) if is_layer else None
        act_name = _act_name(act) if act is not None else "linear"
        if kind == "Activation":
            if name in self.polys:
                return self.polynomial(v, act, name, op(v.probe))
            if act_name == "linear":
                return v
            if act_name == "softmax":
                return _Val(v.seg, v.rows, op(v.probe), softmaxed=name)
            raise self.not_polynomial(name, act_name)
        if kind == "Softmax":
            return _Val(v.seg, v.rows, op(v.probe), softmaxed=name)
        if is_layer and (kind == "ReLU" or kind in registry.ACTIVATION_LAYERS):
            raise self.not_polynomial(name, kind)
        if not is_layer and kind in registry.OP_ACTIVATIONS:  # keras.ops.relu(x) and the like
            raise self.not_polynomial(name, registry.OP_ACTIVATIONS[kind])
        if kind in POOL_LAYERS:
            raise OutOfScopeError(
                f"'{name}' ({kind}) is not a polynomial; convert with `actswap convert MODEL --to square "
                "--pool avg` to make it average pooling"
            )
        if is_layer and kind not in AFFINE_LAYERS or not is_layer and kind not in AFFINE_OPS:
            raise OutOfScopeError(
                f"'{name}' ({kind}) is outside what runs encrypted (affine layers, actswap polynomials, "
                "a final softmax)"
            )
        if not is_layer and kind in ONE_TENSOR_OPS and (
            len(vals) > 1 or (kind != "Multiply" and not isinstance(args[0], _Val))
        ):
            # x * x is a product of ciphertexts and 1 / x is not a polynomial at all.
            raise OutOfScopeError(f"'{name}' ({kind}) multiplies or divides by the input itself; not affine")
        poly_act = name in self.polys and act is not None and act_name not in ("linear", "softmax")
        if act is not None and not poly_act and act_name not in ("linear", "softmax"):
            raise self.not_polynomial(name, act_name)
        linear = act is not None and act_name != "linear"
        self.check_width(op, args, name)
        rows_args = keras.tree.map_structure(lambda a: a.rows if isinstance(a, _Val) else a, args)
        probe_args = keras.tree.map_structure(lambda a: a.probe if isinstance(a, _Val) else a, args)
        fn = self.float64_clone(op, rows_args, linear) if is_layer else op
        rows = fn(*rows_args, **kwargs)
        probe = op(*probe_args, **kwargs)
        self.segments[v.seg].layers.append(name)
        out = _Val(v.seg, rows, probe)
        if poly_act:
            return self.polynomial(out, act, name, probe)
        if act_name == "softmax":
            out.softmaxed = name
        return out

    def check_width(self, op: Any, args: Any, name: str) -> None:
        """Refuse before computing an output wider than any ciphertext: the basis
        rows would need (inputs + 1) x outputs floats."""
        keras = self.keras
        symbolic = keras.tree.map_structure(
            lambda a: keras.KerasTensor((None,) + tuple(a.rows.shape[1:]), dtype="float32")
            if isinstance(a, _Val) else a, args)
        try:
            spec = op.compute_output_spec(*symbolic)
        except Exception:  # noqa: BLE001 - only a size estimate; the real call reports real errors
            return
        width = int(np.prod([d for d in keras.tree.flatten(spec)[0].shape[1:]]))
        if width > MAX_SLOTS:
            raise ParameterError(
                f"'{name}' outputs {width} values; CKKS at 128-bit security holds at most {MAX_SLOTS} per "
                "ciphertext: pool or shrink the model first"
            )

    def not_polynomial(self, name: str, act: str) -> OutOfScopeError:
        return OutOfScopeError(
            f"'{name}': {act} is not a polynomial; convert the model first: `actswap convert MODEL "
            "--to square` (ReLU) or `--from all --to approx` (every activation)"
        )

    def walk(self, model: Any, v: _Val) -> _Val:
        keras = self.keras
        from ..sites import is_graph_model

        if isinstance(model, keras.Sequential):
            for layer in model.layers:
                v = self.call(layer, v)
            return v
        if not is_graph_model(model):
            raise OutOfScopeError(
                f"'{model.name}' is a subclassed model; its structure is Python code, not data: "
                "rebuild it as a Functional or Sequential model"
            )
        if len(model.inputs) != 1 or len(keras.tree.flatten(model.outputs)) != 1:
            raise OutOfScopeError(f"'{model.name}' has several inputs or outputs; one of each is supported")
        out = model._run_through_graph([v], operation_fn=lambda op: op, call_fn=self.call)
        return keras.tree.flatten(out)[0]


def _is_identity(a: Affine) -> bool:
    return a.matrix.shape[0] == a.matrix.shape[1] and np.array_equal(a.matrix, np.eye(a.matrix.shape[0])) \
        and not np.any(a.bias)


def compile_model(model: Any, probe: np.ndarray | None = None) -> Program:
    """Compile ``model`` into a :class:`Program`; raises :class:`OutOfScopeError` naming
    the first layer outside the scope. ``probe`` (a few inputs) is what each stage is
    checked on [default: 4 seeded uniform samples in [0, 1)]."""
    import keras

    from ..sites import is_graph_model

    if not is_graph_model(model):
        raise OutOfScopeError("the encrypted run needs a Sequential or Functional model (not subclassed)")
    if len(model.inputs) != 1 or len(keras.tree.flatten(model.outputs)) != 1:
        raise OutOfScopeError("the encrypted run needs a model with one input and one output")
    shape = tuple(int(d) for d in model.inputs[0].shape[1:] if d is not None)
    if len(shape) != len(model.inputs[0].shape) - 1:
        raise OutOfScopeError(f"the input shape {model.inputs[0].shape} must be fully known (except the batch)")
    if probe is None:
        probe = np.random.default_rng(0).uniform(0, 1, (4,) + shape)
    probe = np.asarray(probe, "float32")
    c = _Compiler(model, probe)
    out = c.walk(model, c.start(shape, probe))
    last = c.close(out, "output")
    seg = c.segments[out.seg]
    logits = seg.probe_in @ last.matrix + last.bias
    reference = np.asarray(model(probe, training=False), "float64").reshape(len(probe), -1)
    last.check_error = c.check(_softmax(logits) if out.softmaxed else logits, reference, "last stretch")
    if last.layers or not _is_identity(last) or not c.stages:
        c.stages.append(last)
    program = Program(c.stages, shape, last.matrix.shape[1], bool(out.softmaxed))
    end_to_end = program.plain(probe)
    c.check(_softmax(end_to_end) if out.softmaxed else end_to_end, reference, "program")
    return program


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# --- evaluation: one code path for plaintext simulation and TenSEAL ------------
