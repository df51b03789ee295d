"""Early exit (nas.compress.early_exit): exit heads trained jointly, thresholds calibrated on
validation, one ONNX graph with If nodes that runs only the segments an input needs, latency
as the mean over the validation inputs, and a bundle that exports, verifies and loads."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
import torch

from nas.cli import main
from nas.compress.deploy import graph_nodes, onnx_predict
from nas.compress.early_exit import GRID, NEVER, EarlyExitNet, answered_by, exit_points, exit_stages
from nas.builder import build
from nas.compress.passes import load_packed
from nas.config import ArchConfig, BlockConfig, Candidate, CompressionConfig, Recipe
from nas.pipeline import Task, evaluate, get_dataset
from nas.space import SpaceError, parse_space
from nas.train import predict

ARCH = ArchConfig(1, 10, (8, 8), "2d", 16,
                  (BlockConfig("conv", 16, 3, 1, stage=0), BlockConfig("conv", 32, 3, 2, stage=1),
                   BlockConfig("conv", 48, 3, 2, stage=2)))


def test_gene_values_and_where_the_exits_sit():
    assert exit_stages("none") == () and exit_stages("1") == (1,) and exit_stages("1+0") == (0, 1)
    assert exit_stages(1) == (1,)  # a YAML integer
    assert exit_points(ARCH, (0, 1)) == [0, 1]
    assert exit_points(ARCH, (2,)) == []  # never after the last stage
    assert exit_points(ARCH, (5,)) == []  # a stage the network does not have (left out)
    assert all(float(torch.tensor(t).half()) == t for t in GRID)  # fp16-exact: packed as chosen
    conf = np.array([[0.9, 0.4, 0.7], [0.95, 0.99, 0.1]])
    assert answered_by(conf, (0.8, 0.9)).tolist() == [0, 1, 2]
    assert answered_by(conf, (NEVER, NEVER)).tolist() == [2, 2, 2]


@pytest.mark.parametrize(("value", "message"), [
    ("1+x", "compression.early_exit: '1+x' must be 'none' or stage indices joined by '+'"),
    ("-1", "compression.early_exit: '-1' stage indices must be >= 0"),
    ("0+1+2+3", "at most 3 exits"),
    (1, "compression.early_exit: 1 is not a str (YAML reads 1 as a number: write it in quotes, '1')"),
])
def test_bad_gene_values_are_one_line_errors(value, message):
    raw = {"name": "s", "spatial": "2d", "stem_channels": 8, "head": "gap",
           "stages": [{"block": "conv", "depth": 1, "width": 8, "kernel": 3, "stride": 1}],
           "recipe": {"epochs": 1, "lr": 0.01}, "compression": {"early_exit": ["none", value]}}
    with pytest.raises(SpaceError, match=re.escape(message)) as err:
        parse_space(raw)
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def exit_trial(tmp_path_factory):
    out = tmp_path_factory.mktemp("ee")
    cfg = CompressionConfig(quant="int8", weight_only=True, early_exit="0+1", exit_loss=0.01, finetune_epochs=1)
    cand = Candidate(ARCH, cfg, Recipe(epochs=4, lr=0.01))
    res = evaluate(cand, Task(dataset="digits", artifacts_dir=str(out)), trial_id="t")
    return cand, res


def test_exits_are_trained_calibrated_and_shipped_as_one_graph_with_control_flow(exit_trial):
    cand, res = exit_trial
    m, folder = res.metrics, res.artifact_dir
    data = get_dataset("digits", 0)
    shipped = load_packed(cand, (folder and open(f"{folder}/weights.nasp", "rb").read()))
    assert isinstance(shipped, EarlyExitNet) and len(shipped.exits) == 2
    own = m["method_metrics"]["early_exit"]
    # thresholds from the grid, calibrated to cost at most exit_loss of validation accuracy
    assert all(t in GRID for t in own["thresholds"]) and own["thresholds"] == shipped.exit_thresholds.tolist()
    assert m["val_accuracy"] >= own["full_depth_val_accuracy"] - 0.01 - 1e-9
    shares = own["exit_share_val"]
    assert len(shares) == 3 and abs(sum(shares) - 1) < 1e-9 and shares[0] + shares[1] > 0  # some leave early
    # the shipped ONNX graph: nested Ifs, every layer once, and the same answers as the packed model
    graph = onnx.load(f"{folder}/model.onnx").graph
    ops = [n.op_type for n in graph_nodes(graph)]
    assert ops.count("If") == 2 and ops.count("Gemm") == 3 and ops.count("Conv") == 4
    onnx_pred = onnx_predict(f"{folder}/model.onnx", data.raw("val")).argmax(1)  # raw: it normalises them
    assert (onnx_pred == predict(shipped, data.x_val).numpy().argmax(1)).all()
    assert m["val_accuracy"] == float((onnx_pred == data.y_val.numpy()).mean())  # the artifact's accuracy
    # latency of input-dependent work: mean over the validation inputs, p95 beside; size counts the heads
    assert m["latency_inputs"] == len(data.y_val) and m["latency_p95_ms"] >= m["latency_ms"] * 0.9
    assert m["deploy_precision"] == "fp32 (early-exit graph)" and m["size_bytes"] > 0


def test_the_recorded_exporter_is_the_one_that_wrote_the_early_exit_graph(exit_trial, tmp_path, monkeypatch):
    """It travels with the deployed file (it used to be a module global, read after the whole
    deploy: '' in a fresh process, or whatever the previous export of the process used)."""
    from nas.compress.deploy import deploy_onnx
    from nas.measure import export_onnx_as

    cand, res = exit_trial
    assert res.metrics["onnx_exporter"] == "torchscript"  # its segments are traced by the TorchScript exporter
    real = torch.onnx.export

    def no_torchscript(*a, **k):
        if not k.get("dynamo", True):
            raise RuntimeError("no TorchScript exporter here")
        return real(*a, **k)

    monkeypatch.setattr(torch.onnx, "export", no_torchscript)
    assert export_onnx_as(build(ARCH).eval(), torch.zeros(1, 1, 8, 8), tmp_path / "d.onnx")[1] == "dynamo"
    monkeypatch.undo()
    shipped = load_packed(cand, open(f"{res.artifact_dir}/weights.nasp", "rb").read())
    deployed = deploy_onnx(shipped, cand.compression, torch.zeros(1, 1, 8, 8), tmp_path / "e.onnx",
                           get_dataset("digits", 0).x_train[:16])
    assert (deployed.precision, deployed.exporter) == ("fp32 (early-exit graph)", "torchscript")


def test_an_input_leaves_at_its_first_confident_exit(exit_trial):
    """Thresholds set by hand: all at NEVER runs full depth, the first at 0 answers everything
    from exit 1; the ONNX graph does what the PyTorch model does in both cases."""
    cand, res = exit_trial
    data = get_dataset("digits", 0)
    shipped = load_packed(cand, open(f"{res.artifact_dir}/weights.nasp", "rb").read())
    x = data.x_val[:40]
    with torch.no_grad():
        outs, final = shipped.stages_out(x)
        for ths, want in (((NEVER, NEVER), final), ((0.0, NEVER), outs[0]), ((NEVER, 0.0), outs[1])):
            shipped.exit_thresholds.copy_(torch.tensor(ths))
            torch.testing.assert_close(shipped(x), want)
            from nas.compress.early_exit import exit_graph

            path = exit_graph(shipped, x[:1], res.artifact_dir and __import__("pathlib").Path(res.artifact_dir) / "h.onnx")
            np.testing.assert_allclose(onnx_predict(path, x), want.numpy(), atol=1e-4)


@pytest.mark.parametrize(("genes", "message"), [
    ({"prune": "l1", "prune_ratio": 0.5, "early_exit": "0"}, "does not combine with structured pruning"),
    ({"quant": "int8", "early_exit": "0"}, "integer weights need weight_only: true"),
    ({"early_exit": "2"}, r"exits go after stages \[0, 1\] of this network \(not after its last stage 2"),
    ({"early_exit": "0+7"}, "nor after a stage it leaves out"),
])
def test_candidates_the_exits_cannot_serve_fail_in_preflight_with_the_reason(genes, message):
    from nas.compress.passes import trained_model
    from nas.errors import TrialFailure

    cand = Candidate(ARCH, CompressionConfig(**genes), Recipe(epochs=1))
    with pytest.raises(ValueError, match=message):
        trained_model(cand)
    with pytest.raises(TrialFailure, match="infeasible candidate: .*" + message):
        evaluate(cand, Task(dataset="digits"))


def test_the_gene_is_not_sampled_where_it_cannot_apply():
    from nas.genes import genes

    matters = genes()["early_exit"].matters
    assert matters({"prune": "none", "quant": "int8", "weight_only": True})
    assert matters({"prune": "none", "quant": "fp32", "weight_only": False})
    assert not matters({"prune": "l1", "quant": "fp32"})
    assert not matters({"prune": "none", "quant": "int4", "weight_only": False})


def test_search_with_the_gene_exports_a_bundle_that_verifies_and_loads(tmp_path, monkeypatch, capsys):
    import yaml

    monkeypatch.chdir(tmp_path)
    space = {"name": "ee", "spatial": "2d", "stem_channels": 16, "head": "gap",
             "stages": [{"block": "conv", "depth": 1, "width": 16, "kernel": 3, "stride": 1},
                        {"block": "conv", "depth": 1, "width": 32, "kernel": 3, "stride": 2},
                        {"block": "conv", "depth": 1, "width": 48, "kernel": 3, "stride": 2}],
             "recipe": {"epochs": 3, "lr": 0.01},
             "compression": {"quant": ["fp32", "int8"], "weight_only": [True], "early_exit": ["0", "1", "0+1"],
                             "finetune_epochs": 1}}
    (tmp_path / "ee.yaml").write_text(yaml.safe_dump(space))
    db = f"sqlite:///{tmp_path}/s.db"
    assert main(["search", "--space", "ee.yaml", "--trials", "3", "--study", "ee", "--storage", db, "--quiet",
                 "--sampler", "random", "--no-early-stop"]) == 0
    import optuna

    study = optuna.load_study(study_name="ee", storage=db)
    best = max((t for t in study.trials if t.state.name == "COMPLETE"), key=lambda t: t.values[0])
    assert "early exit after stage" in best.user_attrs["compression_summary"]
    assert main(["export", "ee", "--storage", db, "--trial", str(best.number), "--out", "bundle"]) == 0
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert "latency_p95_ms" in manifest["metrics"] and "early_exit" in manifest["metrics"]["method_metrics"]
    card = (tmp_path / "bundle" / "MODEL_CARD.md").read_text()
    assert "mean over" in card and "Which exit answered the validation inputs: exit 1" in card
    capsys.readouterr()
    assert main(["verify", "bundle"]) == 0
    out = capsys.readouterr().out
    assert "verified" in out and "FAIL" not in out
    import nas

    model, _ = nas.load_bundle(tmp_path / "bundle")
    data = get_dataset("digits", 0)
    logits = model(data.raw("test")[:50].numpy())
    with torch.no_grad():
        ref = model.torch_model(data.raw("test")[:50]).numpy()
    assert (logits.argmax(1) == ref.argmax(1)).all()
