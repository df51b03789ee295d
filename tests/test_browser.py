"""The pages people look at, tested as people see them: the HTML report and ``nas dashboard``
opened in a real headless Chromium (Debian's ``chromium``, driven by Playwright for Python).

Skipped when Chromium or Playwright is missing, with a reason that says which and how to get it
(``apt-get install chromium``; Playwright comes with ``pip install -e ".[dev]"``), unless
``NAS_REQUIRE_BROWSER=1`` (``.ci/run`` sets it and installs both), where a missing browser fails
the run instead.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest

from nas.cli import main

CHROMIUM = os.environ.get("NAS_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
# Flags for a machine without a display or network (and running as root in CI): no sandbox, no
# GPU, and none of the background connections Chromium makes at start-up.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic", "--disable-dev-shm-usage"]


def _need_browser():
    """Skip (or, with NAS_REQUIRE_BROWSER=1, fail) saying what is missing and how to get it."""
    missing = []
    if not CHROMIUM:
        missing.append("a Chromium browser, and none is on PATH (install it: `apt-get install chromium`, "
                       "or set NAS_CHROMIUM to a Chromium binary)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("Playwright for Python, which is not installed (`pip install -e \".[dev]\"` or "
                       "`pip install playwright`; no `playwright install` needed: the system Chromium is used)")
    if missing:
        msg = "the browser tests (the HTML report and nas dashboard in headless Chromium) need " + "; and ".join(missing)
        if os.environ.get("NAS_REQUIRE_BROWSER") == "1":
            pytest.fail(msg + " (NAS_REQUIRE_BROWSER=1)")
        pytest.skip(msg)


@pytest.fixture(scope="module")
def browser():
    _need_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    (root / "space.yaml").write_text(
        "name: tiny\nstem_channels: [4, 8]\nstages:\n  - block: [conv, dsconv]\n    width: [8, 16]\n    stride: 2\n"
        "recipe: {epochs: 2}\ncompression: {quant: [fp32, int8], prune: l1, prune_ratio: [0.0, 0.5]}\n")
    db = f"sqlite:///{root}/b.db"
    assert main(["search", "--trials", "6", "--study", "s", "--storage", db, "--quiet", "--no-early-stop",
                 "--space", str(root / "space.yaml"), "--artifacts", str(root / "art"), "--sampler", "random"]) == 0
    return root, db


def _shots(tmp_path: Path) -> Path:
    """Where screenshots go: $NAS_SCREENSHOTS (kept for a person to look at), else the test's tmp."""
    folder = Path(os.environ.get("NAS_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _page(browser, errors: list[str], requests: list[str]):
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    page.on("request", lambda r: requests.append(r.url))
    return page


def test_report_draws_every_front_member_with_trial_hover_offline(browser, study, tmp_path):
    root, db = study
    out = root / "report"
    assert main(["report", "s", "--storage", db, "--out", str(out)]) == 0
    front = {t.number for t in optuna.load_study(study_name="s", storage=db).best_trials}
    errors: list[str] = []
    requests: list[str] = []
    page = _page(browser, errors, requests)
    page.route("**/*", lambda route: route.abort() if not route.request.url.startswith("file:") else route.continue_())
    page.goto((out / "report.html").as_uri())
    page.wait_for_selector(".js-plotly-plot .scatterlayer .trace .point")
    # the front plots: one subplot per pair of objectives; the study's Pareto-optimal trace in
    # each (named after the study) draws one marker per front member (counted in the SVG the
    # browser rendered)
    counts = page.evaluate("""() => {
        const plot = document.querySelectorAll('.js-plotly-plot')[0];
        const out = [];
        // each drawn trace is an SVG group bound (by d3) to its trace's calculated data
        plot.querySelectorAll('.scatterlayer .trace').forEach(g => {
            const trace = g.__data__[0].trace;
            if (trace.name === 's') {
                out.push({n: g.querySelectorAll('path.point').length, text: trace.text});
            }
        });
        return out;
    }""")
    assert len(counts) == 3  # accuracy/latency, accuracy/size, latency/size
    for c in counts:
        assert c["n"] == len(front)
        assert {int(t.split("<br>")[0].removeprefix("trial ")) for t in c["text"]} == front
    # the legend, as drawn: the study named once, every entry inside the window (not cut off)
    legend = page.evaluate("""() => Array.from(document.querySelectorAll('.js-plotly-plot')[0]
        .querySelectorAll('.legend .traces .legendtext')).map(t => {
            const r = t.getBoundingClientRect();
            return {text: t.textContent, right: r.right, left: r.left};
        })""")
    texts = [e["text"] for e in legend]
    assert texts.count("s") == 1 and not [t for t in texts if t.startswith("s:")], texts
    assert all(0 <= e["left"] and e["right"] <= 1500 for e in legend), legend
    # hover, as a person does: the mouse over a front marker shows a label naming its trial
    index = page.evaluate("""() => Array.from(document.querySelectorAll('.js-plotly-plot')[0]
        .querySelectorAll('.scatterlayer .trace')).findIndex(g => g.__data__[0].trace.name === 's')""")
    point = page.locator(".js-plotly-plot").first.locator(".scatterlayer .trace").nth(index).locator("path.point").first
    box = point.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    label = page.wait_for_selector(".hoverlayer .hovertext", timeout=5000).text_content()
    assert any(f"trial {n}" in label for n in front), label
    shot = _shots(tmp_path) / "report.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 20_000
    assert not errors, errors
    assert all(u.startswith("file:") or u.startswith("data:") for u in requests), requests  # self-contained, offline
    page.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dashboard_shows_the_study_without_script_errors(browser, study, tmp_path):
    root, db = study
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "nas.cli", "dashboard", "s", "--storage", db, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2).close()
                break
            except OSError:
                time.sleep(0.5)
        errors: list[str] = []
        requests: list[str] = []
        page = _page(browser, errors, requests)
        st = optuna.load_study(study_name="s", storage=db)
        page.goto(f"http://127.0.0.1:{port}/dashboard/studies/{st._study_id}")
        page.get_by_text("Pareto Front").first.wait_for(timeout=30_000)
        plot = page.locator(".js-plotly-plot").first
        plot.locator(".scatterlayer path.point").first.wait_for(timeout=30_000)
        complete = [t for t in st.trials if t.state == optuna.trial.TrialState.COMPLETE]
        assert plot.locator(".scatterlayer path.point").count() == len(complete)  # every trial drawn, front included
        point = plot.locator(".scatterlayer path.point").first
        box = point.bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        label = page.wait_for_selector(".hoverlayer .hovertext", timeout=5000).text_content()
        assert '"number":' in label.replace(" ", "")  # the dashboard's hover names the trial
        shot = _shots(tmp_path) / "dashboard.png"
        page.screenshot(path=str(shot))
        assert shot.stat().st_size > 10_000
        assert not errors, errors
        assert all(u.startswith(f"http://127.0.0.1:{port}/") or u.startswith("data:") for u in requests), requests
        page.close()
    finally:
        proc.terminate()  # the one process this test started
        proc.wait(timeout=20)
