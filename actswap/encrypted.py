"""Run a converted model on CKKS-encrypted data (TenSEAL) and compare it with plaintext.

Three steps, each with one job:

1. :func:`compile_model` turns a Keras model that is a chain of affine maps and
   polynomial activations into a :class:`Program`: a list of stages, each an
   :class:`Affine` (one plain matrix and bias) or a :class:`Poly` (polynomial
   coefficients, shared or per element). Each affine stretch (every layer
   between two polynomial activations) is compiled by applying the layers
   themselves, cloned in float64 with the same weights, to the zero input and
   to every basis vector: ``bias = f(0)``, ``matrix[i] = f(e_i) - f(0)``.
   That is exact for affine layers (up to float64 rounding) and needs no
   per-layer formula. Each stage is then checked against the original float32
   layers on probe inputs (:data:`COMPILE_TOL`); a failure is an
   :class:`~actswap.errors.InvariantError`.
2. :func:`choose_parameters` picks CKKS parameters (polynomial modulus degree,
   coefficient modulus chain, scale) from the program's multiplicative depth,
   its vector sizes and the magnitudes of its values, at 128-bit security.
3. :func:`run` encrypts each sample, evaluates the program with TenSEAL
   (``CKKSVector.mm`` for matrices, squares and products for polynomials),
   decrypts the logits and reports agreement, errors, latency and sizes.

Scope: Dense, Conv1D/2D/3D (and transposed, depthwise, separable), average
pooling, Flatten/Reshape/Permute, BatchNormalization (inference mode),
Rescaling, padding/cropping, dropout (identity at inference), Add/Subtract/
Concatenate/Average of tensors of the same affine stretch, adding or
multiplying by a constant, actswap's square and polynomial activations, and a
softmax as the very last operation (its input, the logits, is what is
decrypted and compared). Anything else is refused with
:class:`OutOfScopeError`, naming the layer and what to do.

Two TenSEAL facts the evaluator is built around (both measured on 0.3.18):

* ``CKKSVector.mm`` (the Halevi-Shoup diagonal method) reads the encrypted
  vector cyclically: an input of size n multiplied by an n x m matrix needs
  the slots to hold the vector repeated over n + m - 1 positions. Encryption
  repeats it over all slots, a product keeps the repetition one input length
  shorter, but ``add_plain``/``mul_plain`` of a plain *vector* write it once
  and zero the rest, which corrupts the next product (OpenMined/TenSEAL#462).
  So vector constants (biases, per-element coefficients) are encrypted once
  with the public key (encryption repeats them) and added or multiplied as
  ciphertexts; scalars stay plain. The slot count must cover
  ``sum(n_i - 1) + m`` over the chain of products (:func:`slots_needed`).
* after every rescale TenSEAL sets the ciphertext's scale back to 2^s although
  it divided by a prime q that is only close to 2^s, so every level multiplies
  the value by 2^s/q (0.3% per level for 27-bit primes). The factor of each
  level is measured once per context (:func:`_measure_drift`) and compensated
  exactly in the next plain matrix or scalar, so the logits keep the precision
  of the scale instead of losing a few percent.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import InvariantError, UnsupportedModelError, UserError

# A compiled stage may differ from the float32 layers it replaces by this much,
# relative to the largest value of the layers' output (at least 1): float32
# rounding of the layers is ~1e-6 of it; a wrong matrix is off by O(1).
COMPILE_TOL = 1e-4

# Largest total coefficient-modulus bits for 128-bit classical security
# (HomomorphicEncryption.org standard, what SEAL enforces by default).
MAX_MODULUS_BITS = {4096: 109, 8192: 218, 16384: 438, 32768: 881}
MAX_PRIME_BITS = 60  # SEAL's largest prime
MAX_SCALE_BITS = 40  # more buys nothing for float64 results
MIN_SCALE_BITS = 25  # below this, rescale and encoding noise reach ~1e-3 of the values
MARGIN_BITS = 3  # headroom over the largest value seen (values up to 8x larger still decrypt)
MAX_SLOTS = max(MAX_MODULUS_BITS) // 2  # the widest vector any parameter set holds

AFFINE_LAYERS = {
    "Dense", "EinsumDense", "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose",
    "Conv3DTranspose", "DepthwiseConv1D", "DepthwiseConv2D", "SeparableConv1D", "SeparableConv2D",
    "AveragePooling1D", "AveragePooling2D", "AveragePooling3D", "GlobalAveragePooling1D",
    "GlobalAveragePooling2D", "GlobalAveragePooling3D", "Flatten", "Reshape", "Permute",
    "BatchNormalization", "Rescaling", "ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D",
    "Cropping1D", "Cropping2D", "Cropping3D", "Dropout", "SpatialDropout1D", "SpatialDropout2D",
    "SpatialDropout3D", "GaussianNoise", "GaussianDropout", "AlphaDropout", "Identity", "Add",
    "Subtract", "Concatenate", "Average",
}
# keras.ops called on a KerasTensor in a functional graph: affine when every
# other argument is a constant (Multiply/Divide: at most one tensor).
AFFINE_OPS = {"Add", "Subtract", "Negative", "Reshape", "Transpose", "Multiply", "Divide", "TrueDivide"}
ONE_TENSOR_OPS = {"Multiply", "Divide", "TrueDivide"}
POOL_LAYERS = {"MaxPooling1D", "MaxPooling2D", "MaxPooling3D", "GlobalMaxPooling1D", "GlobalMaxPooling2D",
               "GlobalMaxPooling3D"}


class OutOfScopeError(UnsupportedModelError):
    """The model is not a chain of affine maps and polynomials (exit 2); names the layer."""


class ParameterError(UnsupportedModelError):
    """No CKKS parameters at 128-bit security fit the model's depth, width or values (exit 2)."""


# --- the compiled program ----------------------------------------------------


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

        from .recover import polynomials_of

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
        from .activations import Polynomial

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
        from .activations import Polynomial, Square
        from .sites import is_graph_model

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
        if isinstance(op, (Square, Polynomial)):
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
        if kind in ("ReLU", "LeakyReLU", "PReLU", "ELU"):
            raise self.not_polynomial(name, kind)
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
        from .sites import is_graph_model

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

    from .sites import is_graph_model

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


@dataclass
class _Ct:
    """A ciphertext (or its plaintext stand-in) with what the evaluator knows of it:
    its level (rescales so far) and ``factor`` (decrypted value = factor x true value)."""

    data: Any
    level: int
    factor: float


class _PlainBackend:
    """Numpy stand-in for TenSEAL: the same operations on (N, n) float64 arrays.
    Records, per level reached, the largest magnitude a slot will hold."""

    def __init__(self) -> None:
        self.magnitude: dict[int, float] = {}

    def note(self, level: int, value: np.ndarray) -> None:
        m = float(np.abs(value).max()) if value.size else 0.0
        self.magnitude[level] = max(self.magnitude.get(level, 0.0), m)

    def drift(self, level: int) -> float:
        return 1.0

    def encrypt(self, x: np.ndarray) -> Any:
        return np.asarray(x, "float64")

    def matmul(self, x: np.ndarray, m: np.ndarray, level: int) -> np.ndarray:
        # The diagonal method's partial sums are bounded by sum |x_i m_ij|.
        self.note(level, np.abs(x) @ np.abs(m))
        y = x @ m
        return y

    def add_vector(self, x: np.ndarray, v: np.ndarray, key: Any) -> np.ndarray:
        return x + v

    def add_scalar(self, x: np.ndarray, c: float) -> np.ndarray:
        return x + c

    def mul_scalar(self, x: np.ndarray, c: float, level: int) -> np.ndarray:
        y = x * c
        self.note(level, y)
        return y

    def mul_vector(self, x: np.ndarray, v: np.ndarray, key: Any, level: int) -> np.ndarray:
        y = x * v
        self.note(level, y)
        return y

    def mul(self, a: np.ndarray, b: np.ndarray, level: int) -> np.ndarray:
        y = a * b
        self.note(level, y)
        return y

    def add(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return a + b

    def neg(self, a: np.ndarray) -> np.ndarray:
        return -a


class _TenSEALBackend:
    """TenSEAL CKKSVector operations; vector constants are encrypted once and cached."""

    def __init__(self, context: Any, drift: list[float]) -> None:
        import tenseal as ts

        self.ts, self.context, self._drift = ts, context, drift
        self.constants: dict[Any, Any] = {}

    def drift(self, level: int) -> float:
        return self._drift[level - 1]

    def note(self, level: int, value: Any) -> None:
        pass  # magnitudes are the plaintext backend's business

    def encrypt(self, x: np.ndarray) -> Any:
        return self.ts.ckks_vector(self.context, np.asarray(x, "float64").tolist())

    def _constant(self, v: np.ndarray, key: Any) -> Any:
        if key not in self.constants:
            self.constants[key] = self.encrypt(v)
        return self.constants[key]

    def matmul(self, x: Any, m: np.ndarray, level: int) -> Any:
        return x.mm(m)

    def add_vector(self, x: Any, v: np.ndarray, key: Any) -> Any:
        return x + self._constant(v, key)

    def add_scalar(self, x: Any, c: float) -> Any:
        return x + float(c)

    def mul_scalar(self, x: Any, c: float, level: int) -> Any:
        return x * float(c)

    def mul_vector(self, x: Any, v: np.ndarray, key: Any, level: int) -> Any:
        return x * self._constant(v, key)

    def mul(self, a: Any, b: Any, level: int) -> Any:
        return a.square() if a is b else a * b

    def add(self, a: Any, b: Any) -> Any:
        return a + b

    def neg(self, a: Any) -> Any:
        return -a


def _evaluate(program: Program, backend: Any, x: np.ndarray) -> tuple[Any, _Ct]:
    """Evaluate ``program`` on ``x`` (one flat sample, or a batch for the plain
    backend). Returns the encrypted input and the output; ``out.data / out.factor``
    is the logits. The level arithmetic here is the multiplicative depth:
    a matrix costs 1, a product 1, a scalar or vector coefficient 1 (folded
    into the factor instead when it is 1 or -1 and the polynomial has one term)."""
    enc = backend.encrypt(x)
    h = _Ct(enc, 0, 1.0)
    for i, s in enumerate(program.stages):
        if isinstance(s, Affine):
            # Compensate this input's factor and the drift of the coming rescale.
            level = h.level + 1
            m = s.matrix / (h.factor * backend.drift(level))
            h = _Ct(backend.matmul(h.data, m, level), level, 1.0)
            if np.any(s.bias):
                h.data = backend.add_vector(h.data, s.bias, (i, "bias"))
        else:
            h = _polynomial(s, backend, h, i)
        backend.note(h.level, h.data)
    return enc, h


def _polynomial(p: Poly, backend: Any, x: _Ct, index: int) -> _Ct:
    c = p.coefficients
    terms = [k for k in range(1, c.shape[0]) if np.any(c[k] != 0)]
    powers: dict[int, _Ct] = {1: x}

    def power(k: int) -> _Ct:
        if k not in powers:
            hi = 1 << (k.bit_length() - 1)
            if hi == k:
                a = b = power(k // 2)
            else:
                a, b = power(hi), power(k - hi)
            level = max(a.level, b.level) + 1
            powers[k] = _Ct(backend.mul(a.data, b.data, level), level, a.factor * b.factor * backend.drift(level))
        return powers[k]

    def scalar(v: np.ndarray) -> float | None:
        return float(v) if v.ndim == 0 else (float(v[0]) if np.all(v == v[0]) else None)

    result: _Ct | None = None
    if len(terms) == 1 and scalar(c[terms[0]]) in (1.0, -1.0):
        # A lone x^k (x² above all): no coefficient to multiply, the factor carries on.
        t = power(terms[0])
        data = t.data if scalar(c[terms[0]]) == 1.0 else backend.neg(t.data)
        result = _Ct(data, t.level, t.factor)
    else:
        for k in terms:
            t = power(k)
            level = t.level + 1
            ck, d = c[k], t.factor * backend.drift(level)
            s = scalar(ck)
            if s is not None:
                data = backend.mul_scalar(t.data, s / d, level)
            else:
                data = backend.mul_vector(t.data, ck / d, (index, k), level)
            term = _Ct(data, level, 1.0)
            result = term if result is None else _Ct(backend.add(result.data, term.data),
                                                      max(result.level, level), 1.0)
    assert result is not None  # a Poly has degree >= 1
    c0 = c[0]
    s0 = scalar(c0)
    if s0 is None:
        result.data = backend.add_vector(result.data, c0 * result.factor, (index, 0))
    elif s0 != 0.0:
        result.data = backend.add_scalar(result.data, s0 * result.factor)
    return result


# --- parameters ------------------------------------------------------------------


def slots_needed(program: Program) -> int:
    """Slots a TenSEAL ``mm`` chain needs: before each product of an n-vector by an
    n x m matrix the vector must repeat over n + m - 1 slots, and each product
    shortens the repetition by n - 1 (see the module docstring)."""
    used, need = 0, program.input_size
    for s in program.stages:
        if isinstance(s, Affine):
            n, m = s.matrix.shape
            need = max(need, used + n + m - 1)
            used += n - 1
    return need


@dataclass
class CKKSParameters:
    poly_modulus_degree: int
    coeff_mod_bit_sizes: list[int]
    scale_bits: int
    depth: int
    slots_needed: int
    integer_bits: int
    security_bits: int = 128

    @property
    def total_bits(self) -> int:
        return sum(self.coeff_mod_bit_sizes)

    def describe(self) -> str:
        return (
            f"CKKS N={self.poly_modulus_degree} ({self.poly_modulus_degree // 2} slots, {self.slots_needed} "
            f"needed), coefficient modulus {self.coeff_mod_bit_sizes} = {self.total_bits} bits "
            f"(max {MAX_MODULUS_BITS[self.poly_modulus_degree]} for {self.security_bits}-bit security), "
            f"scale 2^{self.scale_bits}, depth {self.depth}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "poly_modulus_degree": self.poly_modulus_degree, "slots": self.poly_modulus_degree // 2,
            "slots_needed": self.slots_needed, "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
            "total_bits": self.total_bits, "max_bits_128": MAX_MODULUS_BITS[self.poly_modulus_degree],
            "scale_bits": self.scale_bits, "depth": self.depth, "integer_bits": self.integer_bits,
            "security_bits": self.security_bits,
        }


def depth_and_magnitudes(program: Program, x: np.ndarray) -> tuple[int, dict[int, float]]:
    """Multiplicative depth of ``program`` and, per level, the largest value a slot
    holds on the samples ``x`` (counted by running the evaluator in plaintext)."""
    backend = _PlainBackend()
    _, out = _evaluate(program, backend, np.asarray(x, "float64").reshape(len(x), -1))
    return out.level, backend.magnitude


def choose_parameters(depth: int, slots: int, magnitude: dict[int, float]) -> CKKSParameters:
    """The smallest polynomial modulus degree N (fastest) whose N/2 slots hold ``slots``
    and whose 128-bit-secure modulus budget holds ``depth`` rescale primes of at
    least :data:`MIN_SCALE_BITS` bits; within it, the largest scale (up to
    :data:`MAX_SCALE_BITS`). The first prime q0 = scale + integer bits, where the
    integer bits cover the largest value of the last level, and any earlier level
    within the primes still above it, with :data:`MARGIN_BITS` to spare; the
    special (key-switching) prime equals q0. Raises :class:`ParameterError`."""
    depth = max(depth, 1)

    def integer_bits(s: int) -> int:
        need = 1 + MARGIN_BITS
        for level, m in magnitude.items():
            bits = math.ceil(math.log2(m)) if m > 1 else 0
            # A value produced at `level` still has (depth - level) primes of s bits above q0.
            need = max(need, bits + 1 + MARGIN_BITS - (depth - level) * s)
        return need

    tried = []
    for n in sorted(MAX_MODULUS_BITS):
        if n // 2 < slots:
            tried.append(f"N={n}: {n // 2} slots < {slots}")
            continue
        budget = MAX_MODULUS_BITS[n]
        for s in range(MAX_SCALE_BITS, MIN_SCALE_BITS - 1, -1):
            ib = integer_bits(s)
            q0 = s + ib
            if q0 <= MAX_PRIME_BITS and 2 * q0 + depth * s <= budget:
                return CKKSParameters(n, [q0] + [s] * depth + [q0], s, depth, slots, ib)
        tried.append(f"N={n}: depth {depth} needs {2 * (MIN_SCALE_BITS + integer_bits(MIN_SCALE_BITS)) + depth * MIN_SCALE_BITS} bits > {budget}")
    raise ParameterError(
        f"no CKKS parameters at 128-bit security fit this model (multiplicative depth {depth}, "
        f"{slots} slots needed): {'; '.join(tried)}; use fewer or lower-degree polynomial "
        "activations, or smaller layers"
    )


def make_context(params: CKKSParameters) -> Any:
    import tenseal as ts

    ctx = ts.context(ts.SCHEME_TYPE.CKKS, params.poly_modulus_degree,
                     coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes))
    ctx.global_scale = 2.0 ** params.scale_bits
    ctx.generate_galois_keys()  # rotations for CKKSVector.mm
    return ctx


def _measure_drift(ctx: Any, depth: int) -> list[float]:
    """Per level, the factor 2^s/q that TenSEAL's rescale leaves in the value (see
    the module docstring), measured on a vector of ones over all slots."""
    import tenseal as ts

    ones = ts.ckks_vector(ctx, [1.0] * 256)
    previous, out = 1.0, []
    for _ in range(depth):
        ones = ones * 1.0
        value = float(np.mean(ones.decrypt()))
        out.append(value / previous)
        previous = value
    return out


# --- the run ---------------------------------------------------------------------


@dataclass
class HERunReport:
    samples: int
    parameters: CKKSParameters
    stages: list[str]
    agreement: float
    max_abs_logit_error: float
    max_rel_logit_error: float
    plaintext_accuracy: float | None
    encrypted_accuracy: float | None
    compile_check: float  # largest |softmax(program) - model| (or logits) on the samples
    latency: dict[str, dict[str, float]]  # phase -> mean, max (seconds per sample)
    sizes: dict[str, int]  # bytes (serialized); empty when they could not be measured (notes)
    setup_seconds: float
    final_softmax: bool
    disagreements: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Per sample (not in to_dict): decrypted logits and the plaintext program's.
    encrypted_logits: np.ndarray | None = None
    plaintext_logits: np.ndarray | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples, "parameters": self.parameters.to_dict(), "stages": list(self.stages),
            "top1_agreement": self.agreement, "max_abs_logit_error": self.max_abs_logit_error,
            "max_rel_logit_error": self.max_rel_logit_error,
            "plaintext_accuracy": self.plaintext_accuracy, "encrypted_accuracy": self.encrypted_accuracy,
            "plaintext_check": self.compile_check, "latency_seconds": self.latency,
            "ciphertext_bytes": self.sizes, "setup_seconds": self.setup_seconds,
            "final_softmax": self.final_softmax, "disagreements": list(self.disagreements),
            "notes": list(self.notes),
        }


def run(
    model: Any,
    x: np.ndarray,
    y: np.ndarray | None = None,
    *,
    limit: int | None = None,
    params: CKKSParameters | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_parameters: Callable[[CKKSParameters], None] | None = None,
) -> HERunReport:
    """Run ``model`` (a Keras model or a path) on the samples ``x`` encrypted, one
    ciphertext per sample, and compare with plaintext.

    The plaintext reference is the model itself: top-1 agreement is against its
    predictions, and the logits it compiles to (checked against its own outputs
    on these samples: ``plaintext_check``) are what the decrypted logits are
    compared with. ``progress(done, total)`` is called after each sample;
    ``on_parameters`` once the parameters are chosen (before the slow part).
    """
    try:
        import tenseal  # noqa: F401
    except ImportError:
        raise UserError("the encrypted run needs TenSEAL: pip install 'actswap[he]'") from None
    if not hasattr(model, "inputs"):
        from . import io

        model = io.load(model)
    x = np.asarray(x)
    if y is not None and len(y) != len(x):
        raise UserError(f"x has {len(x)} samples but y has {len(y)} labels")
    if limit is not None:
        if limit < 1:
            raise UserError(f"--limit must be at least 1, got {limit}")
        x = x[:limit]
        y = None if y is None else np.asarray(y)[:limit]
    if len(x) == 0:
        raise UserError("no samples to run")
    want = tuple(model.inputs[0].shape[1:]) if len(getattr(model, "inputs", [])) == 1 else None
    if want is not None and None not in want and tuple(x.shape[1:]) != want:
        if int(np.prod(x.shape[1:])) != int(np.prod(want)):
            raise UserError(f"the samples have shape {tuple(x.shape[1:])}, the model takes {want}")
        x = x.reshape((len(x),) + want)  # e.g. MNIST without its channel axis
    x = x.astype("float32")
    program = compile_model(model, x[:16])
    plain_logits = program.plain(x)
    model_out = np.asarray(model.predict(x, batch_size=256, verbose=0), "float64").reshape(len(x), -1)
    mine = _softmax(plain_logits) if program.final_softmax else plain_logits
    compile_check = float(np.abs(mine - model_out).max())
    depth, magnitude = depth_and_magnitudes(program, x)
    if params is None:
        params = choose_parameters(depth, slots_needed(program), magnitude)
    elif params.depth < depth or params.poly_modulus_degree // 2 < slots_needed(program):
        raise UserError(
            f"the parameters given have depth {params.depth} and {params.poly_modulus_degree // 2} slots; "
            f"this model needs depth {depth} and {slots_needed(program)} slots"
        )
    if on_parameters is not None:
        on_parameters(params)
    t0 = time.perf_counter()
    ctx = make_context(params)
    backend = _TenSEALBackend(ctx, _measure_drift(ctx, params.depth))
    setup = time.perf_counter() - t0
    flat = x.reshape(len(x), -1).astype("float64")
    enc_logits = np.zeros((len(x), program.output_size))
    times = {"encrypt": [], "evaluate": [], "decrypt": []}
    sizes: dict[str, int] = {}
    for i in range(len(x)):
        t = time.perf_counter()
        enc = backend.encrypt(flat[i])
        t1 = time.perf_counter()
        out = _evaluate_from(program, backend, enc)
        t2 = time.perf_counter()
        enc_logits[i] = np.asarray(out.data.decrypt()) / out.factor
        t3 = time.perf_counter()
        times["encrypt"].append(t1 - t)
        times["evaluate"].append(t2 - t1)
        times["decrypt"].append(t3 - t2)
        if i == 0 and _serialize_is_safe():
            sizes = {"input": len(enc.serialize()), "output": len(out.data.serialize())}
        if progress is not None:
            progress(i + 1, len(x))
    notes = []
    if sizes:
        sizes["public_context"] = len(ctx.serialize(save_public_key=True, save_secret_key=False,
                                                    save_galois_keys=True, save_relin_keys=True))
    else:
        notes.append("ciphertext sizes not measured: TensorFlow was imported before TenSEAL, and then "
                     "TenSEAL's serialize() crashes (their protobuf libraries clash); import tenseal first")
    err = np.abs(enc_logits - plain_logits)
    rel = err.max() / max(1e-12, float(np.abs(plain_logits).max()))
    model_top1 = model_out.argmax(axis=1)
    enc_top1 = enc_logits.argmax(axis=1)
    agree = enc_top1 == model_top1
    latency = {k: {"mean": float(np.mean(v)), "max": float(np.max(v))} for k, v in times.items()}
    return HERunReport(
        samples=len(x), parameters=params, stages=[s.describe() for s in program.stages],
        agreement=float(agree.mean()), max_abs_logit_error=float(err.max()), max_rel_logit_error=float(rel),
        plaintext_accuracy=None if y is None else float((model_top1 == y).mean()),
        encrypted_accuracy=None if y is None else float((enc_top1 == y).mean()),
        compile_check=compile_check, latency=latency, sizes=sizes, setup_seconds=setup,
        final_softmax=program.final_softmax, disagreements=[int(i) for i in np.flatnonzero(~agree)],
        notes=notes, encrypted_logits=enc_logits, plaintext_logits=plain_logits,
    )


def _serialize_is_safe() -> bool:
    """Whether TenSEAL was loaded before TensorFlow (sys.modules keeps import order):
    the other way round, TenSEAL's serialize() segfaults (TF 2.21, TenSEAL 0.3.18)."""
    import sys

    names = list(sys.modules)
    return "tensorflow" not in sys.modules or names.index("tenseal") < names.index("tensorflow")


def _evaluate_from(program: Program, backend: Any, enc: Any) -> _Ct:
    """:func:`_evaluate` on an already encrypted input (so encryption is timed apart)."""

    class _Given:
        def __getattr__(self, name: str) -> Any:
            return getattr(backend, name)

        def encrypt(self, _: Any) -> Any:
            return enc

    return _evaluate(program, _Given(), None)[1]
