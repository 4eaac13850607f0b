"""``actswap inspect``: list activation sites (and HE readiness); writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .. import registry
from .base import (
    AsJson, Debug, TrustCode, _console, _import_tensorflow_quietly, _run, _scan_first, _sites_table,
    _state, _warn_trust_code, app,
)


@app.command()
def inspect(
    model: Path = typer.Argument(
        ..., help="Model: .keras, legacy .h5, SavedModel directory or frozen .pb (detected from content)."
    ),
    to: str = typer.Option("square", "--to", help="Target used to judge 'replaceable'."),
    sources: str = typer.Option("relu", "--from", help="Source activations, comma-separated, or 'all'."),
    he: bool = typer.Option(False, "--he", help="Add the HE-readiness report: non-polynomial ops, multiplicative depth."),
    trust_code: TrustCode = False,
    as_json: AsJson = False,
    debug: Debug = False,
) -> None:
    """List every activation site in MODEL and whether it can be replaced. Writes nothing."""

    def body() -> int:
        from ..formats.base import HE  # the formats package: not on --help's path

        target = registry.get_target(to)
        chosen = registry.resolve_sources(sources)
        if trust_code:
            _warn_trust_code()
        _scan_first(model, trust_code, needs=HE if he else None)
        _import_tensorflow_quietly(debug or _state["debug"])
        from .. import api

        report = api.inspect(model, to=target, sources=chosen, trust_code=trust_code, he=he)
        data = report.to_dict()
        if as_json:
            typer.echo(json.dumps(data))
            return 0
        console = _console()
        console.print(
            _sites_table(str(model), data["sites"], ["path", "layer", "form", "activation", "replaceable"])
        )
        for note in report.notes:
            console.print(f"note: {note}")
        counts = ", ".join(f"{k}: {v}" for k, v in data["counts"].items()) or "none"
        replaceable = sum(s.replaceable for s in report.sites)
        console.print(
            f"{len(report.sites)} activation sites ({counts}); {replaceable} replaceable by {target.name}"
        )
        if report.he is not None:
            for item in report.he["non_polynomial"]:
                console.print(f"not polynomial: {item['path']}: {item['op']} ({item['why']})")
            for item in report.he["client_side"]:
                console.print(f"client-side: {item['path']}: {item['op']} ({item['why']})")
            for item in report.he["parts"]:
                cost = ("not a polynomial" if item["ct_ct"] is None
                        else f"{item['ct_ct']} ciphertext x ciphertext, {item['ct_pt']} ciphertext x plaintext")
                console.print(f"  {item['path']}: {item['part']}: {cost}")
            d = report.he["multiplicative_depth"]
            console.print(
                f"multiplicative depth {d['depth']}: {d['ct_ct']} ciphertext x ciphertext, "
                f"{d['ct_pt']} ciphertext x plaintext; "
                + ("HE-ready" if report.he["he_ready"] else "not HE-ready")
            )
        return 0

    _run(debug, body)


