"""Converting a Keras 3 model in memory: the policy applied to the Keras engine.

Finds the sites (:mod:`actswap.sites`), decides each (:func:`actswap.policy.decide`),
and has :func:`actswap.rewrite.rewrite` rebuild the model with the target's
layers and activations. Used by the Keras backends for files and by the API
for models passed in memory.

Invariants: the input model is never modified (unless the caller hands it over
with ``consume``: a model it loaded and drops); every weight is copied
bit-identically (checked by the engine); every site is reported, with the
action taken and why.
"""

from __future__ import annotations

from typing import Any

from .. import registry, rules
from ..errors import UnsupportedModelError, UserError
from ..keras_setup import keras
from ..policy import decide
from ..report import REPLACED, SKIPPED, Report, Site
from ..rewrite import rewrite
from ..sites import attribute_sites, find_sites, subclassed_models, unlisted_sites
from ..trace import count_ops
from .base import ConvertOptions


def inspect_model(model: Any, options: ConvertOptions, *, notes: list[str], source: str | None) -> Report:
    """Every site of ``model`` and whether ``options`` would replace it, and
    ``options.he_report(model)`` when set. Modifies nothing."""
    target, chosen = options.target, options.sources
    sites = find_sites(model)
    for s in sites:
        s.replaceable = decide(s, target, chosen) is None
    if subclassed_models(model):
        # Whether a subclassed model can be rewritten soundly is only known by
        # trying (its Python code may set or call activations its config does
        # not show), so inspect runs the conversion and reports the verdict.
        try:
            convert_model(model, ConvertOptions(target=target, sources=chosen), notes=[], source=None)
        except UnsupportedModelError as e:
            notes.append(f"convert would refuse this model: {e}")
    he_data = options.he_report(model).to_dict() if options.he_report is not None else None
    return Report(sites=sites, notes=notes, source=source, he=he_data)


def convert_model(
    model: Any, options: ConvertOptions, *, notes: list[str], source: str | None, consume: bool = False
) -> tuple[Any, Report]:
    """A copy of ``model`` with the chosen sites replaced, and the report.

    ``consume=True``: the caller owns ``model`` and drops it (it loaded it from
    a file), so unchanged layers move into the result instead of being copied."""
    target, chosen, grad_mode = options.target, options.sources, options.grad
    if not isinstance(grad_mode, str):
        _check_grad_function(grad_mode)
    sites = find_sites(model)
    if options.pool not in (None, "avg"):
        raise UserError(f"--pool takes 'avg', got '{options.pool}'")
    if options.pool == "avg":
        chosen = chosen | {registry.POOL_SOURCE}
    if options.calibrate is not None:
        # Measured input ranges are what element-wise fits use; the layers rules
        # put in measure their own statistics after the rewrite.
        elementwise = [s for s in sites if s.activation not in rules.RULES]
        _calibrate_sites(model, elementwise, options.calibrate, options.margin)
    sites.extend(unlisted_sites(model, chosen))
    for s in sites:
        reason = decide(s, target, chosen)
        s.replaceable = reason is None
        s.action = REPLACED if reason is None else SKIPPED
        s.reason = reason or rules.site_reason(s, target.name)
        if reason is None and target.coefficients is not None and rules.rule_for(s.activation, target.name) is None:
            s.coefficients = target.coefficients(s)

    def make_layer(site: Site, old_node: dict[str, Any]) -> Any:
        rule = rules.rule_for(site.activation, target.name)
        if rule is not None:
            return rule.layer(site, old_node, False)
        cfg = old_node["config"]
        kwargs: dict[str, Any] = {"name": cfg["name"], "trainable": cfg.get("trainable", True)}
        if "dtype" in cfg:
            kwargs["dtype"] = cfg["dtype"]
        else:  # an op: it computed in its input's dtype, so must the layer
            kwargs["cast_inputs"] = False
        return target.layer(grad_mode, site, **kwargs)

    def make_activation(site: Site, owner: dict[str, Any]) -> Any:
        rule = rules.rule_for(site.activation, target.name)
        if rule is not None:
            if rule.activation is None:
                raise UnsupportedModelError(f"'{site.path}': {rule.name} has no activation= form")
            return rule.activation(site, owner)
        return target.activation(grad_mode, site, channels=owner.get("units") or owner.get("filters"))

    def check_subclassed(path: str, new_leaf: Any) -> None:
        _check_no_hidden_sources(path or new_leaf.name, new_leaf, target, chosen)

    new_model = rewrite(model, sites, make_layer, make_activation, check_subclassed, consume=consume)
    notes.extend(precision_warnings(model, sites, target.name))
    notes.extend(_calibrate_rule_layers(new_model, sites, options.calibrate))
    if options.calibrate is not None:
        notes.extend(_overflow_warnings(new_model, sites, options.calibrate))
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


def _calibrate_rule_layers(converted: Any, sites: list[Site], data: Any) -> list[str]:
    """Set the constants of the layers rules put in (softmax and LayerNorm
    scales) from ``data``; without data they keep their data-free defaults, and
    a note says so."""
    ruled = [s for s in sites if s.action == REPLACED and s.activation in rules.RULES
             and rules.RULES[s.activation].calibration]
    if not ruled:
        return []
    if data is None:
        return [
            f"{len(ruled)} site(s) ({', '.join(sorted({s.activation for s in ruled}))}) use data-free constants; "
            "pass --calibrate data.npz, or run `actswap recover`, which calibrates them on its training data"
        ]
    from ..calibrate import batches_of

    rules.calibrate_layers(converted, batches_of(data))
    return []


def _calibrate_sites(model: Any, sites: list[Site], data: Any, margin: float) -> None:
    from ..calibrate import calibrate

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

    from ..calibrate import calibrate

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


def precision_warnings(model: Any, sites: list[Site], target: str = "square") -> list[str]:
    """A warning when the model computes in float16/bfloat16 and a site was replaced:
    x² overflows float16 above |x| ≈ 255, long before ReLU would (a polynomial, likewise)."""
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
        f"{registry.float16_overflow(target)} and loses precision in "
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
