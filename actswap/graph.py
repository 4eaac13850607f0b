"""Graph backend: rewrite activation ops in TF SavedModels and frozen graphs.

How (SavedModel): each function's graph is *re-emitted* op by op inside a new
``tf.function``, as an interpreter would: function calls are inlined by
re-emitting their bodies (or become calls to a replacement function),
``If``/``While`` become ``tf.cond``/``tf.while_loop`` over re-emitted branches
and bodies, captured variable handles are mapped to the model's own variables
and other captured resources (lookup tables) are captured again, and a hook
may return a replacement for any op (the policy layer decides which, e.g.
``Relu`` -> the custom-gradient square). The result is an ordinary traced
function of the model's variables, which ``tf.saved_model.save`` writes with
its custom gradients.

Mechanism only: nothing here names a target.

Invariants: nothing here assigns a variable or changes a loaded function (the
caller decides where the new ones go); every new function keeps its
original's input signatures and output structure.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

import tensorflow as tf

from . import tf_private
from .errors import UnsupportedModelError

# hook(path, op, new_inputs, in_control_flow) -> replacement outputs, or None to
# re-emit op as is. in_control_flow: the op is inside a tf.cond branch or a
# tf.while_loop body, where TF 2.21 cannot reload a custom gradient (the
# reloaded gradient either trips cond_v2's graph assertion, cf.
# tensorflow/tensorflow#40795, or reads a loop-body tensor out of scope), so a
# replacement there must not use one.
OpHook = Callable[[str, Any, list[Any], bool], "list[Any] | None"]

CALL_OPS = frozenset({"PartitionedCall", "StatefulPartitionedCall"})
IF_OPS = frozenset({"If", "StatelessIf"})
WHILE_OPS = frozenset({"While", "StatelessWhile"})


def short_function_name(name: str) -> str:
    """``__inference_while_body_45_105`` -> ``while_body``: paths users can read."""
    name = re.sub(r"^__inference_", "", name)
    return re.sub(r"(_\d+)+$", "", name)


class Interpreter:
    """Re-emits graphs into the current default graph (a function being traced)."""

    def __init__(
        self, library: dict[str, Any], hook: OpHook, replacements: dict[str, Callable[[list[Any]], list[Any]]] | None = None
    ) -> None:
        self.library = library
        self.hook = hook
        # Calls to these library functions become calls to their replacement
        # (flat inputs -> flat outputs) instead of being re-emitted inline.
        self.replacements = replacements or {}
        self._graphs: dict[str, Any] = {}
        self._flow_depth = 0

    def _graph(self, fname: str) -> Any:
        if fname not in self._graphs:
            try:
                fdef = self.library[fname]
            except KeyError:
                raise UnsupportedModelError(f"function '{fname}' is called but not in the graph library") from None
            # Converted eagerly: a SavedModel's functions are registered in the
            # eager context, not in the graph being traced.
            with tf.init_scope():
                self._graphs[fname] = tf_private.function_def_to_graph(fdef)
        return self._graphs[fname]

    def call(self, fname: str, inputs: list[Any], path: str) -> list[Any]:
        graph = self._graph(fname)
        if len(graph.inputs) != len(inputs):
            raise UnsupportedModelError(
                f"function '{fname}' takes {len(graph.inputs)} inputs but is called with {len(inputs)}"
            )
        mapping = {t.name: _local(v) for t, v in zip(graph.inputs, inputs)}
        self.emit(graph, mapping, f"{path}/{short_function_name(fname)}")
        return [mapping[t.name] for t in graph.outputs]

    def emit(self, graph: Any, mapping: dict[str, Any], path: str) -> None:
        """Re-emit every op of ``graph`` not already fed in ``mapping`` (tensor names)."""
        new_ops: dict[str, Any] = {}
        for op in graph.get_operations():
            if op.type == "Placeholder" and op.outputs[0].name in mapping:
                continue
            try:
                inputs = [mapping[t.name] for t in op.inputs]
            except KeyError as e:
                raise UnsupportedModelError(
                    f"op '{op.name}' ({op.type}) at '{path}' reads {e}, which is not computed; "
                    "is an input or captured resource missing?"
                ) from None
            controls = [new_ops[c.name] for c in op.control_inputs if c.name in new_ops]
            with tf.control_dependencies(controls):
                outputs, new_op = self._emit_op(op, inputs, path)
            for t, v in zip(op.outputs, outputs):
                mapping[t.name] = v
            if new_op is not None:
                new_ops[op.name] = new_op

    def _emit_op(self, op: Any, inputs: list[Any], path: str) -> tuple[list[Any], Any]:
        here = f"{path}/{op.name}"
        replaced = self.hook(here, op, inputs, self._flow_depth > 0)
        if replaced is not None:
            return list(replaced), _op_of(replaced)
        if op.type in CALL_OPS:
            fname = op.get_attr("f").name
            if fname in self.replacements:
                out = list(self.replacements[fname](inputs))
            else:
                out = self.call(fname, inputs, path)
            return out, _op_of(out)
        if op.type in IF_OPS:
            return self._emit_if(op, inputs, here)
        if op.type in WHILE_OPS:
            return self._emit_while(op, inputs, here)
        for key, value in op.node_def.attr.items():
            if value.HasField("func") or (value.HasField("list") and len(value.list.func)):
                raise UnsupportedModelError(
                    f"op '{op.name}' ({op.type}) at '{path}' calls a function through attribute "
                    f"'{key}', which actswap cannot rewrite"
                )
        attrs = {
            k: v for k, v in op.node_def.attr.items() if not k.startswith("_") or k == "_gradient_op_type"
        }
        new = tf_private.create_op(
            tf.compat.v1.get_default_graph(), op.type, inputs,
            [t.dtype for t in op.outputs], attrs, op.op_def,
        )
        return list(new.outputs), new

    def _emit_if(self, op: Any, inputs: list[Any], path: str) -> tuple[list[Any], Any]:
        then_f, else_f = op.get_attr("then_branch").name, op.get_attr("else_branch").name
        pred, args = inputs[0], inputs[1:]
        if pred.dtype != tf.bool:
            pred = tf.cast(pred, tf.bool)
        if not op.outputs:
            raise UnsupportedModelError(f"'{path}': a tf.cond without outputs is not supported")
        def branch(fname: str, where: str) -> Callable[[], list[Any]]:
            def run() -> list[Any]:
                self._flow_depth += 1
                try:
                    return self.call(fname, list(args), where)
                finally:
                    self._flow_depth -= 1

            return run

        out = tf.cond(pred, branch(then_f, path + "/then"), branch(else_f, path + "/else"))
        out = list(out) if isinstance(out, (list, tuple)) else [out]
        return out, _op_of(out)

    def _emit_while(self, op: Any, inputs: list[Any], path: str) -> tuple[list[Any], Any]:
        cond_f, body_f = op.get_attr("cond").name, op.get_attr("body").name
        shapes = [tf.TensorShape(s) for s in op.get_attr("output_shapes")]

        def inside(fname: str, where: str, v: Any) -> list[Any]:
            self._flow_depth += 1
            try:
                return self.call(fname, list(v), where)
            finally:
                self._flow_depth -= 1

        def cond(*v: Any) -> Any:
            c = inside(cond_f, path + "/cond", v)[0]
            return c if c.dtype == tf.bool else tf.cast(c, tf.bool)

        def body(*v: Any) -> list[Any]:
            return inside(body_f, path + "/body", v)

        out = tf.while_loop(
            cond, body, loop_vars=list(inputs),
            shape_invariants=shapes if len(shapes) == len(inputs) else None,
            parallel_iterations=op.get_attr("parallel_iterations"),
        )
        out = list(out) if isinstance(out, (list, tuple)) else [out]
        return out, _op_of(out)


def _local(value: Any) -> Any:
    """``value`` as a tensor of the graph being built.

    A cond branch or loop body may read a tensor of an enclosing graph; TF
    captures it when an op consumes it, but a custom gradient that closed over
    the outer tensor itself would later be resolved in the wrong graph
    (cond_v2 asserts). An identity in the current graph makes it local.
    """
    graph = tf.compat.v1.get_default_graph()
    if getattr(value, "graph", graph) is not graph:
        return tf.identity(value)
    return value


def _op_of(tensors: Any) -> Any:
    tensors = [t for t in tensors if hasattr(t, "op")]
    return tensors[0].op if tensors else None


def signature_library(fn: Any) -> dict[str, Any]:
    return {f.signature.name: f for f in fn.graph.as_graph_def().library.function}


def variables_by_handle(functions: list[Any]) -> dict[int, Any]:
    """The variables the functions capture, by the id of their handle (what a
    function's captures name): the model's own, so the rewritten functions read
    and train them (nothing is copied)."""
    found: dict[int, Any] = {}
    for fn in functions:
        for v in fn.variables:
            found.setdefault(id(v.handle), v)
    return found


def _feed(fn: Any, user_values: list[Any], variables: dict[int, Any], name: str) -> dict[str, Any]:
    """Tensor name -> value for ``fn``'s inputs: the user's values, then each
    capture: a variable's handle, a constant's value, or the same resource
    (a lookup table the model tracks)."""
    user_inputs = fn.inputs[: len(fn.inputs) - len(fn.graph.captures)]
    if len(user_inputs) != len(user_values):
        raise UnsupportedModelError(
            f"'{name}' takes {len(user_inputs)} tensor inputs, {len(user_values)} were given"
        )
    mapping = {ph.name: value for ph, value in zip(user_inputs, user_values)}
    for external, internal in fn.graph.captures:
        var = variables.get(id(external))
        if var is not None:
            tf_private.mark_variable_accessed(var)
            mapping[internal.name] = var.handle
        elif external.dtype != tf.resource:
            mapping[internal.name] = tf.constant(external.numpy())
        else:
            mapping[internal.name] = external
    return mapping


def _tensor_leaves(structure: Any) -> list[Any]:
    return [x for x in tf.nest.flatten(structure) if isinstance(x, (tf.Tensor, tf.TensorSpec, tf.Variable))]


def _pack_outputs(fn: Any, flat: list[Any]) -> Any:
    """``fn``'s structured outputs with its output tensors replaced, in order, by ``flat``."""
    structure = tf.nest.flatten(fn.structured_outputs)
    declared = sum(isinstance(x, (tf.Tensor, tf.TensorSpec)) for x in structure)
    if declared != len(flat):  # a damaged SavedModel (found by the fuzzer, issue 29)
        raise UnsupportedModelError(
            f"function '{function_name(fn)}' returns {len(flat)} tensor(s) but its signature declares {declared}"
        )
    values = iter(flat)
    leaves = [next(values) if isinstance(x, (tf.Tensor, tf.TensorSpec)) else x for x in structure]
    return tf.nest.pack_sequence_as(fn.structured_outputs, leaves)


def emit_function(
    fn: Any, name: str, user_values: list[Any], variables: dict[int, Any], hook: OpHook,
    replacements: dict[str, Callable[[list[Any]], list[Any]]] | None = None,
) -> Any:
    """Re-emit concrete function ``fn`` into the function being traced, on
    ``user_values`` (its tensor inputs, flat), through ``hook``; return its
    structured outputs. Site paths start with ``name``."""
    mapping = _feed(fn, user_values, variables, name)
    Interpreter(signature_library(fn), hook, replacements).emit(fn.graph, mapping, name)
    return _pack_outputs(fn, [mapping[t.name] for t in fn.outputs])


def function_name(fn: Any) -> str:
    """A concrete function's name in the graph library (what call ops name)."""
    name = fn.name
    return name.decode() if isinstance(name, bytes) else str(name)


def _matches(signature: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    try:
        tf.nest.assert_same_structure(signature, (args, kwargs))
    except (ValueError, TypeError):
        return False
    for spec, value in zip(tf.nest.flatten(signature), tf.nest.flatten((args, kwargs))):
        if isinstance(spec, tf.TensorSpec):
            if not (hasattr(value, "shape") and hasattr(value, "dtype") and spec.is_compatible_with(value)):
                return False
        elif spec != value:
            return False
    return True


def rewrite_function(
    concretes: list[Any], before_trace: Callable[[Any], str], variables: dict[int, Any], hook: OpHook,
    signature: inspect.Signature | None = None,
) -> tuple[Any, dict[str, Any]]:
    """A new tf.function with one concrete function per concrete function in
    ``concretes`` (same input signature, same outputs), each re-emitted through
    ``hook``; and the new concrete functions by the old ones' names.

    ``before_trace(old)`` runs before each is traced and returns the path its
    sites are named under (the caller sets its hook's state there).
    ``signature`` (the original's Python signature: argument names and
    defaults) is the new function's, so it is called as the original was."""
    originals = list(concretes)

    def body(*args: Any, **kwargs: Any) -> Any:
        for old in originals:
            if _matches(old.structured_input_signature, args, kwargs):
                name = before_trace(old)
                return emit_function(old, name, _tensor_leaves((args, kwargs)), variables, hook)
        raise UnsupportedModelError("a call matches none of the function's traced signatures")

    if signature is not None:
        body.__signature__ = signature  # type: ignore[attr-defined]  # read by tf.function
    # autograph=False: the interpreter is plain Python that must run as written.
    new_fn = tf.function(body, autograph=False)
    traced = {}
    for old in originals:
        a, k = old.structured_input_signature
        traced[function_name(old)] = new_fn.get_concrete_function(*a, **k)
    return new_fn, traced


def call_replacement(old: Any, new: Any) -> Callable[[list[Any]], list[Any]]:
    """What a call op to ``old`` becomes: a call to ``new`` on the op's user
    inputs (the captured ones come after them, and ``new`` captures its own)."""
    n_user = len(old.inputs) - len(old.graph.captures)

    def call(inputs: list[Any]) -> list[Any]:
        values = iter(inputs[:n_user])
        leaves = [next(values) if isinstance(x, tf.TensorSpec) else x
                  for x in tf.nest.flatten(old.structured_input_signature)]
        args, kwargs = tf.nest.pack_sequence_as(old.structured_input_signature, leaves)
        return [x for x in tf.nest.flatten(new(*args, **kwargs)) if isinstance(x, tf.Tensor)]

    return call


def rewrite_signature(
    fn: Any, name: str, variables: dict[int, Any], hook: OpHook,
    replacements: dict[str, Callable[[list[Any]], list[Any]]] | None = None,
) -> tuple[Any, Any]:
    """A new tf.function equal to signature ``fn`` with ``hook`` applied; and its
    concrete function. Calls to a function in ``replacements`` call its
    replacement (the model's carried-over function) instead of re-emitting it."""
    specs = fn.structured_input_signature[1]
    if fn.structured_input_signature[0]:
        raise UnsupportedModelError(f"signature '{name}' takes positional inputs; signatures take keywords")

    def body(**kwargs: Any) -> Any:
        return emit_function(fn, name, tf.nest.flatten(kwargs), variables, hook, replacements)

    new_fn = tf.function(body, autograph=False)
    return new_fn, new_fn.get_concrete_function(**specs)


def python_signature(function: Any) -> inspect.Signature | None:
    """The Python signature (names, defaults) a restored tf.function was saved
    with, or None when it does not say."""
    try:
        spec = function.function_spec.fullargspec
    except AttributeError:
        return None
    P = inspect.Parameter
    defaults = list(spec.defaults or ())
    first_default = len(spec.args) - len(defaults)
    params = [
        P(name, P.POSITIONAL_OR_KEYWORD, default=defaults[i - first_default] if i >= first_default else P.empty)
        for i, name in enumerate(spec.args)
    ]
    if spec.varargs:
        params.append(P(spec.varargs, P.VAR_POSITIONAL))
    params += [P(k, P.KEYWORD_ONLY, default=(spec.kwonlydefaults or {}).get(k, P.empty)) for k in spec.kwonlyargs]
    if spec.varkw:
        params.append(P(spec.varkw, P.VAR_KEYWORD))
    try:
        return inspect.Signature(params)
    except ValueError:
        return None
