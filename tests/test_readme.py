"""The README's Python example runs as written (from the repository root)."""

from __future__ import annotations

import re
import shutil

from conftest import ROOT


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1
    (tmp_path / "fixtures").mkdir()
    shutil.copy(ROOT / "fixtures" / "mnist_cnn.keras", tmp_path / "fixtures")
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "3 1"  # the figures the README shows
    assert (tmp_path / "mnist_square_finetuned.keras").is_file()


def test_readme_commands_match_ci():
    text = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install '.[test]' && python -m pytest -q" in text
    assert "python -m pip install -q '.[test]'" in ci and "python -m pytest -q" in ci
