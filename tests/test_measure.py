"""ONNX export, latency, FLOPs and params (nas.measure)."""

from __future__ import annotations

import torch

from nas.config import ArchConfig, BlockConfig


def test_latency_median_iqr_and_the_lock(tmp_path):
    from nas.builder import build
    from nas.measure import count_flops, count_params, export_onnx, onnx_latency

    arch = ArchConfig(1, 10, (8, 8), "2d", 8, (BlockConfig("conv", 16, 3, 2, stage=0),))
    model = build(arch).eval()
    path = export_onnx(model, torch.zeros(1, 1, 8, 8), tmp_path / "m.onnx")
    lat = onnx_latency(path, (1, 1, 8, 8), warmup=5, repeats=50)
    assert lat.median_ms > 0 and lat.iqr_ms >= 0 and lat.repeats == 50 and lat.threads == 1 and 1 <= lat.attempts <= 3
    assert count_params(model) == sum(p.numel() for p in model.parameters())
    # conv 3x3 from 1 to 8 (stem, 8x8) + conv 3x3 8->16 stride 2 (4x4) + linear 16->10
    convs = 8 * 9 * 64 + 16 * 8 * 9 * 16 + 16 * 10  # multiply-adds of the convs and the classifier
    assert convs <= count_flops(model, torch.zeros(1, 1, 8, 8)) <= convs * 1.1  # (+ BatchNorm and pooling)


def test_the_runtime_floor_graph_is_one_shared_file_per_shape(tmp_path, monkeypatch):
    """Every process used to leave its own Identity graph in /tmp (hundreds after a day of runs):
    now one file per input shape in the user's cache folder, rewritten only if it differs."""
    import subprocess
    import sys

    from nas import measure, timing

    monkeypatch.setenv("NAS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(timing, "_FLOOR_FILES", {})
    code = "from nas.measure import identity_graph; print(identity_graph((1, 1, 8, 8)))"
    paths = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**__import__("os").environ}).stdout.strip() for _ in range(2)}
    assert paths == {str(tmp_path / "cache" / "identity-1x1x8x8.onnx")}
    path = measure.identity_graph((1, 1, 8, 8))
    assert str(path) in paths and sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["identity-1x1x8x8.onnx"]
    path.write_bytes(b"not onnx")  # a damaged file is replaced, not used
    monkeypatch.setattr(timing, "_FLOOR_FILES", {})
    assert measure.onnx_latency(measure.identity_graph((1, 1, 8, 8)), (1, 1, 8, 8), repeats=16, warmup=2).median_ms > 0


def test_latency_over_inputs_follows_the_work_each_input_takes(tmp_path):
    """A graph with an If (early exit): inputs that take the cheap branch are timed as cheap;
    the mean and p95 over the inputs tell the two populations apart."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from nas.measure import onnx_latency_over

    vi = helper.make_tensor_value_info
    heavy = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i - 1}", "w"], [f"h{i}"]) for i in range(40)]
    then = helper.make_graph([helper.make_node("Identity", ["x"], ["t"])], "cheap", [], [vi("t", TensorProto.FLOAT, [1, 64])])
    other = helper.make_graph([*heavy, helper.make_node("Identity", ["h39"], ["e"])], "dear", [], [vi("e", TensorProto.FLOAT, [1, 64])])
    nodes = [helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0),
             helper.make_node("Constant", [], ["z"], value=helper.make_tensor("z", TensorProto.FLOAT, [], [0.0])),
             helper.make_node("Greater", ["m", "z"], ["c1"]), helper.make_node("Squeeze", ["c1"], ["c"]),
             helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)]
    w = helper.make_tensor("w", TensorProto.FLOAT, [64, 64], (np.eye(64, dtype=np.float32) * 0.5).ravel())
    graph = helper.make_graph(nodes, "exit", [vi("x", TensorProto.FLOAT, [1, 64])], [vi("y", TensorProto.FLOAT, [1, 64])], [w])
    path = tmp_path / "exit.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    cheap, dear = np.ones((1, 64), np.float32), -np.ones((1, 64), np.float32)
    all_cheap = onnx_latency_over(path, np.concatenate([cheap] * 40), passes=3)
    mixed = onnx_latency_over(path, np.concatenate([cheap] * 30 + [dear] * 10), passes=3)
    all_dear = onnx_latency_over(path, np.concatenate([dear] * 40), passes=3)
    assert all_cheap.inputs == mixed.inputs == 40 and all_cheap.floor_ms > 0
    assert all_cheap.mean_ms < mixed.mean_ms < all_dear.mean_ms
    assert mixed.p95_ms > 2 * all_cheap.p95_ms  # the slowest 5% took the long branch


def test_two_timings_never_overlap(tmp_path, monkeypatch):
    """Concurrent trials (--jobs, Ray workers on a node) queue for the measurement lock: the
    timed windows of two threads started together never interleave."""
    import threading

    from nas import measure, timing
    from nas.builder import build

    monkeypatch.setenv("NAS_MEASURE_LOCK", str(tmp_path / "lock"))
    arch = ArchConfig(1, 10, (8, 8), "2d", 8, (BlockConfig("conv", 16, 3, 2, stage=0),))
    path = measure.export_onnx(build(arch).eval(), torch.zeros(1, 1, 8, 8), tmp_path / "m.onnx")
    spans: dict[int, list[tuple[float, float]]] = {0: [], 1: []}
    real = timing._window
    who = threading.local()

    def window(*a, **k):
        import time

        t0 = time.perf_counter()
        out = real(*a, **k)
        spans[who.k].append((t0, time.perf_counter()))
        return out

    monkeypatch.setattr(timing, "_window", window)
    start = threading.Barrier(2)

    def run(k: int) -> None:
        who.k = k
        start.wait()
        measure.onnx_latency(path, (1, 1, 8, 8), warmup=2, repeats=64, max_attempts=1)

    threads = [threading.Thread(target=run, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (a0, a1), (b0, b1) = [(min(s for s, _ in spans[k]), max(e for _, e in spans[k])) for k in (0, 1)]
    assert spans[0] and spans[1] and (a1 <= b0 or b1 <= a0)  # one thread's timing ends before the other's starts


def test_the_wait_for_the_timing_lock_is_recorded(tmp_path, monkeypatch):
    """Under load a trial may spend its time waiting for other trials' timings: it says so."""
    import threading
    import time

    from nas import measure, timing
    from nas.builder import build

    monkeypatch.setenv("NAS_MEASURE_LOCK", str(tmp_path / "lock"))
    arch = ArchConfig(1, 10, (8, 8), "2d", 8, (BlockConfig("conv", 16, 3, 2, stage=0),))
    path = measure.export_onnx(build(arch).eval(), torch.zeros(1, 1, 8, 8), tmp_path / "m.onnx")
    assert measure.onnx_latency(path, (1, 1, 8, 8), warmup=2, repeats=64, max_attempts=1).lock_wait_s < 0.2
    held = threading.Event()

    def hold() -> None:
        with measure.measure_lock():
            held.set()
            time.sleep(0.5)

    th = threading.Thread(target=hold)
    th.start()
    held.wait()
    lat = measure.onnx_latency(path, (1, 1, 8, 8), warmup=2, repeats=64, max_attempts=1)
    th.join()
    assert lat.lock_wait_s >= 0.3
