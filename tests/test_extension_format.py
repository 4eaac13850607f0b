"""The format extension point: a toy format registered from this module alone.

"toymlp" files are JSON: ``{"toymlp": 1, "layers": [{"activation", "kernel",
"bias"}, ...]}``, a dense network. The backend below is all a new format
needs: it claims its files, scans them as data, finds sites, lets the shared
policy decide, rewrites, saves atomically and says what the written file must
hold. ``convert`` and ``inspect`` (CLI and API) then handle it end to end,
and options the format does not offer are refused with the formats that do.

The numbers are checked against an independent forward pass written here
with numpy (x·x where ReLU was), not with anything the backend computes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import actswap
from actswap import formats, registry
from actswap.cli import app
from actswap.errors import InvariantError, UserError
from actswap.formats.base import Backend
from actswap.paths import write_atomically
from actswap.policy import decide
from actswap.report import REPLACED, SKIPPED, Report, Site

MAGIC = b'{"toymlp"'


class ToyModel(dict):
    """A converted toy network: the JSON document itself."""


class ToyBackend(Backend):
    name = "toymlp"
    description = "a toymlp JSON file"
    suffix = ".json"

    def claims(self, path: Path, container: object) -> bool:
        if not path.is_file():
            return False
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC

    def scan(self, path: Path, report) -> None:
        doc = json.loads(path.read_text())
        for i, layer in enumerate(doc.get("layers", [])):
            if not isinstance(layer.get("activation"), str):
                report.add("error", "code", f"layers[{i}]", f"layer {i}'s activation is not a name")

    def _read(self, path: Path, trust_code: bool) -> dict:
        from actswap import scan

        scan.check(path, trust_code=trust_code, backend=self)
        return json.loads(path.read_text())

    def _sites(self, doc: dict, options) -> list[Site]:
        sites = []
        for i, layer in enumerate(doc["layers"]):
            act = registry.canonical(layer["activation"])
            if act != "linear":
                site = Site(f"dense_{i}", "Dense", "activation=", act)
                site.replaceable = decide(site, options.target, options.sources) is None
                sites.append(site)
        return sites

    def inspect(self, path: Path, options) -> Report:
        return Report(sites=self._sites(self._read(path, options.trust_code), options), source=str(path))

    def convert(self, path: Path, options):
        doc = self._read(path, options.trust_code)
        sites = self._sites(doc, options)
        new = ToyModel(json.loads(json.dumps(doc)))  # a copy: the input is never modified
        for site in sites:
            reason = decide(site, options.target, options.sources)
            site.action = REPLACED if reason is None else SKIPPED
            site.reason = reason or f"{site.activation} -> {options.target.name}"
            if reason is None:
                new["layers"][int(site.path.split("_")[1])]["activation"] = options.target.name
        return new, Report(sites=sites, target=options.target.name, grad="n/a", source=str(path))

    def holds(self, converted) -> bool:
        return isinstance(converted, ToyModel)

    def save(self, converted, path, *, overwrite=False, verify=True, check=None, trust_code=True):
        self.check_output(path, path, overwrite)
        data = json.dumps(converted).encode()

        def read_back(tmp: Path) -> None:
            written = json.loads(tmp.read_text())
            if verify and written != converted:
                raise InvariantError("the written toymlp file differs from the converted one")
            if check is not None:
                check(written)

        return write_atomically(Path(path), data, read_back)

    def check_output(self, source: Path, out: Path, overwrite: bool) -> None:
        if Path(out).exists() and not overwrite:
            raise UserError(f"output '{out}' already exists; pass --force to overwrite it")

    def written_check(self, report, sources, trust_code):
        def check(written: dict) -> None:
            for s in report.sites:
                if s.action == REPLACED:
                    assert written["layers"][int(s.path.split("_")[1])]["activation"] == report.target

        return check


@pytest.fixture
def toy_format():
    backend = formats.register(ToyBackend())
    yield backend
    formats.unregister(backend)


RNG = np.random.default_rng(7)
LAYERS = [
    {"activation": "relu", "kernel": RNG.normal(size=(4, 5)).tolist(), "bias": RNG.normal(size=5).tolist()},
    {"activation": "relu6", "kernel": RNG.normal(size=(5, 3)).tolist(), "bias": RNG.normal(size=3).tolist()},
    {"activation": "linear", "kernel": RNG.normal(size=(3, 2)).tolist(), "bias": RNG.normal(size=2).tolist()},
]


def _toy_file(path: Path, layers=LAYERS) -> Path:
    path.write_text(json.dumps({"toymlp": 1, "layers": layers}))
    return path


def _forward(doc: dict, x: np.ndarray) -> np.ndarray:
    """An independent evaluator: numpy, with each activation written out by hand."""
    by_name = {
        "relu": lambda z: np.maximum(z, 0), "relu6": lambda z: np.clip(z, 0, 6),
        "square": lambda z: z * z, "linear": lambda z: z,
    }
    for layer in doc["layers"]:
        x = by_name[layer["activation"]](x @ np.array(layer["kernel"]) + np.array(layer["bias"]))
    return x


def test_toy_format_inspect_and_convert_end_to_end(toy_format, tmp_path):
    src = _toy_file(tmp_path / "net.json")
    before = src.read_bytes()
    runner = CliRunner()

    r = runner.invoke(app, ["inspect", str(src), "--json"])
    assert r.exit_code == 0, r.output
    sites = json.loads(r.stdout)["sites"]
    assert [(s["path"], s["activation"], s["replaceable"]) for s in sites] == [
        ("dense_0", "relu", True), ("dense_1", "relu6", False),
    ]

    r = runner.invoke(app, ["convert", str(src), "--to", "square", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    out = tmp_path / "net.square.json"  # the backend's default output: beside the input, same family
    assert data["output"] == str(out) and out.is_file()
    assert src.read_bytes() == before  # the input is never modified

    written = json.loads(out.read_text())
    # Structure: the ReLU became the square, the relu6 was skipped (and reported so), the rest is unchanged.
    assert [layer["activation"] for layer in written["layers"]] == ["square", "relu6", "linear"]
    assert [s["action"] for s in data["sites"]] == ["replaced", "skipped"]
    # Weights bit-identical.
    for old, new in zip(LAYERS, written["layers"]):
        assert np.array_equal(np.array(old["kernel"]), np.array(new["kernel"]))
        assert np.array_equal(np.array(old["bias"]), np.array(new["bias"]))
    # Numbers: the written network equals the original with x·x put in by hand.
    x = RNG.normal(size=(8, 4))
    h = x @ np.array(LAYERS[0]["kernel"]) + np.array(LAYERS[0]["bias"])
    h = np.clip((h * h) @ np.array(LAYERS[1]["kernel"]) + np.array(LAYERS[1]["bias"]), 0, 6)
    reference = h @ np.array(LAYERS[2]["kernel"]) + np.array(LAYERS[2]["bias"])
    np.testing.assert_allclose(_forward(written, x), reference, rtol=1e-12, atol=1e-12)

    # Round trip: the written file is read again by the same backend.
    r = runner.invoke(app, ["inspect", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert [s["activation"] for s in json.loads(r.stdout)["sites"]] == ["square", "relu6"]


def test_toy_format_through_the_python_api(toy_format, tmp_path):
    src = _toy_file(tmp_path / "net.json")
    converted, report = actswap.convert(src, to="square")
    assert isinstance(converted, ToyModel) and report.replaced == 1
    out = actswap.save(converted, tmp_path / "out.json")
    assert json.loads(out.read_text())["layers"][0]["activation"] == "square"
    assert [s.activation for s in actswap.inspect(out).sites] == ["square", "relu6"]


def test_toy_format_options_and_scan(toy_format, tmp_path):
    src = _toy_file(tmp_path / "net.json")
    runner = CliRunner()
    # An option the format does not offer: one line, exit 2, naming the formats that offer it.
    r = runner.invoke(app, ["convert", str(src), "--to", "square", "--onnx", str(tmp_path / "x.onnx")])
    assert r.exit_code == 2
    assert "supported for a Keras 3 .keras archive" in r.stderr and "toymlp" in r.stderr
    assert "Traceback" not in r.output
    # The backend's scan runs before anything reads the file, through the shared refusal.
    bad = _toy_file(tmp_path / "bad.json", [{"activation": {"py": "os.system"}, "kernel": [[1.0]], "bias": [0.0]}])
    r = runner.invoke(app, ["convert", str(bad), "--to", "square"])
    assert r.exit_code == 2 and "refusing to load" in r.stderr and "activation is not a name" in r.stderr
    assert not (tmp_path / "bad.square.json").exists()


def test_unregistered_toy_file_is_not_a_model(tmp_path):
    src = _toy_file(tmp_path / "net.json")
    r = CliRunner().invoke(app, ["inspect", str(src)])
    assert r.exit_code == 2 and "not a model file actswap can read" in r.stderr
