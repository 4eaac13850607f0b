"""actswap's performance budgets (issue 8): measure, compare with floors, report.

    python benchmarks/run.py            # full run (~15 min on 2 cores), writes docs/benchmarks.md
    python benchmarks/run.py --quick    # smoke version: tiny models, 1 repeat, writes nothing

Every measure is compared with a *floor* measured in the same run, because the
machines are shared and absolute times are noise: floor and subject runs
alternate (floor first in even rounds, subject first in odd ones), so a load
change hits both. Each row shows the median of the runs and their min-max,
the floor's, the ratio (the median of the per-round subject/floor ratios:
each round's pair ran back to back), the budget and whether it is met.

Whole-process measures run each command as a fresh child process; wall time
is measured around it and peak RSS comes from ``os.wait4`` (that child's own
rusage, not the maximum over every child). In-process measures run in a child
per task (``benchmarks/perf_tasks.py``), in the parent with ``--quick``.

The ``performance`` section of docs/benchmarks.md is written with
``benchmarks/docsection.py``: the table, the machine, the load averages, and
the notes kept in ``benchmarks/performance_notes.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TASKS = HERE / "perf_tasks.py"
NOTES = HERE / "performance_notes.md"
GROUPS = ("help", "convert", "chains", "savedmodel", "onnx", "train", "inference", "onnx-memory")
# Groups whose rows are a section of docs/benchmarks.md of their own (refreshed alone with --only).
OWN_SECTION = {"onnx-memory": "onnx-memory"}


# --- measuring ------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    # This checkout's actswap, whatever is installed; TF's C++ logging off.
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    env.pop("PYTHONPROFILEIMPORTTIME", None)
    return env


def actswap_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "actswap.cli", *args]


@dataclass
class ProcessRun:
    seconds: float
    cpu_seconds: float  # user + system time of the child
    max_rss_mb: float
    returncode: int
    stderr: str


def run_process(cmd: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> ProcessRun:
    """Run ``cmd`` to completion; wall seconds and that child's own peak RSS (os.wait4)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env or child_env(), cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # already reaped: tell Popen
        err.seek(0)
        stderr = err.read().decode(errors="replace")
        if log is not None:
            out.seek(0)
            log.write_bytes(out.read() + b"\n--- stderr ---\n" + stderr.encode())
    # ru_maxrss is in kilobytes on Linux.
    return ProcessRun(seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, proc.returncode, stderr)


def check(run: ProcessRun, what: str) -> ProcessRun:
    if run.returncode != 0:
        tail = "\n".join(run.stderr.strip().splitlines()[-15:])
        raise SystemExit(f"benchmark step failed ({what}, exit {run.returncode}):\n{tail}")
    return run


def run_task(name: str, args: dict[str, Any], isolate: bool) -> dict[str, Any]:
    """A task of perf_tasks.py: in a fresh child process (``isolate``), else here."""
    if not isolate:
        sys.path.insert(0, str(HERE))
        import perf_tasks

        return perf_tasks.TASKS[name](**args)
    proc = subprocess.run(
        [sys.executable, str(TASKS), name, json.dumps(args)],
        capture_output=True, text=True, env=child_env(), cwd=ROOT,
    )
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise SystemExit(f"benchmark task '{name}' failed (exit {proc.returncode}):\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- rows ---------------------------------------------------------------------------


@dataclass
class Row:
    measure: str
    floor_name: str
    unit: str  # "s", "ms", "MB", "ms/layer"
    subject: list[float]
    floor: list[float]
    budget: str
    kind: str  # "ratio": ratio <= limit; "diff": median difference <= limit; "max": median <= limit;
    # "report": no budget
    limit: float | None = None
    load: float = 0.0
    extra_ok: bool = True  # a condition besides the number (e.g. TF not imported)
    note: str = ""
    scale: float = 1.0  # display factor for the unit (1000 for ms)
    # CPU seconds of the same runs, where measured: less sensitive to other
    # processes than wall time, shown beside it (the budget is on wall time).
    subject_cpu: list[float] = field(default_factory=list)
    floor_cpu: list[float] = field(default_factory=list)

    @property
    def cpu_ratio(self) -> float | None:
        pairs = [s / f for s, f in zip(self.subject_cpu, self.floor_cpu) if f > 0]
        return statistics.median(pairs) if pairs else None

    @property
    def ratio(self) -> float:
        pairs = [s / f for s, f in zip(self.subject, self.floor) if f > 0]
        return statistics.median(pairs) if pairs else float("nan")

    @property
    def ratio_of_medians(self) -> float:
        return statistics.median(self.subject) / statistics.median(self.floor)

    @property
    def diff(self) -> float:
        return statistics.median([s - f for s, f in zip(self.subject, self.floor)])

    @property
    def ok(self) -> bool | None:
        if self.kind == "report":
            return None
        value = {"ratio": lambda: self.ratio, "diff": lambda: self.diff,
                 "max": lambda: statistics.median(self.subject)}[self.kind]()
        return bool(value <= self.limit) and self.extra_ok  # type: ignore[operator]


def _num(v: float, scale: float) -> str:
    v *= scale
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    if abs(v) >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def _stats(values: list[float], scale: float) -> tuple[str, str]:
    return _num(statistics.median(values), scale), f"{_num(min(values), scale)}–{_num(max(values), scale)}"


def table(rows: list[Row]) -> str:
    head = (
        "| measure | floor (same run) | n | median | min–max | floor median | floor min–max "
        "| ratio | budget | result | CPU-time ratio | load |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        med, rng = _stats(r.subject, r.scale)
        fmed, frng = _stats(r.floor, r.scale) if r.floor else ("–", "–")
        if r.kind == "diff":
            ratio = f"+{_num(r.diff, r.scale)} {r.unit}"
        else:
            ratio = f"{r.ratio:.3f}" if r.floor else "–"
        result = {None: "(reported)", True: "**pass**", False: "**FAIL**"}[r.ok]
        cpu = "–" if r.cpu_ratio is None else f"{r.cpu_ratio:.3f}"
        lines.append(
            f"| {r.measure} | {r.floor_name} | {len(r.subject)} | {med} {r.unit} | {rng} | {fmed} {r.unit if r.floor else ''} "
            f"| {frng} | {ratio} | {r.budget} | {result} | {cpu} | {r.load:.1f} |"
        )
    return "\n".join(lines)


def _load() -> float:
    return os.getloadavg()[0]


def _progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {_load():.1f}] {msg}", file=sys.stderr, flush=True)


def alternate(rounds: int, floor: Any, subject: Any) -> None:
    """Call floor() and subject() ``rounds`` times each, alternating which goes first."""
    for r in range(rounds):
        for fn in (floor, subject) if r % 2 == 0 else (subject, floor):
            fn()


def bench_help(cfg: Config) -> list[Row]:
    load = _load()
    env = child_env()
    floor_cmd, subject_cmd = [sys.executable, "-c", "pass"], actswap_cmd("--help")
    # Not timed: does --help import TensorFlow? (-X importtime lists every import.)
    probe = check(run_process(actswap_cmd("--help")[:1] + ["-X", "importtime"] + subject_cmd[1:], env), "--help")
    tf_imported = any(
        line.split("|")[-1].strip().split(".")[0] == "tensorflow"
        for line in probe.stderr.splitlines() if line.startswith("import time:")
    )
    f, s = [], []
    alternate(
        cfg.repeats_fast,
        lambda: f.append(check(run_process(floor_cmd, env), "python -c pass").seconds),
        lambda: s.append(check(run_process(subject_cmd, env), "actswap --help").seconds),
    )
    return [Row(
        "`actswap --help` wall time", "`python -c pass`", "s", s, f,
        "≤ +0.2 s; TF not imported", "diff", 0.2, load, extra_ok=not tf_imported,
        note=f"TensorFlow imported by --help: {'YES' if tf_imported else 'no'}",
    )]


def _paired_processes(
    cfg: Config, floor: tuple[list[str], Path, str], subject: tuple[list[str], Path, str]
) -> tuple[list[ProcessRun], list[ProcessRun]]:
    """Run a floor process and a subject process alternately (each ``(command,
    output path, log name)``), removing the output before every run so each one
    writes it afresh; return (floor runs, subject runs)."""
    runs: dict[str, list[ProcessRun]] = {floor[2]: [], subject[2]: []}

    def one(cmd: list[str], out: Path, what: str, keep: bool) -> None:
        if out.is_dir():
            shutil.rmtree(out)
        else:
            out.unlink(missing_ok=True)
        run = check(run_process(cmd, log=cfg.work / f"{what}.log"), what)
        if keep:
            runs[what].append(run)

    if not cfg.quick:  # warm-up: page cache, .pyc files
        one(*floor, keep=False)
        one(*subject, keep=False)
    alternate(cfg.repeats, lambda: one(*floor, keep=True), lambda: one(*subject, keep=True))
    return runs[floor[2]], runs[subject[2]]


def bench_convert(cfg: Config) -> list[Row]:
    load = _load()
    w = cfg.work
    src, out_f, out_s = w / "model.keras", w / "floor_out.keras", w / "actswap_out.keras"
    floor_runs, subject_runs = _paired_processes(
        cfg,
        ([sys.executable, str(TASKS), "floor-keras", str(src), str(out_f)], out_f, "floor-keras"),
        (actswap_cmd("convert", str(src), "--to", "square", "-o", str(out_s)), out_s, "actswap-convert"),
    )
    name = cfg.model_label
    floor_name = "`load_model` + `model.save` process"
    return [
        Row(f"`actswap convert` {name} `.keras`, whole process", floor_name, "s",
            [r.seconds for r in subject_runs], [r.seconds for r in floor_runs], "≤ 1.25×", "ratio", 1.25, load,
            subject_cpu=[r.cpu_seconds for r in subject_runs], floor_cpu=[r.cpu_seconds for r in floor_runs]),
        Row("same, peak RSS", floor_name, "MB",
            [r.max_rss_mb for r in subject_runs], [r.max_rss_mb for r in floor_runs], "≤ 1.20×", "ratio", 1.20, load),
    ]


def bench_savedmodel(cfg: Config) -> list[Row]:
    load = _load()
    w = cfg.work
    src, out_f, out_s = w / "model_sm", w / "floor_out_sm", w / "actswap_out_sm"
    f, s = _paired_processes(
        cfg,
        ([sys.executable, str(TASKS), "floor-savedmodel", str(src), str(out_f)], out_f, "floor-savedmodel"),
        (actswap_cmd("convert", str(src), "--to", "square", "-o", str(out_s)), out_s, "actswap-convert-sm"),
    )
    return [Row(
        f"SavedModel rewrite ({cfg.model_label} `export()`), whole process",
        "`tf.saved_model.load` + `save` process", "s", [r.seconds for r in s], [r.seconds for r in f],
        "≤ 1.5×", "ratio", 1.5, load,
        subject_cpu=[r.cpu_seconds for r in s], floor_cpu=[r.cpu_seconds for r in f],
    )]


def bench_onnx(cfg: Config) -> list[Row]:
    load = _load()
    w = cfg.work
    f: list[dict[str, Any]] = []
    s: list[dict[str, Any]] = []

    def floor() -> None:
        args = {"model_path": str(w / "model.keras"), "out": str(w / "floor.onnx"), "actswap_export": False}
        f.append(run_task("onnx", args, cfg.isolate))

    def subject() -> None:
        args = {"model_path": str(w / "converted.keras"), "out": str(w / "converted.onnx"), "actswap_export": True}
        s.append(run_task("onnx", args, cfg.isolate))

    alternate(cfg.repeats, floor, subject)
    return [Row(
        f"ONNX export of converted {cfg.model_label} incl. parity check",
        "tf2onnx `from_function` export of the unconverted model", "s",
        [r["seconds"] for r in s], [r["seconds"] for r in f], "≤ 1.3×", "ratio", 1.3, load,
        subject_cpu=[r["cpu_seconds"] for r in s], floor_cpu=[r["cpu_seconds"] for r in f],
        note=f"parity of the last export: {s[-1].get('parity')}",
    )]


def bench_chains(cfg: Config) -> list[Row]:
    load = _load()
    sizes = cfg.chain_sizes
    result = run_task("chains", {"sizes": sizes, "rounds": cfg.repeats}, cfg.isolate)["seconds"]
    per_layer = {n: [t / n for t in result[str(n)]] for n in sizes}
    rows = []
    ref = sizes[1]
    for n in sizes:
        rows.append(Row(
            f"conversion time per layer, chain of {n:,} Dense+ReLU", f"per layer at {ref:,}", "ms/layer",
            per_layer[n], per_layer[ref], "" if n != sizes[-1] else f"≤ 1.5× (at {n:,} vs {ref:,})",
            "report" if n != sizes[-1] else "ratio", None if n != sizes[-1] else 1.5, load, scale=1000.0,
        ))
    return rows


def bench_train(cfg: Config) -> list[Row]:
    load = _load()
    steps = cfg.train_steps
    rounds = cfg.repeats_fast if cfg.quick else 2 * cfg.repeats_fast - 1
    result = run_task("train", {"quick": cfg.quick, "rounds": rounds, "steps": steps}, cfg.isolate)
    net = "tiny CNN" if cfg.quick else "6-conv CNN, batch 128"
    floor_name = "same network with `tf.square`, same weights"
    per = f"{steps} steps"
    rows = [
        Row(f"training step, converted {net}, `tf.function` ({per})", floor_name, "s",
            result["exact"]["subject"], result["exact"]["floor"], "≤ 1.05×", "ratio", 1.05, load),
        Row(f"training step, converted {net}, `jit_compile=True` ({per})", floor_name, "s",
            result["exact_jit"]["subject"], result["exact_jit"]["floor"], "≤ 1.05×", "ratio", 1.05, load),
        Row(f"training step, converted with `--grad clip:1` (custom gradient), `tf.function` ({per})", floor_name,
            "s", result["clip"]["subject"], result["clip"]["floor"], "(none: for reference)", "report", None, load),
    ]
    return rows


def bench_inference(cfg: Config) -> list[Row]:
    load = _load()
    w = cfg.work
    onnx_path = w / "converted.onnx"
    if not onnx_path.exists():
        run_task("onnx", {"model_path": str(w / "converted.keras"), "out": str(onnx_path), "actswap_export": True},
                 cfg.isolate)
    batch = cfg.infer_batch
    result = run_task(
        "inference", {"keras_path": str(w / "converted.keras"), "onnx_path": str(onnx_path),
                      "rounds": cfg.repeats_fast, "batch": batch}, cfg.isolate,
    )
    return [Row(
        f"inference of the exported ONNX (converted {cfg.model_label}) in onnxruntime, batch {batch}",
        "the TF model's `predict` on the same batch", "ms", result["subject"], result["floor"],
        "report the ratio", "report", None, load, scale=1000.0,
        note=f"largest |ONNX - TF| output difference: {result['max_abs_diff']:.3g}",
    )]


def bench_onnx_memory(cfg: Config) -> list[Row]:
    """Peak RSS and wall time of `actswap export` as a whole process, per model,
    against the budget 3x the weights + 1.5 GB; the floor is actswap's export
    before issue 28 (``floor-onnx-before``), which ConvNeXt-Base never passed."""
    models = run_task("setup-onnx-memory", {"workdir": str(cfg.work), "quick": cfg.quick}, cfg.isolate)
    rows = []
    for name, m in models.items():
        load = _load()
        src = m["path"]
        out_f, out_s = cfg.work / f"before-{Path(src).stem}.onnx", cfg.work / f"{Path(src).stem}.onnx"
        # Before issue 28 ConvNeXt never exported (StatefulPartitionedCall); --quick
        # (the smoke test) runs actswap's export alone.
        floor = name != "ConvNeXtBase" and not cfg.quick
        subject = (actswap_cmd("export", src, str(out_s), "--force"), out_s, f"export-{name}")
        repeats = cfg.repeats_memory
        if floor:
            f, s = _paired_processes(
                replace(cfg, repeats=repeats),
                ([sys.executable, str(TASKS), "floor-onnx-before", src, str(out_f)], out_f, f"before-{name}"),
                subject,
            )
        else:
            f, s = [], []
            for _ in range(repeats):
                s.append(check(run_process(subject[0], log=cfg.work / f"{subject[2]}.log"), subject[2]))
        budget_mb = (3 * m["weight_bytes"] + 1.5e9) / 1e6
        last = (cfg.work / f"{subject[2]}.log").read_text().split("--- stderr ---")[0].strip().splitlines()
        label = f"{name} ({m['weight_bytes'] / 1e6:.0f} MB of weights, `--to {m['to']}`)"
        floor_name = ("actswap's export before issue 28" if floor else "(not run: --quick)" if cfg.quick
                      else "(the export before issue 28 failed)")
        rows += [
            Row(f"`actswap export` {label}, whole process", floor_name, "s",
                [r.seconds for r in s], [r.seconds for r in f], "≤ 1.0×" if floor else "exports with parity",
                "ratio" if floor else "report", 1.0 if floor else None, load,
                subject_cpu=[r.cpu_seconds for r in s], floor_cpu=[r.cpu_seconds for r in f],
                note=" ".join(line for line in last if line.startswith(("parity", "wrote")))),
            Row(f"same, peak RSS (budget 3× weights + 1.5 GB = {budget_mb:.0f} MB)", floor_name, "MB",
                [r.max_rss_mb for r in s], [r.max_rss_mb for r in f], f"≤ {budget_mb:.0f} MB", "max",
                budget_mb, load),
        ]
    return rows


BENCHES = {
    "help": bench_help, "convert": bench_convert, "chains": bench_chains, "savedmodel": bench_savedmodel,
    "onnx": bench_onnx, "train": bench_train, "inference": bench_inference, "onnx-memory": bench_onnx_memory,
}


@dataclass
class Config:
    quick: bool
    work: Path
    repeats: int  # runs per row for the slow measures (>= 5 in a full run)
    repeats_fast: int  # for the cheap ones
    isolate: bool
    chain_sizes: list[int]
    train_steps: int
    infer_batch: int
    model_label: str = "ResNet50"
    setup_info: dict[str, Any] = field(default_factory=dict)
    repeats_memory: int = 2  # the ONNX-memory rows: ResNet152's export before issue 28 takes a minute, 14 GB


# --- the report ---------------------------------------------------------------------


def code_digest() -> str:
    """A digest of the code measured (actswap/ and the benchmark tasks): a run
    whose code changed while it ran measured a mix, and says so."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted((ROOT / "actswap").rglob("*.py")) + [TASKS]:
        h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def machine() -> dict[str, str]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, IndexError, ValueError):
        pass
    versions = {}
    for mod in ("tensorflow", "keras", "tf2onnx", "onnxruntime", "onnx", "numpy"):
        try:
            from importlib.metadata import version

            versions[mod] = version(mod)
        except Exception:  # noqa: BLE001
            versions[mod] = "?"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "actswap"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
        commit += " + uncommitted changes in actswap/" if dirty else ""
    except OSError:
        commit = "?"
    return {
        "cpu": f"{cpu or platform.processor()}, {os.cpu_count()} logical cores" + (f", {mem} RAM" if mem else ""),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": ", ".join(f"{k} {v}" for k, v in versions.items()),
        "commit": commit,
    }


def markdown(cfg: Config, rows: list[Row], info: dict[str, Any]) -> str:
    m = info["machine"]
    met = [r for r in rows if r.ok is not None]
    passed = sum(bool(r.ok) for r in met)
    lines = [
        "## Performance budgets (issue 8)",
        "",
        f"Command: `{info['command']}` ({info['minutes']:.1f} min, {info['date']}).",
        "",
        f"Machine: {m['cpu']}; {m['os']}; Python {m['python']}; {m['versions']}; actswap at {m['commit']} "
        f"(code digest {info['code']}"
        + (", **which changed during the run: the table measured a mix; rerun**)." if info["code_changed"]
           else ", the same at the start and the end of the run)."),
        f"The machine is shared: load average (1/5/15 min) {info['load_start']} at the start, "
        f"{info['load_end']} at the end; the `load` column is the 1-minute load average when the row started.",
        "",
        f"Model: {info['setup'].get('name')} (`weights=None`), {info['setup'].get('layers')} layers, "
        f"{info['setup'].get('params', 0):,} parameters, {info['setup'].get('file_mb', 0):.0f} MB `.keras`, "
        f"{info['setup'].get('replaced')} ReLU sites.",
        "",
        f"**{passed} of {len(met)} budgets met in this run.**",
        "",
        table(rows),
        "",
    ]
    notes = [f"- {r.measure}: {r.note}" for r in rows if r.note]
    if notes:
        lines += ["Checks made along the way:", "", *notes, ""]
    lines += [
        "How to read it: each row ran its floor and its subject alternately, "
        "floor first in even rounds and subject first in odd ones; `ratio` is the median of the per-round "
        "subject/floor ratios (each pair ran back to back, so a load change hits both), `median` and `min–max` "
        "are over that row's runs. Ratios of the medians, for comparison: "
        + "; ".join(f"{r.measure.split(',')[0]}: {r.ratio_of_medians:.3f}" for r in rows if r.kind == "ratio")
        + ".",
        "",
    ]
    if NOTES.exists():
        lines.append(NOTES.read_text().strip())
    return "\n".join(lines)


def markdown_onnx_memory(cfg: Config, rows: list[Row], info: dict[str, Any]) -> str:
    m = info["machine"]
    met = [r for r in rows if r.ok is not None]
    notes = [f"- {r.measure}: {r.note}" for r in rows if r.note]
    return "\n".join([
        "## ONNX export memory (issue 28)",
        "",
        f"Command: `{info['command']}` ({info['minutes']:.1f} min, {info['date']}); "
        f"machine: {m['cpu']}; {m['versions']}; actswap at {m['commit']}.",
        "",
        "Each export is `actswap export CONVERTED.keras OUT.onnx` as a whole process (load, export, "
        "the full checker, onnxruntime-vs-TensorFlow parity, the write), peak RSS from that process's own "
        "`wait4` rusage. The floor is actswap's export before issue 28 in the same run: tf2onnx's "
        "`from_function` with the same fix, checks and parity (`benchmarks/perf_tasks.py floor-onnx-before`). "
        "Weights: the model's variables, 4 bytes a parameter. "
        "The ResNets' parity figure is 0 on seeded random inputs because their x² softmax saturates "
        "(as the MNIST fixture's does); ConvNeXt-Base's is the float32 one.",
        "",
        f"**{sum(bool(r.ok) for r in met)} of {len(met)} budgets met in this run.**",
        "",
        table(rows),
        "",
        *(["Checks made along the way:", "", *notes, ""] if notes else []),
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke version: tiny models, 1 repeat, writes no doc")
    parser.add_argument("--repeats", type=int, help="runs per slow row (default 5; 1 with --quick)")
    parser.add_argument("--only", help=f"comma-separated groups: {', '.join(GROUPS)}")
    parser.add_argument("--workdir", type=Path, help="keep the model files here (default: a temporary directory)")
    parser.add_argument("--doc", action=argparse.BooleanOptionalAction, default=None,
                        help="write the 'performance' section of docs/benchmarks.md (default: yes unless --quick)")
    parser.add_argument("--check", action="store_true", help="exit 1 if a budget is missed")
    args = parser.parse_args(argv)

    groups = GROUPS if not args.only else tuple(g.strip() for g in args.only.split(","))
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        parser.error(f"unknown group(s) {unknown}; choose from {', '.join(GROUPS)}")
    repeats = args.repeats or (1 if args.quick else 5)
    if repeats < 1:
        parser.error("--repeats must be >= 1")
    write_doc = (not args.quick) if args.doc is None else args.doc
    own_dir = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="actswap-bench-")) if own_dir else args.workdir
    work.mkdir(parents=True, exist_ok=True)
    cfg = Config(
        quick=args.quick, work=work, repeats=repeats,
        repeats_fast=repeats if args.quick else max(repeats, 2 * repeats + 1),
        isolate=not args.quick,
        chain_sizes=[10, 20, 50] if args.quick else [100, 1000, 5000],
        train_steps=1 if args.quick else 3,
        infer_batch=2 if args.quick else 8,
        model_label="tiny CNN" if args.quick else "ResNet50",
        repeats_memory=args.repeats or (1 if args.quick else 2),
    )
    started = time.time()
    load_start = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    digest_start = code_digest()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sections: dict[str, list[Row]] = {}
    try:
        if any(g in groups for g in ("convert", "savedmodel", "onnx", "inference")):
            _progress(f"setup: writing {cfg.model_label} files in {work}")
            cfg.setup_info = run_task("setup", {"workdir": str(work), "quick": cfg.quick}, cfg.isolate)
        for g in groups:
            _progress(f"measuring: {g}")
            sections.setdefault(OWN_SECTION.get(g, "performance"), []).extend(BENCHES[g](cfg))
    finally:
        if own_dir:
            shutil.rmtree(work, ignore_errors=True)
    info = {
        "machine": machine(),
        "load_start": load_start,
        "load_end": ", ".join(f"{v:.2f}" for v in os.getloadavg()),
        "minutes": (time.time() - started) / 60,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "command": "python benchmarks/run.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
        "setup": cfg.setup_info,
        "code": digest_start,
        "code_changed": code_digest() != digest_start,
    }
    rows = [r for section in sections.values() for r in section]
    for section, section_rows in sections.items():
        text = (markdown if section == "performance" else markdown_onnx_memory)(cfg, section_rows, info)
        print(text)
        if write_doc:
            sys.path.insert(0, str(HERE))
            from docsection import write_section

            path = write_section(section, text)
            _progress(f"wrote the '{section}' section of {path}")
    missed = [r.measure for r in rows if r.ok is False]
    return 1 if (args.check and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
