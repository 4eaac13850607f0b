"""Fuzz the untrusted-input path (issue 29): mutated model files and recovery data.

    python benchmarks/fuzz.py --minutes 60            # the long run (table for docs/benchmarks.md)
    python benchmarks/fuzz.py --inputs 200            # a fixed number of inputs per target

A plain, seeded mutation loop, not atheris: actswap's parsers are C libraries
(HDF5, zlib, protobuf's upb, TensorFlow's image decoders) that atheris cannot
see into without rebuilding them with coverage instrumentation, so its
guidance would only follow the thin Python layer above them; a seeded loop is
reproducible input by input (an input is named by its target, seed file and
index) and runs the same in the test suite and here.

Targets, each with a seed corpus built from the fixtures (:func:`seeds`) and
byte-level plus structural mutators (:mod:`fuzz_mutate`): the ``.keras`` zip
(bytes; a member's bytes rewritten with a valid CRC; ``config.json`` as a JSON
tree), HDF5 (``.h5`` model files, bytes and ``model_config`` trees), SavedModel
(``saved_model.pb``, ``keras_metadata.pb``, the variables index), frozen
GraphDefs, and recovery data (``.npz``, image folders, TFRecords).

Each input runs in a worker process (:mod:`fuzz_worker`), in process there:
the scan, then, for a model the scan accepts, the first stages of ``convert``
(plan, load, rewrite in memory), and for data, opening it and reading a batch.
The property, per input: success, or a refusal (an ``ActswapError`` with exit
code 2, one line, naming the file). Everything else is a finding: another
exception, the worker past the time or memory bound, a file written in the
input's folder, or the canary (a Lambda in the seeds that writes a file when
it runs) having run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TARGETS = ("keras", "h5", "savedmodel", "graphdef", "npz", "images", "tfrecord")


@dataclass
class Tally:
    """What one target's inputs came to."""

    inputs: int = 0
    ok: int = 0
    refused: int = 0
    deep: int = 0  # inputs the scan accepted that went on to load and convert
    findings: list[dict[str, Any]] = field(default_factory=list)


class Worker:
    """A ``fuzz_worker`` process: one JSON request per line in, one reply out."""

    def __init__(self, root: Path, seconds: float, memory_mb: int) -> None:
        self.root, self.seconds, self.memory = root, seconds, memory_mb * 1024 * 1024
        self.proc: subprocess.Popen[str] | None = None

    def _start(self) -> subprocess.Popen[str]:
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=os.pathsep.join(
            [str(ROOT), str(HERE)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "fuzz_worker.py"), str(self.root)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, bufsize=1,
        )
        ready = proc.stdout.readline()  # type: ignore[union-attr]
        if json.loads(ready or "{}").get("ready") is not True:
            raise RuntimeError("the fuzz worker did not start")
        return proc

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        """The worker's reply, or a finding if it died, hung or grew past the bound."""
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        proc = self.proc
        proc.stdin.write(json.dumps(request) + "\n")  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]
        deadline = time.monotonic() + self.seconds
        import select

        while True:
            ready, _, _ = select.select([proc.stdout], [], [], 0.05)
            if ready:
                line = proc.stdout.readline()  # type: ignore[union-attr]
                if line:
                    return json.loads(line)
                return self._lost(f"the worker died (exit {proc.wait()})")
            rss = _rss(proc.pid)
            if rss is not None and rss > self.memory:
                return self._lost(f"memory past the bound ({rss / 2**20:.0f} MB > {self.memory / 2**20:.0f} MB)")
            if time.monotonic() > deadline:
                return self._lost(f"no answer within {self.seconds:g} s (a hang)")

    def _lost(self, why: str) -> dict[str, Any]:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        return {"outcome": "finding", "kind": "worker", "detail": why}

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()  # type: ignore[union-attr]
            self.proc.wait(timeout=60)


def _rss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run(
    *, inputs: int | None = None, minutes: float | None = None, targets: tuple[str, ...] = TARGETS,
    seed: int = 0, deep_cap: int | None = None, deep_every: int = 1, seconds: float = 60.0,
    memory_mb: int = 6000, workers: int = 1, keep: Path | None = None, progress: bool = False,
) -> dict[str, Tally]:
    """Fuzz ``targets`` round-robin: ``inputs`` per target, or until ``minutes``
    have passed, on ``workers`` worker processes. An input the scan accepts
    goes on to load and convert if its index is a multiple of ``deep_every``
    and its target has had fewer than ``deep_cap`` such inputs (None: no cap).
    Findings' inputs are copied to ``keep``. With one worker the run is the
    same, input for input, every time."""
    import threading

    root = Path(tempfile.mkdtemp(prefix="actswap-fuzz-"))
    pool = [Worker(root, seconds, memory_mb) for _ in range(max(1, workers))]
    tallies = {t: Tally() for t in targets}
    stop = time.monotonic() + minutes * 60 if minutes is not None else None
    lock = threading.Lock()
    counter = iter(range(10**12))
    failure: list[BaseException] = []

    def next_index() -> int | None:
        with lock:
            index = next(counter)
        if (inputs is not None and index >= inputs) or (stop is not None and time.monotonic() > stop) or failure:
            return None
        return index

    def one(worker: Worker, target: str, index: int) -> None:
        tally = tallies[target]
        with lock:
            deep = index % deep_every == 0 and (deep_cap is None or tally.deep < deep_cap)
        reply = worker.ask({"op": "fuzz", "target": target, "seed": seed, "index": index, "deep": deep})
        outcome = reply.get("outcome")
        if outcome == "harness-error":
            raise RuntimeError(f"{target} #{index}: {reply['detail']}")
        with lock:
            tally.inputs += 1
            if outcome == "ok":
                tally.ok += 1
            elif outcome == "refused":
                tally.refused += 1
            else:
                reply.update(target=target, seed=seed, index=index)
                tally.findings.append(reply)
                if keep is not None:  # a lost worker's input is still in its folder
                    _keep(Path(reply.get("input") or root / "work" / f"{target}-{index}"),
                          keep / f"{target}-{seed}-{index}")
            if reply.get("deep"):
                tally.deep += 1

    def loop(worker: Worker) -> None:
        try:
            while (index := next_index()) is not None:
                for target in targets:
                    one(worker, target, index)
                if progress and index % 100 == 0:
                    with lock:
                        total = sum(t.inputs for t in tallies.values())
                        found = sum(len(t.findings) for t in tallies.values())
                    print(f"{total} inputs, {found} finding(s)", file=sys.stderr, flush=True)
        except BaseException as e:  # noqa: BLE001 - re-raised by the caller
            failure.append(e)

    try:
        setup = pool[0].ask({"op": "seeds"})  # built once, shared by the workers
        if setup.get("outcome") != "ok":
            raise RuntimeError(f"building the seed corpus failed: {setup}")
        threads = [threading.Thread(target=loop, args=(w,)) for w in pool]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if failure:
            raise failure[0]
    finally:
        for worker in pool:
            worker.close()
        shutil.rmtree(root, ignore_errors=True)
    return tallies


def _keep(src: Path, dst: Path) -> None:
    if not src.exists():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst, dirs_exist_ok=True)
    else:
        shutil.copy2(src, dst.with_suffix("".join(src.suffixes)))


def table(tallies: dict[str, Tally], seconds: float) -> str:
    lines = [
        "| target | inputs | refused | accepted | loaded and converted | unexpected failures | hangs / memory | canary |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, t in tallies.items():
        worker = sum(1 for f in t.findings if f.get("kind") == "worker")
        canary = sum(1 for f in t.findings if f.get("kind") == "canary")
        other = len(t.findings) - worker - canary
        lines.append(f"| {name} | {t.inputs:,} | {t.refused:,} | {t.ok:,} | {t.deep:,} | {other} | {worker} | {canary} |")
    total = sum(t.inputs for t in tallies.values())
    found = sum(len(t.findings) for t in tallies.values())
    lines.append(f"| **all** | **{total:,}** | | | | | | **{found} finding(s)** |")
    lines.append("")
    lines.append(f"{total:,} inputs in {seconds / 60:.1f} min ({total / max(seconds, 1e-9):.1f} inputs/s).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=None, help="run this long (default: --inputs)")
    ap.add_argument("--inputs", type=int, default=None, help="inputs per target (default 100 without --minutes)")
    ap.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, of {', '.join(TARGETS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seconds", type=float, default=60.0, help="time bound per input")
    ap.add_argument("--memory-mb", type=int, default=6000, help="each worker's RSS bound")
    ap.add_argument("--workers", type=int, default=1, help="worker processes (one per core)")
    ap.add_argument("--deep-every", type=int, default=1,
                    help="load and convert every k-th input the scan accepts (loading is the slow stage)")
    ap.add_argument("--keep", type=Path, default=ROOT / "build" / "fuzz-findings", help="where findings' inputs go")
    ap.add_argument("--doc", action="store_true", help="write the table into docs/benchmarks.md")
    args = ap.parse_args(argv)
    targets = tuple(t for t in args.targets.split(",") if t)
    unknown = set(targets) - set(TARGETS)
    if unknown:
        ap.error(f"unknown target(s) {sorted(unknown)}")
    inputs = args.inputs if args.inputs is not None or args.minutes is not None else 100
    start = time.monotonic()
    tallies = run(inputs=inputs, minutes=args.minutes, targets=targets, seed=args.seed, seconds=args.seconds,
                  memory_mb=args.memory_mb, workers=args.workers, deep_every=args.deep_every, keep=args.keep,
                  progress=True)
    text = table(tallies, time.monotonic() - start)
    found = [f"{name} #{f['index']} ({f.get('from')}): {f.get('kind')}: {f.get('detail')}"
             for name, t in tallies.items() for f in t.findings]
    print(text)
    for line in found[:50]:
        print(f"finding: {line}")
    if args.doc:
        from docsection import write_section

        command = "python benchmarks/fuzz.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_section("fuzz", doc_text(text, command.replace(" --doc", ""), found))
    return 1 if found else 0


def doc_text(table_text: str, command: str, found: list[str]) -> str:
    """The fuzz section of docs/benchmarks.md."""
    import platform
    import subprocess

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    lines = [
        "## Fuzzing the untrusted-input path (`benchmarks/fuzz.py`, issue 29)", "",
        f"`{command}` at commit {commit}, on {os.cpu_count()} cores ({platform.processor() or platform.machine()}). "
        "Targets: the `.keras` zip, HDF5 `.h5` files, SavedModels, frozen GraphDefs, and recovery data (`.npz`, "
        "image folders, TFRecords). Each input is a seeded mutation (bytes, zip members, JSON trees, protobuf "
        "messages) of a seed built from the fixtures; the scan runs on every model input, and the first stages of "
        "`inspect`/`convert` (load, rewrite in memory) on the accepted ones (`--deep-every`); data is opened and "
        "read batch by batch as `recover` reads it. A finding is anything but success or a one-line refusal "
        "naming the file (exit 2): another exception, a hang, memory past the bound, a file written beside the "
        "input, or the seed corpus's Lambda canary running. Targets: at least 100,000 inputs, 0 findings.", "",
        table_text, "",
    ]
    lines += [f"- finding: {line}" for line in found[:50]] or ["No findings."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
