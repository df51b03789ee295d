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
should need nothing beyond ONNX Runtime, and the server answers two requests.
"""

from __future__ import annotations

import argparse
import hmac
import json
import math
import os
import platform
import re
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

__all__ = ["ProbeServer", "ProbeClient", "ProbeError", "connect", "read_token", "device_identity", "serve", "PROTOCOL"]

PROTOCOL = 1
MAX_BODY_BYTES = 64 * 1024 * 1024  # an int8 model of 60M parameters; ours are KB to MB
MAX_CLIENTS = 16
HEADER_DEADLINE_S = 10.0  # the request line and headers must arrive within this (no token yet)
READ_DEADLINE_S = 60.0  # the whole request, body included, within this, or the connection is closed
TIME_BUDGET_S = 120.0  # one timing's bound: the repeats shrink for a slow model, and past it the timing is killed
KILL_GRACE_S = 30.0  # past the budget by this much, the timing process is killed
MIN_REPEATS = 24
MAX_MEMORY_MB = 4096  # the timing process's address-space limit
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
    if not _token_ok(token):
        raise ProbeError(f"--token-file {p}: the token must be one line of at least {MIN_TOKEN_CHARS} printable "
                         "characters without spaces (e.g. `python -c 'import secrets; print(secrets.token_hex(16))'`)")
    return token


def _token_ok(token: str) -> bool:
    """At least 16 printable ASCII characters, no spaces (it travels in an HTTP header)."""
    return len(token) >= MIN_TOKEN_CHARS and all(33 <= ord(c) <= 126 for c in token)


def connect(url: str, token_file: str | None, **kwargs: Any) -> ProbeClient:
    """The client of the probe at ``url`` with the token in ``token_file`` (``--latency-on`` and
    ``--probe-token-file``; the token file is required)."""
    if not token_file:
        raise ProbeError("--latency-on needs --probe-token-file (the token file the probe was started with)")
    return ProbeClient(url, read_token(token_file), **kwargs)


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
    if not shape or math.prod(shape) > 64 * 1024 * 1024:
        raise BundleError(f"the model's input shape {shape} is not timeable")
    return tuple(shape)


class ProbeServer(ThreadingHTTPServer):
    """The probe: ``ProbeServer(("127.0.0.1", port), token, threads=1).serve_forever()``."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], token: str, *, threads: int = 1, warmup: int = 50,
                 repeats: int = 500, max_body: int = MAX_BODY_BYTES, max_memory_mb: int = MAX_MEMORY_MB,
                 verbose: bool = False) -> None:
        self.token = token.encode()
        self.threads, self.warmup, self.repeats, self.max_body, self.verbose = threads, warmup, repeats, max_body, verbose
        self.max_memory_mb = max_memory_mb
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
        """Check the model (as bundles are), then time it in a child process that has an
        address-space limit and is killed past :data:`TIME_BUDGET_S`: a model that loops or
        allocates without end costs one refused request, not the probe."""
        import subprocess

        from nas.trust import check_onnx

        check_onnx(path)
        job = json.dumps({"path": str(path), "threads": self.threads, "warmup": self.warmup, "repeats": self.repeats,
                          "budget_s": TIME_BUDGET_S})

        def limit() -> None:  # in the child, before it runs anything of the model
            import resource

            cap = self.max_memory_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

        with self.timing:  # one timing at a time (session load included: it disturbs a timing too)
            try:
                out = subprocess.run([sys.executable, "-c", "from nas.probe import _time_child; _time_child()"],
                                     input=job, capture_output=True, text=True, timeout=TIME_BUDGET_S + KILL_GRACE_S,
                                     preexec_fn=limit)  # noqa: PLW1509 - no threads touched between fork and exec
            except subprocess.TimeoutExpired:
                raise BundleError(f"the model did not finish timing within {TIME_BUDGET_S + KILL_GRACE_S:.0f} s; "
                                  "refused") from None
            self.timed += 1
        lines = out.stdout.strip().splitlines()
        try:
            answer = json.loads(lines[-1]) if lines else {}
        except ValueError:
            answer = {}
        if out.returncode != 0 or "error" in answer or "latency" not in answer:
            why = answer.get("error") or (f"the timing process died (exit {out.returncode}"
                                          f"{', out of memory?' if out.returncode in (-9, 1) else ''})")
            raise BundleError(why)
        return {"protocol": PROTOCOL, "latency": answer["latency"], "device": self.identity,
                "input_shape": answer["input_shape"]}


def _time_child() -> None:
    """The timing process (``ProbeServer.time_model``): a JSON job on stdin, one JSON line out."""
    import numpy as np

    from nas.timing import onnx_latency, ort_session

    job = json.loads(sys.stdin.read())
    path = Path(job["path"])
    try:
        try:
            sess = ort_session(path, job["threads"])
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own types for a bad graph
            raise BundleError(f"ONNX Runtime cannot load the model ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
        shape = input_shape(sess)
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)  # what onnx_latency feeds
        name = sess.get_inputs()[0].name
        t0 = time.perf_counter()
        try:
            sess.run(None, {name: x})
        except Exception as exc:  # noqa: BLE001
            raise BundleError(f"the model does not run on input {list(shape)} ({type(exc).__name__})") from None
        one = max(time.perf_counter() - t0, 1e-6)
        # a slow model gets fewer repeats and one attempt, so that the timing fits the budget
        fits = int(job["budget_s"] / one / 1.5)
        if fits < MIN_REPEATS + 2:
            raise BundleError(f"one run takes {one:.1f} s; {MIN_REPEATS} timed runs would exceed the probe's "
                              f"{job['budget_s']:.0f} s budget")
        repeats = max(MIN_REPEATS, min(job["repeats"], fits // 3))
        warmup = max(2, min(job["warmup"], fits // 30))
        attempts = 3 if repeats * 3 + warmup * 3 <= fits else 1
        lat = onnx_latency(path, shape, threads=job["threads"], warmup=warmup, repeats=repeats, max_attempts=attempts)
        print(json.dumps({"latency": lat.to_dict(), "input_shape": list(shape)}))
    except NasError as exc:
        print(json.dumps({"error": str(exc).splitlines()[0]}))


class _Handler(BaseHTTPRequestHandler):
    server: ProbeServer
    server_version = "nas-probe"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    timeout = READ_DEADLINE_S  # each socket read; the whole body is also bounded below

    def handle(self) -> None:
        """One request per connection, within deadlines a watchdog enforces: the headers within
        :data:`HEADER_DEADLINE_S` (a client with no token holds a slot no longer than that),
        the whole request within :data:`READ_DEADLINE_S`; past them the socket is shut."""
        if not self.server.slots.acquire(blocking=False):
            try:
                self.connection.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                                        b"Connection: close\r\n\r\n")
            except OSError:
                pass
            return
        self.headers_done = self.body_done = False

        def expire(phase: str) -> None:
            if not self.body_done and (phase == "body" or not self.headers_done):
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        timers = [threading.Timer(HEADER_DEADLINE_S, expire, ("headers",)), threading.Timer(READ_DEADLINE_S, expire, ("body",))]
        for t in timers:
            t.daemon = True
            t.start()
        try:
            self.close_connection = True
            self.handle_one_request()
        except (OSError, TimeoutError, ValueError):
            pass  # a client that went away or stalled: nothing to answer
        finally:
            for t in timers:
                t.cancel()
            self.server.slots.release()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        if self.server.verbose:
            super().log_message(format, *args)

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = (json.dumps(body) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _drain(self, limit: int = 1 << 20) -> None:
        """Read (and drop) up to ``limit`` bytes of a refused request's body, so that a client
        still sending it reads the refusal instead of a broken pipe."""
        length = self.headers.get("Content-Length", "")
        if re.fullmatch(r"[0-9]{1,15}", length) and 0 < int(length) <= limit:
            try:
                self.rfile.read(int(length))
            except OSError:
                pass

    def _authorized(self) -> bool:
        given = self.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        ok = hmac.compare_digest(token.strip().encode("utf-8", "replace"), self.server.token) and scheme.lower() == "bearer"
        if not ok:
            self._drain()
            self._send(401, {"error": "missing or wrong token (Authorization: Bearer <token>)"})
        return ok

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.headers_done = self.body_done = True
        if urllib.parse.urlsplit(self.path).path != "/v1/device":
            self._send(404, {"error": "unknown path; this probe answers GET /v1/device and POST /v1/time"})
            return
        if self._authorized():
            self._send(200, {"protocol": PROTOCOL, "device": self.server.identity, "max_body": self.server.max_body})

    def do_POST(self) -> None:  # noqa: N802
        self.headers_done = True
        if urllib.parse.urlsplit(self.path).path != "/v1/time":
            self._send(404, {"error": "unknown path; this probe answers GET /v1/device and POST /v1/time"})
            return
        if not self._authorized():
            return
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding") or length is None or not re.fullmatch(r"[0-9]{1,15}", length):
            self._send(411, {"error": "a body with a Content-Length is required (the ONNX file)"})
            return
        n = int(length)
        if n > self.server.max_body:
            self._send(413, {"error": f"the body is {n} bytes; this probe takes at most {self.server.max_body}"})
            return
        if n == 0:
            self._send(400, {"error": "the body is empty; send the ONNX file"})
            return
        with tempfile.TemporaryDirectory(prefix="nas-probe-") as tmp:
            path = Path(tmp) / "model.onnx"  # a name of ours: nothing the client sends names a path
            with open(path, "wb") as fh:
                left = n
                while left:  # (the watchdog shuts the socket if the body is not here in time)
                    chunk = self.rfile.read(min(left, 1 << 16))
                    if not chunk:
                        return  # the client went away, or the deadline passed
                    fh.write(chunk)
                    left -= len(chunk)
            self.body_done = True
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


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a probe never redirects: a 3xx is an error, and the token goes nowhere else


_OPENER = urllib.request.build_opener(_NoRedirects)


class ProbeClient:
    """Times ONNX files on a probe. ``GET`` requests are retried on connection failures,
    timeouts and 5xx answers; the ``POST`` of a timing only where the probe refused the
    connection or was busy (503), since a timing may still be running there (``retries``
    times, ``backoff_s`` apart, doubling). A 4xx answer is the probe's verdict and is raised
    at once, as is a malformed answer. Redirects are never followed."""

    def __init__(self, url: str, token: str, *, timeout_s: float = 300.0, retries: int = 4, backoff_s: float = 2.0) -> None:
        parts = urllib.parse.urlsplit(str(url))
        if (parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/")
                or parts.query or parts.fragment or "@" in parts.netloc):
            raise ProbeError(f"--latency-on {ProbeClient.redacted(str(url))!r}: expected http://HOST:PORT (the probe's "
                             "address, no user or path)")
        if not _token_ok(token):
            raise ProbeError(f"the probe token must be at least {MIN_TOKEN_CHARS} printable ASCII characters "
                             "without spaces")
        self.url = f"{parts.scheme}://{parts.netloc}"
        self._token = token
        self._max_body: int | None = None
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
                with _OPENER.open(req, timeout=self.timeout_s) as resp:
                    raw = resp.read(1 << 20)
            except urllib.error.HTTPError as exc:
                try:
                    msg = json.loads(exc.read(1 << 16)).get("error", "")
                except (ValueError, AttributeError, OSError):
                    msg = ""
                msg = str(msg).splitlines()[0][:300] if msg else str(exc.reason)
                if 300 <= exc.code < 400:
                    raise ProbeError(f"probe {self.url} answered with a redirect ({exc.code}); not followed") from None
                if exc.code < 500 and exc.code not in (408, 429):
                    raise ProbeError(f"probe {self.url} refused it: {exc.code} {msg}") from None
                last = f"{exc.code} {msg}"
                if method == "POST" and exc.code != 503:
                    break
                continue
            except (urllib.error.URLError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                last = reason if isinstance(reason, str) else f"{type(reason).__name__}: {reason}"
                refused = isinstance(reason, ConnectionRefusedError)
                if method == "POST" and not refused:  # it may be timing it still: sending it again doubles the load
                    raise ProbeError(f"probe {self.url}: the timing failed ({last})") from None
                continue
            try:
                answer = json.loads(raw)
            except ValueError:
                answer = None
            if not isinstance(answer, dict):
                raise ProbeError(f"probe {self.url}: a malformed answer (not a JSON object)")
            return answer
        raise ProbeError(f"probe {self.url} did not answer after {attempt + 1} tries ({last})")

    @staticmethod
    def redacted(url: str) -> str:
        """The probe's address as trials record it (no credentials)."""
        from nas.trust import redact_url

        return redact_url(url)

    def device(self) -> dict[str, Any]:
        answer = self._request("GET", "/v1/device")
        if not isinstance(answer.get("device"), dict):
            raise ProbeError(f"probe {self.url}: a malformed answer (no device)")
        max_body = answer.get("max_body")
        self._max_body = max_body if isinstance(max_body, int) else None
        return dict(answer["device"])

    def time(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        if self._max_body is None:
            self.device()  # a wrong token is a clear 401 here, and the probe's size limit is known
        body = Path(path).read_bytes()
        if self._max_body is not None and len(body) > self._max_body:
            raise ProbeError(f"probe {self.url}: the model is {len(body):,} bytes; the probe takes at most "
                             f"{self._max_body:,}")
        answer = self._request("POST", "/v1/time", body)
        if not isinstance(answer.get("latency"), dict) or not isinstance(answer.get("device"), dict):
            raise ProbeError(f"probe {self.url}: a malformed answer (no latency)")
        return answer


def main(argv: list[str] | None = None) -> int:
    """``python -m nas.probe serve ...`` on a device with no torch or Optuna (``nas probe serve`` elsewhere)."""
    from nas.cliparser import probe_serve_parser

    ap = probe_serve_parser()
    return run(ap.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    try:
        return serve(args.host, args.port, args.token_file, args.threads)
    except NasError as exc:
        print(f"nas: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
