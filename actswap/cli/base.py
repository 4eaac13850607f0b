"""What every command shares: the typer app, the error and exit-code mapping,
the console, the pre-load scan, and the quiet TensorFlow import.

No logic lives in the command modules beyond argument checks that must happen
before TensorFlow is imported (so that ``--help``, ``--version`` and bad input
stay fast).

Exit codes: 0 success; 2 bad input or usage (one line on stderr, no
traceback unless ``--debug``); 1 anything else that failed.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from .. import __version__
from ..errors import ActswapError

if TYPE_CHECKING:  # pragma: no cover
    from ..scan import ScanReport

app = typer.Typer(
    name="actswap",
    help="Swap ReLU activations of trained Keras models for polynomials (x²), keeping them trainable.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_state = {"debug": False}

# The options several commands share, defined once (``debug: Debug = False``).
TrustCode = Annotated[bool, typer.Option(
    "--trust-code", help="DANGEROUS: load a file although the scan found code in it (Lambda, custom ops...).",
)]
AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"actswap {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
) -> None:
    _state["debug"] = debug


def _import_tensorflow_quietly(debug: bool) -> None:
    """Import TensorFlow with its C++ start-up banners kept off stderr.

    TF 2.21 logs oneDNN/CUDA banners through absl before its log level applies,
    and a user error must stay one line on stderr. Python-level failures still
    raise normally once stderr is restored.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    backend = os.environ.get("KERAS_BACKEND", "").strip()
    if backend and backend != "tensorflow" and "keras" not in sys.modules:
        # The commands read and write TensorFlow formats and run TensorFlow's
        # training, tf2onnx and the encrypted run; a .keras file they write
        # still loads under the user's backend.
        os.environ["KERAS_BACKEND"] = "tensorflow"
        typer.echo(f"note: the actswap command line runs Keras on TensorFlow (KERAS_BACKEND={backend} applies "
                   f"to your own code: the .keras files written here load, predict and train under {backend})",
                   err=True)
    if debug or "tensorflow" in sys.modules:
        import tensorflow  # noqa: F401
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            import tensorflow as tf

            tf.config.list_physical_devices()  # device probing logs too (cuInit)
            # TensorFlow's Python-side advice (e.g. "tf.function retracing" when a
            # command evaluates several models) is for developers, not a user's
            # terminal; errors still show.
            tf.get_logger().setLevel("ERROR")
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _run(debug: bool, body: Callable[[], int]) -> None:
    """Run a command body, mapping failures to one stderr line and an exit code."""
    debug = debug or _state["debug"]
    try:
        code = body()
    except ActswapError as e:
        if debug:
            raise
        _fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted; nothing was written", 130)
    except typer.Exit:
        raise
    except Exception as e:  # noqa: BLE001 - the last line of defence
        if debug:
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        _fail(f"unexpected failure: {type(e).__name__}: {first} (rerun with --debug for the traceback)", 1)
    else:
        if code:
            raise typer.Exit(code)


def _console() -> Console:
    # Piped output is not wrapped at 80 columns: a report is read in full.
    probe = Console()
    return probe if probe.is_terminal else Console(width=160)


def _sites_table(title: str, sites: list[dict[str, Any]], columns: list[str]) -> Table:
    table = Table(title=title, show_lines=False)
    for col in columns:
        table.add_column(col)
    for s in sites:
        row = []
        for col in columns:
            value = s.get(col, "")
            if col == "path" and s.get("also_at"):
                value = f"{value} (+{len(s['also_at'])} shared)"
            row.append("yes" if value is True else "no" if value is False else str(value))
        table.add_row(*row)
    return table


def _warn_trust_code() -> None:
    typer.echo(
        "WARNING: --trust-code: code stored in the model file (e.g. Lambda layers) WILL RUN "
        "with your permissions; use it only for files whose author you trust",
        err=True,
    )


def _warn_code_findings(report: ScanReport) -> None:
    """With --trust-code: say, loudly and one line each, which code will run."""
    from ..scan import CODE

    code = [f for f in report.errors if f.kind == CODE]
    for f in code[:5]:
        typer.echo(f"WARNING: --trust-code: '{report.path}': {f.message}; this WILL RUN", err=True)
    if len(code) > 5:
        typer.echo(f"WARNING: --trust-code: '{report.path}': and {len(code) - 5} more (actswap scan lists them)", err=True)


def _scan_first(path: Path, trust_code: bool = False, needs: str | None = None) -> ScanReport:
    """Scan before anything loads ``path`` (and before TensorFlow is imported);
    refuse (exit 2) unless --trust-code lets code findings through. ``needs``:
    a feature the command requires of the file's format (e.g. a Keras 3 model),
    refused first, with the formats that offer it."""
    from .. import scan as scanning
    from ..formats import backend_for
    from ..formats.base import require

    backend = backend_for(path)
    if needs is not None:
        require(backend, needs, path)
    report = scanning.check(path, trust_code=trust_code, backend=backend)
    if trust_code:
        _warn_code_findings(report)
    return report


def main(argv: Optional[list[str]] = None) -> None:
    """Console-script entry point; usage errors become one line and exit code 2."""
    try:
        code = app(args=argv, standalone_mode=False)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        sys.exit(130)
    except Exception as e:
        # Usage errors come from the click that typer ships (vendored in recent
        # typer), so they are recognised by shape, not by class.
        if not callable(getattr(e, "format_message", None)) or not isinstance(
            getattr(e, "exit_code", None), int
        ):
            raise
        ctx = getattr(e, "ctx", None)
        command = ctx.command_path if ctx is not None else "actswap"
        message = e.format_message().strip().rstrip(".")
        if message:  # empty when no arguments were given and help was shown
            typer.echo(f"error: {message}; see '{command} --help'", err=True)
        sys.exit(e.exit_code)
    sys.exit(code if isinstance(code, int) else 0)
