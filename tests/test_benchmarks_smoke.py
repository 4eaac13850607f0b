"""The performance benchmark runs: ``benchmarks/run.py --quick`` exits 0 and
prints its table. Nothing here is timed or compared with a budget (the
budgets are checked by the full run, on a quiet machine, not by tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmark_runs_and_prints_the_table(tmp_path):
    doc = ROOT / "docs" / "benchmarks.md"
    before = doc.read_bytes() if doc.exists() else None
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=900, env=env, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "| measure | floor (same run) |" in out
    for measure in (
        "`actswap --help` wall time", "`actswap convert`", "peak RSS", "conversion time per layer",
        "SavedModel rewrite", "ONNX export", "training step", "inference of the exported ONNX",
        "`actswap export` tiny CNN", "peak RSS (budget 3× weights + 1.5 GB",
    ):
        assert measure in out, measure
    assert "TensorFlow imported by --help: no" in out
    # --quick writes no doc.
    assert (doc.read_bytes() if doc.exists() else None) == before
