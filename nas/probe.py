"""Latency on the device you ship to: a probe server that runs on the target, and its client.

``nas probe serve --port P --token-file F`` (or ``python -m nas.probe serve ...``) runs on the
device with ONNX Runtime, onnx, numpy and the standard library only: this module and what it
imports (``nas.timing``, ``nas.trust``, ``nas.errors``) never import PyTorch or Optuna. It
receives an ONNX model over HTTP, checks it with the rules bundles get (size limit, no external
data, no custom operator domains), times it with the search's own protocol (``nas.timing``:
warm-up, repeats in windows, the runtime's floor beside, one timing at a time on the device)
and answers with the figures and the device's identity.

The protocol (JSON answers; every request carries ``Authorization: Bearer <token>``):

- ``GET /v1/device``: the device's identity (CPU model, cores, architecture, system, ONNX
  Runtime version, thread count);
- ``POST /v1/time`` with the ONNX file as the body (``Content-Length`` required):
  ``{"latency": {...}, "device": {...}, "input_shape": [...]}``; a refused model is a 4xx
  answer with ``{"error": "one line"}``.

Security: the token is compared in constant time (``hmac.compare_digest``); the server binds
127.0.0.1 unless told otherwise; bodies are size-limited and must arrive within a bound; a
request names no path and runs nothing but the model in ONNX Runtime; at most
:data:`MAX_CLIENTS` requests are handled at once (others get 503), one timing at a time.

Written on the standard library's ``http.server`` rather than a web framework: the target
should need nothing beyond ONNX Runtime, and the server answers three requests.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import platform
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from nas.errors import BundleError, NasError

__all__ = ["ProbeServer", "ProbeClient", "ProbeError", "read_token", "device_identity", "serve", "PROTOCOL"]

PROTOCOL = 1
MAX_BODY_BYTES = 64 * 1024 * 1024  # an int8 model of 60M parameters; ours are KB to MB
MAX_CLIENTS = 8
READ_DEADLINE_S = 60.0  # headers and body must arrive within this, or the request is dropped
TIME_BUDGET_S = 120.0  # one timing's bound: the repeats shrink for a slow model (never below MIN_REPEATS)
MIN_REPEATS = 24
MIN_TOKEN_CHARS = 16
MAX_TOKEN_BYTES = 4096


class ProbeError(NasError):
    """A probe refused a request or could not be reached (the message is one line)."""


def read_token(path: str | os.PathLike[str]) -> str:
    """The shared secret from a file (its first line, stripped): at least 16 characters."""
    p = Path(path)
    try:
        raw = p.read_bytes()[: MAX_TOKEN_BYTES + 1]
    except FileNotFoundError:
        raise ProbeError(f"--token-file {p}: no such file") from None
    except OSError as exc:
        raise ProbeError(f"--token-file {p}: cannot read it ({exc.strerror or exc})") from None
    if len(raw) > MAX_TOKEN_BYTES:
        raise ProbeError(f"--token-file {p}: more than {MAX_TOKEN_BYTES} bytes; a token is one line")
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise ProbeError(f"--token-file {p}: not UTF-8 text") from None
    token = lines[0].strip() if lines else ""
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() or not c.isprintable() for c in token):
        raise ProbeError(f"--token-file {p}: the token must be one line of at least {MIN_TOKEN_CHARS} printable "
                         "characters without spaces (e.g. `python -c 'import secrets; print(secrets.token_hex(16))'`)")
    return token


def device_identity(threads: int) -> dict[str, Any]:
    """What a latency figure depends on besides the model (stored with every timing)."""
    import onnxruntime

    from nas.timing import cpu_model

    return {"latency_cpu": cpu_model(), "latency_cores": os.cpu_count(), "latency_onnxruntime": onnxruntime.__version__,
            "arch": platform.machine(), "system": platform.system(), "threads": threads,
            "host": socket.gethostname()}


def input_shape(sess: Any) -> tuple[int, ...]:
    """The single float input's shape at batch 1 (a symbolic first dimension is the batch)."""
    inputs = sess.get_inputs()
    if len(inputs) != 1:
        raise BundleError(f"the model has {len(inputs)} inputs; a probe times single-input models")
    inp = inputs[0]
    if inp.type != "tensor(float)":
        raise BundleError(f"the model's input is {inp.type}; a probe feeds tensor(float)")
    shape = []
    for i, d in enumerate(inp.shape):
        if isinstance(d, int) and d > 0:
            shape.append(d)
        elif i == 0:
            shape.append(1)
        else:
            raise BundleError(f"the model's input dimension {i} is {d!r}; only the first (batch) may be free")
    if not shape or int(__import__("math").prod(shape)) > 64 * 1024 * 1024:
        raise BundleError(f"the model's input shape {shape} is not timeable")
    return tuple(shape)


class ProbeServer(ThreadingHTTPServer):
    """The probe: ``ProbeServer(("127.0.0.1", port), token, threads=1).serve_forever()``."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], token: str, *, threads: int = 1, warmup: int = 50,
                 repeats: int = 500, max_body: int = MAX_BODY_BYTES, verbose: bool = False) -> None:
        self.token = token.encode()
        self.threads, self.warmup, self.repeats, self.max_body, self.verbose = threads, warmup, repeats, max_body, verbose
        self.slots = threading.BoundedSemaphore(MAX_CLIENTS)
        self.timing = threading.Lock()
        self.identity = device_identity(threads)
        self.timed = 0
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def time_model(self, path: Path) -> dict[str, Any]:
        from nas.timing import onnx_latency, ort_session
        from nas.trust import check_onnx

        check_onnx(path)
        try:
            sess = ort_session(path, self.threads)
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own types for a bad graph
            raise BundleError(f"ONNX Runtime cannot load the model ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
        shape = input_shape(sess)
        import numpy as np

        x = np.zeros(shape, dtype=np.float32)
        name = sess.get_inputs()[0].name
        with self.timing:
            t0 = time.perf_counter()
            try:
                sess.run(None, {name: x})
            except Exception as exc:  # noqa: BLE001
                raise BundleError(f"the model does not run on input {list(shape)} ({type(exc).__name__})") from None
            one = max(time.perf_counter() - t0, 1e-6)
            # a slow model gets fewer repeats, so that one timing stays within TIME_BUDGET_S
            fits = int(TIME_BUDGET_S / one / 1.3)
            repeats = max(MIN_REPEATS, min(self.repeats, fits))
            warmup = max(2, min(self.warmup, fits // 10))
            lat = onnx_latency(path, shape, threads=self.threads, warmup=warmup, repeats=repeats)
            self.timed += 1
        return {"protocol": PROTOCOL, "latency": lat.to_dict(), "device": self.identity, "input_shape": list(shape)}


class _Handler(BaseHTTPRequestHandler):
    server: ProbeServer
    server_version = "nas-probe"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    timeout = READ_DEADLINE_S  # each socket read; the whole body is also bounded below

    def handle(self) -> None:
        if not self.server.slots.acquire(blocking=False):
            try:
                self.connection.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                                        b"Connection: close\r\n\r\n")
            except OSError:
                pass
            return
        try:
            super().handle()
        except (OSError, TimeoutError):
            pass  # a client that went away or stalled: nothing to answer
        finally:
            self.server.slots.release()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        if self.server.verbose:
            super().log_message(format, *args)

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = (json.dumps(body) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status >= 400:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        given = self.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        ok = hmac.compare_digest(token.strip().encode(), self.server.token) and scheme.lower() == "bearer"
        if not ok:
            self._send(401, {"error": "missing or wrong token (Authorization: Bearer <token>)"})
        return ok

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if urllib.parse.urlsplit(self.path).path != "/v1/device":
            self._send(404, {"error": "unknown path; this probe answers GET /v1/device and POST /v1/time"})
            return
        if self._authorized():
            self._send(200, {"protocol": PROTOCOL, "device": self.server.identity})

    def do_POST(self) -> None:  # noqa: N802
        if urllib.parse.urlsplit(self.path).path != "/v1/time":
            self._send(404, {"error": "unknown path; this probe answers GET /v1/device and POST /v1/time"})
            return
        if not self._authorized():
            return
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding") or length is None or not length.isdigit():
            self._send(411, {"error": "a body with a Content-Length is required (the ONNX file)"})
            return
        n = int(length)
        if n > self.server.max_body:
            self._send(413, {"error": f"the body is {n} bytes; this probe takes at most {self.server.max_body}"})
            return
        if n == 0:
            self._send(400, {"error": "the body is empty; send the ONNX file"})
            return
        deadline = time.monotonic() + READ_DEADLINE_S
        with tempfile.TemporaryDirectory(prefix="nas-probe-") as tmp:
            path = Path(tmp) / "model.onnx"  # a name of ours: nothing the client sends names a path
            with open(path, "wb") as fh:
                left = n
                while left:
                    if time.monotonic() > deadline:
                        self._send(408, {"error": f"the body did not arrive within {READ_DEADLINE_S:.0f} s"})
                        return
                    chunk = self.rfile.read(min(left, 1 << 16))
                    if not chunk:
                        return  # the client went away
                    fh.write(chunk)
                    left -= len(chunk)
            try:
                answer = self.server.time_model(path)
            except NasError as exc:
                self._send(422, {"error": str(exc).replace(str(path), "model.onnx").splitlines()[0]})
                return
            except Exception as exc:  # noqa: BLE001 - a model that breaks the runtime: refused, server still serving
                self._send(422, {"error": f"the model could not be timed ({type(exc).__name__})"})
                return
        self._send(200, answer)


def serve(host: str, port: int, token_file: str, threads: int, *, verbose: bool = True) -> int:
    token = read_token(token_file)
    try:
        server = ProbeServer((host, port), token, threads=threads, verbose=verbose)
    except OSError as exc:
        raise ProbeError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    ident = server.identity
    print(f"nas probe: serving {server.url} ({ident['latency_cpu']}, {ident['latency_cores']} cores, "
          f"ONNX Runtime {ident['latency_onnxruntime']}, {threads} thread(s)); Ctrl-C stops it", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


# --------------------------------------------------------------------------- client


class ProbeClient:
    """Times ONNX files on a probe. Connection failures, timeouts and 5xx/503 answers are
    retried (``retries`` times, ``backoff_s`` apart, doubling); a 4xx answer is the probe's
    verdict on the model and is raised at once."""

    def __init__(self, url: str, token: str, *, timeout_s: float = 300.0, retries: int = 4, backoff_s: float = 2.0) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
            raise ProbeError(f"--latency-on {url!r}: expected http://HOST:PORT (the probe's address)")
        self.url = f"{parts.scheme}://{parts.netloc}"
        self._token = token
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s

    def _request(self, method: str, path: str, body: bytes | None = None) -> dict[str, Any]:
        delay, last = self.backoff_s, ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(delay)
                delay *= 2
            req = urllib.request.Request(self.url + path, data=body, method=method,
                                         headers={"Authorization": f"Bearer {self._token}",
                                                  "Content-Type": "application/octet-stream"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:  # noqa: S310 - http(s) only, checked above
                    return json.loads(resp.read(1 << 20))
            except urllib.error.HTTPError as exc:
                try:
                    msg = json.loads(exc.read(1 << 16)).get("error", "")
                except (ValueError, AttributeError, OSError):
                    msg = ""
                if exc.code < 500 and exc.code not in (408, 429):
                    raise ProbeError(f"probe {self.url} refused it: {exc.code} {msg or exc.reason}") from None
                last = f"{exc.code} {msg or exc.reason}"
            except (urllib.error.URLError, OSError, TimeoutError, ValueError) as exc:
                reason = getattr(exc, "reason", exc)
                last = f"{type(reason).__name__}: {reason}" if not isinstance(reason, str) else reason
        raise ProbeError(f"probe {self.url} did not answer after {self.retries + 1} tries ({last})")

    @staticmethod
    def redacted(url: str) -> str:
        """The probe's address as trials record it (no credentials)."""
        from nas.trust import redact_url

        return redact_url(url)

    def device(self) -> dict[str, Any]:
        return dict(self._request("GET", "/v1/device")["device"])

    def time(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        return self._request("POST", "/v1/time", Path(path).read_bytes())


def main(argv: list[str] | None = None) -> int:
    """``python -m nas.probe serve ...`` on a device with no torch or Optuna (``nas probe serve`` elsewhere)."""
    from nas.cliparser import _Parser, add_probe_serve_arguments

    ap = _Parser(prog="nas probe", description="time ONNX models on this device for a search elsewhere")
    sub = ap.add_subparsers(dest="probe_command", required=True, parser_class=_Parser)
    add_probe_serve_arguments(sub.add_parser("serve", help="serve latency timings over HTTP (token required)"))
    return run(ap.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    try:
        return serve(args.host, args.port, args.token_file, args.threads)
    except NasError as exc:
        print(f"nas: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
