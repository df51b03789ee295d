"""``nas.search()``: the README's example runs as written; options are validated as the flags are."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

import nas

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readme_example_runs_as_written(in_tmp, capsys):
    code = re.search(r"```python\n# api_example.py\n(.*?)```", README.read_text(), re.S).group(1)
    (in_tmp / "api_example.py").write_text(code)
    runpy.run_path(str(in_tmp / "api_example.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "accuracy" in out and "bundles/api-demo-knee" in out
    assert (in_tmp / "bundles" / "api-demo-knee" / "manifest.json").is_file()
    result = nas.open_study("api-demo", "sqlite:///api-demo.db")
    assert len(result.trials()) == 4 and set(result.front()["trial"]) <= set(result.trials()["trial"])
    assert result.study.study_name == "api-demo"


@pytest.mark.parametrize("options,message", [
    ({"trials": 0}, "nas.search(): trials: 0 must be >= 1"),
    ({"max_size_bytes": float("inf")}, "max_size_bytes: inf must be a finite number > 0"),
    ({"sampler": "cma"}, "unknown sampler 'cma'"),
    ({"bogus": 1}, "nas.search(): unknown option 'bogus' (allowed: "),
    ({"early_stop": "yes"}, "early_stop: 'yes' is not allowed (allowed: true, false)"),
])
def test_bad_options_raise_the_clis_one_line(in_tmp, options, message):
    with pytest.raises(nas.NasError, match=re.escape(message)):
        nas.search(**options)
    assert not (in_tmp / "runs").exists()


def test_an_optional_part_that_is_missing_names_its_extra(in_tmp, capsys, monkeypatch):
    import sys

    from nas.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "ray" else object())
    assert main(["search", "--backend", "ray", "--trials", "1"]) == 2
    assert capsys.readouterr().err == "nas: error: --backend ray needs Ray Tune: pip install 'nas[ray]'\n"
    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)
    assert main(["search", "--trials", "1", "--epochs", "1", "--study", "d", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["dashboard", "d"]) == 2
    assert capsys.readouterr().err == "nas: error: nas dashboard needs optuna-dashboard: pip install 'nas[dashboard]'\n"
