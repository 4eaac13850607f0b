"""Compile a Keras model into a :class:`Program` of affine stages and polynomials.

See :mod:`actswap.he` for the method (each affine stretch by applying its own
layers to the zero input and every basis vector, then checked).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import registry
from ..errors import InvariantError
from . import layers
from .attention import SPECIAL_LAYERS, einsum_pairs, shifted_square
from .limits import MAX_SLOTS, OutOfScopeError, ParameterError
from .stages import COMPILE_TOL, Affine, Bilinear, Poly, Program, input_first  # noqa: F401 - re-exported
from .stages import is_identity as _is_identity
from .stages import softmax as _softmax  # noqa: F401 - encrypted.py's


# The affine layers the compiler runs: the HE table's, less those it does not compile yet.
AFFINE_LAYERS = set(layers.AFFINE_LAYERS) - layers.NOT_COMPILED


# keras.ops called on a KerasTensor in a functional graph: affine when every
# other argument is a constant (Multiply/Divide: at most one tensor).
AFFINE_OPS = {"Add", "Subtract", "Negative", "Reshape", "Transpose", "Multiply", "Divide", "TrueDivide"}


ONE_TENSOR_OPS = {"Multiply", "Divide", "TrueDivide"}


POOL_LAYERS = set(registry.POOL_SWAPS)


# --- compiling a Keras model ---------------------------------------------------


class _Val:
    """A value inside one affine stretch (a *segment*): ``rows[0]`` is the stretch
    applied to 0, ``rows[1 + i]`` to basis vector i of the segment's sources
    (float64, TF tensor); ``probe`` is the original float32 layers applied to the
    probe inputs; ``value`` the program value it is, once materialised."""

    def __init__(self, seg: int, rows: Any, probe: Any, softmaxed: str | None = None,
                 value: int | None = None, names: tuple[str, ...] = ()) -> None:
        self.seg, self.rows, self.probe, self.softmaxed = seg, rows, probe, softmaxed
        self.value, self.names = value, names


@dataclass
class _Segment:
    """An affine stretch from ``sources`` (program values, concatenated) on."""

    sources: list[int]
    probe_in: np.ndarray  # (P, n) float64: the sources' probes side by side


def _act_name(act: Any) -> str:
    return str(getattr(act, "__name__", type(act).__name__))


class _Compiler:
    """Walks the model's graph, keeping affine stretches symbolic (basis rows) and
    emitting a stage where a polynomial or a product of two encrypted values
    needs the stretch's value as ciphertexts. Every stage is checked on the
    probes against the float32 layers it stands for."""

    def __init__(self, model: Any, probe: np.ndarray) -> None:
        import keras

        from ..recover import polynomials_of

        self.keras = keras
        self.model = model
        self.polys = polynomials_of(model)
        self.segments: list[_Segment] = []
        self.stages: list[Affine | Poly | Bilinear] = []
        self.probe = probe
        self.probes: dict[int, np.ndarray] = {}  # program value -> (P, n) float64 probe
        self.shapes: dict[int, tuple[int, ...]] = {}  # program value -> per-sample shape

    # values and segments
    def value(self, probe: Any, shape: tuple[int, ...]) -> int:
        """Record the stage just appended as a program value."""
        vid = len(self.stages)
        self.probes[vid] = np.asarray(probe, "float64").reshape(len(self.probe), -1)
        self.shapes[vid] = tuple(int(d) for d in shape)
        return vid

    def start(self, shape: tuple[int, ...], probe: Any, value: int) -> _Val:
        import tensorflow as tf

        n = int(np.prod(shape))
        if n > MAX_SLOTS:
            raise ParameterError(
                f"a vector of {n} values enters an affine stretch; CKKS at 128-bit security holds at most "
                f"{MAX_SLOTS} per ciphertext: pool or shrink the model first"
            )
        self.probes.setdefault(value, np.asarray(probe, "float64").reshape(len(self.probe), -1))
        self.shapes.setdefault(value, tuple(shape))
        rows = np.concatenate([np.zeros((1, n)), np.eye(n)]).reshape((1 + n,) + tuple(shape))
        self.segments.append(_Segment([value], self.probes[value]))
        return _Val(len(self.segments) - 1, tf.constant(rows, tf.float64), probe, value=value)

    def size(self, value: int) -> int:
        return int(np.prod(self.shapes[value]))

    def unify(self, vals: list[_Val]) -> dict[int, _Val]:
        """``vals`` re-expressed over one segment whose sources are all of theirs
        (id(val) -> val): a value ignores the sources it did not come from, so
        their basis rows repeat its row 0."""
        import tensorflow as tf

        segs = sorted({v.seg for v in vals})
        if len(segs) == 1:
            return {id(v): v for v in vals}
        # A value still computed from the program's input is materialised first
        # (at the input's level + 1, no deeper than the input's other readers), so
        # later stages read it, not the input: the input's ciphertexts, the widest
        # and at the top level, are then freed early.
        originals, vals = vals, [self.off_input(v) for v in vals]
        segs = sorted({v.seg for v in vals})
        sources: list[int] = []
        for s in segs:
            sources += [src for src in self.segments[s].sources if src not in sources]
        self.segments.append(_Segment(sources, np.concatenate([self.probes[s] for s in sources], axis=1)))
        out = {}
        for original, v in zip(originals, vals):
            old = self.segments[v.seg]
            rows = np.asarray(v.rows, "float64")
            flat = rows.reshape(rows.shape[0], -1)
            at, offset = {}, 1
            for src in old.sources:
                at[src] = flat[offset:offset + self.size(src)]
                offset += self.size(src)
            blocks = [flat[:1]] + [at[src] if src in at else np.repeat(flat[:1], self.size(src), axis=0)
                                   for src in sources]
            merged = np.concatenate(blocks).reshape((-1,) + rows.shape[1:])
            out[id(original)] = _Val(len(self.segments) - 1, tf.constant(merged, tf.float64), v.probe,
                                     v.softmaxed, names=v.names)
        return out

    def off_input(self, v: _Val) -> _Val:
        """``v`` as the start of a segment of its own when it is computed from the
        program's input (else ``v``)."""
        if 0 not in self.segments[v.seg].sources or v.value == 0:
            return v
        vid = self.materialize(v, "residual")
        return self.start(self.shapes[vid], v.probe, vid)

    def materialize(self, v: _Val, where: str) -> int:
        """The program value ``v`` is: an affine stage from its segment's sources (those
        it depends on), appended once and checked; a source itself when ``v`` is one."""
        if v.value is not None:
            return v.value
        seg = self.segments[v.seg]
        rows = np.asarray(v.rows, "float64").reshape(v.rows.shape[0], -1)
        matrix, bias = rows[1:] - rows[0], rows[0].copy()
        kept, blocks, offset = [], [], 0
        for src in seg.sources:
            block = matrix[offset:offset + self.size(src)]
            offset += self.size(src)
            if np.any(block) or (src == seg.sources[-1] and not kept):
                kept.append(src)
                blocks.append(block)
        matrix = np.concatenate(blocks)
        out_shape = tuple(int(d) for d in v.rows.shape[1:])
        if len(kept) == 1 and not v.names and self.shapes[kept[0]] == out_shape and _is_identity(matrix, bias):
            v.value = kept[0]
            return v.value
        in_shape = self.shapes[kept[0]] if len(kept) == 1 else (matrix.shape[0],)
        affine = Affine(matrix, bias, list(v.names), in_shape, out_shape, inputs=tuple(kept))
        out = np.concatenate([self.probes[s] for s in kept], axis=1) @ matrix + bias
        if v.probe is not None:
            affine.check_error = self.check(_softmax(out) if v.softmaxed else out, v.probe,
                                            f"affine stretch ending at '{where}'")
        self.stages.append(affine)
        v.value = self.value(out, out_shape)
        return v.value

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

    # stages
    def poly_coefficients(self, obj: Any, name: str, shape: tuple[int, ...]) -> np.ndarray:
        from ..activations import Polynomial

        c = shifted_square(obj)
        if c is not None:
            return c
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

    def poly_stage(self, vid: int, coefficients: np.ndarray, name: str, reference: Any) -> int:
        poly = Poly(coefficients, name, self.size(vid), inputs=(vid,))
        self.check(poly.apply(self.probes[vid]), reference, f"polynomial '{name}'")
        self.stages.append(poly)
        return self.value(reference, self.shapes[vid])

    def polynomial(self, v: _Val, poly_obj: Any, name: str, reference: Any) -> _Val:
        vid = self.materialize(v, name)
        c = self.poly_coefficients(poly_obj, name, self.shapes[vid])
        return self.start(self.shapes[vid], reference, self.poly_stage(vid, c, name, reference))

    def bilinear(self, equation: str, a: int, b: int, name: str, reference: Any) -> int:
        """``einsum(equation, a, b)`` of two program values as a :class:`Bilinear` stage."""
        pairs, out_shape = einsum_pairs(equation, (1,) + self.shapes[a], (1,) + self.shapes[b])
        stage = Bilinear(pairs, name, out_shape[1:], (a, b))
        self.check(stage.apply(self.probes[a], self.probes[b]), reference, f"'{name}'")
        self.stages.append(stage)
        return self.value(reference, out_shape[1:])

    # layers
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
        if len({v.seg for v in vals}) > 1:  # branches meet (a residual): one segment over all sources
            same = self.unify(vals)
            args, kwargs = keras.tree.map_structure(
                lambda a: same[id(a)] if isinstance(a, _Val) else a, (args, kwargs))
            vals = [same[id(v)] for v in vals]
        if is_graph_model(op):
            return self.walk(op, vals[0])
        is_layer = isinstance(op, keras.layers.Layer)
        kwargs = {k: w for k, w in kwargs.items() if k not in ("mask", "training")}
        if is_layer and getattr(op, "_call_has_training_arg", False):
            kwargs["training"] = False
        v = vals[0]
        if kind in SPECIAL_LAYERS:  # actswap's transformer layers: their own compilers
            return SPECIAL_LAYERS[kind](self, op, args, kwargs)
        if layers.polynomial_cost(op) is not None:  # one of actswap's element-wise polynomial layers
            return self.polynomial(v, op, name, op(v.probe))
        act = getattr(op, "activation", None) if is_layer else None
        act_name = _act_name(act) if act is not None else "linear"
        if kind == "Activation":
            if name in self.polys or shifted_square(act) is not None:
                return self.polynomial(v, act, name, op(v.probe))
            if act_name == "linear":
                return v
            if act_name == "softmax":
                return _Val(v.seg, v.rows, op(v.probe), softmaxed=name, names=v.names)
            raise self.not_polynomial(name, act_name)
        if kind == "Softmax":
            return _Val(v.seg, v.rows, op(v.probe), softmaxed=name, names=v.names)
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
                "attention, a final softmax)"
            )
        return self.affine(op, args, kwargs, vals, act)

    def affine(self, op: Any, args: Any, kwargs: Any, vals: list[_Val] | None = None, act: Any = None) -> _Val:
        """``op`` (an affine layer or op, possibly with a polynomial activation) on the
        segment's basis rows, and the float32 ``op`` on the probes; ``vals`` are the
        values among its arguments (found when not given), all of one segment."""
        keras = self.keras
        if vals is None:
            vals = [a for a in keras.tree.flatten((args, kwargs)) if isinstance(a, _Val)]
        name, kind = getattr(op, "name", type(op).__name__), type(op).__name__
        is_layer = isinstance(op, keras.layers.Layer)
        act_name = _act_name(act) if act is not None else "linear"
        if not is_layer and kind in ONE_TENSOR_OPS and (
            len(vals) > 1 or (kind != "Multiply" and not isinstance(args[0], _Val))
        ):
            # x * x is a product of ciphertexts and 1 / x is not a polynomial at all.
            raise OutOfScopeError(f"'{name}' ({kind}) multiplies or divides by the input itself; not affine")
        poly_act = act is not None and act_name not in ("linear", "softmax") and (
            name in self.polys or shifted_square(act) is not None)
        if act is not None and not poly_act and act_name not in ("linear", "softmax"):
            raise self.not_polynomial(name, act_name)
        linear = act is not None and act_name != "linear"
        self.check_width(op, args, name)
        rows_args = keras.tree.map_structure(lambda a: a.rows if isinstance(a, _Val) else a, args)
        probe_args = keras.tree.map_structure(lambda a: a.probe if isinstance(a, _Val) else a, args)
        fn = self.float64_clone(op, rows_args, linear) if is_layer else op
        rows = fn(*rows_args, **kwargs)
        probe = op(*probe_args, **kwargs)
        names = tuple(dict.fromkeys(n for v in vals for n in v.names)) + (name,)
        # Before a polynomial activation the float32 probe is past it: the polynomial's
        # check covers the pair (the stretch is checked on its own otherwise).
        out = _Val(vals[0].seg, rows, None if poly_act else probe, names=names)
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
        dims = keras.tree.flatten(spec)[0].shape[1:]
        if any(d is None for d in dims):  # not known from the spec (EinsumDense's free axes): the call tells
            return
        width = int(np.prod(dims))
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


def compile_model(model: Any, probe: np.ndarray | None = None) -> Program:
    """Compile ``model`` into a :class:`Program`; raises :class:`OutOfScopeError` naming
    the first layer outside the scope. ``probe`` (a few inputs) is what each stage is
    checked on [default: 4 seeded uniform samples in [0, 1)]. A model whose values
    only flow layer to layer compiles to a chain (:attr:`Program.is_chain`);
    residual branches and attention to a graph of stages."""
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
    out = c.walk(model, c.start(shape, probe, 0))
    vid = c.materialize(out, "output")
    if vid != len(c.stages) or not c.stages:  # the output is an earlier value: an identity stage to end on
        n = c.size(vid)
        c.stages.append(Affine(np.eye(n), np.zeros(n), [], c.shapes[vid], c.shapes[vid], inputs=(vid,)))
        c.value(c.probes[vid], c.shapes[vid])
    program = Program(input_first(c.stages), shape, c.size(len(c.stages)), bool(out.softmaxed))
    reference = np.asarray(model(probe, training=False), "float64").reshape(len(probe), -1)
    end_to_end = program.plain(probe)
    c.check(_softmax(end_to_end) if out.softmaxed else end_to_end, reference, "program")
    return program
