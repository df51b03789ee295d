"""Is a handed-over ONNX model the graph we would deploy? A structural comparison.

:func:`compare_models` compares two ``onnx.ModelProto`` node by node: operator types and
domains, every attribute, the wiring (which node output, graph input or initializer feeds
which input, and what the graph outputs are), and every initializer and constant value
(floats within :data:`REL_TOL` relative, element by element; everything else exactly).
Subgraphs (the ``If`` branches of early exits) are compared the same way, recursively, their
reads of outer-scope tensors included; so are local functions.

Tensor and node names differ legitimately between exporters, so nothing is matched by name:
the two graphs are walked together from their outputs. Graph output ``j`` of one is paired
with graph output ``j`` of the other, then the nodes producing them, then, input by input,
whatever each pair of nodes reads: a node output with the node producing it, a graph input
with the graph input of the same position, an initializer with an initializer (values
compared). A tensor once paired must stay paired with the same tensor wherever it is read
(so a node reading another tensor than its counterpart, or one tensor fanning out where the
other graph uses two, is a difference), and nodes left unpaired at the end (extra nodes, or
nodes that feed no output) are differences too.

Pure: no file is read and no tensor with external data is ever loaded (such a tensor is a
difference, never followed).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nas.valuediff import REL_TOL, floats_differ, sparse_diff, tensor_diff, type_sig, value_diff

__all__ = ["compare_models", "REL_TOL", "MAX_DIFFERENCES"]

# Differences reported at most (the first is what a FAIL line shows).
MAX_DIFFERENCES = 20


class _Full(Exception):
    """Enough differences collected."""


@dataclass
class _Report:
    labels: tuple[str, str]
    diffs: list[str] = field(default_factory=list)

    def add(self, text: str) -> None:
        self.diffs.append(text)
        if len(self.diffs) >= MAX_DIFFERENCES:
            raise _Full


@dataclass
class _Body:
    """What a graph or a function body is made of, by position."""

    inputs: list[str]
    input_types: list[Any]  # TypeProto, or None (function inputs have none)
    outputs: list[str]
    output_types: list[Any]
    inits: list[tuple[str, Any, str]]  # (name, TensorProto or SparseTensorProto, "dense" | "sparse")
    nodes: list[Any]


def _graph_body(g: Any) -> _Body:
    inits = [(t.name, t, "dense") for t in g.initializer]
    inits += [(s.values.name, s, "sparse") for s in g.sparse_initializer]
    return _Body([v.name for v in g.input], [v.type for v in g.input], [v.name for v in g.output],
                 [v.type for v in g.output], inits, list(g.node))


def _function_body(fn: Any) -> _Body:
    return _Body(list(fn.input), [None] * len(fn.input), list(fn.output), [None] * len(fn.output), [], list(fn.node))


class _Defs:
    """Where every name a body defines comes from."""

    def __init__(self, body: _Body) -> None:
        self.body = body
        self.problems: list[str] = []
        self.local: dict[str, tuple] = {}  # name -> ("in", i) | ("init", name) | ("node", idx, j)
        self.inits = {name: (t, kind) for name, t, kind in body.inits}
        self.defaults: dict[int, tuple[Any, str]] = {}  # graph input i -> its initializer (a default value)
        for i, name in enumerate(body.inputs):
            if name in self.local:
                self.problems.append(f"input {name[:60]!r} is declared twice")
            self.local.setdefault(name, ("in", i))
        seen: set[str] = set()
        for name, t, kind in body.inits:
            if name in seen:
                self.problems.append(f"initializer {name[:60]!r} is defined twice")
            seen.add(name)
            if name in self.local and self.local[name][0] == "in":
                self.defaults[self.local[name][1]] = (t, kind)
            else:
                self.local.setdefault(name, ("init", name))
        for idx, node in enumerate(body.nodes):
            for j, o in enumerate(node.output):
                if not o:
                    continue
                if o in self.local:
                    self.problems.append(f"tensor {o[:60]!r} is defined twice (again by a {node.op_type} node)")
                self.local[o] = ("node", idx, j)

    def source(self, name: str) -> tuple:
        if not name:
            return ("none",)
        return self.local.get(name, ("outer", name))


# ---------------------------------------------------------------------------------------------
# the walk


def _op(node: Any) -> str:
    return f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type


def _op_delta(a: Sequence[Any], b: Sequence[Any], labels: tuple[str, str]) -> str:
    ca, cb = Counter(map(_op, a)), Counter(map(_op, b))
    more = ", ".join(f"+{ca[k] - cb[k]} {k}" for k in sorted(ca) if ca[k] > cb[k])
    less = ", ".join(f"-{cb[k] - ca[k]} {k}" for k in sorted(cb) if cb[k] > ca[k])
    parts = [p for p in (more, less) if p]
    return f" ({labels[0]} vs {labels[1]}: {', '.join(parts)})" if parts else ""


def _node_label(node: Any) -> str:
    return f"{_op(node)} node" + (f" {node.name[:80]!r}" if node.name else "")


class _Walk:
    """Two bodies walked together from their outputs (see the module docstring)."""

    def __init__(self, a: _Body, b: _Body, where: str, parent: _Walk | None, rep: _Report) -> None:
        self.A, self.B = _Defs(a), _Defs(b)
        self.where, self.parent, self.rep = where, parent, rep
        self.la, self.lb = rep.labels
        self.pairs: dict[str, dict] = {"a": {}, "b": {}}  # node idx -> paired idx, each side
        self.init_pairs: dict[str, dict] = {"a": {}, "b": {}}
        self.queue: deque[tuple[int, int]] = deque()

    # -- descriptions
    def _desc(self, defs: _Defs, src: tuple, name: str) -> str:
        kind = src[0]
        if kind == "in":
            return f"graph input {src[1]}"
        if kind == "init":
            return f"an initializer {name[:60]!r}"
        if kind == "node":
            node = defs.body.nodes[src[1]]
            return f"output {src[2]} of the {_node_label(node)}"
        if kind == "none":
            return "nothing (an omitted optional input)"
        return f"{name[:60]!r} of an outer scope"

    def add(self, text: str) -> None:
        self.rep.add(f"{self.where}: {text}")

    # -- pairing
    def match(self, na: str, nb: str, reader: str) -> None:
        """``na`` (in A) and ``nb`` (in B) are read at the same place: pair what they are."""
        sa, sb = self.A.source(na), self.B.source(nb)
        if sa[0] == "outer" and sb[0] == "outer":
            if self.parent is None:
                if na != nb:
                    self.add(f"{reader} reads undefined {na[:60]!r} where {self.lb} reads undefined {nb[:60]!r}")
                return
            self.parent.match(na, nb, f"{reader} in {self.where}")
            return
        differs = sa[0] != sb[0] or (sa[0] == "in" and sa[1] != sb[1]) or (sa[0] == "node" and sa[2] != sb[2])
        conflict = ""
        if not differs and sa[0] == "init":
            pa, pb = self.init_pairs["a"].get(na), self.init_pairs["b"].get(nb)
            if (pa is not None and pa != nb) or (pb is not None and pb != na):
                differs = True
            elif pa is None:
                self.init_pairs["a"][na], self.init_pairs["b"][nb] = nb, na
                d = value_diff(self.A.inits[na], self.B.inits[nb], self.lb)
                if d:
                    self.add(f"initializer read by {reader}: {d}")
        if not differs and sa[0] == "node":
            x, y = self.A.body.nodes[sa[1]], self.B.body.nodes[sb[1]]
            pa, pb = self.pairs["a"].get(sa[1]), self.pairs["b"].get(sb[1])
            if _op(x) != _op(y):
                differs = True  # another operator, or another node read: either way, named here
            elif (pa is not None and pa != sb[1]) or (pb is not None and pb != sa[1]):
                differs = True
                conflict = (f" (elsewhere, {self.la}'s node stands for {self.lb}'s {_node_label(self.B.body.nodes[pa])})"
                            if pa is not None else
                            f" (elsewhere, {self.lb}'s node stands for {self.la}'s {_node_label(self.A.body.nodes[pb])})")
            elif pa is None:
                self.pairs["a"][sa[1]], self.pairs["b"][sb[1]] = sb[1], sa[1]
                self.queue.append((sa[1], sb[1]))
        if differs:
            self.add(f"{reader} reads {self._desc(self.A, sa, na)} where {self.lb} reads "
                     f"{self._desc(self.B, sb, nb)}{conflict}")

    def run(self) -> None:
        a, b = self.A.body, self.B.body
        for p in self.A.problems:
            if p not in self.B.problems:
                self.add(f"{self.la}: {p}")
        if len(a.nodes) != len(b.nodes):
            self.add(f"{len(a.nodes)} nodes where {self.lb} has {len(b.nodes)}{_op_delta(a.nodes, b.nodes, self.rep.labels)}")
        if len(a.inputs) != len(b.inputs):
            self.add(f"{len(a.inputs)} input(s) where {self.lb} has {len(b.inputs)}")
        for i, (x, y) in enumerate(zip(a.input_types, b.input_types)):
            if type_sig(x) != type_sig(y):
                self.add(f"input {i} has another type or shape than in {self.lb}")
        if sorted(self.A.defaults) != sorted(self.B.defaults):
            self.add(f"inputs with a default value (an initializer of the same name) differ from {self.lb}'s")
        for i in sorted(set(self.A.defaults) & set(self.B.defaults)):
            d = value_diff(self.A.defaults[i], self.B.defaults[i], self.lb)
            if d:
                self.add(f"default value of input {i}: {d}")
        if len(a.outputs) != len(b.outputs):
            self.add(f"{len(a.outputs)} output(s) where {self.lb} has {len(b.outputs)}")
        for j, (x, y) in enumerate(zip(a.output_types, b.output_types)):
            if type_sig(x) != type_sig(y):
                self.add(f"output {j} has another type or shape than in {self.lb}")
        for j, (x, y) in enumerate(zip(a.outputs, b.outputs)):
            self.match(x, y, f"graph output {j}")
        start = len(self.rep.diffs)
        while self.queue:
            self._compare_nodes(*self.queue.popleft())
        if len(self.rep.diffs) == start:
            # nodes that feed no output (the same on both sides, if this is the same graph):
            # paired in their listed order, then walked like the rest
            for ia, ib in zip([i for i in range(len(a.nodes)) if i not in self.pairs["a"]],
                              [i for i in range(len(b.nodes)) if i not in self.pairs["b"]]):
                if ia not in self.pairs["a"] and ib not in self.pairs["b"] and _op(a.nodes[ia]) == _op(b.nodes[ib]):
                    self.pairs["a"][ia], self.pairs["b"][ib] = ib, ia
                    self.queue.append((ia, ib))
                    while self.queue:
                        self._compare_nodes(*self.queue.popleft())
        left_a = [n for i, n in enumerate(a.nodes) if i not in self.pairs["a"]]
        left_b = [n for i, n in enumerate(b.nodes) if i not in self.pairs["b"]]
        if left_a or left_b:
            first = f"; the first: {_node_label(left_a[0])}" if left_a else ""
            self.add(f"{len(left_a)} node(s) of {self.la} and {len(left_b)} of {self.lb} have no counterpart on the "
                     f"way to the outputs{_op_delta(left_a, left_b, self.rep.labels)}{first}")
        unread_a = len(self.A.inits) - len(self.init_pairs["a"]) - len(self.A.defaults)
        unread_b = len(self.B.inits) - len(self.init_pairs["b"]) - len(self.B.defaults)
        if unread_a != unread_b:
            self.add(f"{unread_a} initializer(s) no compared node reads where {self.lb} has {unread_b}")

    def _compare_nodes(self, ia: int, ib: int) -> None:
        x, y = self.A.body.nodes[ia], self.B.body.nodes[ib]
        node = f"{_node_label(x)}"
        if getattr(x, "overload", "") != getattr(y, "overload", ""):
            self.add(f"{node} calls another function overload")
        if len(x.input) != len(y.input):
            self.add(f"{node} has {len(x.input)} inputs where {self.lb}'s has {len(y.input)}")
        if [bool(o) for o in x.output] != [bool(o) for o in y.output]:
            self.add(f"{node} has outputs {[bool(o) for o in x.output]} where {self.lb}'s has {[bool(o) for o in y.output]}")
        ax, ay = {t.name: t for t in x.attribute}, {t.name: t for t in y.attribute}
        if len(ax) != len(x.attribute) or len(ay) != len(y.attribute):
            self.add(f"{node} names an attribute twice")
        if set(ax) != set(ay):
            extra, missing = sorted(set(ax) - set(ay)), sorted(set(ay) - set(ax))
            self.add(f"{node} attributes differ" + (f"; only in {self.la}: {', '.join(extra)}" if extra else "")
                     + (f"; only in {self.lb}: {', '.join(missing)}" if missing else ""))
        for name in sorted(set(ax) & set(ay)):
            _compare_attr(ax[name], ay[name], node, self, self.rep)
        for k, (u, v) in enumerate(zip(x.input, y.input)):
            self.match(u, v, f"input {k} of the {node}")


def _compare_attr(a: Any, b: Any, where: str, walk: _Walk | None, rep: _Report) -> None:
    """Attribute ``a`` against ``b``: every field, whatever the declared type; subgraphs walked
    with ``walk`` as their outer scope."""
    what, lb = f"attribute {a.name!r} of the {where}", rep.labels[1]
    prefix = f"{walk.where}: " if walk is not None else ""

    def add(text: str) -> None:
        rep.add(f"{prefix}{what}: {text}")

    if a.type != b.type or a.ref_attr_name != b.ref_attr_name:
        add("of another type or reference")
        return
    if a.i != b.i or list(a.ints) != list(b.ints):
        add(f"{a.i if not a.ints else list(a.ints)} where {lb} has {b.i if not b.ints else list(b.ints)}")
    if a.s != b.s or list(a.strings) != list(b.strings):
        add(f"{a.s or list(a.strings)!r} where {lb} has {b.s or list(b.strings)!r}")
    fa, fb = np.array([a.f, *a.floats], dtype=np.float64), np.array([b.f, *b.floats], dtype=np.float64)
    if fa.shape != fb.shape or floats_differ(fa, fb):
        add(f"{a.f if not a.floats else list(a.floats)} where {lb} has {b.f if not b.floats else list(b.floats)}")
    ta = ([a.t] if a.HasField("t") else []) + list(a.tensors)
    tb = ([b.t] if b.HasField("t") else []) + list(b.tensors)
    if len(ta) != len(tb):
        add(f"{len(ta)} tensor(s) where {lb} has {len(tb)}")
    for k, (x, y) in enumerate(zip(ta, tb)):
        d = tensor_diff(x, y, lb)
        if d:
            add(f"tensor{'' if len(ta) == 1 else f' {k}'} {d}")
    xa = ([a.sparse_tensor] if a.HasField("sparse_tensor") else []) + list(a.sparse_tensors)
    xb = ([b.sparse_tensor] if b.HasField("sparse_tensor") else []) + list(b.sparse_tensors)
    if len(xa) != len(xb):
        add(f"{len(xa)} sparse tensor(s) where {lb} has {len(xb)}")
    for x, y in zip(xa, xb):
        d = sparse_diff(x, y, lb)
        if d:
            add(f"sparse tensor {d}")
    pa = ([a.tp] if a.HasField("tp") else []) + list(a.type_protos)
    pb = ([b.tp] if b.HasField("tp") else []) + list(b.type_protos)
    if [type_sig(t) for t in pa] != [type_sig(t) for t in pb]:
        add("another type")
    ga = ([a.g] if a.HasField("g") else []) + list(a.graphs)
    gb = ([b.g] if b.HasField("g") else []) + list(b.graphs)
    if len(ga) != len(gb):
        add(f"{len(ga)} subgraph(s) where {lb} has {len(gb)}")
    for k, (x, y) in enumerate(zip(ga, gb)):
        scope = f"{walk.where} > " if walk is not None else ""
        _Walk(_graph_body(x), _graph_body(y), f"{scope}{a.name}{'' if len(ga) == 1 else f'[{k}]'} of the {where}", walk,
              rep).run()


def _opsets(m: Any) -> dict[str, int]:
    return {o.domain or "ai.onnx": o.version for o in m.opset_import}


def compare_models(model: Any, reference: Any, labels: tuple[str, str] = ("the model", "the reference")) -> list[str]:
    """How ``model`` differs from ``reference`` (both ``onnx.ModelProto``): one line per
    difference, the most telling first; empty when they are the same graph (names aside,
    floats within :data:`REL_TOL`). At most :data:`MAX_DIFFERENCES` lines. ``labels`` name
    the two in the lines."""
    rep = _Report(labels)
    lb = labels[1]
    try:
        if model.ir_version != reference.ir_version:
            rep.add(f"model: IR version {model.ir_version} where {lb} has {reference.ir_version}")
        if _opsets(model) != _opsets(reference):
            rep.add(f"model: operator sets {_opsets(model)} where {lb} has {_opsets(reference)}")
        if len(model.training_info) != len(reference.training_info):
            rep.add(f"model: {len(model.training_info)} training_info entries where {lb} has {len(reference.training_info)}")
        if len(model.functions) != len(reference.functions):
            rep.add(f"model: {len(model.functions)} local function(s) where {lb} has {len(reference.functions)}")
        for k, (fa, fb) in enumerate(zip(model.functions, reference.functions)):
            where = f"function {k} ({fa.domain[:40]}.{fa.name[:40]})"
            if (fa.domain, fa.name, getattr(fa, "overload", ""), list(fa.attribute)) != \
                    (fb.domain, fb.name, getattr(fb, "overload", ""), list(fb.attribute)):
                rep.add(f"{where}: another name or attribute list than {lb}'s")
            if _opsets(fa) != _opsets(fb):
                rep.add(f"{where}: operator sets {_opsets(fa)} where {lb} has {_opsets(fb)}")
            if len(fa.attribute_proto) != len(fb.attribute_proto):
                rep.add(f"{where}: {len(fa.attribute_proto)} attribute default(s) where {lb} has {len(fb.attribute_proto)}")
            for x, y in zip(fa.attribute_proto, fb.attribute_proto):
                if x.name != y.name:
                    rep.add(f"{where}: attribute default {x.name[:40]!r} where {lb} has {y.name[:40]!r}")
                else:
                    _compare_attr(x, y, f"{where} defaults", None, rep)
            _Walk(_function_body(fa), _function_body(fb), where, None, rep).run()
        _Walk(_graph_body(model.graph), _graph_body(reference.graph), "graph", None, rep).run()
    except _Full:
        pass
    except RecursionError:
        rep.diffs.append("graph: subgraphs nested too deeply to compare")
    return rep.diffs
