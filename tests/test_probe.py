"""The latency probe (nas.probe): a server on the target device and its client, on loopback.

Every refused request (missing or wrong token, an oversized or missing body, a body that is no
ONNX model, an ONNX model with external data or a custom operator domain) gets one line and a
4xx answer, and the server keeps serving; the server imports neither torch nor Optuna."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from nas.cli import main
from nas.probe import ProbeClient, ProbeError, ProbeServer, read_token

TOKEN = "0123456789abcdef0123456789abcdef"


def _graph(path: Path, *, domain: str = "", external: bool = False) -> Path:
    """A small real model: y = relu(x @ W) on a [1, 8] input."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    w = helper.make_tensor("W", TensorProto.FLOAT, [8, 4], [0.1] * 32)
    if external:
        w.data_location = TensorProto.EXTERNAL
        w.ClearField("float_data")
        w.external_data.add(key="location", value="../../etc/passwd")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["y"], domain=domain)]
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w]), opset_imports=opsets)
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture(scope="module")
def probe():
    server = ProbeServer(("127.0.0.1", 0), TOKEN, threads=1, warmup=5, repeats=64)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _post(server: ProbeServer, body: bytes, token: str | None = TOKEN, path: str = "/v1/time",
          headers: dict[str, str] | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    h = {"Authorization": f"Bearer {token}"} if token is not None else {}
    conn.request("POST", path, body=body, headers={**h, **(headers or {})})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, json.loads(data) if data else {}


def test_times_a_model_and_names_the_device(probe, tmp_path):
    client = ProbeClient(probe.url, TOKEN)
    answer = client.time(_graph(tmp_path / "m.onnx"))
    lat = answer["latency"]
    assert lat["median_ms"] > 0 and lat["floor_ms"] > 0 and lat["repeats"] == 64 and lat["threads"] == 1
    assert answer["input_shape"] == [1, 8]
    dev = client.device()
    assert dev == answer["device"]
    assert {"latency_cpu", "latency_cores", "latency_onnxruntime", "arch", "threads"} <= set(dev)


@pytest.mark.parametrize("token", [None, "wrong-token-wrong-token-wrong-token", TOKEN[:-1], TOKEN + "x", ""])
def test_missing_or_wrong_token_is_refused(probe, tmp_path, token):
    before = probe.timed
    status, body = _post(probe, _graph(tmp_path / "m.onnx").read_bytes(), token=token)
    assert status == 401 and "token" in body["error"]
    assert probe.timed == before  # nothing was timed
    assert ProbeClient(probe.url, TOKEN).device()  # still serving


def test_refused_bodies_get_one_line_and_the_server_keeps_serving(probe, tmp_path):
    cases = [
        (b"", 400, "empty"),
        (b"\x00garbage" * 50, 422, "not an ONNX model"),
        (_graph(tmp_path / "ext.onnx", external=True).read_bytes(), 422, "external data"),
        (_graph(tmp_path / "dom.onnx", domain="evil.custom").read_bytes(), 422, "not a standard ONNX operator"),
    ]
    for body, status, needle in cases:
        got, answer = _post(probe, body)
        assert got == status and needle in answer["error"], (got, answer)
        assert "\n" not in answer["error"] and str(tmp_path) not in answer["error"]
    assert ProbeClient(probe.url, TOKEN).time(_graph(tmp_path / "ok.onnx"))["latency"]["median_ms"] > 0


def test_oversized_and_unmeasured_bodies(probe):
    conn = http.client.HTTPConnection(*probe.server_address[:2], timeout=30)
    conn.putrequest("POST", "/v1/time")
    conn.putheader("Authorization", f"Bearer {TOKEN}")
    conn.putheader("Content-Length", str(probe.max_body + 1))  # refused from the header: nothing is read
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and "at most" in json.loads(resp.read())["error"]
    conn.close()
    status, answer = _post(probe, b"x" * 10, headers={"Transfer-Encoding": "chunked"})
    assert status == 411
    status, answer = _post(probe, b"", path="/etc/passwd")
    assert status == 404


def test_a_stalled_client_does_not_hold_the_probe(probe, tmp_path, monkeypatch):
    import nas.probe

    monkeypatch.setattr(nas.probe, "READ_DEADLINE_S", 1.0)
    s = socket.create_connection(probe.server_address[:2])
    s.sendall(f"POST /v1/time HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 1000\r\n\r\nabc".encode())
    t0 = time.monotonic()
    assert ProbeClient(probe.url, TOKEN).time(_graph(tmp_path / "m.onnx"))["latency"]["median_ms"] > 0
    assert time.monotonic() - t0 < 30
    s.close()


def test_client_retries_then_fails_with_the_reason():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = ProbeClient(f"http://127.0.0.1:{port}", TOKEN, retries=2, backoff_s=0.01)
    with pytest.raises(ProbeError, match=r"did not answer after 3 tries \(.*(refused|Connection)"):
        client.device()
    with pytest.raises(ProbeError, match="expected http://HOST:PORT"):
        ProbeClient("ftp://x:1", TOKEN)


def test_client_does_not_retry_a_verdict(probe, tmp_path):
    client = ProbeClient(probe.url, TOKEN, retries=3, backoff_s=5.0)
    t0 = time.monotonic()
    with pytest.raises(ProbeError, match="refused it: 422 .*external data"):
        client.time(_graph(tmp_path / "ext.onnx", external=True))
    assert time.monotonic() - t0 < 5  # no backoff: a 4xx is the probe's answer, not an outage
    with pytest.raises(ProbeError, match="401"):
        ProbeClient(probe.url, "another-token-another-token").device()


def test_token_file_rules(tmp_path):
    (tmp_path / "t").write_text(TOKEN + "\n")
    assert read_token(tmp_path / "t") == TOKEN
    for text, needle in [("short\n", "at least 16"), ("", "at least 16"), ("has a space in it here\n", "without spaces")]:
        (tmp_path / "bad").write_text(text)
        with pytest.raises(ProbeError, match=needle):
            read_token(tmp_path / "bad")
    with pytest.raises(ProbeError, match="no such file"):
        read_token(tmp_path / "missing")


@pytest.mark.parametrize("argv,needle", [
    (["--port", "8765", "--token-file", "MISSING"], "no such file"),
    (["--port", "99999", "--token-file", "t"], "port in 1..65535"),
    (["--port", "8765", "--token-file", "t", "--threads", "100000"], "this host's cores"),
])
def test_cli_refuses_bad_serve_arguments(tmp_path, capsys, monkeypatch, argv, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t").write_text(TOKEN)
    try:
        code = main(["probe", "serve", *argv])
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and needle in err, err


def test_the_server_runs_without_torch_or_optuna(tmp_path):
    """On the device: ``python -m nas.probe serve`` imports only ONNX Runtime, onnx, numpy and
    the standard library (the module blocks torch and optuna to prove it)."""
    _graph(tmp_path / "m.onnx")
    (tmp_path / "t").write_text(TOKEN)
    code = f"""
import sys, threading
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'optuna', 'pandas', 'sklearn'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
from nas.probe import ProbeServer, ProbeClient, read_token
s = ProbeServer(('127.0.0.1', 0), read_token({str(tmp_path / 't')!r}), warmup=2, repeats=24)
threading.Thread(target=s.serve_forever, daemon=True).start()
print(ProbeClient(s.url, read_token({str(tmp_path / 't')!r})).time({str(tmp_path / 'm.onnx')!r})['latency']['median_ms'] > 0)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr[-2000:]
    help_out = subprocess.run([sys.executable, "-m", "nas.probe", "serve", "--help"], capture_output=True, text=True,
                              timeout=60)
    assert help_out.returncode == 0 and "--token-file" in help_out.stdout


# --------------------------------------------------------------------------- a search timed on a probe


def _search(db: str, tmp_path: Path, *extra: str, trials: int = 3) -> int:
    return main(["search", "--trials", str(trials), "--epochs", "1", "--study", "p", "--storage", db, "--quiet",
                 "--artifacts", str(tmp_path / "art"), *extra])


@pytest.mark.slow  # a long multi-process run: deselected by default, CI runs it (`pytest -m slow`)
def test_search_times_every_trial_on_the_probe(probe, tmp_path):
    import optuna

    (tmp_path / "t").write_text(TOKEN)
    db = f"sqlite:///{tmp_path / 'p.db'}"
    before = probe.timed
    assert _search(db, tmp_path, "--latency-on", probe.url, "--probe-token-file", str(tmp_path / "t")) == 0
    study = optuna.load_study(study_name="p", storage=db)
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 3
    for t in done:
        assert t.user_attrs["latency_device"] == probe.url
        assert t.user_attrs["latency_cpu"] == probe.identity["latency_cpu"]
        assert t.user_attrs["latency_ms"] > 0
    # pre-flight and shipped model of every trial (pruned trials stop before shipping)
    assert probe.timed - before >= 2 * len(done)
    assert "TOKEN" not in json_dump(study) and TOKEN not in json_dump(study)  # the token is never stored


def json_dump(study) -> str:
    return json.dumps([t.user_attrs for t in study.trials] + [study.user_attrs], default=str)


def test_search_refuses_an_unreachable_probe_before_storing_anything(tmp_path, capsys):
    (tmp_path / "t").write_text(TOKEN)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    code = _search(f"sqlite:///{tmp_path / 'p.db'}", tmp_path, "--latency-on", f"http://127.0.0.1:{port}",
                   "--probe-token-file", str(tmp_path / "t"))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "did not answer" in err, err
    assert time.monotonic() - t0 < 30 and not (tmp_path / "p.db").exists()
    assert _search(f"sqlite:///{tmp_path / 'p.db'}", tmp_path, "--latency-on", f"http://127.0.0.1:{port}") == 2
    assert "needs --probe-token-file" in capsys.readouterr().err


@pytest.mark.slow  # a long multi-process run: deselected by default, CI runs it (`pytest -m slow`)
def test_probe_down_mid_search_fails_trials_with_the_reason_and_resume_works(tmp_path, monkeypatch):
    """The probe stops after the first trial: the next trials wait (retries), then fail with
    the reason; the finished trial stays; a resumed search against a probe that is back
    completes new trials."""
    import optuna

    import nas.probe

    monkeypatch.setattr(nas.probe.ProbeClient.__init__, "__kwdefaults__",
                        {"timeout_s": 300.0, "retries": 1, "backoff_s": 0.05})  # one retry, a short backoff
    (tmp_path / "t").write_text(TOKEN)
    server = ProbeServer(("127.0.0.1", 0), TOKEN, warmup=2, repeats=24)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    db = f"sqlite:///{tmp_path / 'p.db'}"
    args = ("--latency-on", f"http://127.0.0.1:{port}", "--probe-token-file", str(tmp_path / "t"))

    from nas import pipeline

    real = pipeline._timed_on_probe
    calls = {"n": 0}

    def stop_after_first_trial(path, task, inputs):
        calls["n"] += 1
        if calls["n"] == 3:  # trial 0: pre-flight + shipped; then the probe goes away
            server.shutdown()
            server.server_close()
            pipeline._PROBES.clear()
        return real(path, task, inputs)

    monkeypatch.setattr(pipeline, "_timed_on_probe", stop_after_first_trial)
    assert _search(db, tmp_path, *args, trials=2) == 0
    study = optuna.load_study(study_name="p", storage=db)
    states = [t.state.name for t in study.trials]
    assert states[0] == "COMPLETE" and states[1] == "FAIL", states
    assert "did not answer" in study.trials[1].user_attrs["fail_reason"]
    monkeypatch.setattr(pipeline, "_timed_on_probe", real)
    back = ProbeServer(("127.0.0.1", port), TOKEN, warmup=2, repeats=24)  # the device is back, same address
    threading.Thread(target=back.serve_forever, daemon=True).start()
    try:
        assert _search(db, tmp_path, *args, trials=4) == 0
    finally:
        back.shutdown()
        back.server_close()
    study = optuna.load_study(study_name="p", storage=db)
    assert sum(t.state.name == "COMPLETE" for t in study.trials) >= 2 and study.trials[0].state.name == "COMPLETE"


# --------------------------------------------------------------------------- a second "device" in a network namespace


def _netns_usable() -> str | None:
    import os
    import shutil

    if shutil.which("ip") is None:
        return "no `ip` command"
    if os.geteuid() != 0:
        return "network namespaces need root"
    return None


@pytest.fixture
def netns_device(tmp_path):
    """A host of its own: a network namespace joined to this one by a veth pair (10.x.y.1 here,
    10.x.y.2 there), made for this test and removed after it, with a probe serving inside on
    the namespace's address. Only what this fixture made is stopped and removed."""
    import os

    why = _netns_usable()
    if why:
        if os.environ.get("NAS_REQUIRE_NETNS") == "1":
            pytest.fail(f"NAS_REQUIRE_NETNS=1 but {why}")
        pytest.skip(why)
    tag = f"{os.getpid() % 10000}{threading.get_ident() % 100:02d}"[-6:]
    ns, here, there = f"nas-probe-{tag}", f"np{tag}a", f"np{tag}b"
    octet = 1 + os.getpid() % 250
    net = f"10.231.{octet}"

    def ip(*a: str, check: bool = True) -> None:
        subprocess.run(["ip", *a], check=check, capture_output=True, timeout=30)

    made: list[str] = []
    proc = None
    try:
        ip("netns", "add", ns)
        made.append("ns")
        ip("link", "add", here, "type", "veth", "peer", "name", there)
        made.append("veth")
        ip("link", "set", there, "netns", ns)
        ip("addr", "add", f"{net}.1/30", "dev", here)
        ip("link", "set", here, "up")
        ip("netns", "exec", ns, "ip", "addr", "add", f"{net}.2/30", "dev", there)
        ip("netns", "exec", ns, "ip", "link", "set", there, "up")
        ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        (tmp_path / "device-token").write_text(TOKEN)
        proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "nas.probe", "serve",
                                 "--host", f"{net}.2", "--port", "8765", "--token-file", str(tmp_path / "device-token")],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        url = f"http://{net}.2:8765"
        deadline = time.monotonic() + 60
        while True:
            try:
                ProbeClient(url, TOKEN, retries=0).device()
                break
            except ProbeError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the probe in {ns} did not start: {proc.stdout.read()[-2000:]}") from None
                time.sleep(0.2)
        yield url
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()  # by its id: the probe this fixture started, nothing else
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if "veth" in made:
            ip("link", "del", here, check=False)  # removes both ends
        if "ns" in made:
            ip("netns", "del", ns, check=False)


def test_probe_on_another_host_in_a_network_namespace(netns_device, tmp_path):
    client = ProbeClient(netns_device, TOKEN)
    answer = client.time(_graph(tmp_path / "m.onnx"))
    assert answer["latency"]["median_ms"] > 0 and answer["device"]["threads"] == 1
    with pytest.raises(ProbeError, match="401"):
        ProbeClient(netns_device, "not-the-token-not-the-token").device()


# --------------------------------------------------------------------------- what an attacker or a broken network tries


class _Fake:
    """A stand-in server answering every request with ``answer(handler)``; records requests."""

    def __init__(self, answer):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        seen = self.seen = []

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _any(self):
                n = int(self.headers.get("Content-Length") or 0)
                if n:
                    self.rfile.read(n)
                seen.append((self.command, self.path, self.headers.get("Authorization")))
                status, headers, body = answer(self)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_client_follows_no_redirect_and_the_token_goes_nowhere_else(tmp_path):
    thief = _Fake(lambda h: (200, {}, b'{"device": {}, "latency": {}}'))
    redirector = _Fake(lambda h: (302, {"Location": thief.url + "/steal"}, b""))
    try:
        for call in (lambda c: c.device(), lambda c: c._request("POST", "/v1/time", b"x")):
            with pytest.raises(ProbeError, match="redirect"):
                call(ProbeClient(redirector.url, TOKEN, retries=0))
        assert thief.seen == []
    finally:
        thief.close()
        redirector.close()


def test_client_does_not_resend_a_timing_and_refuses_malformed_answers(tmp_path):
    broken = _Fake(lambda h: (500, {}, b'{"error": "boom"}'))
    odd = _Fake(lambda h: (200, {}, b"[1, 2]"))
    try:
        with pytest.raises(ProbeError, match="500 boom"):
            ProbeClient(broken.url, TOKEN, retries=3, backoff_s=0.01)._request("POST", "/v1/time", b"x")
        assert [m for m, *_ in broken.seen] == ["POST"]  # sent once: the probe may still be timing it
        with pytest.raises(ProbeError, match="malformed answer"):
            ProbeClient(odd.url, TOKEN, retries=3).device()
        assert len(odd.seen) == 1
    finally:
        broken.close()
        odd.close()


def test_client_refuses_credentials_in_the_url_and_a_token_http_cannot_carry():
    with pytest.raises(ProbeError, match="no user or path") as info:
        ProbeClient("http://user:hunter2hunter2@127.0.0.1:1", TOKEN)
    assert "hunter2" not in str(info.value)
    for bad in (TOKEN + "\n", TOKEN + " x", "é" * 20, "short"):
        with pytest.raises(ProbeError, match="printable ASCII"):
            ProbeClient("http://127.0.0.1:1", bad)


def test_a_wrong_token_is_a_401_even_while_sending_a_model(probe, tmp_path):
    big = tmp_path / "big.onnx"
    big.write_bytes(b"\0" * (4 << 20))
    t0 = time.monotonic()
    with pytest.raises(ProbeError, match="401"):
        ProbeClient(probe.url, "wrong-token-0123456789", retries=2, backoff_s=1.0).time(big)
    assert time.monotonic() - t0 < 3  # refused at once, not retried as an outage


def test_idle_connections_cannot_lock_the_probe(probe, monkeypatch):
    import nas.probe

    monkeypatch.setattr(nas.probe, "HEADER_DEADLINE_S", 0.5)
    idle = [socket.create_connection(probe.server_address[:2]) for _ in range(nas.probe.MAX_CLIENTS + 4)]
    try:
        t0 = time.monotonic()
        assert ProbeClient(probe.url, TOKEN, retries=6, backoff_s=0.2).device()  # 503 at first, then served
        assert time.monotonic() - t0 < 15
    finally:
        for s in idle:
            s.close()


def test_odd_content_length_is_refused(probe):
    status, _ = _post(probe, b"", headers={"Content-Length": "\u00b2".encode().decode("latin-1")})
    assert status in (400, 411)
    assert ProbeClient(probe.url, TOKEN).device()


def _loop_forever(path: Path) -> Path:
    """A valid graph whose one run loops 10^12 times."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    body = helper.make_graph([helper.make_node("Identity", ["c_in"], ["c_out"]),
                              helper.make_node("Identity", ["cond_in"], ["cond_out"])], "body",
                             [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                              helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                              helper.make_tensor_value_info("c_in", TensorProto.FLOAT, [1, 4])],
                             [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
                              helper.make_tensor_value_info("c_out", TensorProto.FLOAT, [1, 4])])
    inits = [helper.make_tensor("M", TensorProto.INT64, [], [10**12]), helper.make_tensor("T", TensorProto.BOOL, [], [True])]
    g = helper.make_graph([helper.make_node("Loop", ["M", "T", "x"], ["y"], body=body)], "g", [x], [y], inits)
    path.write_bytes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    return path


def _allocate_64gb(path: Path) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    shape = helper.make_tensor("S", TensorProto.INT64, [1], [1 << 34])
    nodes = [helper.make_node("ConstantOfShape", ["S"], ["big"]), helper.make_node("ReduceSum", ["big"], ["s"]),
             helper.make_node("Add", ["x", "s"], ["y"])]
    path.write_bytes(helper.make_model(helper.make_graph(nodes, "g", [x], [y], [shape]),
                                       opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    return path


def test_a_model_that_never_finishes_or_eats_memory_costs_one_refused_request(probe, tmp_path, monkeypatch):
    import nas.probe

    monkeypatch.setattr(nas.probe, "TIME_BUDGET_S", 1.0)
    monkeypatch.setattr(nas.probe, "KILL_GRACE_S", 2.0)
    t0 = time.monotonic()
    status, answer = _post(probe, _loop_forever(tmp_path / "loop.onnx").read_bytes())
    assert status == 422 and "did not finish" in answer["error"] and time.monotonic() - t0 < 20, answer
    status, answer = _post(probe, _allocate_64gb(tmp_path / "mem.onnx").read_bytes())
    assert status == 422, answer
    assert ProbeClient(probe.url, TOKEN).time(_graph(tmp_path / "ok.onnx"))["latency"]["median_ms"] > 0
