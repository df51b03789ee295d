"""Crafted ``model.onnx`` graphs and datasets: ``nas verify`` compares the deployed graph's
structure with the one ``deploy_onnx`` rebuilds from ``weights.nasp`` (nas.graphcheck), ONNX
files are refused with external data wherever the format allows a tensor, or with
``training_info`` (nas.trust.check_onnx), and a dataset the manifest names is bounded before
it is read (nas.datasize.check_dataset_size). Each crafted case here used to verify or load."""

from __future__ import annotations

import copy as copymod
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import nas
from nas.cli import main
from nas.compress.deploy import onnx_predict
from nas.errors import BundleError
from nas.graphcheck import compare_models
from nas.datasize import check_dataset_size
from nas.trust import check_onnx, graphs_in

from bundles import rehash  # tests/bundles.py


def _verify(capsys, b: Path) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["verify", str(b), "--no-latency"])
    out, err = capsys.readouterr()
    return code, out, err


def _lines(out: str, status: str) -> list[str]:
    return [ln for ln in out.splitlines() if ln.startswith(status)]


def _save(b: Path, model: onnx.ModelProto) -> None:
    onnx.save(model, str(b / "model.onnx"))
    rehash(b)


def _assert_graph_fails(capsys, b: Path, *needles: str) -> str:
    """verify reports exactly the graph check as failing, naming ``needles``."""
    code, out, err = _verify(capsys, b)
    assert code == 1, out + err
    line = next((ln for ln in out.splitlines() if ln.startswith("FAIL graph:")), None)
    assert line is not None, out
    for n in needles:
        assert n in line, line
    return out


# -- the honest bundle ----------------------------------------------------------------------


def test_an_honest_bundle_verifies_with_its_graph_compared(copy, capsys):
    code, out, err = _verify(capsys, copy)
    assert code == 0, out + err
    assert "ok   graph: model.onnx is the graph deploy_onnx rebuilds from weights.nasp" in out
    assert "bundle verified" in out and not _lines(out, "FAIL")


def test_names_and_node_order_do_not_matter(bundle):
    """Another exporter names tensors and orders nodes its own way: the same graph still."""
    ref = onnx.load(str(bundle / "model.onnx"))
    m = copymod.deepcopy(ref)
    renamed: dict[str, str] = {}
    for g in graphs_in(m.graph):
        for t in g.initializer:
            renamed[t.name] = f"w{len(renamed)}"
        for n in g.node:
            renamed.update({o: f"t{len(renamed)}" for o in n.output})
    for g in graphs_in(m.graph):
        for t in g.initializer:
            t.name = renamed[t.name]
        for n in g.node:
            n.name = ""
            ins, outs = [renamed.get(i, i) for i in n.input], [renamed.get(o, o) for o in n.output]
            del n.input[:], n.output[:]
            n.input.extend(ins)
            n.output.extend(outs)
        for o in g.output:
            o.name = renamed.get(o.name, o.name)
        for field in (g.node, g.initializer):
            items = list(reversed([copymod.deepcopy(i) for i in field]))
            del field[:]
            field.extend(items)
    assert compare_models(m, ref) == []


# -- crafted graphs (each used to get "bundle verified") ------------------------------------


def _backdoor(model: onnx.ModelProto, target: int = 3, trigger: float = 1000.0) -> onnx.ModelProto:
    """Extra nodes: when input pixel (0, 0, 0, 0) exceeds ``trigger`` (never on real inputs),
    the logits become one-hot ``target``; otherwise the clean logits pass through."""
    m = copymod.deepcopy(model)
    g = m.graph
    x, out = g.input[0].name, g.output[0].name
    producer = next(n for n in g.node if out in n.output)
    producer.output[list(producer.output).index(out)] = "clean_logits"
    classes = g.output[0].type.tensor_type.shape.dim[1].dim_value or 10
    forced = np.zeros((1, classes), np.float32)
    forced[0, target] = 1e4
    g.node.extend([
        helper.make_node("Constant", [], ["bd_starts"], value=numpy_helper.from_array(np.zeros(4, np.int64))),
        helper.make_node("Constant", [], ["bd_ends"], value=numpy_helper.from_array(np.ones(4, np.int64))),
        helper.make_node("Slice", [x, "bd_starts", "bd_ends"], ["bd_pixel"]),
        helper.make_node("ReduceMax", ["bd_pixel"], ["bd_value"], keepdims=0),
        helper.make_node("Constant", [], ["bd_threshold"], value=numpy_helper.from_array(np.array(trigger, np.float32))),
        helper.make_node("Greater", ["bd_value", "bd_threshold"], ["bd_on"]),
        helper.make_node("Constant", [], ["bd_forced"], value=numpy_helper.from_array(forced)),
        helper.make_node("Where", ["bd_on", "bd_forced", "clean_logits"], [out]),
    ])
    return m


def test_a_trigger_pixel_backdoor_fails_the_graph_check(bundle, copy, capsys):
    from nas.pipeline import get_dataset

    _save(copy, _backdoor(onnx.load(str(copy / "model.onnx"))))
    # the backdoor works, and is invisible on the test split
    manifest = json.loads((copy / "manifest.json").read_text())
    data = get_dataset(manifest["data"]["dataset"], manifest["data"]["seed"])
    x = data.raw("test") if hasattr(data, "raw") else data.x_test
    clean = onnx_predict(bundle / "model.onnx", x).argmax(1)
    assert (onnx_predict(copy / "model.onnx", x).argmax(1) == clean).all()
    triggered = x[:5].clone()
    triggered[:, 0, 0, 0] = 5000.0
    assert (onnx_predict(copy / "model.onnx", triggered).argmax(1) == 3).all()

    out = _assert_graph_fails(capsys, copy, "graph output 0 reads output 0 of the Where node", "+1 Where", "+1 Greater")
    assert _lines(out, "FAIL") == [ln for ln in out.splitlines() if ln.startswith("FAIL graph:")]  # nothing else sees it


def _first(model: onnx.ModelProto, op: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.op_type == op)


def _relu_to(op: str, **attrs):  # noqa: ANN202
    def change(m):  # noqa: ANN001, ANN202
        n = _first(m, "Relu")
        n.op_type = op
        n.attribute.extend(helper.make_attribute(k, v) for k, v in attrs.items())
    return change


def _set_ints(op: str, name: str, value: list[int]):  # noqa: ANN202
    def change(m):  # noqa: ANN001, ANN202
        a = next(a for a in _first(m, op).attribute if a.name == name)
        a.ints[:] = value
    return change


def _gemm_alpha(m):  # noqa: ANN001, ANN202
    next(a for a in _first(m, "Gemm").attribute if a.name == "alpha").f = 1.001  # same argmax everywhere


@pytest.mark.parametrize("change,needles", [
    (_relu_to("Sigmoid"), ["the Sigmoid node", "where the rebuild reads output 0 of the Relu node"]),
    (_relu_to("LeakyRelu", alpha=1e-6), ["the LeakyRelu node"]),  # the same predictions, another operator
    (_set_ints("Conv", "pads", [0, 0, 0, 0]), ["attribute 'pads' of the Conv node", "[0, 0, 0, 0] where the rebuild has"]),
    (_set_ints("Conv", "strides", [2, 2]), ["attribute 'strides' of the Conv node"]),
    (_gemm_alpha, ["attribute 'alpha' of the Gemm node", "1.001"]),
], ids=["relu-sigmoid", "relu-leakyrelu", "conv-pads", "conv-stride", "gemm-alpha"])
def test_a_changed_operator_or_attribute_fails_the_graph_check(copy, capsys, change, needles):
    m = onnx.load(str(copy / "model.onnx"))
    change(m)
    _save(copy, m)
    _assert_graph_fails(capsys, copy, *needles)


def test_a_rewired_input_fails_the_graph_check(copy, capsys):
    """A node reads another tensor (the one before the activation: the Relu is skipped)."""
    m = onnx.load(str(copy / "model.onnx"))
    relu = _first(m, "Relu")
    reader = next(n for n in m.graph.node if relu.output[0] in n.input)
    reader.input[list(reader.input).index(relu.output[0])] = relu.input[0]
    _save(copy, m)
    _assert_graph_fails(capsys, copy, f"input 0 of the {reader.op_type} node", "where the rebuild reads output 0 of the Relu node")


def test_a_changed_constant_in_an_exit_branch_is_found_recursively():
    """Subgraphs are walked too, their reads of outer tensors included (early exits: If)."""
    vi = helper.make_tensor_value_info

    def model(threshold: float, answer_reads: str) -> onnx.ModelProto:
        then = helper.make_graph([helper.make_node("Identity", [answer_reads], ["a"])], "then", [],
                                 [vi("a", TensorProto.FLOAT, [1, 4])])
        rest = helper.make_graph([helper.make_node("Relu", ["h"], ["r"])], "else", [], [vi("r", TensorProto.FLOAT, [1, 4])])
        nodes = [helper.make_node("Neg", ["x"], ["h"]), helper.make_node("Abs", ["x"], ["h2"]),
                 helper.make_node("ReduceMax", ["h"], ["m"], keepdims=0),
                 helper.make_node("Constant", [], ["t"], value=helper.make_tensor("t", TensorProto.FLOAT, [], [threshold])),
                 helper.make_node("Greater", ["m", "t"], ["go"]),
                 helper.make_node("If", ["go"], ["y"], then_branch=then, else_branch=rest)]
        g = helper.make_graph(nodes, "g", [vi("x", TensorProto.FLOAT, [1, 4])], [vi("y", TensorProto.FLOAT, [1, 4])])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

    ref = model(0.5, "h")
    assert compare_models(model(0.5, "h"), ref) == []
    assert compare_models(model(0.5000001, "h"), ref) == []  # float rounding
    diffs = compare_models(model(0.6, "h"), ref)
    assert diffs and "attribute 'value' of the Constant node" in diffs[0] and "values differ" in diffs[0]
    diffs = compare_models(model(0.5, "h2"), ref, ("model.onnx", "the rebuild"))
    assert diffs and "then_branch of the If node" in diffs[0] and "output 0 of the Abs node" in diffs[0], diffs


# -- external data, wherever ONNX allows a tensor; training_info ------------------------------


def _external(t: onnx.TensorProto, flag: bool = True) -> onnx.TensorProto:
    t.ClearField("raw_data")
    t.ClearField("float_data")
    t.ClearField("int64_data")
    if flag:
        t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value="../../../../etc/hostname")
    return t


def _ext(name: str, flag: bool = True) -> onnx.TensorProto:
    return _external(numpy_helper.from_array(np.zeros(4, np.float32), name), flag)


def _sparse(name: str) -> onnx.SparseTensorProto:
    values = _ext(name)
    values.dims[:] = [1]
    indices = numpy_helper.from_array(np.array([0], np.int64), name + "_idx")
    return helper.make_sparse_tensor(values, indices, [4])


def _in_initializer(m):  # noqa: ANN001, ANN202
    _external(m.graph.initializer[0])


def _in_initializer_entries_only(m):  # noqa: ANN001, ANN202 - external_data entries, location left DEFAULT
    m.graph.initializer.append(_ext("stash", flag=False))


def _in_sparse_initializer(m):  # noqa: ANN001, ANN202
    m.graph.sparse_initializer.append(_sparse("sp"))


def _constant_sparse_value(m):  # noqa: ANN001, ANN202
    m.graph.node.append(helper.make_node("Constant", [], ["c_sp"], sparse_value=_sparse("c_sp")))


def _tensors_list_attribute(m):  # noqa: ANN001, ANN202
    node = helper.make_node("Identity", [m.graph.input[0].name], ["ident"])
    node.attribute.append(helper.make_attribute("payload", [_ext("listed")]))
    m.graph.node.append(node)


def _in_a_subgraph(m):  # noqa: ANN001, ANN202 - an If branch holding a sparse initializer and a sparse constant
    vi = helper.make_tensor_value_info
    branch = helper.make_graph([helper.make_node("Constant", [], ["b"], sparse_value=_sparse("b"))], "branch", [],
                               [vi("b", TensorProto.FLOAT, [4])], sparse_initializer=[_sparse("sub_sp")])
    m.graph.node.extend([
        helper.make_node("Constant", [], ["cond"], value=helper.make_tensor("cond", TensorProto.BOOL, [], [False])),
        helper.make_node("If", ["cond"], ["dead"], then_branch=branch, else_branch=branch)])


def _in_a_function_default(m):  # noqa: ANN001, ANN202 - an attribute default of a local function
    fn = helper.make_function("ai.onnx", "leak", [], ["out"],
                              [helper.make_node("Constant", [], ["out"], value_floats=[0.0])], [helper.make_opsetid("", 17)])
    fn.attribute_proto.append(helper.make_attribute("secret", _ext("secret")))
    m.functions.append(fn)


def _training_info(m):  # noqa: ANN001, ANN202
    init = helper.make_graph([], "init", [], [], initializer=[_ext("state")])
    m.training_info.append(onnx.TrainingInfoProto(initialization=init))


@pytest.mark.parametrize("craft,needle", [
    (_in_initializer, "external data"),
    (_in_initializer_entries_only, "tensor 'stash' names an external data file"),
    (_in_sparse_initializer, "sparse_initializer"),
    (_constant_sparse_value, "attribute 'sparse_value'"),
    (_tensors_list_attribute, "attribute 'payload'"),
    (_in_a_subgraph, "subgraph"),
    (_in_a_function_default, "attribute 'secret'"),
    (_training_info, "training_info"),
], ids=["initializer", "initializer-entries-only", "sparse-initializer", "constant-sparse-value", "tensors-attribute",
        "subgraph", "function-default", "training-info"])
def test_external_data_and_training_info_are_refused_everywhere(copy, capsys, craft, needle):
    m = onnx.load(str(copy / "model.onnx"))
    craft(m)
    _save(copy, m)
    code, out, err = _verify(capsys, copy)
    assert code == 2 and err.count("\n") == 1 and err.startswith("nas: error: ") and needle in err, out + err
    assert "refused" in err
    with pytest.raises(BundleError, match="refused"):
        nas.load_bundle(copy)
    with pytest.raises(BundleError, match="refused"):
        check_onnx(copy / "model.onnx")


# -- a dataset the manifest names is bounded before it is read --------------------------------


def _npy_header(shape: tuple[int, ...], dtype: str = "<f4") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()  # (magic included)


def _point_at(b: Path, dataset: str) -> None:
    man = json.loads((b / "manifest.json").read_text())
    man["data"]["dataset"] = dataset  # not hashed: the manifest is the reference
    (b / "manifest.json").write_text(json.dumps(man))


@pytest.mark.parametrize("kind", ["npy-headers", "bare-npy", "other-member"])
def test_a_dataset_declaring_huge_arrays_is_refused_before_allocating(copy, capsys, tmp_path, kind):
    path = tmp_path / "huge.npz"
    if kind == "bare-npy":  # np.load reads a .npy whatever the file is called
        path.write_bytes(_npy_header((2**20, 1, 2**10, 2**10)))
    else:
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("y.npy", _npy_header((10,), "<i8") + bytes(80))
            if kind == "npy-headers":  # 4 TiB declared, a few bytes stored
                z.writestr("x.npy", _npy_header((2**20, 1, 2**10, 2**10)))
            else:  # a member np.load reads whole, declaring 3 GiB
                info = zipfile.ZipInfo("notes.bin")
                z.writestr(info, b"")
    if kind == "other-member":  # the declared (uncompressed) size in both headers of the zip
        raw = bytearray(path.read_bytes())
        for sig in (b"PK\x03\x04", b"PK\x01\x02"):
            at = raw.rfind(sig)
            off = at + (22 if sig == b"PK\x03\x04" else 24)
            raw[off:off + 4] = (3 * 2**30).to_bytes(4, "little")
        path.write_bytes(bytes(raw))
    _point_at(copy, str(path))
    code, out, err = _verify(capsys, copy)
    assert code == 2 and err.count("\n") == 1 and "more than 2,147,483,648 bytes" in err and "refused" in err, out + err
    with pytest.raises(BundleError, match="more than"):
        check_dataset_size(str(path))


def test_the_dataset_bound_passes_real_data_and_covers_image_folders(tmp_path, monkeypatch):
    from PIL import Image

    ok = tmp_path / "ok.npz"
    np.savez_compressed(ok, x=np.zeros((20, 1, 8, 8), np.float32), y=np.arange(20) % 2)
    check_dataset_size(str(ok))
    check_dataset_size("digits")
    folder = tmp_path / "imgs"
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        for k in range(3):
            Image.new("L", (64, 64)).save(folder / c / f"{k}.png")
    check_dataset_size(str(folder))
    monkeypatch.setattr("nas.datasize.MAX_DATASET_BYTES", 6 * 64 * 64 * 3 * 4 - 1)  # six RGB float32 images, less one byte
    with pytest.raises(BundleError, match="more than"):
        check_dataset_size(str(folder))
    check_dataset_size(f"{folder}?size=8x8")  # resized: small again
