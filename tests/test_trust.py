"""Crafted bundles: everything a malicious or broken bundle can hold is refused with one line,
exit status 2, and nothing in it is executed (nas.trust, nas.verify.read_manifest)."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import onnx
import pytest

import nas
from nas.cli import main
from nas.errors import BundleError
from nas.trust import check_pt2, no_unpickling, redact_text, redact_url

from bundles import rehash  # tests/bundles.py


def _refused(capsys, b: Path, *needles: str) -> str:
    capsys.readouterr()
    assert main(["verify", str(b), "--no-latency"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nas: error: "), err
    for n in needles:
        assert n in err, err
    return err


class _WritesAFile:
    """Unpickling this creates a file: the proof that a loader executed bundle data."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # noqa: ANN204
        return (open, (self.path, "w"))


def _rewrite_pt2(path: Path, change) -> None:  # noqa: ANN001
    with zipfile.ZipFile(path) as z:
        entries = {i.filename: z.read(i.filename) for i in z.infolist()}
    root = next(iter(entries)).split("/", 1)[0]
    change(root, entries)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in entries.items():
            z.writestr(name, data)


def _pickled_weight(marker: Path):  # noqa: ANN202
    def change(root, entries):  # noqa: ANN001, ANN202
        cfg_name = f"{root}/data/weights/model_weights_config.json"
        cfg = json.loads(entries[cfg_name])
        first = next(iter(cfg["config"]))
        cfg["config"][first]["use_pickle"] = True
        entries[cfg_name] = json.dumps(cfg).encode()
        entries[f"{root}/data/weights/{cfg['config'][first]['path_name']}"] = pickle.dumps(_WritesAFile(str(marker)))
    return change


def test_pickled_pt2_entry_is_refused_before_loading(copy, capsys, tmp_path):
    marker = tmp_path / "pwned"
    _rewrite_pt2(copy / "model.pt2", _pickled_weight(marker))
    rehash(copy)
    _refused(capsys, copy, "model.pt2", "unpickling")
    assert not marker.exists()


def test_the_load_itself_cannot_unpickle(copy, tmp_path, monkeypatch):
    """Defence in depth: even with the archive check bypassed, the guarded load refuses."""
    import torch

    marker = tmp_path / "pwned"
    _rewrite_pt2(copy / "model.pt2", _pickled_weight(marker))
    with pytest.raises(BundleError, match="refused to unpickle"), no_unpickling():
        torch.export.load(str(copy / "model.pt2"))  # the crafted archive, loaded only inside the guard under test
    assert not marker.exists()
    with pytest.raises(BundleError, match="marked for unpickling"):
        check_pt2(copy / "model.pt2")


@pytest.mark.parametrize("entry,data", [("data/sample_inputs/model.pt", b"\x80\x04N."),
                                        ("data/aotinductor/model/model.so", b"\x7fELF"),
                                        ("extra/notes.txt", b"hello")])
def test_pt2_entries_nas_never_writes_are_refused(copy, capsys, entry, data):
    _rewrite_pt2(copy / "model.pt2", lambda root, e: e.__setitem__(f"{root}/{entry}", data))
    rehash(copy)
    err = _refused(capsys, copy, "model.pt2")
    assert "model.pt2" in err
    with pytest.raises(BundleError, match="model.pt2"):  # the archive check itself, before any load
        check_pt2(copy / "model.pt2")


@pytest.mark.parametrize("name", ["../../etc/hostname", "/etc/hostname", "sub/../../x"])
def test_manifest_paths_outside_the_bundle_are_refused(copy, capsys, name):
    man = json.loads((copy / "manifest.json").read_text())
    man["files"][name] = {"sha256": "0" * 64, "bytes": 1}
    (copy / "manifest.json").write_text(json.dumps(man))
    err = _refused(capsys, copy, "outside the bundle")
    assert "hostname" not in err or "points outside" in err  # no digest of the outside file


def test_a_symlink_out_of_the_bundle_is_refused(copy, capsys, tmp_path):
    outside = tmp_path / "outside.bin"
    outside.write_bytes((copy / "weights.nasp").read_bytes())
    (copy / "weights.nasp").unlink()
    (copy / "weights.nasp").symlink_to(outside)
    err = _refused(capsys, copy, "weights.nasp")
    assert str(outside) not in err or "outside" in err
    with pytest.raises(BundleError, match="weights.nasp"):
        nas.load_bundle(copy)


def test_empty_file_list_is_refused(copy, capsys):
    man = json.loads((copy / "manifest.json").read_text())
    man["files"] = {}
    (copy / "manifest.json").write_text(json.dumps(man))
    err = _refused(capsys, copy, "required file", "not listed")
    assert "not listed" in err
    with pytest.raises(BundleError, match="not listed"):
        nas.load_bundle(copy)


def test_missing_required_file_is_refused(copy, capsys):
    (copy / "model.pt2").unlink()
    err = _refused(capsys, copy, "model.pt2", "missing")
    assert "missing" in err
    with pytest.raises(BundleError, match="missing"):
        nas.load_bundle(copy)


@pytest.mark.parametrize("text", ["{}", "not json {", "[]", '{"format": "nas-bundle/1", "files": []}', "\udcff"])
def test_malformed_manifest_is_one_line(copy, capsys, text):
    (copy / "manifest.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    err = _refused(capsys, copy, "manifest.json")
    assert "Traceback" not in err
    with pytest.raises(BundleError, match="manifest.json"):
        nas.load_bundle(copy)


def test_manifest_fields_of_the_wrong_type_are_one_line(copy, capsys):
    man = json.loads((copy / "manifest.json").read_text())
    man["metrics"]["size_bytes"] = "big"
    (copy / "manifest.json").write_text(json.dumps(man))
    assert "metrics.size_bytes" in _refused(capsys, copy, "metrics.size_bytes")
    man["metrics"]["size_bytes"] = 1
    man["candidate"] = {"version": 1, "arch": "x"}
    (copy / "manifest.json").write_text(json.dumps(man))
    assert "candidate" in _refused(capsys, copy, "candidate")
    with pytest.raises(BundleError, match="candidate"):
        nas.load_bundle(copy)


def test_onnx_with_external_data_is_refused(copy, capsys):
    model = onnx.load(str(copy / "model.onnx"))
    init = model.graph.initializer[0]
    init.ClearField("raw_data")
    init.data_location = onnx.TensorProto.EXTERNAL
    init.external_data.add(key="location", value="../../etc/passwd")
    onnx.save(model, str(copy / "model.onnx"))
    rehash(copy)
    _refused(capsys, copy, "model.onnx", "external data")
    with pytest.raises(BundleError, match="external data"):
        nas.load_bundle(copy)


def test_an_unlisted_extra_file_fails_verification(copy, capsys):
    (copy / "payload.sh").write_text("echo hi\n")
    assert main(["verify", str(copy), "--no-latency"]) == 1
    assert "files the manifest does not list: payload.sh" in capsys.readouterr().out


def test_load_bundle_refuses_what_verify_refuses(copy):
    (copy / "manifest.json").write_text("{}")
    with pytest.raises(BundleError, match="manifest.json"):
        nas.load_bundle(copy)


def test_redaction():
    assert redact_url("postgresql://user:hunter2@db.example:5432/nas") == "postgresql://user:***@db.example:5432/nas"
    assert redact_url("postgresql+psycopg://u:p@ss@h/d") == "postgresql+psycopg://u:***@h/d"
    assert redact_url("sqlite:///runs/nas.db") == "sqlite:///runs/nas.db"
    assert redact_url("postgresql://u@h/d") == "postgresql://u@h/d"
    assert "hunter2" not in redact_text("failed: hunter2 rejected", "postgresql://u:hunter2@h/d")


def test_credentials_never_reach_errors_or_stored_records(bundle, capsys, tmp_path):
    url = "postgresql://alice:hunter2@127.0.0.1:1/nas"
    for argv in (["front", "x", "--storage", url], ["search", "--storage", url, "--trials", "1"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "hunter2" not in err and "alice:***@" in err, err
    # what export writes: the manifest and the card carry the masked URL
    import optuna

    from nas.export import export_bundle

    db = f"sqlite:///{bundle.parent}/t.db"
    export_bundle(optuna.load_study(study_name="t", storage=db), 0, tmp_path / "e", storage_url=url)
    for f in ("manifest.json", "MODEL_CARD.md"):
        text = (tmp_path / "e" / f).read_text()
        assert "hunter2" not in text and "alice:***@127.0.0.1:1/nas" in text


def test_a_program_calling_file_operators_is_refused_before_it_runs(copy, capsys, tmp_path):
    """A crafted graph that maps a file (aten.from_file, shared) and overwrites it (fill_):
    refused by the operator check, and the file is untouched."""
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"\x00" * 64)

    def change(root, entries):  # noqa: ANN001, ANN202
        m = json.loads(entries[f"{root}/models/model.json"])
        g = m["graph_module"]["graph"]
        meta = {"dtype": 7, "sizes": [{"as_int": 16}], "requires_grad": False, "device": {"type": "cpu", "index": None},
                "strides": [{"as_int": 1}], "storage_offset": {"as_int": 0}, "layout": 7}
        g["tensor_values"]["ff"] = meta
        g["tensor_values"]["ff2"] = dict(meta)
        g["nodes"][:0] = [
            {"target": "torch.ops.aten.from_file.default", "name": "ff", "metadata": {}, "is_hop_single_tensor_return": None,
             "inputs": [{"name": "filename", "arg": {"as_string": str(victim)}, "kind": 1},
                        {"name": "shared", "arg": {"as_bool": True}, "kind": 1},
                        {"name": "size", "arg": {"as_int": 16}, "kind": 1},
                        {"name": "dtype", "arg": {"as_scalar_type": 7}, "kind": 2}],
             "outputs": [{"as_tensor": {"name": "ff"}}]},
            {"target": "torch.ops.aten.fill_.Scalar", "name": "ff2", "metadata": {}, "is_hop_single_tensor_return": None,
             "inputs": [{"name": "self", "arg": {"as_tensor": {"name": "ff"}}, "kind": 1},
                        {"name": "value", "arg": {"as_float": 7.0}, "kind": 1}],
             "outputs": [{"as_tensor": {"name": "ff2"}}]}]
        entries[f"{root}/models/model.json"] = json.dumps(m).encode()

    _rewrite_pt2(copy / "model.pt2", change)
    rehash(copy)
    _refused(capsys, copy, "model.pt2", "from_file", "refused")
    with pytest.raises(BundleError, match="from_file"):
        check_pt2(copy / "model.pt2")  # what nas verify and --baseline run before any load
    assert victim.read_bytes() == b"\x00" * 64


def test_pt2_entries_are_read_no_further_than_the_limit(copy, capsys, monkeypatch):
    """Declared sizes can lie: an entry is decompressed only up to the limit."""
    import nas.trust as trust

    monkeypatch.setattr(trust, "MAX_PT2_JSON_BYTES", 1024)
    rehash(copy)
    err = _refused(capsys, copy, "model.pt2", "unpacks to more than")
    assert "models/model.json unpacks to more than 0 MiB" in err  # the first JSON entry read, stopped at the limit
    with pytest.raises(BundleError, match="unpacks to more than"):
        check_pt2(copy / "model.pt2")


def test_onnx_functions_are_checked_like_the_graph(copy, capsys):
    from onnx import TensorProto, helper

    model = onnx.load(str(copy / "model.onnx"))
    secret = helper.make_tensor("s", TensorProto.FLOAT, [1], [0.0])
    secret.ClearField("float_data")
    secret.data_location = TensorProto.EXTERNAL
    secret.external_data.add(key="location", value="id_rsa")
    node = helper.make_node("Constant", [], ["out"], value=secret)
    model.functions.append(helper.make_function("custom.fn", "leak", [], ["out"], [node],
                                                [helper.make_opsetid("", 17)]))
    onnx.save(model, str(copy / "model.onnx"))
    rehash(copy)
    err = _refused(capsys, copy, "model.onnx", "external data")
    assert "tensor 's' names an external data file" in err  # the tensor inside the function body
    with pytest.raises(BundleError, match="external data"):
        nas.load_bundle(copy)


def test_weight_check_refuses_a_second_tensor_of_the_same_name_in_a_subgraph(tmp_path):
    """A crafted model.onnx runs doubled weights and hides the packed ones under the same name
    in a dead If branch: the check reads every (sub)graph, so a name defined twice fails it."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from nas.compress.deploy import weights_off_packed

    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    vi = helper.make_tensor_value_info
    ref = helper.make_graph([helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)], "ref",
                            [vi("x", TensorProto.FLOAT, [1, 4])], [vi("y", TensorProto.FLOAT, [1, 3])],
                            [numpy_helper.from_array(w, "W")])
    hidden = helper.make_graph([helper.make_node("Gemm", ["x", "W"], ["h"], transB=1)], "dead", [],
                               [vi("h", TensorProto.FLOAT, [1, 3])], [numpy_helper.from_array(w, "W")])
    nodes = [helper.make_node("Gemm", ["x", "W"], ["y0"], transB=1),
             helper.make_node("Constant", [], ["c"], value=helper.make_tensor("c", TensorProto.BOOL, [], [False])),
             helper.make_node("If", ["c"], ["y"], then_branch=hidden,
                              else_branch=helper.make_graph([helper.make_node("Identity", ["y0"], ["e"])], "live", [],
                                                            [vi("e", TensorProto.FLOAT, [1, 3])]))]
    crafted = helper.make_graph(nodes, "g", [vi("x", TensorProto.FLOAT, [1, 4])], [vi("y", TensorProto.FLOAT, [1, 3])],
                                [numpy_helper.from_array(2 * w, "W")])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(crafted, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    assert weights_off_packed(path, ref) == ["W (defined twice)"]
    honest = helper.make_graph(nodes[:1], "g", [vi("x", TensorProto.FLOAT, [1, 4])], [vi("y0", TensorProto.FLOAT, [1, 3])],
                               [numpy_helper.from_array(w, "W")])
    onnx.save(helper.make_model(honest, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    assert weights_off_packed(path, ref) == []
