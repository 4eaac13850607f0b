"""``actswap he-run``: run a converted model on CKKS-encrypted data (TenSEAL)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from ..errors import UserError
from .base import (
    AsJson, Debug, _console, _import_tensorflow_quietly, _run, _state, app,
)


MODES = ("batch", "latency")  # actswap.he.encrypted.MODES; importing actswap.he here would load TensorFlow


@app.command("he-run")
def he_run(
    model: Path = typer.Argument(..., help="Converted model (.keras/.h5): affine layers and polynomial activations."),
    data: Path = typer.Option(..., "--data", help="Samples: .npz with x (inputs) and, for accuracies, y (labels)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Run only the first N samples."),
    mode: Optional[str] = typer.Option(
        None, "--mode", help="batch: many samples per ciphertext (throughput); latency: one sample per "
        "ciphertext. Default: batch for more than 8 samples, or when the model is not a chain."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Batch mode: processes (default: one per core)."),
    encryption: Optional[str] = typer.Option(
        None, "--encryption", help="How the samples are encrypted (SEAL's own, same keys and parameters): "
        "public-key, or secret-key (by the data owner, who decrypts anyway: about twice as fast to encrypt "
        "and half the bytes to send). Default: public-key."),
    as_json: AsJson = False,
    debug: Debug = False,
) -> None:
    """Run MODEL on CKKS-encrypted samples (TenSEAL) and compare with plaintext."""

    def body() -> int:
        from ..formats import backend_for
        from ..formats.base import KERAS_MODEL, require
        from ..paths import read_arrays

        if mode is not None and mode not in MODES:
            raise UserError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
        if workers is not None and workers < 1:
            raise UserError(f"--workers must be at least 1, got {workers}")
        from ..he.encryption import encryption_named  # no numpy, no TensorFlow

        encryption_named(encryption)
        require(backend_for(model), KERAS_MODEL, model)
        arrays = read_arrays(data, "data")
        if "x" not in arrays:
            raise UserError(f"data '{data}' has arrays {sorted(arrays)}; it needs 'x' (inputs), and 'y' for accuracies")
        x, y = arrays["x"], arrays.get("y")
        if y is not None and len(y) != len(x):
            raise UserError(f"data '{data}': x has {len(x)} rows but y has {len(y)}")
        if limit is not None and limit < 1:
            raise UserError(f"--limit must be at least 1, got {limit}")
        try:
            # Before TensorFlow: loaded after it, TenSEAL's serialize() crashes (protobuf clash).
            import tenseal  # noqa: F401
        except ImportError:
            raise UserError("he-run needs TenSEAL: pip install 'actswap[he]'") from None
        _import_tensorflow_quietly(debug or _state["debug"])
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from ..he.encrypted import run as run_encrypted

        console = _console()
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        progress = Progress(*columns, console=Console(stderr=True), disable=as_json)
        task = progress.add_task("encrypted samples", total=min(len(x), limit or len(x)))

        def parameters_chosen(p: Any) -> None:
            # The bar starts only now: a refusal before this point stays one line on stderr.
            if not as_json:
                console.print(p.describe())
            progress.start()

        try:
            report = run_encrypted(
                model, x, y, limit=limit, mode=mode, workers=workers, encryption=encryption,
                on_parameters=parameters_chosen,
                progress=lambda done, total: progress.update(task, completed=done),
            )
        finally:
            progress.stop()
        r = report.to_dict()
        if as_json:
            typer.echo(json.dumps(r))
            return _failed(r)
        lat, size, per = r["latency_seconds"], r["ciphertext_bytes"], "batch" if r["mode"] == "batch" else "sample"
        times = r.get("stage_seconds") or {}
        table = Table(title=f"he-run {model} ({r['samples']} samples, {r['mode']} mode)")
        table.add_column("figure")
        table.add_column("value")
        table.add_row("top-1 agreement", f"{r['top1_agreement']:.4f} ({len(r['disagreements'])} differ)")
        table.add_row("max abs logit error", f"{r['max_abs_logit_error']:.3g} (relative {r['max_rel_logit_error']:.2g})")
        if r["plaintext_accuracy"] is not None:
            table.add_row("accuracy plaintext / encrypted", f"{r['plaintext_accuracy']:.4f} / {r['encrypted_accuracy']:.4f}")
        table.add_row("throughput", f"{r['throughput_per_second']:.3g} samples/s ({r['wall_seconds']:.3g} s wall, "
                      f"{r['workers']} process{'es' if r['workers'] > 1 else ''})")
        table.add_row(f"latency per {per}: encrypt / evaluate / decrypt",
                      " / ".join(f"{lat[k]['mean']:.3g} s" for k in lat))
        if r["mode"] == "batch":
            table.add_row("batches", f"{r['batches']} of up to {r['batch_size']} samples")
        table.add_row("encryption", r["encryption"])
        if "input" in size:
            table.add_row(f"ciphertexts in / out per {per}", f"{size['input']:,} / {size['output']:,} bytes")
        if "public_context" in size:
            keys = "public, relinearisation" + (" and Galois" if r["mode"] == "latency" else "")
            table.add_row(f"public context ({keys} keys)", f"{size['public_context']:,} bytes")
        rss = dict(r["peak_rss_bytes"])
        shared = rss.pop("shared", None)
        names = {"main": "encrypted run", "worker": "largest helper", "caller": "this process"}
        table.add_row("peak memory (RSS)", " / ".join(f"{names.get(k, k)} {v / 1e6:,.0f} MB" for k, v in rss.items()))
        if shared is not None:
            table.add_row("shared memory (ciphertext data, mapped by all of them)", f"{shared / 1e6:,.0f} MB")
        if times:
            table.add_row("time, all batches: encrypt / decrypt",
                          f"{times.get('encrypt', 0):.3g} s / {times.get('decrypt', 0):.3g} s")
        table.add_row("setup: keys" + (" and planning the products" if r["mode"] == "latency" else ""),
                      f"{r['setup_seconds']:.2g} s")
        console.print(table)
        console.print(f"packing: {r['packing']}")
        for i, stage in enumerate(r["stages"]):
            took = times.get(f"{i + 1}: {stage}")
            console.print(f"stage {i + 1}: {stage}" + (f" ({took:.3g} s)" if took is not None else ""))
        for note in r["notes"]:
            console.print(f"note: {note}")
        return _failed(r)

    _run(debug, body)


def _failed(r: dict[str, Any]) -> int:
    """Exit 1 with the reason when the encrypted run did not reproduce plaintext."""
    if r["failure"]:
        typer.echo(f"error: encrypted run failed: {r['failure']}", err=True)
        return 1
    return 0
