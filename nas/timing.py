"""Latency timing in ONNX Runtime, with no PyTorch: the search's measurements and the probe
server on a target device (``nas probe serve``, which installs without torch) share it.

Latency is timed on the exported ONNX model in ONNX Runtime on CPU (batch 1, a fixed thread
count, warm-up, many repeats; median and IQR). Only one process per host times at a time: the
timing loop holds a node-local file lock, so concurrent trials (``--jobs``, Ray workers, probe
requests) queue for it instead of disturbing each other's figures.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Latency", "InputLatency", "onnx_latency", "onnx_latency_over", "latency_host", "cpu_model",
           "measure_lock", "file_lock", "identity_graph", "ort_session", "NOISY_IQR_RATIO", "LATENCY_HOST_KEYS"]


def ort_session(path: Path, threads: int):  # noqa: ANN202
    """A CPU session with ``threads`` intra-op threads, sequential, every graph optimization."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


# Latency figures whose IQR/median exceeds this are re-measured (DESIGN: treat as noisy).
NOISY_IQR_RATIO = 0.10


@dataclass(frozen=True)
class Latency:
    median_ms: float
    iqr_ms: float
    repeats: int
    threads: int
    attempts: int
    floor_ms: float = 0.0  # an Identity graph's median in the same windows: the runtime's floor now
    lock_wait_s: float = 0.0  # waited for the host-wide timing lock (other trials timing): why a trial under load is slow

    @property
    def noisy(self) -> bool:
        return self.median_ms > 0 and self.iqr_ms / self.median_ms > NOISY_IQR_RATIO

    def to_dict(self) -> dict[str, float | int | bool]:
        return {**asdict(self), "noisy": self.noisy}


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


LATENCY_HOST_KEYS = ("latency_cpu", "latency_cores", "latency_onnxruntime")


def latency_host() -> dict[str, Any]:
    """What a latency figure depends on besides the model: stored with every timing, so a
    later re-timing (``nas verify``) knows whether it is comparable."""
    import onnxruntime

    return dict(zip(LATENCY_HOST_KEYS, (cpu_model(), os.cpu_count(), onnxruntime.__version__)))


def _lock_path() -> Path:
    return Path(os.environ.get("NAS_MEASURE_LOCK", Path(tempfile.gettempdir()) / "nas-measure.lock"))


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive fcntl lock on ``path``: across processes and threads of one host."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def measure_lock() -> contextlib.AbstractContextManager[None]:
    """Hold the host-wide measurement lock, so two timings never overlap on a node."""
    return file_lock(_lock_path())


# The timed runs are split into windows a short pause apart, and the fastest window's median
# is reported. On a shared host, load comes in phases (here a model that runs in 0.021 ms was
# timed at up to 0.041 ms by back-to-back runs); load only ever slows a run down, so the fastest
# window is the figure that reproduces (measured: 0.021 ms in 8 of 12 repeats, vs 2 of 12).
WINDOWS = 6
WINDOW_GAP_S = 0.02


def onnx_latency(
    path: str | os.PathLike[str],
    input_shape: tuple[int, ...],
    *,
    threads: int = 1,
    warmup: int = 50,
    repeats: int = 500,
    max_attempts: int = 3,
) -> Latency:
    """Median and IQR (ms) of single-input inference in ONNX Runtime on CPU: ``repeats`` timed
    runs in :data:`WINDOWS` windows, the fastest window's median and IQR.

    A measurement whose IQR/median is above :data:`NOISY_IQR_RATIO` is repeated (up to
    ``max_attempts``); the steadiest attempt is kept and the number of attempts recorded.
    """
    sess = ort_session(Path(path), threads)
    name = sess.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal(input_shape).astype(np.float32)
    floor = ort_session(identity_graph(input_shape), threads)
    windows = max(1, min(WINDOWS, repeats // 8))
    best: Latency | None = None
    asked = time.perf_counter()
    with measure_lock():
        waited = time.perf_counter() - asked
        for attempt in range(1, max_attempts + 1):
            for _ in range(warmup):
                sess.run(None, {name: x})
            fastest: tuple[float, float] | None = None
            floors = []
            for w in range(windows):
                if w:
                    time.sleep(WINDOW_GAP_S)
                q1, med, q3 = _window(sess, name, x, repeats // windows)
                floors.append(_window(floor, "x", x, max(8, repeats // windows // 4))[1])
                if fastest is None or med < fastest[0]:
                    fastest = (med, q3 - q1)
            assert fastest is not None
            lat = Latency(fastest[0], fastest[1], repeats, threads, attempt, min(floors))
            if best is None or lat.iqr_ms / max(lat.median_ms, 1e-9) < best.iqr_ms / max(best.median_ms, 1e-9):
                best = lat
            if not lat.noisy:
                break
    assert best is not None
    return Latency(best.median_ms, best.iqr_ms, best.repeats, best.threads, attempt, best.floor_ms, waited)


@dataclass(frozen=True)
class InputLatency:
    """Latency of a graph whose work depends on its input (early exits): each input timed at
    batch 1 in ``passes`` passes over the inputs (per input: the median of its passes), then
    the mean and the 95th percentile over the inputs. ``iqr_ms``: the spread of the passes'
    means (how steady the figure is, as a single-input median's IQR is)."""

    mean_ms: float
    p95_ms: float
    iqr_ms: float
    inputs: int
    passes: int
    threads: int
    floor_ms: float

    @property
    def noisy(self) -> bool:
        return self.mean_ms > 0 and self.iqr_ms / self.mean_ms > NOISY_IQR_RATIO


MAX_TIMED_INPUTS = 1000


def onnx_latency_over(path: str | os.PathLike[str], inputs: np.ndarray, *, threads: int = 1, passes: int = 5,
                      warmup: int = 50) -> InputLatency:
    """Mean and p95 latency (ms) over ``inputs`` (N, ...) run one at a time in ONNX Runtime on
    CPU (at most :data:`MAX_TIMED_INPUTS`, the first ones), with the runtime floor (an Identity
    graph) timed between passes, as :func:`onnx_latency` does beside a single input."""
    xs = np.ascontiguousarray(np.asarray(inputs, dtype=np.float32)[:MAX_TIMED_INPUTS])
    if len(xs) == 0:
        raise ValueError("no inputs to time")
    sess = ort_session(Path(path), threads)
    name = sess.get_inputs()[0].name
    floor = ort_session(identity_graph(xs[:1].shape), threads)
    times = np.zeros((passes, len(xs)))
    floors = []
    with measure_lock():
        for i in range(warmup):
            sess.run(None, {name: xs[i % len(xs)][None]})
        for p in range(passes):
            if p:
                time.sleep(WINDOW_GAP_S)
            for i in range(len(xs)):
                x = xs[i][None]
                t0 = time.perf_counter_ns()
                sess.run(None, {name: x})
                times[p, i] = (time.perf_counter_ns() - t0) / 1e6
            floors.append(_window(floor, "x", xs[:1], 64)[1])
    per_input = np.median(times, axis=0)
    q1, q3 = np.percentile(times.mean(axis=1), [25, 75])
    return InputLatency(float(per_input.mean()), float(np.percentile(per_input, 95)), float(q3 - q1), len(xs),
                        passes, threads, float(min(floors)))


def _window(sess: Any, name: str, x: np.ndarray, runs: int) -> tuple[float, float, float]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        sess.run(None, {name: x})
        times.append((time.perf_counter_ns() - t0) / 1e6)
    q1, med, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (times[0],) * 3
    return q1, med, q3


_FLOOR_FILES: dict[str, Path] = {}


def identity_graph(input_shape: tuple[int, ...]) -> Path:
    """An ONNX graph of one Identity node for this input shape: what the runtime costs with no
    work at all, timed beside every model as the host's speed reference.

    One file per shape in the user's cache folder (``$NAS_CACHE_DIR`` or ``~/.cache/nas``), shared
    by every process; where that is not writable, a temporary file removed at exit."""
    from onnx import TensorProto, helper

    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(input_shape)) for n in ("x", "y")]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "floor", io[:1], io[1:])
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    key = "x".join(map(str, input_shape))
    if key in _FLOOR_FILES:
        return _FLOOR_FILES[key]
    from nas.images import cache_dir

    path = cache_dir() / f"identity-{key}.onnx"
    try:
        if not path.is_file() or path.read_bytes() != data:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            try:
                tmp.write_bytes(data)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
    except OSError:
        import atexit

        fd, name = tempfile.mkstemp(prefix=f"nas-identity-{key}-", suffix=".onnx")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        path = Path(name)
        atexit.register(path.unlink, missing_ok=True)
    _FLOOR_FILES[key] = path
    return path
