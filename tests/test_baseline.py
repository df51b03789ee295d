"""``--baseline``: a user's own model measured on the study's data, stored with the study and
shown on the front (tables and plots), with how much each front member beats it."""

from __future__ import annotations

import re

import optuna
import pytest
import torch
from torch import nn

from nas.baseline import BASELINES_KEY, beats
from nas.cli import main
from nas.measure import export_onnx


class BigMLP(nn.Module):
    """A deliberately heavy model for 8x8 digits (untrained: ~10% accurate, 4 MB, slow)."""

    def __init__(self, in_shape=(1, 8, 8), hidden=1024):
        super().__init__()
        n = in_shape[0] * in_shape[1] * in_shape[2]
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(n, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 10))

    def forward(self, x):
        return self.net(x)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("base")
    (root / "space.yaml").write_text(
        "name: tiny\nstem_channels: [4, 8]\nstages:\n  - block: [conv, dsconv]\n    width: [8]\n    stride: 2\n"
        "recipe: {epochs: 2}\ncompression: {quant: [fp32, int8]}\n")
    db = f"sqlite:///{root}/b.db"
    assert main(["search", "--trials", "3", "--study", "s", "--storage", db, "--quiet", "--no-early-stop",
                 "--space", str(root / "space.yaml"), "--artifacts", str(root / "art")]) == 0
    torch.manual_seed(0)
    model = BigMLP().eval()
    export_onnx(model, torch.zeros(1, 1, 8, 8), root / "big.onnx")
    return root, db, model


def _rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("│").split("│")] for line in text.splitlines() if line.startswith("│")]


def test_onnx_baseline_on_the_front_with_ratios_from_stored_figures(study, capsys):
    root, db, _ = study
    capsys.readouterr()
    assert main(["front", "s", "--storage", db, "--baseline", str(root / "big.onnx")]) == 0
    out = capsys.readouterr().out
    s = optuna.load_study(study_name="s", storage=db)
    base = s.user_attrs[BASELINES_KEY]["big.onnx"]
    assert base["size_bytes"] == (root / "big.onnx").stat().st_size
    assert 0.0 <= base["accuracy"] <= 0.3 and base["latency_ms"] > 0 and base["latency_floor_ms"] > 0
    assert re.search(r"baseline big\.onnx: \d+\.\d% val / \d+\.\d% test, \d\.\d{4} ms, [\d,]+ B .*front members? beats? it", out)
    header = next(line for line in out.splitlines() if line.startswith("┃"))
    assert "vs big.onnx" in header
    rows = _rows(out)
    cols = [c.strip() for c in header.strip("┃").split("┃")]
    beaten = 0
    for r in rows:
        t = s.trials[int(r[0])]
        cell = r[cols.index("vs big.onnx")]
        if not cell:
            assert t.values[0] < base["accuracy"] or t.values[1] > base["latency_ms"] or t.values[2] > base["size_bytes"]
            continue
        beaten += 1
        m = re.fullmatch(r"([\d.,]+)x faster, ([\d.,]+)x smaller", cell)
        assert m, cell
        lat_x, size_x = (float(g.replace(",", "")) for g in m.groups())
        for shown, want in ((size_x, base["size_bytes"] / t.values[2]), (lat_x, base["latency_ms"] / t.values[1])):
            assert shown == round(want, 2 if want < 100 else 0)  # recomputed from the stored figures
        assert t.values[0] >= base["accuracy"]
    assert beaten >= 1  # an untrained 4 MB MLP is beaten by the trained front
    # stored: a later `nas front` shows it without re-measuring
    assert main(["front", "s", "--storage", db]) == 0
    again = capsys.readouterr().out
    assert "vs big.onnx" in again and "baseline big.onnx" in again
    assert optuna.load_study(study_name="s", storage=db).user_attrs[BASELINES_KEY]["big.onnx"]["measured_at"] == base["measured_at"]


def test_report_draws_the_baseline_on_every_front_plot(study, capsys):
    root, db, _ = study
    assert main(["report", "s", "--storage", db, "--out", str(root / "rep"), "--baseline", str(root / "big.onnx")]) == 0
    page = (root / "rep" / "report.html").read_text()
    # one star per front plot (3 objectives: 3 pairs), the table column and the sentence
    assert page.count('"name":"baseline big.onnx"') == 3
    assert "vs big.onnx" in page and "baseline big.onnx:" in page


def test_pt2_baseline_is_measured_like_the_onnx_one(study, capsys):
    root, db, model = study
    program = torch.export.export(model, (torch.zeros(1, 1, 8, 8),))
    torch.export.save(program, str(root / "big.pt2"))
    assert main(["front", "s", "--storage", db, "--baseline", str(root / "big.pt2"), "--format", "json"]) == 0
    s = optuna.load_study(study_name="s", storage=db)
    rec = s.user_attrs[BASELINES_KEY]["big.pt2"]
    onnx_rec = s.user_attrs[BASELINES_KEY].get("big.onnx")
    assert rec["format"] == "pt2" and rec["size_bytes"] == (root / "big.pt2").stat().st_size
    if onnx_rec:  # the same weights: the same predictions
        assert rec["accuracy"] == onnx_rec["accuracy"] and rec["test_accuracy"] == onnx_rec["test_accuracy"]
    # as a user runs it: the exporter's log lines (missing torchvision operators) stay out of stderr
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "nas.cli", "front", "s", "--storage", db, "--baseline", str(root / "big.pt2")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stderr.strip() == "", run.stderr[-2000:]


def test_bad_baselines_are_one_line_errors_before_any_work(study, tmp_path, capsys):
    root, db, _ = study
    wrong = tmp_path / "wrong.onnx"
    export_onnx(BigMLP(in_shape=(1, 1, 40), hidden=8).eval(), torch.zeros(1, 1, 1, 40), wrong)
    (tmp_path / "model.h5").write_bytes(b"x")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    cases = [(wrong, "takes input"), (tmp_path / "model.h5", "unknown format '.h5' (allowed: .onnx, .pt2)"),
             (tmp_path / "missing.onnx", "does not exist"), (tmp_path / "junk.onnx", "is not an ONNX model")]
    for path, message in cases:
        capsys.readouterr()
        assert main(["front", "s", "--storage", db, "--baseline", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
    new_db = f"sqlite:///{tmp_path}/n.db"
    assert main(["search", "--trials", "1", "--study", "n", "--storage", new_db, "--baseline", str(wrong)]) == 2
    assert "takes input" in capsys.readouterr().err
    assert all(len(optuna.load_study(study_name=n, storage=new_db).trials) == 0
               for n in optuna.get_all_study_names(new_db))  # refused before the first trial
    assert BASELINES_KEY not in optuna.load_study(study_name="s", storage=db).user_attrs or all(
        k in ("big.onnx", "big.pt2") for k in optuna.load_study(study_name="s", storage=db).user_attrs[BASELINES_KEY])


def test_beats_needs_accuracy_and_every_cost():
    base = {"accuracy": 0.9, "latency_ms": 0.01, "size_bytes": 1000}
    objs = ["accuracy", "latency_ms", "size_bytes"]
    assert beats({"accuracy": 0.9, "latency_ms": 0.005, "size_bytes": 100}, base, objs) == {"latency_ms": 2.0, "size_bytes": 10.0}
    assert beats({"accuracy": 0.89, "latency_ms": 0.005, "size_bytes": 100}, base, objs) is None
    assert beats({"accuracy": 0.95, "latency_ms": 0.011, "size_bytes": 100}, base, objs) is None
    assert beats({"accuracy": 0.9, "latency_ms": 0.01, "size_bytes": 1000}, base, objs) is None  # equal is not better
    assert beats({"accuracy": 0.95, "size_bytes": 2000}, base, ["accuracy", "size_bytes"]) is None
    assert beats({"accuracy": 0.95, "size_bytes": 500}, base, ["accuracy", "size_bytes"]) == {"size_bytes": 2.0}
