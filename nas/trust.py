"""Files a user is handed stay data: checks that run before anything is loaded.

A bundle (or any file a user passes in) is untrusted. Its manifest's hashes come from the same
untrusted folder, so they prove nothing about safety; what they name and what the archives
hold are checked here *before* any loader sees them:

- every path a manifest names resolves inside the bundle folder (no ``..``, no absolute
  paths, no symlinks leading out), and the bundle's required files are present;
- ``model.pt2`` (a zip archive written by ``torch.export.save``) holds only the entries that
  our exporter writes: JSON configs and raw tensor bytes, no entry marked for pickle, no
  sample inputs, constants, custom objects, extra files or AOTInductor shared libraries; its
  graph calls only the operators CNN classifiers are made of (no ``aten.from_file``, nothing
  that reaches storage or files);
  :func:`no_unpickling` then guards the load itself: any unpickling attempted inside it raises;
- ``model.onnx`` names no external data file in any place the format allows a tensor
  (initializers, sparse initializers, tensor attributes such as ``Constant``'s ``value`` and
  ``sparse_value``, subgraphs, function bodies and their attribute defaults), carries no
  ``training_info``, and uses only the standard ONNX domains;
- a dataset a manifest names is bounded before it is read (:func:`check_dataset_size`: the
  array headers of a ``.npz``, the image headers of a folder, against :data:`MAX_DATASET_BYTES`);
- storage URLs are shown with their password masked (:func:`redact_url`).

Every failure is a :class:`~nas.errors.BundleError`: one line naming the file.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import re
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nas.errors import BundleError

__all__ = ["is_external", "redact_url", "redact_text", "inside", "check_pt2", "check_onnx", "no_unpickling",
           "read_json_file"]

_URL_PASSWORD = re.compile(r"^(?P<head>[A-Za-z][\w+.-]*://[^/@:]*:)(?P<pw>.*)(?P<tail>@[^@]*)$")


def redact_url(url: str) -> str:
    """``postgresql://user:secret@host/db`` -> ``postgresql://user:***@host/db``; other text as is."""
    m = _URL_PASSWORD.match(str(url))
    return f"{m['head']}***{m['tail']}" if m else str(url)


def redact_text(text: str, url: str) -> str:
    """``text`` (an error message, say) with ``url``'s password masked wherever it appears."""
    m = _URL_PASSWORD.match(str(url))
    text = str(text).replace(str(url), redact_url(url))
    return text.replace(m["pw"], "***") if m and m["pw"] else text


def inside(root: Path, name: Any, what: str) -> Path:
    """``root / name`` if ``name`` is a plain relative path that stays inside ``root`` (symlinks
    resolved); otherwise a :class:`BundleError` naming ``what``."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise BundleError(f"{what}: file name {name!r} is not a relative path")
    p = Path(name)
    if p.is_absolute() or ".." in p.parts or name.startswith(("/", "\\")) or ":" in p.parts[0]:
        raise BundleError(f"{what}: file name {name!r} points outside the bundle")
    full = root / p
    base = root.resolve()
    if not full.resolve().is_relative_to(base):
        raise BundleError(f"{what}: file {name!r} resolves outside the bundle (a link to {full.resolve()})")
    return full


def read_json_file(path: Path, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BundleError(f"{path}: cannot read {what} ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise BundleError(f"{path}: {what} is not UTF-8 text") from exc
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise BundleError(f"{path}: {what} is not valid JSON ({exc})") from exc


# What ``torch.export.save`` writes for a plain module (checked on torch 2.5-2.13): the archive
# root folder, then these entries. Anything else (pickled weights or constants, sample inputs,
# custom objects, extra files, AOTInductor libraries) is refused.
_PT2_FIXED = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id",
              ".data/serialization_id.txt", "data/weights/model_weights_config.json",
              "data/constants/model_constants_config.json", "models/model.json"}
_PT2_WEIGHT = re.compile(r"^data/weights/weight_\d+$")
_PT2_EMPTY = {"data/sample_inputs/model.pt"}  # present but must be empty (it would be torch.load-ed)
MAX_PT2_BYTES = 512 * 2**20
MAX_PT2_JSON_BYTES = 64 * 2**20

# The operators a handed-over program may call: what CNN classifiers are made of (ours and the
# usual baselines). ``torch.export.load`` rebuilds the graph and running it calls each node's
# target, so a crafted archive could otherwise call ``aten.from_file`` (reads, or with
# ``shared=True`` writes, any file) or other storage operators. In-place variants of the
# activations are allowed: they only ever touch the graph's own tensors.
_PT2_OPS = frozenset("""
    conv1d conv2d convolution _convolution conv_transpose1d conv_transpose2d batch_norm _native_batch_norm_legit_no_training
    _native_batch_norm_legit_functional native_batch_norm layer_norm native_layer_norm group_norm native_group_norm
    relu relu_ hardtanh hardtanh_ hardswish hardswish_ hardsigmoid hardsigmoid_ silu silu_ sigmoid sigmoid_ gelu
    leaky_relu leaky_relu_ elu elu_ tanh tanh_ relu6 prelu _prelu_kernel softmax _softmax log_softmax _log_softmax
    add add_ sub sub_ mul mul_ div div_ neg abs sign clamp clamp_ clamp_min clamp_max round floor ceil sqrt rsqrt pow exp log
    mean sum amax amin max min argmax adaptive_avg_pool1d adaptive_avg_pool2d _adaptive_avg_pool2d avg_pool1d avg_pool2d
    max_pool1d max_pool2d max_pool2d_with_indices linear addmm mm bmm matmul t transpose permute view reshape _unsafe_view
    flatten squeeze unsqueeze expand cat stack split split_with_sizes chunk slice select contiguous clone alias detach
    dropout native_dropout _to_copy to constant_pad_nd pad upsample_nearest2d upsample_bilinear2d zeros_like ones_like
    full scalar_tensor where lift_fresh_copy sym_size gt ge lt le eq ne logical_not logical_and logical_or
""".split())
_PT2_TARGET = re.compile(r"^torch\.ops\.aten\.(\w+)\.(\w+)$")


def _read_capped(zf: zipfile.ZipFile, name: str, limit: int, path: Path) -> bytes:
    """An archive entry, read no further than ``limit`` bytes (declared sizes can lie)."""
    try:
        with zf.open(name) as fh:
            data = fh.read(limit + 1)
    except KeyError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError) as exc:
        raise BundleError(f"{path}: {path.name}: {name} cannot be read ({exc})") from exc
    if len(data) > limit:
        raise BundleError(f"{path}: {path.name}: {name} unpacks to more than {limit >> 20} MiB")
    return data


def _json_entry(zf: zipfile.ZipFile, root: str, rel: str, path: Path) -> Any:
    """A JSON entry of the archive, read within the size limit, parsed."""
    try:
        raw = _read_capped(zf, f"{root}/{rel}", MAX_PT2_JSON_BYTES, path)
    except KeyError:
        raise BundleError(f"{path}: {path.name} lacks {rel}") from None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise BundleError(f"{path}: {path.name}: {rel} is not valid JSON") from exc


def _node_targets(obj: Any) -> Iterator[Any]:
    """Every node target in a serialized program (nested graphs included)."""
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, dict):
            if "target" in o and "inputs" in o:
                yield o["target"]
            stack.extend(reversed(list(o.values())))
        elif isinstance(o, list):
            stack.extend(reversed(o))  # (graph order: the first offending node is the one named)


def check_pt2(path: Path) -> None:
    """Refuse a ``.pt2`` archive that ``torch.export.load`` would unpickle anything from."""
    name = path.name
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise BundleError(f"{path}: {name} is not a torch.export archive ({exc})") from exc
    with zf:
        infos = zf.infolist()
        if not infos:
            raise BundleError(f"{path}: {name} is an empty archive")
        roots = {i.filename.split("/", 1)[0] for i in infos}
        if len(roots) != 1:
            raise BundleError(f"{path}: {name} has entries under several roots ({', '.join(sorted(roots))})")
        root = roots.pop()
        if sum(i.file_size for i in infos) > MAX_PT2_BYTES:
            raise BundleError(f"{path}: {name} unpacks to more than {MAX_PT2_BYTES >> 20} MiB")
        for info in infos:
            rel = info.filename[len(root) + 1 :]
            if rel in _PT2_FIXED or _PT2_WEIGHT.match(rel):
                continue
            if rel in _PT2_EMPTY:
                if info.file_size:
                    raise BundleError(f"{path}: {name} carries pickled sample inputs ({info.filename}); refused")
                continue
            raise BundleError(f"{path}: {name} holds an entry nas never writes ({info.filename}); refused")
        program = _json_entry(zf, root, "models/model.json", path)
        for target in _node_targets(program):
            m = _PT2_TARGET.match(target) if isinstance(target, str) else None
            if target != "_operator.getitem" and not (m and m.group(1) in _PT2_OPS):
                raise BundleError(f"{path}: {name} calls operator {str(target)[:80]!r}, which a handed-over "
                                  "program may not use; refused")
        for cfg_name in ("data/weights/model_weights_config.json", "data/constants/model_constants_config.json"):
            cfg = _json_entry(zf, root, cfg_name, path)
            entries = cfg.get("config") if isinstance(cfg, dict) else None
            if not isinstance(entries, dict):
                raise BundleError(f"{path}: {name}: {cfg_name} has no 'config' mapping")
            if cfg_name.startswith("data/constants") and entries:
                raise BundleError(f"{path}: {name} carries constants ({', '.join(map(str, entries))}); refused")
            for key, meta in entries.items():
                if not isinstance(meta, dict) or meta.get("use_pickle") is not False:
                    raise BundleError(f"{path}: {name}: entry {key!r} is marked for unpickling; refused")


@contextlib.contextmanager
def no_unpickling() -> Iterator[None]:
    """Inside this block every unpickling entry point raises (defence in depth around a loader
    of untrusted files whose contents were already checked)."""
    import torch

    def refuse(*_a: Any, **_k: Any) -> Any:
        raise BundleError("refused to unpickle data from an untrusted file")

    patches = [(pickle, "load"), (pickle, "loads"), (torch, "load"), (torch._C, "_pickle_load_obj")]
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr in patches if hasattr(obj, attr)]
    try:
        for obj, attr, _ in saved:
            setattr(obj, attr, refuse)
        yield
    finally:
        for obj, attr, orig in saved:
            setattr(obj, attr, orig)


_ONNX_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "pkg.onnxscript.torch_lib.common"}


def graphs_in(graph: Any) -> Iterator[Any]:
    """``graph`` and every subgraph its nodes hold (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from graphs_in(attr.g)
            for sub in attr.graphs:
                yield from graphs_in(sub)


def _onnx_tensors(model: Any) -> Iterator[tuple[Any, str]]:
    """Every ``TensorProto`` an ONNX model can carry, with where it sits: initializers and
    sparse initializers of the graph and of every subgraph, every tensor an attribute holds
    (``value``, ``sparse_value``, lists of tensors, in any node, whatever the attribute's
    declared type), in function bodies and their attribute defaults too. (``training_info`` is
    refused as a whole before this is asked.)"""
    stack: list[tuple[str, Any, Any]] = [("graph", model.graph, None)]
    for fn in model.functions:
        stack.append((f"function {fn.domain}.{fn.name}", None, fn))

    def attrs(where: str, attributes: Any) -> Iterator[tuple[Any, str]]:
        for a in attributes:
            here = f"{where} attribute {a.name!r}"
            if a.HasField("t"):
                yield a.t, here
            for t in a.tensors:
                yield t, here
            for sp in ([a.sparse_tensor] if a.HasField("sparse_tensor") else []) + list(a.sparse_tensors):
                yield sp.values, f"{here} (sparse values)"
                yield sp.indices, f"{here} (sparse indices)"
            if a.HasField("g"):
                stack.append((f"{here} subgraph", a.g, None))
            for k, g in enumerate(a.graphs):
                stack.append((f"{here} subgraph {k}", g, None))

    while stack:
        where, g, fn = stack.pop()
        if fn is not None:
            yield from attrs(f"{where} default", fn.attribute_proto)
            for node in fn.node:
                yield from attrs(f"{where} node {node.op_type}", node.attribute)
            continue
        for t in g.initializer:
            yield t, f"{where} initializer"
        for sp in g.sparse_initializer:
            yield sp.values, f"{where} sparse_initializer (values)"
            yield sp.indices, f"{where} sparse_initializer (indices)"
        for node in g.node:
            yield from attrs(f"{where} node {node.op_type}", node.attribute)


def is_external(t: Any) -> bool:
    """Whether a tensor points to data outside the model file (either way ONNX allows it)."""
    from onnx import TensorProto

    return t.data_location == TensorProto.EXTERNAL or len(t.external_data) > 0


def check_onnx(path: Path) -> None:
    """Refuse an ONNX file that would make ONNX Runtime read other files (external data, in any
    place the format allows a tensor), that carries ``training_info`` (our exporter never writes
    one), or that uses operator domains outside the standard ones."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - the protobuf parser raises several types
        raise BundleError(f"{path}: {path.name} is not an ONNX model ({type(exc).__name__})") from exc
    if len(model.training_info):
        raise BundleError(f"{path}: {path.name} carries training_info (initialization or training graphs), which "
                          "nas never writes; refused")
    for t, where in _onnx_tensors(model):
        if is_external(t):
            raise BundleError(f"{path}: {path.name}: tensor {t.name[:80]!r} names an external data file "
                              f"({where[:120]}); refused")

    class _Fn:  # a function body, walked like a graph (its nodes may hold subgraphs too)
        def __init__(self, fn: Any) -> None:
            self.node, self.initializer = fn.node, []

    bodies = [model.graph] + [_Fn(fn) for fn in model.functions]
    for g in (sub for body in bodies for sub in graphs_in(body)):
        for node in g.node:
            if node.domain not in _ONNX_DOMAINS:
                raise BundleError(f"{path}: {path.name}: operator {node.op_type!r} of domain {node.domain!r} "
                                  f"is not a standard ONNX operator; refused")
    for fn in model.functions:
        if fn.domain not in _ONNX_DOMAINS:
            raise BundleError(f"{path}: {path.name}: function domain {fn.domain!r} is not allowed; refused")
        for a in fn.attribute_proto:  # subgraphs in attribute defaults
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                for sub in graphs_in(g):
                    for node in sub.node:
                        if node.domain not in _ONNX_DOMAINS:
                            raise BundleError(f"{path}: {path.name}: operator {node.op_type!r} of domain "
                                              f"{node.domain!r} is not a standard ONNX operator; refused")

