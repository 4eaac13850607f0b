"""TF SavedModels: find and replace activation ops in every function and signature.

The TensorFlow side of the :mod:`.savedmodel` backend (which imports it only
when used: it imports TensorFlow); frozen GraphDefs are :mod:`.tf_graphdef`.

Policy over :mod:`actswap.graph` (the mechanism): which op is a site, which
sites are replaced, and how the result is written.

Invariants: the input is only read; variables of the result are bit-identical
copies with their trainable flags; every signature keeps its name and its
input/output specs (checked after the rewrite); outputs are written atomically
(a temporary sibling, then a rename).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import tensorflow as tf

from .. import graph, registry
from ..containers import Format
from ..errors import InvariantError, LoadError, UserError, first_line, naming
from ..paths import (
    check_output_dir, disk_full, ensure_space, hold_before_rename, is_disk_full, remove_stale_temps,
    temp_prefix,
)
from ..policy import decide
from ..report import REPLACED, SKIPPED, Report, Site, warnings_as_notes
from ..safety import check_container

FORM = "graph op"


def load_signatures(
    path: Path, trust_code: bool = False, notes: list[str] | None = None
) -> tuple[Any, dict[str, Any]]:
    """Scan a SavedModel (:func:`actswap.safety.check_container`: TF runs initializers while
    loading), load it, and return it with its signatures (refusing none). The
    loader's warnings go to ``notes`` (when given)."""
    check_container(path, Format.SAVEDMODEL, trust_code)
    try:
        with warnings_as_notes(notes if notes is not None else [], "TensorFlow, loading the SavedModel,"):
            loaded = tf.saved_model.load(str(path))
    except Exception as e:  # noqa: BLE001 - any loader failure is the file's
        raise LoadError(f"could not load SavedModel '{path}': {first_line(e)}") from e
    sigs = _signature_map(path, getattr(loaded, "signatures", None))
    if not sigs:
        raise UserError(
            f"SavedModel '{path}' has no signatures, so it has no graph actswap can rewrite; "
            "re-export it with signatures (tf.saved_model.save(obj, dir, signatures=...))"
        )
    return loaded, sigs


def _signature_map(path: Path, signatures: Any) -> dict[str, Any]:
    """The loaded object's signatures, by name. A corrupt object graph can
    restore its ``signatures`` child as some other object (a fuzzed file gave
    a ``_UserObject``; issue 29), or a signature as something not a function:
    those are the file's fault, named as such."""
    if signatures is None:
        return {}
    if not isinstance(signatures, Mapping):
        raise LoadError(f"corrupt SavedModel '{path}': its 'signatures' object is a "
                        f"{type(signatures).__name__}, not a map of signatures")
    sigs = dict(signatures)
    for name, fn in sigs.items():
        if not isinstance(fn, tf.types.experimental.ConcreteFunction):
            raise LoadError(f"corrupt SavedModel '{path}': its signature {str(name)!r} is a "
                            f"{type(fn).__name__}, not a function")
    return sigs


class _Sites:
    """The op hook: records every activation op as a site and replaces the chosen ones."""

    def __init__(
        self, target: registry.Target | None, grad: Any, sources: frozenset[str], signature: str | None
    ) -> None:
        self.target, self.grad, self.sources, self.signature = target, grad, sources, signature
        self.sites: list[Site] = []
        self.in_control_flow = 0
        self.current = ""
        self.frozen = False
        # False while re-emitting a function whose ops a signature's re-emission
        # reports (a function the signature calls): decided alike, not listed twice.
        self.record = True
        self.low_precision: set[str] = set()  # dtypes of replaced sites that overflow early

    def __call__(self, path: str, op: Any, inputs: list[Any], in_control_flow: bool) -> Any:
        act = registry.TF_OP_ACTIVATIONS.get(op.type)
        if act is None:
            return None
        # Frozen: the report is made, but saving traces a function of several
        # signatures again (TF re-creates each trace); it gets the same
        # decisions, and nothing is added to the report.
        record = self.record and not self.frozen
        site = Site(path, op.type, FORM, act)
        if record:
            self.sites.append(site)
        reason = None
        if self.target is not None:
            reason = decide(site, self.target, self.sources)
            if reason is None and self.signature is not None and self.current != self.signature:
                reason = f"signature not selected (--signature {self.signature})"
        site.replaceable = reason is None
        if self.target is None:
            return None
        site.action = REPLACED if reason is None else SKIPPED
        site.reason = reason or f"{act} -> {self.target.name}"
        if reason is not None:
            return None
        if in_control_flow:
            self.in_control_flow += record
            site.detail = "in tf.cond/tf.while_loop"
        dtype = _op_dtype(op)
        if dtype in ("float16", "bfloat16"):
            self.low_precision.add(dtype)
        return [self.target.tensor(inputs[0], self.grad, not in_control_flow, site)]


def _op_dtype(op: Any) -> str:
    try:
        return op.get_attr("T").name
    except (ValueError, AttributeError):
        return ""


def _specs_of(fn: Any) -> tuple[Any, Any]:
    def spec(t: Any) -> Any:
        if not hasattr(t, "shape"):
            return t  # a Python value of the signature (e.g. training=False)
        return (tuple(t.shape.as_list()) if t.shape.rank is not None else None, t.dtype.name)

    return (
        tf.nest.map_structure(spec, fn.structured_input_signature),
        tf.nest.map_structure(spec, fn.structured_outputs),
    )


@dataclass
class Rewritten:
    """What :func:`convert_savedmodel` did to a loaded SavedModel (kept beside it,
    not in it, so that nothing named after actswap enters the object graph)."""

    signatures: dict[str, Any]  # name -> new concrete function
    variables: list[Any]  # the variables the functions read: the model's own
    functions: list[str]  # attribute paths of the carried-over functions
    # The new functions' concrete functions: held, so that saving finds them
    # traced (a tf.function's cache holds its traces weakly; a trace saving
    # made again would run the hook after the report was made).
    traced: list[Any] = field(default_factory=list)


# The loaded objects convert_savedmodel returned -> what it did to them.
REWRITTEN: weakref.WeakKeyDictionary[Any, Rewritten] = weakref.WeakKeyDictionary()


def _functions(loaded: Any) -> list[tuple[str, Any, str, Any]]:
    """``(path, parent, attribute, function)`` for every function of the object
    graph but the signatures, parents first; each object once."""
    view = tf.train.TrackableView(loaded)
    found: list[tuple[str, Any, str, Any]] = []
    seen = {id(loaded)}

    def walk(obj: Any, prefix: str) -> None:
        for name, child in view.children(obj).items():
            if id(child) in seen or (obj is loaded and name == "signatures"):
                continue
            seen.add(id(child))
            if isinstance(child, tf.types.experimental.PolymorphicFunction):
                found.append((prefix + name, obj, name, child))
            else:
                walk(child, f"{prefix}{name}/")

    walk(loaded, "")
    return found


def rewrite_savedmodel(path: Path, hook: _Sites, trust_code: bool = False) -> tuple[Any, Rewritten, list[str]]:
    """Load the SavedModel at ``path`` and put into it, in place, every function
    re-emitted through ``hook``: each function of its object graph keeps its
    attribute, each signature its name; the functions read the model's own
    variables. Return the loaded object (ready for :func:`save_savedmodel`),
    what was done, and notes.

    A signature that calls one of the object's functions calls its new version
    (one copy of its graph, not two); that function's sites are reported under
    the signature's path, as a signature's own. A function no signature
    reaches is reported under its attribute path."""
    with naming(path):
        return _rewrite_savedmodel(path, hook, trust_code)


def _rewrite_savedmodel(path: Path, hook: _Sites, trust_code: bool) -> tuple[Any, Rewritten, list[str]]:
    notes: list[str] = []
    loaded, sigs = load_signatures(path, trust_code, notes)
    if hook.signature is not None and hook.signature not in sigs:
        raise UserError(
            f"--signature '{hook.signature}' is not in '{path}'; it has: {', '.join(sorted(sigs))}"
        )
    functions = _functions(loaded)
    variables = graph.variables_by_handle(
        [c for *_, f in functions for c in f.concrete_functions] + list(sigs.values())
    )
    direct: dict[str, str] = {}  # function name -> the first signature that calls it
    reached: set[str] = set()  # every function a signature's graph calls, at any depth
    for name, fn in sorted(sigs.items()):
        reached.update(graph.signature_library(fn))
        for op in fn.graph.get_operations():
            if op.type in graph.CALL_OPS:
                direct.setdefault(op.get_attr("f").name, name)

    def before_trace(old: Any, where: str) -> str:
        name = graph.function_name(old)
        sig = direct.get(name)
        hook.current, hook.record = (sig, True) if sig else (None, name not in reached)
        return f"{sig}/{graph.short_function_name(name)}" if sig else where

    edits, carried, replacements, held = [], [], {}, []
    for where, parent, attribute, fn in functions:
        concretes = list(fn.concrete_functions)
        if not concretes:
            notes.append(
                f"function '{where}' kept as it was: it was saved without a traced input signature, so it "
                "holds no graph (and cannot be called after loading, here or in the original)"
            )
            continue
        new_fn, traced = graph.rewrite_function(
            concretes, lambda old, where=where: before_trace(old, where), variables, hook,
            graph.python_signature(fn),
        )
        for old in concretes:
            name = graph.function_name(old)
            if _specs_of(traced[name]) != _specs_of(old):
                raise InvariantError(f"function '{where}' changed its input/output specs")
            if name in direct:
                replacements[name] = graph.call_replacement(old, traced[name])
        # One traced signature: the concrete function itself, which saving
        # writes as it is (a tf.function would be traced again by the save,
        # running the hook after the report was made).
        edits.append((parent, attribute, next(iter(traced.values())) if len(traced) == 1 else new_fn))
        held.extend(traced.values())
        carried.append(where)
    concretes: dict[str, Any] = {}
    for name, fn in sorted(sigs.items()):
        hook.current, hook.record = name, True
        # The concrete function, not the tf.function: saving must not retrace
        # the interpreter (it would run the hook again).
        _, concrete = graph.rewrite_signature(fn, name, variables, hook, replacements)
        if _specs_of(concrete) != _specs_of(fn):
            raise InvariantError(f"signature '{name}' changed its input/output specs")
        concretes[name] = concrete
    for parent, attribute, new_fn in edits:
        setattr(parent, attribute, new_fn)
    hook.frozen = True
    if hook.in_control_flow:
        notes.append(
            f"{hook.in_control_flow} site(s) inside tf.cond/tf.while_loop use the same gradient written "
            "with stop_gradient: TF cannot reload a custom gradient there"
        )
    return loaded, Rewritten(concretes, list(variables.values()), carried, held), notes


def inspect_savedmodel(
    path: Path, sources: Iterable[str] = ("relu",), to: Any = "square", trust_code: bool = False
) -> Report:
    """Every activation op of every signature and function (nested functions and
    control flow included), named as :func:`rewrite_savedmodel` names them."""
    target = registry.get_target(to)
    recorder = _Sites(None, None, frozenset(sources), None)
    rewrite_savedmodel(path, recorder, trust_code)  # tracing the re-emission is the walk; nothing is kept
    for s in recorder.sites:
        s.replaceable = decide(s, target, frozenset(sources)) is None
    return Report(sites=recorder.sites, source=str(path))


def convert_savedmodel(
    path: Path,
    to: Any = "square",
    grad: Any = "exact",
    *,
    sources: Iterable[str] = ("relu",),
    signature: str | None = None,
    trust_code: bool = False,
) -> tuple[Any, Report]:
    """The loaded SavedModel with its functions and signatures replaced by ones
    equal to them with the activations replaced; the same object graph."""
    target = registry.get_target(to)
    hook = _Sites(target, grad, frozenset(sources), signature)
    loaded, done, notes = rewrite_savedmodel(path, hook, trust_code)
    REWRITTEN[loaded] = done
    if done.functions:
        notes.insert(0, f"carried over with the same replacements: {', '.join(done.functions)}")
    notes += precision_notes(hook.low_precision, target.name)
    return loaded, Report(
        sites=hook.sites, target=target.name, grad=grad if isinstance(grad, str) else "custom",
        notes=notes, source=str(path),
    )


def signatures_of(obj: Any) -> dict[str, Any]:
    """The signatures of a converted SavedModel (its new ones: the loaded
    object's ``signatures`` still name the old) or of a loaded one."""
    done = REWRITTEN.get(obj) if _weakrefable(obj) else None
    return dict(done.signatures) if done is not None else dict(getattr(obj, "signatures", {}) or {})


def _weakrefable(obj: Any) -> bool:
    try:
        weakref.ref(obj)
    except TypeError:
        return False
    return True


def _variables_nbytes(variables: list[Any]) -> int:
    return sum(int(v.shape.num_elements() or 0) * v.dtype.size for v in variables)


def save_savedmodel(
    module: Any,
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    check: Callable[[Path], None] | None = None,
) -> Path:
    """Write a converted module as a SavedModel directory, atomically.

    ``check(tmp_dir)`` runs on the complete temporary directory before it is
    moved into place; if it raises, nothing is written."""
    dest = check_output_dir(path, overwrite=overwrite)
    remove_stale_temps(dest)
    done = REWRITTEN[module]
    ensure_space(dest.parent, _variables_nbytes(done.variables), f"'{dest.name}'")
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(dest), suffix=".tmp", dir=dest.parent))
    old = None
    try:
        tf.saved_model.save(
            module, str(tmp / "model"), signatures=done.signatures,
            options=tf.saved_model.SaveOptions(experimental_custom_gradients=True),
        )
        if check is not None:
            check(tmp / "model")
        hold_before_rename(tmp / "model")
        if dest.exists():
            old = dest.with_name(f"{temp_prefix(dest)}x.old")
            os.replace(dest, old)
        os.replace(tmp / "model", dest)
    except Exception as e:
        if is_disk_full(e):
            raise disk_full(dest, e) from e
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return dest


def precision_notes(details: Iterable[str], target: str) -> list[str]:
    low = sorted({d for d in details if d in ("float16", "bfloat16")})
    if not low:
        return []
    return [
        f"warning: replaced sites compute in {'/'.join(low)}: {registry.float16_overflow(target)} "
        "and loses precision in bfloat16; check the outputs on real data"
    ]


__all__ = ["convert_savedmodel", "inspect_savedmodel", "load_signatures", "save_savedmodel", "signatures_of"]
