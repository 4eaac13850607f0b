"""Batch mode's encrypted run in a process of its own: ``python -m
actswap.he.worker JOB`` (started by :func:`run_in_worker`).

Why a process: the caller has compiled the model with Keras, so it holds
TensorFlow (~1 GB resident, which every forked helper would report again) and,
with TensorFlow imported first, TenSEAL's ``serialize`` crashes. This process
imports numpy, TenSEAL and the evaluator only; it makes the keys, encrypts,
evaluates, decrypts, and measures the public context.

Protocol: JOB is a pickle this module wrote into a private temporary folder
(never a user's file): the program, the parameters, the samples, the batch
size, the number of processes, the encryption and the backend. The worker prints ``progress DONE TOTAL``
lines on stdout and pickles its :class:`~.batch.BatchResult` to JOB + ".out".
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def run_in_worker(program: Any, params: Any, x: np.ndarray, *, batch_size: int | None, workers: int | None,
                  progress: Callable[[int, int], None] | None = None, encryption: str | None = None,
                  backend_name: str | None = None) -> Any:
    """:func:`~.batch.run_batches` in a fresh process (see the module docstring);
    its keys are made there. Raises ``RuntimeError`` with the worker's last error
    line if it fails."""
    with tempfile.TemporaryDirectory(prefix="actswap-he-") as folder:
        job = Path(folder) / "job.pkl"
        with open(job, "wb") as f:
            pickle.dump({"program": program, "params": params, "x": np.asarray(x, "float32"),
                         "batch_size": batch_size, "workers": workers, "encryption": encryption,
                         "backend_name": backend_name}, f)
        root = str(Path(__file__).resolve().parents[2])  # where the actswap package is
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
        err = Path(folder) / "stderr"
        with open(err, "wb") as stderr:
            proc = subprocess.Popen([sys.executable, "-m", "actswap.he.worker", str(job)], env=env,
                                    stdout=subprocess.PIPE, stderr=stderr, text=True)
            try:
                assert proc.stdout is not None
                for line in proc.stdout:
                    words = line.split()
                    if len(words) == 3 and words[0] == "progress" and progress is not None:
                        progress(int(words[1]), int(words[2]))
                code = proc.wait()
            finally:  # interrupted (Ctrl-C, an error in the callback): the worker goes too
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        if code != 0:
            lines = [s for s in err.read_text(errors="replace").splitlines() if s.strip()]
            raise RuntimeError(f"the encrypted batch run failed (exit {code}): "
                               f"{lines[-1] if lines else 'no message'}")
        with open(str(job) + ".out", "rb") as f:
            return pickle.load(f)


def main(path: str) -> None:
    import tenseal  # noqa: F401  - before anything else that might load protobuf

    from .batch import run_batches
    from .params import make_context

    with open(path, "rb") as f:
        job = pickle.load(f)  # written by run_in_worker, in a folder only this user reads
    params = job["params"]
    started = time.perf_counter()
    ctx = make_context(params, galois=False)
    setup = time.perf_counter() - started

    def progress(done: int, total: int) -> None:
        print(f"progress {done} {total}", flush=True)

    out = run_batches(job["program"], ctx, params, job["x"], batch_size=job["batch_size"],
                      workers=job["workers"], progress=progress, encryption=job["encryption"],
                      backend_name=job["backend_name"])
    out.setup_seconds = setup
    out.sizes["public_context"] = len(ctx.serialize(save_public_key=True, save_secret_key=False,
                                                    save_galois_keys=False, save_relin_keys=True))
    with open(path + ".out.tmp", "wb") as f:
        pickle.dump(out, f)
    os.replace(path + ".out.tmp", path + ".out")


if __name__ == "__main__":
    main(sys.argv[1])
