"""Every registered compression method and codec, as test_blocks is over the block registry:
each round-trips through pack/decode, exports to ONNX carrying exactly its packed weights, and
shows the effect it declares on a model where it should."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import torch

from nas.builder import build
from nas.compress.deploy import deploy_onnx, graph_nodes, onnx_predict, weights_off_packed
from nas.compress.pack import WeightPlan, pack_state, unpack_state
from nas.compress.passes import (
    compress,
    dynamic_latency,
    load_packed,
    pack_model,
    trained_arch,
    trained_model,
    training_terms,
)
from nas.compress.quantize import quantize_codes, snap
from nas.compress.registry import CODECS, METHODS, ordered_methods
from nas.config import ArchConfig, BlockConfig, Candidate, CompressionConfig, Recipe
from nas.measure import count_params, export_onnx
from nas.pipeline import Task, get_dataset
from nas.train import predict, train

# stage 0 holds two identical mbconvs (sharing ties them) and 1x1 convs (low-rank factorizes them)
ARCH = ArchConfig(1, 10, (8, 8), "2d", 16,
                  (BlockConfig("conv", 24, 3, 1, stage=0), BlockConfig("mbconv", 24, 3, 1, 4, stage=0),
                   BlockConfig("mbconv", 24, 3, 1, 4, stage=0), BlockConfig("dsconv", 32, 3, 2, stage=1)))
RECIPE = Recipe(epochs=3, lr=0.01)
EXAMPLE = torch.zeros(1, 1, 8, 8)


@pytest.fixture(scope="module")
def data():
    return get_dataset("digits", 0)


@pytest.fixture(scope="module")
def trained(data):
    torch.manual_seed(0)
    model = build(ARCH)
    train(model, data.x_train, data.y_train, RECIPE, seed=0)
    return model.state_dict()


def _shipped(cfg: CompressionConfig, state, data):
    cand = Candidate(ARCH, cfg, RECIPE)
    model = trained_model(cand)
    if trained_arch(cand) == ARCH and set(model.state_dict()) == set(state):
        model.load_state_dict(state)
    else:  # a method that changes what is trained (sharing, exit heads): train that model
        torch.manual_seed(0)
        train(model, data.x_train, data.y_train, RECIPE, seed=0)
    compressed = compress(model.eval(), cand, data, 0)
    blob = pack_model(compressed, cfg)
    return compressed, blob, load_packed(cand, blob)


def _cfg(genes: dict) -> CompressionConfig:
    return CompressionConfig(**{"finetune_epochs": 1, **genes})


def test_registry_is_complete_and_ordered():
    names = [m.name for m in ordered_methods()]
    assert {"prune", "lowrank", "sparsity", "quant", "cluster", "huffman", "share", "distill"} <= set(names)
    assert names.index("prune") < names.index("quant") < names.index("cluster")
    assert set(CODECS) == {"fp32", "fp16", "int8", "int4", "int2", "ternary", "binary"}
    for m in ordered_methods():
        assert m.example and all(g in CompressionConfig().to_dict() for g in m.example), m.name


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_round_trips_exports_and_shows_its_effect(name, data, trained, tmp_path):
    method = METHODS[name]
    cfg = _cfg(method.example)
    own = {g.name for g in method.genes}
    base = _cfg({k: v for k, v in method.example.items() if k not in own})
    assert method.active(cfg) == bool(method.effect) and not method.active(base)
    compressed, blob, shipped = _shipped(cfg, trained, data)
    # 1. the packed file decodes into the compressed model (BatchNorm and biases may be stored
    # as fp16 beside low-bit weights); packing the decoded model again loses nothing more
    again = load_packed(Candidate(ARCH, cfg, RECIPE), pack_model(shipped, cfg))
    with torch.no_grad():
        np.testing.assert_allclose(shipped(data.x_val[:32]).numpy(), compressed.eval()(data.x_val[:32]).numpy(),
                                   atol=1e-2)
        np.testing.assert_allclose(again(data.x_val[:32]).numpy(), shipped(data.x_val[:32]).numpy(), atol=1e-5)
    # 2. its deployable ONNX model carries exactly the packed weights and runs
    path, precision, _ = deploy_onnx(shipped, cfg, EXAMPLE, tmp_path / "m.onnx", data.x_train[:16])
    ref = onnx.load(str(export_onnx(shipped, EXAMPLE, tmp_path / "ref.onnx"))).graph
    assert weights_off_packed(path, ref) == []
    agree = (onnx_predict(path, data.x_val).argmax(1) == predict(shipped, data.x_val).numpy().argmax(1)).mean()
    assert agree >= (0.9 if "int8" in precision else 1.0)
    # 3. the effect it declares, against the same genes with its own off
    b_compressed, b_blob, b_shipped = _shipped(base, trained, data)
    if "params" in method.effect:
        assert count_params(shipped) < count_params(b_compressed)
    if "bytes" in method.effect:
        assert len(blob) < len(b_blob)
    if "nodes" in method.effect:  # a leaner deployed graph (at this scale latency is node count)
        b_path, _, _ = deploy_onnx(b_shipped, base, EXAMPLE, tmp_path / "b.onnx",
                                data.x_train[:16])
        assert len(onnx.load(str(path)).graph.node) < len(onnx.load(str(b_path)).graph.node)
    if "exits" in method.effect:  # control flow in the deployed graph: some inputs answered early
        assert any(n.op_type == "If" for n in graph_nodes(onnx.load(str(path)).graph))
        assert dynamic_latency(cfg) and not dynamic_latency(base)
        shares = method.metrics(shipped, cfg, data)["exit_share_val"]
        assert sum(shares[:-1]) > 0 and abs(sum(shares) - 1) < 1e-9
    if "loss" in method.effect:
        loss, _ = training_terms(cfg, Task(teacher_epochs=1), data)
        assert loss is not None and training_terms(base, Task(), data)[0] is None
    assert predict(shipped, data.x_val).argmax(1).eq(data.y_val).float().mean() > 0.3  # still a classifier


@pytest.mark.parametrize("name", sorted(CODECS))
def test_every_codec_round_trips_and_deploys_exactly(name, data, trained, tmp_path):
    codec = CODECS[name]
    w = trained["body.0.conv.0.weight"].clone()
    q = snap(w, name)
    plan = WeightPlan(codec=name)
    back = unpack_state(pack_state({"w": q}, {"w": plan}))["w"]
    torch.testing.assert_close(back, q, atol=1e-8, rtol=1e-6)  # lossless on its own grid (scale rounding aside)
    if codec.kind == "int":
        codes, _ = quantize_codes(w, name)
        assert codes.abs().max() <= codec.qmax
        sym = codec.symbols(codes.long())
        assert sym.min() >= 0 and sym.max() < 2**codec.bits and torch.equal(codec.codes(sym), codes.long())
    # stored size follows the bits
    assert len(pack_state({"w": q}, {"w": plan})) < len(pack_state({"w": w}, {"w": WeightPlan()})) or codec.bits == 32
    cfg = _cfg({"quant": name})
    _, _, shipped = _shipped(cfg, trained, data)
    path, precision, _ = deploy_onnx(shipped, cfg, EXAMPLE, tmp_path / "m.onnx", data.x_train[:16])
    assert precision == ("int8" if codec.deploy == "int8" else "fp32")
    ref = onnx.load(str(export_onnx(shipped, EXAMPLE, tmp_path / "ref.onnx"))).graph
    assert weights_off_packed(path, ref) == []


@pytest.mark.parametrize("genes", [{"prune": "l1", "prune_ratio": 0.5}, {"quant": "ternary"}], ids=["structural", "parametrize"])
def test_finetuning_spends_its_budget_and_recovers_what_compression_cost(genes, data, trained):
    """The finetune gene (effect: none of its own) is the budget the other methods spend: with
    it at 0 nothing is trained after compressing, and with epochs the accuracy comes back."""
    def shipped_accuracy(epochs: int) -> float:
        cfg = CompressionConfig(**genes, finetune_epochs=epochs)
        compressed, _, shipped = _shipped(cfg, trained, data)
        return float(predict(shipped, data.x_val).argmax(1).eq(data.y_val).float().mean())

    untuned, tuned = shipped_accuracy(0), shipped_accuracy(2)
    assert tuned > untuned + 0.02, (untuned, tuned)


def test_conflicts_between_methods_are_refused_at_registration():
    from dataclasses import dataclass

    from nas.compress.registry import register_method
    from nas.compress.weight_only import WeightOnly
    from nas.genes import MethodConfig, gene, register_config, unregister_config

    with pytest.raises(ValueError, match="gene 'quant' already belongs to method 'quant'"):
        @register_config
        @dataclass(frozen=True)
        class Clash(MethodConfig):
            method, order = "clash", 99
            quant: str = gene("fp32")
    with pytest.raises(ValueError, match="reads \\['nothing'\\]"):
        @register_config
        @dataclass(frozen=True)
        class Reader(MethodConfig):
            method, order, reads = "reader", 99, ("nothing",)
            reader_on: bool = gene(False)

    @register_config
    @dataclass(frozen=True)
    class Other(MethodConfig):
        method, order = "other_float", 99
        other_float: bool = gene(False)

    try:
        # weight_only and cluster both answer float_deploy: allowed only because weight_only
        # declares that it is never active with cluster; a third supplier without that is refused
        class Third(WeightOnly):
            config, excludes = Other, ()

        with pytest.raises(ValueError, match="both supply 'float_deploy'"):
            register_method(Third)
        assert "other_float" not in METHODS
        assert "cluster" in WeightOnly.excludes
    finally:
        unregister_config("other_float")
    assert "other_float" not in CompressionConfig().to_dict()


def test_the_readme_method_registers_and_compresses(data, trained, tmp_path):
    """The README's worked example, run as a user would: its file imported, then the gene used
    in a space, a candidate, compress() and the packed file."""
    import importlib.util
    import re
    import sys
    from pathlib import Path

    from nas.compress.registry import unregister_method
    from nas.genes import unregister_config
    from nas.space import parse_space

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    code = re.search(r"```python\n# mythreshold.py\n(.*?)```", readme, re.S).group(1)
    (tmp_path / "mythreshold.py").write_text(code)
    spec = importlib.util.spec_from_file_location("mythreshold", tmp_path / "mythreshold.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["mythreshold"] = module
    try:
        spec.loader.exec_module(module)
        cfg = _cfg({"threshold": 0.5})
        assert cfg[module.ThresholdConfig].threshold == 0.5 and "threshold 0.5" in cfg.summary()
        assert parse_space({"name": "t", "stem_channels": 8, "stages": [{"block": "conv", "width": 8}],
                            "compression": {"threshold": [0.0, 0.5]}}).compression["threshold"].options() == [0.0, 0.5]
        compressed, blob, shipped = _shipped(cfg, trained, data)
        _, plain, _ = _shipped(_cfg({}), trained, data)
        assert len(blob) < len(plain)  # the effect it declares
        w = shipped.body[0].conv[0].weight
        assert (w == 0).any() and torch.equal(w == 0, compressed.body[0].conv[0].weight == 0)
    finally:
        if "threshold" in METHODS:
            unregister_method("threshold")
        from nas.genes import CONFIGS

        if "threshold" in CONFIGS:
            unregister_config("threshold")
        sys.modules.pop("mythreshold", None)
    assert "threshold" not in CompressionConfig().to_dict()


def test_a_method_of_your_own_is_found_through_nas_plugins(tmp_path):
    """Every command and worker imports the modules $NAS_PLUGINS names once the built-ins are in;
    a plugin that cannot be imported is one line naming it."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    (tmp_path / "mythreshold.py").write_text(re.search(r"```python\n# mythreshold.py\n(.*?)```", readme, re.S).group(1))
    env = {**__import__("os").environ, "NAS_PLUGINS": "mythreshold",
           "PYTHONPATH": f"{tmp_path}:{__import__('os').environ.get('PYTHONPATH', '')}"}
    code = ("import nas.compress; from nas.config import Candidate, CompressionConfig; "
            "print(CompressionConfig(threshold=0.5).summary(), 'threshold' in nas.compress.METHODS)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["threshold", "0.5", "True"], out.stderr[-800:]
    env["NAS_PLUGINS"] = "no_such_plugin"
    bad = subprocess.run([sys.executable, "-m", "nas.cli", "search", "--trials", "1"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "'no_such_plugin'" in bad.stderr, bad.stderr[-800:]
