"""The Python API: load, inspect, convert, save.

Invariants every function here keeps:

* an input model object is never modified; a path is only read;
* ``convert`` copies every weight bit-identically and keeps input/output names,
  shapes and dtypes; a replaced ``Dense(activation='relu')`` keeps an
  activation (the target), nothing is dropped;
* every activation site is reported, with the action taken and why.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Union

from . import gradients, io, registry
from .errors import InvariantError, UnsupportedModelError, UserError
from .formats import Format, detect
from .io import load, load_with_notes
from .keras_setup import keras
from .policy import decide
from .report import REPLACED, SKIPPED, Report, Site
from .rewrite import rewrite
from .sites import attribute_sites, find_sites, subclassed_models
from .trace import count_ops

ModelOrPath = Union[keras.Model, str, os.PathLike]

__all__ = ["convert", "inspect", "load", "save"]


def _resolve(model_or_path: ModelOrPath, trust_code: bool = False) -> tuple[keras.Model, list[str], str | None]:
    if isinstance(model_or_path, keras.Model):
        return model_or_path, [], None
    if isinstance(model_or_path, (str, os.PathLike)):
        # load_with_notes scans again even when the CLI's plan_convert already did:
        # the file may have changed since (it is untrusted input), and the scan
        # closest to the loader is the one that protects it. Cost: ~1.5% of a
        # ResNet50 conversion (docs/benchmarks.md).
        model, notes = load_with_notes(model_or_path, trust_code=trust_code)
        return model, notes, str(model_or_path)
    raise UnsupportedModelError(
        f"expected a keras.Model or a path to a model file, got {type(model_or_path).__name__}"
    )


def _graph_format(model_or_path: Any) -> Format | None:
    if isinstance(model_or_path, (str, os.PathLike)):
        fmt = detect(model_or_path)
        if fmt in (Format.SAVEDMODEL, Format.GRAPHDEF):
            return fmt
    return None


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
    if isinstance(converted, keras.Model):
        return io.save(converted, path, overwrite=overwrite, verify=verify, check=check, trust_code=trust_code)
    from . import savedmodel

    if hasattr(converted, "actswap_signatures"):
        def check_dir(tmp: Path) -> None:
            from .readback import read_back_savedmodel

            # Read as data first (protobuf and checkpoint): a load restores and
            # re-traces every function; it decides only what reading cannot confirm.
            if verify and not read_back_savedmodel(converted, tmp):
                _, sigs = savedmodel.load_signatures(tmp, trust_code)
                if sorted(sigs) != sorted(converted.actswap_signatures):
                    raise InvariantError(
                        f"the written SavedModel has signatures {sorted(sigs)}, "
                        f"expected {sorted(converted.actswap_signatures)}"
                    )
            if check is not None:
                check(tmp)

        return savedmodel.save_savedmodel(converted, path, overwrite=overwrite, check=check_dir)
    if type(converted).__name__ == "GraphDef":
        def check_pb(tmp: Path) -> None:
            if verify and tmp.read_bytes() != converted.SerializeToString():
                raise InvariantError("the written graph differs from the converted one")
            if check is not None:
                check(tmp)

        return savedmodel.save_graphdef(converted, path, overwrite=overwrite, check=check_pb)
    raise UserError(f"cannot save a {type(converted).__name__}; pass what actswap.convert returned")


def _pool_sites(model: Any) -> list[Site]:
    """Max-pooling layers as sites, to be swapped for average pooling."""
    from .sites import is_graph_model, iter_nodes

    found = []
    for path, obj in iter_nodes(model) if is_graph_model(model) else []:
        name = type(obj).__name__
        if name in registry.POOL_SWAPS:
            s = Site(path, name, "pooling layer", registry.POOL_SOURCE, leaf_id=id(obj), pointer=())
            s.action, s.replaceable = REPLACED, True
            s.reason = f"{name} -> {registry.POOL_SWAPS[name]} (--pool avg)"
            found.append(s)
    return found


def _average_pooling(old_node: dict[str, Any]) -> Any:
    cls = getattr(keras.layers, registry.POOL_SWAPS[old_node["class_name"]])
    keys = ("name", "pool_size", "strides", "padding", "data_format", "keepdims", "trainable", "dtype")
    return cls(**{k: v for k, v in old_node["config"].items() if k in keys})


def _calibrate_sites(model: Any, sites: list[Site], data: Any, margin: float) -> None:
    from .calibrate import calibrate

    if not margin >= 0:
        raise UserError(f"--margin must be >= 0, got {margin}")
    ranges = calibrate(model, sites, data)
    for s in sites:
        r = ranges.get(s.path)
        if r is None:
            continue
        s.input_range = r.to_dict()
        width = max(r.max - r.min, 1e-6)
        s.fit_interval = (r.min - margin * width, r.max + margin * width)


# Largest finite value per float type: where a polynomial's outputs overflow.
FLOAT_MAX = {"float16": 65504.0, "bfloat16": 3.3895314e38, "float32": 3.4028235e38}


def _overflow_warnings(converted: Any, sites: list[Site], data: Any) -> list[str]:
    """Run the *converted* model on the calibration data and estimate each
    replaced site's output range (its polynomial over the inputs it now sees,
    which the swap upstream changes); warn where a float type would overflow."""
    import numpy as np

    from .calibrate import calibrate

    after = {s.path: s for s in find_sites(converted)}
    ranges = calibrate(converted, list(after.values()), data)
    warnings = []
    for s in sites:
        if s.action != REPLACED or s.path not in ranges or s.path not in after:
            continue
        r = ranges[s.path]
        coefficients = s.coefficients or (0.0, 0.0, 1.0)  # square
        xs = np.concatenate([np.linspace(r.min, r.max, 257), [r.min, r.max]])
        peak = float(np.max(np.abs(np.polynomial.Polynomial(coefficients)(xs))))
        s.output_max = peak
        over = [name for name, limit in FLOAT_MAX.items() if peak > limit]
        if over:
            warnings.append(
                f"'{s.path}': outputs reach {peak:.3g} after the swap on the calibration data, "
                f"which overflows {', '.join(over)}"
            )
    return warnings


LOW_PRECISION = ("float16", "bfloat16")


def precision_warnings(model: Any, sites: list[Site]) -> list[str]:
    """A warning when the model computes in float16/bfloat16 and a site was replaced:
    x² overflows float16 above |x| ≈ 255, long before ReLU would."""
    if not any(s.action == REPLACED for s in sites):
        return []
    low = [
        (layer.name, layer.compute_dtype) for layer in model._flatten_layers(include_self=True)
        if getattr(layer, "compute_dtype", None) in LOW_PRECISION
    ]
    if not low:
        return []
    name, dtype = low[0]
    return [
        f"warning: the model computes in {dtype} (layer '{name}'{' and others' if len(low) > 1 else ''}): "
        "x² overflows float16 once |x| > 255 (65504 is its largest value) and loses precision in "
        "bfloat16; check the outputs on real data (--calibrate reports output_max), or convert a float32 copy"
    ]


def _check_grad_function(fn: Any) -> None:
    # The converted model is rebuilt from its config and must reload from a
    # file, so a gradient function must be findable by its registered name.
    if not callable(fn):
        raise UserError(f"grad must be 'exact', 'clip:C' or a function, got {fn!r}")
    name = keras.saving.get_registered_name(fn)
    if keras.saving.get_registered_object(name) is not fn:
        raise UserError(
            f"gradient function {getattr(fn, '__name__', fn)!r} is not registered; decorate it "
            "with @keras.saving.register_keras_serializable() so the converted model can be "
            "rebuilt and reloaded"
        )


def _check_no_hidden_sources(
    where: str, leaf: Any, target: registry.Target, chosen: frozenset[str]
) -> None:
    """Refuse a rebuilt subclassed model that still applies a selected activation.

    Such an activation is set or called by the model's Python code rather than
    its config, so no rewrite of the config can remove it, and changing the live
    object instead would be undone the next time the model is loaded.
    """
    cls = type(leaf).__name__
    fix = (
        "pass the activation through the constructor (and get_config), "
        "or rebuild the model as Functional/Sequential"
    )
    for site in attribute_sites(leaf, where):
        if decide(site, target, chosen) is None:
            raise UnsupportedModelError(
                f"subclassed model {cls}: {site.activation} at '{site.path}' is set in its "
                f"Python code, not in its config, so replacing it would not survive saving; {fix}"
            )
    op_types = [op for name in sorted(chosen) for op in registry.TF_OPS.get(name, ())]
    found = count_ops(leaf, op_types)
    if found is None:
        raise UnsupportedModelError(
            f"subclassed model {cls} at '{where}' cannot be traced to check its call() for "
            f"hidden activations; {fix}"
        )
    if found:
        raise UnsupportedModelError(
            f"subclassed model {cls} at '{where}': its call() still computes {found} "
            f"{'/'.join(op_types)} op(s) in Python code (e.g. keras.ops.relu), which actswap "
            f"cannot rewrite; {fix}"
        )


def inspect(
    model_or_path: ModelOrPath,
    *,
    to: str = "square",
    sources: Iterable[str] = ("relu",),
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
    to = registry.get_target(to, degree=degree, interval=interval)
    graph_fmt = _graph_format(model_or_path)
    if graph_fmt is Format.SAVEDMODEL:
        from .savedmodel import inspect_savedmodel

        return inspect_savedmodel(Path(model_or_path), sources, to, trust_code)
    if graph_fmt is Format.GRAPHDEF:
        from .savedmodel import inspect_graphdef

        return inspect_graphdef(Path(model_or_path), sources, to, trust_code)
    model, notes, source = _resolve(model_or_path, trust_code)
    target = registry.get_target(to)
    chosen = frozenset(sources)
    sites = find_sites(model)
    for s in sites:
        s.replaceable = decide(s, target, chosen) is None
    if subclassed_models(model):
        # Whether a subclassed model can be rewritten soundly is only known by
        # trying (its Python code may set or call activations its config does
        # not show), so inspect runs the conversion and reports the verdict.
        try:
            convert(model, to=to, sources=chosen)
        except UnsupportedModelError as e:
            notes.append(f"convert would refuse this model: {e}")
    he_data = None
    if he:
        from .he import he_report

        he_data = he_report(model).to_dict()
    return Report(sites=sites, notes=notes, source=source, he=he_data)


def convert(
    model_or_path: ModelOrPath,
    to: str = "square",
    grad: Any = "exact",
    *,
    sources: Iterable[str] = ("relu",),
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
    family are reported as skipped with a reason).

    The input is never modified; weights are copied bit-identically (checked);
    input/output names, shapes and dtypes are unchanged (checked).

    A subclassed model is rewritten through its config (constructor arguments
    such as ``activation='relu'``), which is what rebuilds it on load; if its
    Python code still sets or calls a ReLU afterwards (a hard-coded layer
    argument, ``keras.ops.relu`` in ``call()``), the conversion is refused with
    :class:`~actswap.errors.UnsupportedModelError` naming the place, because a
    change made there would not survive saving.

    Paths to a SavedModel directory or a frozen GraphDef are rewritten at graph
    level (see :mod:`actswap.savedmodel`); the result is a ``tf.Module`` or a
    ``GraphDef``, which :func:`save` writes in the same family.
    ``signature`` restricts a SavedModel rewrite to one signature.
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
    grad_mode = gradients.normalize(grad) if isinstance(grad, str) else grad
    to = registry.get_target(
        to, degree=degree, interval=interval, trainable=trainable, per_channel=per_channel
    )
    graph_fmt = _graph_format(model_or_path)
    if graph_fmt is Format.SAVEDMODEL:
        from .savedmodel import convert_savedmodel

        return convert_savedmodel(
            Path(model_or_path), to, grad_mode, sources=sources, signature=signature, trust_code=trust_code
        )
    if graph_fmt is Format.GRAPHDEF:
        from .savedmodel import convert_graphdef

        return convert_graphdef(Path(model_or_path), to, sources=sources, trust_code=trust_code)
    if signature is not None:
        raise UserError("--signature applies to SavedModel input only")
    model, notes, source = _resolve(model_or_path, trust_code)
    target = registry.get_target(to)
    if not isinstance(grad_mode, str):
        _check_grad_function(grad_mode)
    chosen = frozenset(sources)
    sites = find_sites(model)
    if pool not in (None, "avg"):
        raise UserError(f"--pool takes 'avg', got '{pool}'")
    if calibrate is not None:
        _calibrate_sites(model, sites, calibrate, margin)
    for s in sites:
        reason = decide(s, target, chosen)
        s.replaceable = reason is None
        s.action = REPLACED if reason is None else SKIPPED
        s.reason = reason or f"{s.activation} -> {target.name}"
        if reason is None and target.coefficients is not None:
            s.coefficients = target.coefficients(s)
    if pool == "avg":
        sites.extend(_pool_sites(model))

    def make_layer(site: Site, old_node: dict[str, Any]) -> Any:
        cfg = old_node["config"]
        if site.activation == registry.POOL_SOURCE:
            return _average_pooling(old_node)
        kwargs: dict[str, Any] = {"name": cfg["name"], "trainable": cfg.get("trainable", True)}
        if "dtype" in cfg:
            kwargs["dtype"] = cfg["dtype"]
        else:  # an op: it computed in its input's dtype, so must the layer
            kwargs["cast_inputs"] = False
        return target.layer(grad_mode, site, **kwargs)

    def make_activation(site: Site, owner: dict[str, Any]) -> Any:
        return target.activation(grad_mode, site, channels=owner.get("units") or owner.get("filters"))

    def check_subclassed(path: str, new_leaf: Any) -> None:
        _check_no_hidden_sources(path or new_leaf.name, new_leaf, target, chosen)

    # A model loaded here from a path is ours alone: its unchanged layers can
    # move into the result rather than be rebuilt with copied weights.
    new_model = rewrite(model, sites, make_layer, make_activation, check_subclassed, consume=source is not None)
    notes.extend(precision_warnings(model, sites))
    if calibrate is not None:
        notes.extend(_overflow_warnings(new_model, sites, calibrate))
    if getattr(model, "compiled", False):
        if not getattr(new_model, "compiled", False):
            try:
                new_model.compile_from_config(model.get_compile_config())
            except Exception as e:  # noqa: BLE001 - reported, not fatal
                notes.append(f"could not restore the training configuration ({e}); compile before fit")
        notes.append("optimizer state (e.g. Adam moments) is not carried over; it starts fresh")
    report = Report(
        sites=sites,
        target=target.name,
        grad=grad_mode if isinstance(grad_mode, str) else getattr(grad_mode, "__name__", "custom"),
        notes=notes,
        source=source,
    )
    return new_model, report
