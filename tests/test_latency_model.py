"""A device's latency model (nas.latency_model): graph features, the untrusted device.json,
``nas probe profile`` and ``nas search --latency-model``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from nas.cli import main
from nas.errors import ConfigError
from nas.latency_model import FEATURES, LatencyModel, graph_features, read_profile


def _conv_graph(path: Path, *, int8: bool = False) -> Path:
    """x[1,4,8,8] -> dense 3x3 conv (8 out) -> depthwise 3x3 (group 8) -> pointwise 1x1 (16 out)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 8, 8])
    inits = [helper.make_tensor("w1", TensorProto.FLOAT, [8, 4, 3, 3], [0.1] * 288),
             helper.make_tensor("w2", TensorProto.FLOAT, [8, 1, 3, 3], [0.1] * 72),
             helper.make_tensor("w3", TensorProto.FLOAT, [16, 8, 1, 1], [0.1] * 128)]
    nodes = []
    src = "x"
    if int8:
        inits += [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]), helper.make_tensor("z", TensorProto.UINT8, [], [128])]
        nodes += [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
                  helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"])]
        src = "xd"
    nodes += [helper.make_node("Conv", [src, "w1"], ["a"], pads=[1, 1, 1, 1]),
              helper.make_node("Conv", ["a", "w2"], ["b"], pads=[1, 1, 1, 1], group=8),
              helper.make_node("Conv", ["b", "w3"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)])
    path.write_bytes(model.SerializeToString())
    return path


def test_graph_features_count_each_convolution_kind(tmp_path):
    f = graph_features(_conv_graph(tmp_path / "m.onnx"))
    assert f["fp32_dense_macs"] == 8 * 8 * 8 * 4 * 9 and f["fp32_dense_out"] == 8 * 64
    assert f["fp32_depthwise_macs"] == 8 * 64 * 9 and f["fp32_pointwise_macs"] == 16 * 64 * 8
    assert f["nodes"] == 3 and f["int8_dense_macs"] == 0 and f["weight_bytes"] == 4 * (288 + 72 + 128)
    q = graph_features(_conv_graph(tmp_path / "q.onnx", int8=True))
    assert q["int8_dense_macs"] == f["fp32_dense_macs"] and q["fp32_dense_macs"] == 0 and q["quant_nodes"] == 2
    assert set(f) == set(FEATURES)


def test_runtime_features_attribute_each_convolution_to_the_kernel_onnx_runtime_runs(tmp_path):
    """The graph after ONNX Runtime's own optimizations: every convolution runs as one kernel
    (fused or not), and all of its work is attributed to that kernel's class."""
    f = graph_features(_conv_graph(tmp_path / "m.onnx"))
    kernels = ("conv_nchwc", "conv_fused", "conv_plain", "qconv")
    assert sum(f[f"rt_nodes_{k}"] for k in kernels) == 3
    for kind in ("dense", "depthwise", "pointwise"):
        assert sum(f[f"rt_{k}_{kind}_macs"] for k in kernels) == f[f"fp32_{kind}_macs"]
        assert sum(f[f"rt_{k}_{kind}_n"] for k in kernels) == 1
    assert f["rt_nodes_qconv"] == 0


def _profile(path: Path, samples: list, **extra) -> Path:
    path.write_text(json.dumps({"version": 2, "device": {"latency_cpu": "x", "latency_cores": 2}, "samples": samples,
                                **extra}))
    return path


def _samples(n: int = 40) -> list:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        f = {k: float(rng.integers(0, 10_000)) for k in FEATURES}
        out.append({"features": f, "latency_ms": 0.005 + 1e-6 * f["fp32_dense_macs"] + 2e-7 * f["elementwise_out"]})
    return out


def test_additive_model_recovers_a_linear_device(tmp_path):
    prof = read_profile(_profile(tmp_path / "d.json", _samples(60)))
    fit, test = prof["samples"][:45], prof["samples"][45:]
    model = LatencyModel(fit, "additive")
    pred = model.predict([f for f, _ in test])
    true = np.array([v for _, v in test])
    assert np.all(np.abs(pred - true) / true < 0.02)


@pytest.mark.parametrize("content,needle", [
    ("not json", "not a JSON device profile"),
    ('{"version": 1, "device": {}, "samples": []}', "version 2"),
    ('{"version": 2, "device": {"a": [1]}, "samples": []}', "'device' must map names"),
    ('{"version": 2, "device": {}, "samples": {}}', "'samples' must be a list"),
    ('{"version": 2, "device": {}, "samples": [{"features": {}, "latency_ms": -1}]}', "a number > 0"),
    ('{"version": 2, "device": {}, "samples": [{"features": {"evil": 1}, "latency_ms": 1}]}', "unknown: evil"),
    ('{"version": 2, "device": {}, "samples": [{"features": {"nodes": NaN}, "latency_ms": 1}]}', "bad value"),
    ('{"version": 2, "device": {}, "samples": [{"features": {}, "latency_ms": 1}], "method": "pickle"}', "method"),
])
def test_malformed_profiles_are_one_line(tmp_path, content, needle):
    (tmp_path / "d.json").write_text(content)
    with pytest.raises(ConfigError, match=needle) as info:
        read_profile(tmp_path / "d.json")
    assert "\n" not in str(info.value)


def test_too_few_samples_and_a_huge_file_are_refused(tmp_path, monkeypatch):
    import nas.latency_model

    with pytest.raises(ConfigError, match="at least 20"):
        LatencyModel(read_profile(_profile(tmp_path / "d.json", _samples(5)))["samples"])
    monkeypatch.setattr(nas.latency_model, "MAX_FILE_BYTES", 100)
    with pytest.raises(ConfigError, match="at most 100"):
        read_profile(_profile(tmp_path / "d.json", _samples(5)))


def test_search_refuses_a_bad_profile_before_storing_anything(tmp_path, capsys):
    (tmp_path / "d.json").write_text('{"version": 2}')
    db = tmp_path / "s.db"
    code = main(["search", "--trials", "2", "--epochs", "1", "--storage", f"sqlite:///{db}", "--quiet",
                 "--latency-model", str(tmp_path / "d.json"), "--artifacts", str(tmp_path / "art")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "device" in err and not db.exists(), err


@pytest.mark.slow  # a long end-to-end run: deselected by default, CI runs it (`pytest -m slow`)
def test_profile_then_search_offline_with_predicted_latency(tmp_path, capsys):
    import optuna

    from nas.latency_model import load_latency_model

    dev = tmp_path / "device.json"
    assert main(["probe", "profile", "--samples", "24", "-o", str(dev)]) == 0
    prof = json.loads(dev.read_text())
    assert len(prof["samples"]) == 24 and prof["device"]["latency_cores"] >= 1
    assert all(s["latency_ms"] > 0 for s in prof["samples"])
    db = f"sqlite:///{tmp_path / 's.db'}"
    assert main(["search", "--trials", "3", "--epochs", "1", "--study", "m", "--storage", db, "--quiet",
                 "--latency-model", str(dev), "--artifacts", str(tmp_path / "art")]) == 0
    study = optuna.load_study(study_name="m", storage=db)
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert done
    model, _ = load_latency_model(dev)
    for t in done:
        assert t.user_attrs["latency_source"] == "predicted" and t.user_attrs["latency_device"] == "model device.json"
        # the objective is the shipped graph's prediction (a prediction has no noise to take
        # the faster of two timings against), whatever the untrained pre-flight graph predicted
        shipped = Path(t.user_attrs["artifact_dir"]) / "model.onnx"
        assert t.values[1] == t.user_attrs["latency_ms"] > 0
        assert t.values[1] == pytest.approx(model.predict(graph_features(shipped)), rel=1e-9)
    capsys.readouterr()
    assert main(["probe", "profile", "--samples", "24", "-o", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
