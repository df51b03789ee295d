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
    from nas.pareto import normalize_objectives

    names, dirs = ["accuracy", "size_bytes"], ["maximize", "minimize"]
    ref, lower = {"accuracy": 0.0, "size_bytes": 1e6}, {"size_bytes": 1e2}

    def hv(points):
        vals, r = normalize_objectives(np.array(points, dtype=float), names, dirs, ref, lower)
        return hypervolume(vals, dirs, r)

    base = hv([[0.9, 1e5]])
    assert hv([[0.9, 1e4]]) - base == pytest.approx(0.9 * 0.25)  # one decade of four
    big, small = hv([[0.9, 1e5], [0.95, 1e5]]), hv([[0.9, 1e3], [0.95, 1e3]])
    assert hv([[0.9, 1e4], [0.95, 1e5]]) - big == pytest.approx(hv([[0.9, 1e2], [0.95, 1e3]]) - small)
    assert hv([[0.9, 1e2]]) == pytest.approx(0.9)


# ----------------------------------------------------------------------------- what people read

def _legends(fig) -> list[tuple[str, object]]:
    """(text, handle) of every legend entry of a matplotlib figure, figure- and axes-level."""
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    return [(t.get_text(), h) for leg in legends for t, h in zip(leg.get_texts(), leg.legend_handles)]


def _rgba(color) -> tuple:
    from matplotlib.colors import to_rgba

    return tuple(round(float(x), 3) for x in to_rgba(color)[:3])


def _handle_color(handle) -> tuple:
    if hasattr(handle, "get_facecolor") and len(handle.get_facecolor()):
        return _rgba(handle.get_facecolor()[0])
    return _rgba(handle.get_color())


def _plotly_figures(page: str) -> list[tuple[list[dict], dict]]:
    """(traces, layout) of every plotly figure in a report page, as the browser receives them."""
    import re

    decoder = json.JSONDecoder()
    out = []
    for m in re.finditer(r'Plotly\.newPlot\(\s*"[0-9a-f-]+",\s*', page):
        traces, end = decoder.raw_decode(page, m.end())
        layout, _ = decoder.raw_decode(page, page.index("{", end))
        out.append((traces, layout))
    return out


def _naming(texts: list[str], name: str) -> list[str]:
    return [t for t in texts if t == name or t.startswith(name + ":") or t.startswith(name + " ")]


def test_report_legends_name_each_study_once_in_one_colour_everywhere(two_studies, monkeypatch, tmp_path):
    """Every plot's legend names each study once and each baseline once, and a study has one
    colour in every plot, PNG and HTML alike (the figures themselves are inspected)."""
    import matplotlib.pyplot as plt

    from nas.report import build_report, write_report

    root, db = two_studies
    rep = build_report([optuna.load_study(study_name=n, storage=db) for n in ("a", "b")])
    fake = {"name": "big.onnx", "accuracy": 0.5, "test_accuracy": 0.5, "latency_ms": 0.05, "size_bytes": 1e6,
            "timing_host": "here"}
    for st in rep.studies:  # both studies have it: still one entry
        st.baselines.append(dict(fake))
    figures = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    try:
        write_report(rep, tmp_path / "r")
    finally:
        monkeypatch.setattr(plt, "close", real_close)
    assert len(figures) == 4  # three front plots and the hypervolume plot
    colors: dict[str, set] = {"a": set(), "b": set()}
    for fig in figures:
        entries = _legends(fig)
        texts = [t for t, _ in entries]
        for name in ("a", "b"):
            assert len(_naming(texts, name)) == 1, (fig.axes[0].get_title(), texts)
            colors[name].add(_handle_color(dict(entries)[_naming(texts, name)[0]]))
        if "vs" in fig.axes[0].get_title():  # a front plot: the baseline once
            assert texts.count("baseline big.onnx") == 1, texts
        real_close(fig)
    page = (tmp_path / "r" / "report.html").read_text()
    plots = _plotly_figures(page)
    assert len(plots) == 2  # the front subplots, the hypervolume curves
    for traces, layout in plots:
        shown = [t for t in traces if t.get("showlegend", True) is not False]
        texts = [t.get("name", "") for t in shown]
        for name in ("a", "b"):
            assert len(_naming(texts, name)) == 1, texts
            entry = next(t for t in shown if t.get("name") in _naming(texts, name))
            colors[name].add(_rgba((entry.get("marker") or {}).get("color") or (entry.get("line") or {}).get("color")))
    assert texts.count("baseline big.onnx") == 0 and [t.get("name") for t in plots[0][0] if t.get("showlegend", True)
                                                     is not False].count("baseline big.onnx") == 1
    assert len(colors["a"]) == 1 and len(colors["b"]) == 1, colors  # one colour per study in all six plots
    assert colors["a"] != colors["b"]


def _table_lines(text: str) -> tuple[list[str], list[str]]:
    lines = text.splitlines()
    return [ln for ln in lines if ln.startswith("┃")], [ln for ln in lines if ln.startswith("│")]


HEADERS = {"trial", "state", "accuracy", "latency_ms", "size_bytes", "flops", "params", "test acc", "iqr ms",
           "arch", "compression", "packed val", "packed test", "deploy", "reason", "timed on"}


def test_front_table_fits_80_columns_and_never_splits_a_header_word(two_studies, capsys, monkeypatch):
    """At COLUMNS=80 every line of `nas front` (and `--all`) is at most 80 wide, the header is one
    line of whole names, each trial one line; csv keeps every column."""
    from rich.cells import cell_len

    root, db = two_studies
    monkeypatch.setenv("COLUMNS", "80")
    study = optuna.load_study(study_name="a", storage=db)
    for extra, n in (([], len(study.best_trials)), (["--all"], len(study.trials))):
        capsys.readouterr()
        assert main(["front", "a", "--storage", db, *extra]) == 0
        out = capsys.readouterr().out
        assert max(cell_len(ln) for ln in out.splitlines()) <= 80, out
        heads, rows = _table_lines(out)
        assert len(heads) == 1, out  # no header wrapped onto a second line
        cells = [c.strip() for c in heads[0].strip("┃").split("┃")]
        assert set(cells) <= HEADERS and {"trial", "accuracy", "latency_ms", "size_bytes"} <= set(cells), cells
        assert len(rows) == n and all(r.strip("│").split("│")[0].strip().isdigit() for r in rows), out
    capsys.readouterr()
    assert main(["front", "a", "--storage", db, "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines()[0].split(",") == [
        "trial", "accuracy", "latency_ms", "size_bytes", "test_accuracy", "latency_iqr_ms", "params", "flops", "arch",
        "compression"]


def test_table_cuts_long_text_with_an_ellipsis_and_never_a_number(monkeypatch):
    import pandas as pd
    from rich.cells import cell_len

    from nas.table import render

    arch = "stem16 k5 /2 | " + " | ".join(f"factorized k5 w{8 * i} x2 /2" for i in range(1, 8)) + " | gap"
    df = pd.DataFrame([{"trial": 1234, "accuracy": 0.987654, "latency_ms": 12.34567, "size_bytes": 123456789,
                        "test_accuracy": 0.5, "latency_iqr_ms": 0.001, "params": 9876543, "flops": 123456789012,
                        "arch": arch, "compression": "prune l1 0.5 | int4 | weight-only | huffman",
                        "vs big.onnx": "6.25x faster, 2,885x smaller"}])
    for columns in ("80", "100", "60"):
        monkeypatch.setenv("COLUMNS", columns)
        out = render(df, ["accuracy", "latency_ms", "size_bytes"], "table", "Pareto front of a study with a long name "
                     "that has to be wrapped between its words somewhere")
        assert max(cell_len(ln) for ln in out.splitlines()) <= int(columns), out
        heads, rows = _table_lines(out)
        assert len(heads) == 1 and len(rows) == 1, out
        # numbers whole (a column too wide is left out), the baseline's column first among the rest
        for shown in ("1234", "98.8%", "12.3457", "123,456,789"):
            assert shown in rows[0], out
        assert ("6.25x faster, 2,885x smaller" in rows[0]) == (columns != "60"), out
        assert "…" in rows[0] or "arch" not in heads[0], out
        assert "Not shown in" in out  # what was left out is named
    monkeypatch.setenv("COLUMNS", "400")
    wide = render(df, ["accuracy", "latency_ms", "size_bytes"], "table", "t")
    assert arch in wide and "…" not in wide  # room for everything: nothing cut
    for fmt in ("csv", "json", "markdown"):  # every column, in full
        text = render(df, ["accuracy", "latency_ms", "size_bytes"], fmt, "t")
        assert "factorized k5 w56 x2 /2" in text and "weight-only" in text and "123456789012" in text.replace(",", "")
