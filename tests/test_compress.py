from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import torch

from nas.builder import build
from nas.compress import huffman
from nas.compress.distill import distill_loss_fn, kd_loss
from nas.compress.pack import WeightPlan, pack_state, unpack_state
from nas.compress.deploy import deploy_onnx, onnx_predict
from nas.compress.passes import compress, final_model, load_packed, pack_model
from nas.compress.prune import prune_structured, target_widths
from nas.config import ArchConfig, BlockConfig, Candidate, CompressionConfig, Recipe
from nas.measure import count_flops, count_params
from nas.pipeline import get_dataset
from nas.train import accuracy, predict, train

ARCH = ArchConfig(
    1, 10, (8, 8), "2d", 16,
    (BlockConfig("conv", 24, 3, 1, stage=0), BlockConfig("mbconv", 24, 3, 1, 2, stage=0),
     BlockConfig("mbconv", 24, 3, 1, 2, stage=0), BlockConfig("dsconv", 32, 3, 2, stage=1),
     BlockConfig("factorized", 32, 3, 1, stage=1), BlockConfig("conv", 48, 3, 2, stage=2)),
)
RECIPE = Recipe(epochs=6, lr=0.01)


@pytest.fixture(scope="module")
def data():
    return get_dataset("digits", 0)


@pytest.fixture(scope="module")
def trained(data):
    torch.manual_seed(0)
    model = build(ARCH)
    train(model, data.x_train, data.y_train, RECIPE, seed=0)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def trained_shared(data):
    """Sharing is structural: the pipeline trains the tied network from the start (weights
    trained untied and then tied are whichever block loaded last: near chance, by luck)."""
    torch.manual_seed(0)
    model = build(dataclasses.replace(ARCH, share=True))
    train(model, data.x_train, data.y_train, RECIPE, seed=0)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _fresh(state, share=False):
    model = build(dataclasses.replace(ARCH, share=share))
    model.load_state_dict(state)
    return model.eval()


METHODS = {
    "prune_l1": CompressionConfig(prune="l1", prune_ratio=0.5),
    "prune_bn_iterative": CompressionConfig(prune="bn", prune_ratio=0.5, prune_rounds=2),
    "prune_per_stage": CompressionConfig(prune="l1", stage_prune_ratios=(0.25, 0.5, 0.0)),
    "prune_multiple_8": CompressionConfig(prune="l1", prune_ratio=0.375, prune_multiple=8),
    "sparsity": CompressionConfig(sparsity=0.7),
    "fp16": CompressionConfig(quant="fp16"),
    "int8": CompressionConfig(quant="int8"),
    "int4": CompressionConfig(quant="int4"),
    "int2": CompressionConfig(quant="int2"),
    "ternary": CompressionConfig(quant="ternary"),
    "binary": CompressionConfig(quant="binary"),
    "mixed_precision": CompressionConfig(stage_quant=("int8", "int4", "fp16")),
    "cluster": CompressionConfig(cluster_bits=4),
    "cluster_huffman_sparse": CompressionConfig(cluster_bits=4, huffman=True, sparsity=0.5),
    "int4_huffman": CompressionConfig(quant="int4", huffman=True),
    "lowrank": CompressionConfig(lowrank=0.5),
    "share": CompressionConfig(share=True),
    "everything": CompressionConfig(prune="bn", prune_ratio=0.25, sparsity=0.5, quant="int4", huffman=True,
                                    lowrank=0.5, share=True),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_keeps_accuracy_and_packed_file_round_trips(name, data, trained, trained_shared, tmp_path):
    cfg = METHODS[name].replace(finetune_epochs=2)
    cand = Candidate(ARCH, cfg, RECIPE)
    model = compress(_fresh(trained_shared if cfg.share else trained, share=cfg.share), cand, data, seed=0)
    acc = accuracy(model, data.x_val, data.y_val)
    assert acc > 0.5, f"{name}: accuracy {acc:.3f} (chance is 0.1)"

    blob = pack_model(model, cfg)
    (tmp_path / "w.nasp").write_bytes(blob)
    shipped = load_packed(cand, (tmp_path / "w.nasp").read_bytes())
    got, want = predict(shipped, data.x_val), predict(model, data.x_val)
    # the decoded model is the compressed one: identical up to BatchNorm stored in its inference
    # form (float rounding), and fp16 storage of BatchNorm beside low-bit weights
    tol = 1e-5 if all(p == "fp32" for p in cfg.precisions) and not cfg.cluster_bits else 5e-2
    assert torch.allclose(got, want, atol=tol, rtol=tol), f"{name}: max diff {(got - want).abs().max()}"
    assert (got.argmax(1) == want.argmax(1)).float().mean() > 0.98
    # the final shape is known before training: an untrained final model has the same structure
    assert [(k, v.shape) for k, v in final_model(cand).state_dict().items()] == \
           [(k, v.shape) for k, v in shipped.state_dict().items()]


def test_size_ordering_fp32_fp16_int8_int4_int2_binary(data, trained):
    sizes = {}
    for q in ("fp32", "fp16", "int8", "int4", "int2", "binary"):
        cfg = CompressionConfig(quant=q, finetune_epochs=0)
        sizes[q] = len(pack_model(compress(_fresh(trained), Candidate(ARCH, cfg, RECIPE), data, 0), cfg))
    values = list(sizes.values())
    assert values == sorted(values, reverse=True) and len(set(values)) == len(values), sizes
    params = count_params(_fresh(trained))
    assert sizes["fp32"] >= 4 * params  # the full-precision file really holds every weight
    # 1 bit per conv/linear weight; scales, fp16 BatchNorm and the header make up the rest
    assert sizes["binary"] < sizes["fp32"] / 8


def test_pruned_widths_round_to_the_runtime_channel_multiple():
    from nas.compress.passes import structural_arch
    from nas.compress.prune import channel_groups

    _, info = channel_groups(ARCH)
    plain, m8 = target_widths(ARCH, [0.375]), target_widths(ARCH, [0.375], multiple=8)
    assert target_widths(ARCH, [0.375], multiple=1) == plain and plain != m8
    for g, (width, _) in info.items():
        assert m8[g] % 8 == 0 and 8 <= m8[g] <= width and abs(m8[g] - 0.625 * width) <= 4, (g, width, m8[g])
    # nearest multiple, half up: 24 * 0.625 = 15 -> 16; 48 * 0.625 = 30 -> 32; 16 * 0.625 = 10 -> 8
    assert m8["i1"] == 16 and m8["h1"] == 32 and m8["i0"] == 8
    # never below one multiple, never above the width; a group narrower than the multiple keeps
    # the plain rounding
    assert set(target_widths(ARCH, [0.95], multiple=8).values()) == {8}
    narrow = ArchConfig(1, 10, (8, 8), "2d", 4, (BlockConfig("conv", 6, 3, 1, stage=0),))
    assert target_widths(narrow, [0.5], multiple=8) == target_widths(narrow, [0.5]) == {"i0": 2, "i1": 3}
    # nothing pruned, nothing narrowed: a width that is not a multiple is kept whole at ratio 0, and
    # each kept width is the nearest of the multiples and the width itself
    odd = ArchConfig(1, 10, (8, 8), "2d", 18, (BlockConfig("conv", 50, 3, 1, stage=0), BlockConfig("conv", 12, 3, 1, stage=1)))
    assert target_widths(odd, [0.0, 0.0], multiple=8) == {"i0": 18, "i1": 50, "i2": 12}
    assert target_widths(odd, [0.0, 0.1], multiple=8)["i2"] == 12  # 10.8: nearer 12 than 8
    assert target_widths(odd, [0.25, 0.0], multiple=8) == {"i0": 16, "i1": 40, "i2": 12}  # 13.5 -> 16, 37.5 -> 40
    # iterative rounds narrow monotonically to the one-shot widths
    rounds = [target_widths(ARCH, [0.375], fraction=j / 3, multiple=8) for j in (1, 2, 3)]
    assert all(rounds[i][g] >= rounds[i + 1][g] for i in range(2) for g in m8) and rounds[-1] == m8
    # the gene reaches the arch a candidate is built with (known before training)
    arch = structural_arch(Candidate(ARCH, CompressionConfig(prune="l1", prune_ratio=0.375, prune_multiple=8), RECIPE))
    widths = [arch.stem_channels] + [w for b in arch.blocks for w in (b.out_channels, b.hidden) if w]
    assert all(w % 8 == 0 for w in widths), widths


def test_structured_pruning_half_shrinks_params_and_flops(trained):
    model = _fresh(trained)
    pruned = prune_structured(model, target_widths(ARCH, [0.5, 0.5, 0.5]), "l1")
    x = torch.zeros(1, 1, 8, 8)
    assert count_params(pruned) < 0.5 * count_params(model)
    assert count_flops(pruned, x) < 0.5 * count_flops(model, x)
    assert pruned.arch.blocks[0].out_channels == 12 and pruned.arch.stem_channels == 8


def test_pruning_removes_the_least_important_channels_exactly(trained):
    # Zero half of the stem's BatchNorm gammas and betas: those channels carry nothing, so
    # pruning them by |gamma| must leave the outputs unchanged.
    arch = ArchConfig(1, 10, (8, 8), "2d", 16, (BlockConfig("conv", 24, 3, 1, stage=0),))
    torch.manual_seed(0)
    model = build(arch).eval()
    bn = model.stem[1]
    with torch.no_grad():
        bn.weight[::2] = 0
        bn.bias[::2] = 0
    widths = target_widths(arch, [0.5])
    widths["i1"] = 24  # prune only the stem's output group
    pruned = prune_structured(model, widths, "bn").eval()
    x = torch.randn(8, 1, 8, 8)
    assert pruned.arch.stem_channels == 8
    torch.testing.assert_close(pruned(x), model(x), atol=1e-5, rtol=1e-5)


def _packed(state, cfg, data):
    """What the pipeline deploys: the trained model compressed and decoded from its packed file."""
    cand = Candidate(ARCH, cfg, RECIPE)
    return load_packed(cand, pack_model(compress(_fresh(state), cand, data, 0, finetune=False), cfg))


def test_int8_export_has_quantized_ops_and_runs(data, trained, tmp_path):
    cfg = CompressionConfig(quant="int8")
    path, precision, _ = deploy_onnx(_packed(trained, cfg, data), cfg, torch.zeros(1, 1, 8, 8), tmp_path / "m.onnx",
                                  data.x_train[:32])
    graph = onnx.load(str(path)).graph
    ops = {n.op_type for n in graph.node}
    assert precision == "int8" and {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8_weights = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) >= 6  # every conv and the classifier store int8 weights
    logits = onnx_predict(path, data.x_val)
    fp32 = predict(_fresh(trained), data.x_val).numpy()
    assert (logits.argmax(1) == fp32.argmax(1)).mean() > 0.95


@pytest.mark.parametrize("cfg", [CompressionConfig(quant=q) for q in ("int8", "int4", "int2", "ternary", "binary")]
                         + [CompressionConfig(stage_quant=("int4", "fp16", "ternary")),
                            CompressionConfig(quant="int2", sparsity=0.5, huffman=True)], ids=str)
def test_deployed_int8_weights_are_exactly_the_packed_codes(data, trained, tmp_path, cfg):
    """The deployed QDQ graph dequantizes to the packed model's weights (per-channel scales of
    the packed codes); ONNX Runtime's own int8 scale would put sub-8-bit codes on another grid."""
    from nas.compress.deploy import weights_off_packed
    from nas.measure import export_onnx

    model = _packed(trained, cfg, data)
    path, precision, _ = deploy_onnx(model, cfg, torch.zeros(1, 1, 8, 8), tmp_path / "m.onnx", data.x_train[:32])
    assert "int8" in precision
    ref = onnx.load(str(export_onnx(model, torch.zeros(1, 1, 8, 8), tmp_path / "ref.onnx"))).graph
    assert weights_off_packed(path, ref) == []
    n_int8 = sum(i.data_type == onnx.TensorProto.INT8 for i in onnx.load(str(path)).graph.initializer)
    assert n_int8 >= (3 if cfg.stage_quant else 7)


def test_requantized_weights_are_caught(data, trained, tmp_path):
    """The check behind the deploy and `nas verify`: an int4 model quantized by ONNX Runtime's
    default scales (what the deploy did before) is reported as not carrying the packed weights."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from nas.compress.deploy import _Calibration, weights_off_packed
    from nas.measure import export_onnx

    model = _packed(trained, CompressionConfig(quant="int4"), data)
    fp32 = export_onnx(model, torch.zeros(1, 1, 8, 8), tmp_path / "f.onnx")
    from onnxruntime.quantization import CalibrationDataReader

    reader = type("R", (_Calibration, CalibrationDataReader), {})(onnx.load(str(fp32)).graph.input[0].name, data.x_train[:8])
    quantize_static(str(fp32), str(tmp_path / "q.onnx"), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    assert len(weights_off_packed(tmp_path / "q.onnx", onnx.load(str(fp32)).graph)) >= 6


def test_clustered_weights_deploy_as_exact_fp32(data, trained, tmp_path):
    cfg = CompressionConfig(cluster_bits=4)
    model = _packed(trained, cfg, data)
    path, precision, _ = deploy_onnx(model, cfg, torch.zeros(1, 1, 8, 8), tmp_path / "m.onnx", data.x_train[:4])
    assert precision == "fp32 (clustered weights)"
    np.testing.assert_array_equal(onnx_predict(path, data.x_val).argmax(1), predict(model, data.x_val).numpy().argmax(1))


def test_fp32_deploy_matches_pytorch(data, trained, tmp_path):
    path, precision, _ = deploy_onnx(_fresh(trained), CompressionConfig(), torch.zeros(1, 1, 8, 8), tmp_path / "m.onnx", data.x_train[:4])
    assert precision == "fp32"
    np.testing.assert_allclose(onnx_predict(path, data.x_val[:50]), predict(_fresh(trained), data.x_val[:50]).numpy(), atol=1e-4)


def test_distillation_soft_loss_scaling_and_student_learns(data, trained):
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    y = torch.tensor([1, 2, 3, 4])
    probs = torch.softmax(t / 4.0, 1)
    hard_only = kd_loss(s, y, probs, alpha=0.0, T=4.0)
    assert torch.isclose(hard_only, torch.nn.functional.cross_entropy(s, y))
    soft = kd_loss(s, y, probs, alpha=1.0, T=4.0)
    kl = torch.nn.functional.kl_div(torch.log_softmax(s / 4.0, 1), probs, reduction="batchmean")
    assert torch.isclose(soft, kl * 16)  # T^2 scaling

    teacher = _fresh(trained)
    student_arch = ArchConfig(1, 10, (8, 8), "2d", 8, (BlockConfig("dsconv", 16, 3, 1, stage=0),
                                                      BlockConfig("conv", 24, 3, 2, stage=1)))
    torch.manual_seed(0)
    student = build(student_arch)
    train(student, data.x_train, data.y_train, Recipe(epochs=6, lr=0.01), 0,
          loss_fn=distill_loss_fn([teacher, teacher], alpha=0.7, T=4.0))
    assert accuracy(student, data.x_val, data.y_val) > 0.6


def test_huffman_round_trip_and_beats_fixed_width_on_skewed_data():
    rng = np.random.default_rng(0)
    sym = rng.choice(16, size=5000, p=np.r_[0.7, np.full(15, 0.3 / 15)])
    stream, lengths, n_bits = huffman.encode(sym)
    assert np.array_equal(huffman.decode(stream, lengths, len(sym), n_bits), sym)
    assert n_bits < 4 * len(sym) * 0.6
    one = np.zeros(10, dtype=np.int64)
    s1, l1, b1 = huffman.encode(one)
    assert np.array_equal(huffman.decode(s1, l1, 10, b1), one)


def test_pack_aliases_shared_tensors_and_rejects_bad_magic():
    w = torch.randn(8, 4)
    state = {"a.weight": w, "b.weight": w, "c.bias": torch.randn(8)}
    blob = pack_state(state, {"a.weight": WeightPlan("int4"), "b.weight": WeightPlan("int4")})
    out = unpack_state(blob)
    assert torch.equal(out["a.weight"], out["b.weight"])
    single = pack_state({"a.weight": w, "c.bias": state["c.bias"]}, {"a.weight": WeightPlan("int4")})
    assert len(blob) < len(single) + 16  # stored once, aliased by name
    with pytest.raises(ValueError, match="bad magic"):
        unpack_state(b"XXXX" + blob[4:])


def test_mixed_precision_deploys_float_stages_as_float(data, trained, tmp_path):
    cfg = CompressionConfig(stage_quant=("fp32", "int8", "int8"))
    path, precision, _ = deploy_onnx(_packed(trained, cfg, data), cfg, torch.zeros(1, 1, 8, 8), tmp_path / "m.onnx", data.x_train[:16])
    assert precision == "mixed int8/fp32"
    graph = onnx.load(str(path)).graph
    producers = {o: n for n in graph.node for o in n.output}
    convs = [n for n in graph.node if n.op_type in ("Conv", "Gemm")]
    quantized_inputs = [any(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear"
                            for i in n.input[1:2]) for n in convs]
    # stage 0 (stem, conv, two mbconvs of 3 convs each: 8 layers) keeps float weights;
    # stages 1-2 and the classifier run int8
    assert quantized_inputs[:8] == [False] * 8 and all(quantized_inputs[8:]) and len(quantized_inputs) > 8


def test_binary_keeps_pruned_zeros_through_packing(data, trained):
    for sparsity in (0.0, 0.6):
        cfg = CompressionConfig(quant="binary", sparsity=sparsity, finetune_epochs=0)
        cand = Candidate(ARCH, cfg, RECIPE)
        model = compress(_fresh(trained), cand, data, 0)
        w = model.body[5].conv[0].weight
        assert ((w == 0).float().mean() > 0.5) == (sparsity > 0)
        blob = pack_model(model, cfg)
        torch.testing.assert_close(load_packed(cand, blob).body[5].conv[0].weight, w, atol=1e-6, rtol=1e-6)


def test_pack_does_not_alias_distinct_views_of_one_buffer():
    buf = torch.arange(8.0)
    out = unpack_state(pack_state({"a": buf[:4], "b": buf[4:]}, {}))
    assert out["b"].tolist() == [4.0, 5.0, 6.0, 7.0]


def test_teacher_cache_is_keyed_by_data_and_recipe_inside_the_given_folder(tmp_path):
    """Distillation teachers are cached in the study's own folder, named by the training data's
    content and the recipe: another dataset with the same seed never reuses a cached teacher."""
    import tempfile
    from pathlib import Path

    from nas.compress.distill import get_teachers

    digits = get_dataset("digits", 0)
    shifted = dataclasses.replace(digits, x_train=digits.x_train.flip(-1))
    folder = tmp_path / "art" / "teachers"
    t1 = get_teachers(folder, digits, 1, 1)
    files = sorted(p.name for p in folder.glob("teacher-*.safetensors"))
    assert len(files) == 1 and "teacher-1000" not in files[0]  # not keyed by seed alone
    assert get_teachers(folder, digits, 1, 1)[0] is t1[0]  # the same data and recipe: reused
    get_teachers(folder, shifted, 1, 1)
    assert len(list(folder.glob("teacher-*.safetensors"))) == 2  # other content: another teacher
    get_teachers(folder, digits, 1, 2)
    assert len(list(folder.glob("teacher-*.safetensors"))) == 3  # another recipe: another teacher
    shared = Path(tempfile.gettempdir()) / "teachers"
    before = set(tmp_path.rglob("*")), set(shared.glob("*")) if shared.exists() else set()
    get_teachers(None, digits, 1, 3)  # no study folder: memory only, nothing written anywhere shared
    assert (set(tmp_path.rglob("*")), set(shared.glob("*")) if shared.exists() else set()) == before


def test_pack_stores_batchnorm_folded_and_fp16_scales_and_codebooks(data, trained):
    """A BatchNorm is stored as 2 vectors (scale, shift), integer scales and codebooks in fp16,
    and Huffman only where it is smaller than the plain codes: the decoded model still gives the
    same outputs."""
    import json
    import struct
    import zlib

    for genes in ({"quant": "int4"}, {"cluster_bits": 4}, {"quant": "int4", "huffman": True}):
        cfg = CompressionConfig(**genes)
        cand = Candidate(ARCH, cfg, RECIPE)
        model = compress(_fresh(trained, share=False), cand, data, seed=0)
        blob = pack_model(model, cfg)
        (hlen,) = struct.unpack("<I", blob[8:12])
        entries = json.loads(zlib.decompress(blob[12 : 12 + hlen]))["t"]
        bns = [e for e in entries if e.get("e") == "bn"]
        assert bns and not any("running" in e["n"] for e in entries)
        assert all(e.get("sd") == 16 or e.get("cd") == 16 for e in entries if "sc" in e or "cb" in e)
        assert all(min(ln for ln in e["h"] if ln) >= 1 and e["nb"] < e["n_sym"] * e["b"] for e in entries if "h" in e)
        shipped = load_packed(cand, blob)
        np.testing.assert_allclose(predict(shipped, data.x_val).numpy(), predict(model, data.x_val).numpy(), atol=5e-2)
        bn = dict(shipped.named_modules())[bns[0]["n"]]
        assert torch.all(bn.running_mean == 0) and torch.allclose(bn.running_var, torch.ones_like(bn.running_var), atol=1e-4)
