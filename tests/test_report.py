from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import optuna
import pytest

from nas.cli import main


@pytest.fixture(scope="module")
def two_studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("rep")
    (root / "space.yaml").write_text(
        "name: tiny\nstem_channels: [8, 16]\nstages:\n  - block: [conv, dsconv]\n    width: [8, 16]\n    stride: 2\n"
        "recipe: {epochs: 2}\ncompression: {quant: [fp32, int8], prune: l1, prune_ratio: [0.0, 0.5]}\n")
    db = f"sqlite:///{root}/r.db"
    for name, sampler in (("a", "nsga2"), ("b", "random")):
        assert main(["search", "--trials", "4", "--study", name, "--storage", db, "--quiet", "--no-early-stop",
                     "--space", str(root / "space.yaml"), "--sampler", sampler, "--artifacts", str(root / "art")]) == 0
    return root, db


def test_report_writes_html_and_pngs_with_reference_and_layer_costs(two_studies, capsys):
    root, db = two_studies
    out = root / "report_a"
    assert main(["report", "a", "--storage", db, "--out", str(out)]) == 0
    written = capsys.readouterr().out.split()
    names = sorted(p.split("/")[-1] for p in written)
    assert names == ["front_accuracy_vs_latency_ms.png", "front_accuracy_vs_size_bytes.png",
                     "front_latency_ms_vs_size_bytes.png", "hypervolume.png", "report.html"]
    for p in written:
        data = open(p, "rb").read()
        assert len(data) > 10_000
        if p.endswith(".png"):
            assert data[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    assert "reference point" in page and '"size_bytes"' in page
    assert "no two trials were ever timed at the same moment" in page
    front = optuna.load_study(study_name="a", storage=db).best_trials
    for t in front:
        assert f"Trial {t.number}: cost per layer" in page  # per-layer params / FLOPs / bytes
    assert "classifier" in page and "Pareto-optimal trials" in page
    assert "<script" in page and 'src="http' not in page  # self-contained: plotly inlined, nothing fetched
    # numbers as people read them: sizes in bytes with separators, accuracies in %, counts as a sentence
    import re

    tables = page[page.index("Pareto-optimal trials"):]
    t = front[0]
    assert f"{int(t.values[2]):,} B" in tables and f"{100 * t.values[0]:.1f}%" in tables
    assert f"{t.values[1]:.4f} ms" in tables and not re.search(r"\d\.\d+e[+-]\d\d", tables)
    assert re.search(r"\d+ trials: \d+ complete, \d+ stopped early or rejected by a limit, \d+ failed", page)


def test_report_compares_studies_on_one_plot(two_studies, capsys):
    root, db = two_studies
    out = root / "report_ab"
    assert main(["report", "a", "b", "--storage", db, "--out", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "<h2>a</h2>" in page and "<h2>b</h2>" in page
    assert page.count("final hypervolume") == 2


def test_layer_costs_add_up_to_the_packed_file(two_studies):
    from nas.pipeline import PACKED_NAME
    from nas.report import layer_costs

    root, db = two_studies
    study = optuna.load_study(study_name="a", storage=db)
    t = next(t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE)
    layers = layer_costs(t.user_attrs["artifact_dir"])
    assert layers["params"].sum() == t.user_attrs["params"]
    assert layers["flops"].sum() == t.user_attrs["flops"]
    packed = (root / "art" / "a" / f"trial-{t.number:05d}" / PACKED_NAME).stat().st_size
    assert 0 < layers["bytes"].sum() < packed  # payload only; the header is the rest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dashboard_serves_the_study_on_localhost(two_studies):
    root, db = two_studies
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "nas.cli", "dashboard", "a", "--storage", db, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        body = None
        while time.time() < deadline and body is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as r:
                    body = json.loads(r.read())
            except OSError:
                time.sleep(0.5)
        assert body is not None, "dashboard did not answer"
        studies = {s["study_name"]: s for s in body["study_summaries"]}
        assert "a" in studies
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_dashboard_unknown_study_exit_2(two_studies, capsys):
    root, db = two_studies
    assert main(["dashboard", "ghost", "--storage", db]) == 2
    assert "study 'ghost' not found" in capsys.readouterr().err


def test_report_states_the_recorded_thread_count(tmp_path, capsys):
    (tmp_path / "s.yaml").write_text("name: s\nstem_channels: 8\nstages:\n  - block: conv\n    width: 8\n    stride: 2\n"
                                     "recipe: {epochs: 1}\n")
    db = f"sqlite:///{tmp_path}/t.db"
    assert main(["search", "--trials", "1", "--study", "t", "--storage", db, "--quiet", "--space", str(tmp_path / "s.yaml"),
                 "--latency-threads", "2", "--artifacts", str(tmp_path / "art")]) == 0
    assert main(["report", "t", "--storage", db, "--out", str(tmp_path / "r")]) == 0
    page = (tmp_path / "r" / "report.html").read_text()
    assert "batch 1, 2 threads" in page and "1 thread," not in page


def test_hypervolume_counts_costs_as_ratios():
    """A 10x smaller model adds the same hypervolume at any size (costs on a log scale), and
    nothing outside the [lower, reference] box counts."""
    from nas.pareto import hypervolume
    from nas.report import _normalize

    names, dirs = ["accuracy", "size_bytes"], ["maximize", "minimize"]
    ref, lower = {"accuracy": 0.0, "size_bytes": 1e6}, {"size_bytes": 1e2}

    def hv(points):
        vals, r = _normalize(np.array(points, dtype=float), names, dirs, ref, lower)
        return hypervolume(vals, dirs, r)

    base = hv([[0.9, 1e5]])
    assert hv([[0.9, 1e4]]) - base == pytest.approx(0.9 * 0.25)  # one decade of four
    big, small = hv([[0.9, 1e5], [0.95, 1e5]]), hv([[0.9, 1e3], [0.95, 1e3]])
    assert hv([[0.9, 1e4], [0.95, 1e5]]) - big == pytest.approx(hv([[0.9, 1e2], [0.95, 1e3]]) - small)
    assert hv([[0.9, 1e2]]) == pytest.approx(0.9)
