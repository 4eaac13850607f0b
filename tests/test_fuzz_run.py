"""The CI-sized run of the untrusted-input fuzzer (benchmarks/fuzz.py, issue 29):
a fixed, derandomized set of mutated inputs per target (model containers and
recovery data) through actswap's scan and the first stages of convert,
inspect and recover, in a worker process. Every input must end in success or
a one-line refusal naming the file (exit 2); an unexpected exception, a hang,
memory past the bound, a file written beside the input or the seed's Lambda
running is a finding and fails this test (the finding's input is kept under
build/fuzz-findings for a reproducer). The long run is
``python benchmarks/fuzz.py --minutes M``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INPUTS = 200  # per target: 1,400 inputs, two workers, under a minute on 2 cores


def _fuzz():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("actswap_fuzz", ROOT / "benchmarks" / "fuzz.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_fuzzed_inputs_are_accepted_or_refused_in_one_line():
    fuzz = _fuzz()
    # Two workers (one per core); loading and converting every 10th input the scan
    # accepts keeps the inputs that reach each stage the same from run to run.
    tallies = fuzz.run(inputs=INPUTS, seed=0, workers=2, deep_every=10, seconds=120,
                       keep=ROOT / "build" / "fuzz-findings")
    findings = [f"{name} #{f['index']} ({f.get('from')}): {f.get('kind')}: {f.get('detail')}"
                for name, t in tallies.items() for f in t.findings]
    assert findings == [], "\n".join(findings)
    for name, t in tallies.items():
        assert t.inputs == INPUTS, name
        assert t.refused > 0, f"{name}: no input was refused; the mutators do not reach the parsers"
    # The mutators also make inputs the scan accepts, which then load and convert.
    assert sum(t.deep for t in tallies.values()) >= 50
