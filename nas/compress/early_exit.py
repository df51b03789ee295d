"""Early exit (dynamic computation, 动态计算): exit heads after chosen stages answer the inputs
they are confident about; only the others run the full depth (BranchyNet, Teerapittayanon et
al. 2016; the source notes' 动态计算).

- Gene ``early_exit``: ``none``, or the stages after which an exit head sits (``"1"``,
  ``"1+2"``: stage indices of the space, never the last stage). A head is global average
  pooling and one linear layer. ``exit_weight``: weight of the exits' cross-entropy in the joint
  training loss (the backbone and every head train together, from the first epoch).
  ``exit_loss``: the validation accuracy the exits may cost against the same network run to
  full depth; the thresholds are calibrated to it.
- Confidence is the softmax maximum; an input leaves at the first exit whose confidence
  reaches that exit's threshold. After training (and the other compression steps), the
  thresholds are chosen on the validation split from a fixed grid: the combination with the
  least expected compute (FLOPs of the segments each input runs) whose validation accuracy is
  within ``exit_loss`` of full depth.
- Deployed for real: ``model.onnx`` is one graph with ONNX ``If`` nodes, so ONNX Runtime runs
  only the segments an input needs (a nested If per exit costs ~1.5 us here, less than a second
  session's ~3.5 us floor). The PyTorch model computes every exit and picks per input with the
  same thresholds: same answers, no saving (it is the reference, not the shipped artifact).
  Latency is therefore input-dependent: the mean over the validation inputs at batch 1, p95
  beside (the registry's ``dynamic_latency``). The packed file holds the heads and thresholds.
- Not combined with structured pruning (the heads read stage widths pruning would change) nor
  with int8 activations (QDQ; the exit graph is float, so integer weights need
  ``weight_only``): the gene is sampled only where neither is on, and a candidate that sets
  it with them, or names a stage the network lacks or its last stage, fails in pre-flight
  with the reason. At most three exits (thresholds are calibrated over a grid per exit).
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from nas.builder import Net
from nas.compress.registry import Method, register_method
from nas.methods import EarlyExitConfig, exit_stages, int8_activations

__all__ = ["EarlyExit", "EarlyExitNet", "exit_stages", "calibrate_thresholds"]

NEVER = 2.0  # a threshold no softmax maximum reaches: the exit never answers
# Threshold grid, rounded to fp16 so the packed file (which may store small tensors as fp16)
# ships exactly the thresholds that were chosen.
GRID = tuple(float(torch.tensor(v).half()) for v in (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.975, 0.99)) + (NEVER,)


def exit_points(arch: Any, stages: Sequence[int]) -> list[int]:
    """Body indices after which the exits sit: the last block of each chosen stage that is
    present and is not the network's last stage."""
    last_of: dict[int, int] = {}
    for i, b in enumerate(arch.blocks):
        last_of[b.stage] = i
    final = len(arch.blocks) - 1
    return sorted({last_of[s] for s in stages if s in last_of and last_of[s] < final})


class EarlyExitNet(Net):
    """A :class:`~nas.builder.Net` with exit heads (``exits``) after body blocks ``exit_after``
    and one threshold per exit (buffer ``exit_thresholds``). Training returns the final logits
    and keeps the exits' for :meth:`auxiliary_loss`; evaluation answers each input from its
    first confident exit (every exit computed, picked per input)."""

    exit_after: tuple[int, ...]
    exit_weight: float
    exits: nn.ModuleList
    exit_thresholds: torch.Tensor

    def stages_out(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        x = self.stem(x)
        outs = []
        for i, block in enumerate(self.body):
            x = block(x)
            if i in self.exit_after:
                outs.append(self.exits[len(outs)](x.mean((2, 3))))
        return outs, self.classifier(self.dropout(torch.flatten(self.pool(x), 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs, final = self.stages_out(x)
        if self.training:
            self._exit_logits = outs
            return final
        out = final
        for k in reversed(range(len(outs))):  # the first confident exit wins
            confident = F.softmax(outs[k], dim=1).amax(1) >= self.exit_thresholds[k]
            out = torch.where(confident[:, None], outs[k], out)
        return out

    def auxiliary_loss(self, targets: torch.Tensor) -> torch.Tensor:
        logits = getattr(self, "_exit_logits", [])
        if not logits:
            return torch.zeros(())
        return self.exit_weight * sum(F.cross_entropy(lg, targets) for lg in logits) / len(logits)


def _add_exits(model: Net, points: Sequence[int], weight: float) -> EarlyExitNet:
    widths = [model.arch.blocks[i].out_channels for i in points]
    model.__class__ = EarlyExitNet  # same modules and weights; the exits are added beside them
    model.exit_after = tuple(points)
    model.exit_weight = float(weight)
    model.exits = nn.ModuleList(nn.Linear(w, model.arch.num_classes) for w in widths)
    model.register_buffer("exit_thresholds", torch.full((len(points),), NEVER))
    return model  # type: ignore[return-value]


@torch.no_grad()
def _segment_outputs(model: EarlyExitNet, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per input: each exit's softmax maximum and prediction (E, N), and the final prediction."""
    model.eval()
    confs, preds, finals = [], [], []
    for i in range(0, len(x), 512):
        outs, final = model.stages_out(x[i : i + 512])
        confs.append(torch.stack([F.softmax(o, 1).amax(1) for o in outs]))
        preds.append(torch.stack([o.argmax(1) for o in outs]))
        finals.append(final.argmax(1))
    return torch.cat(confs, 1).numpy(), torch.cat(preds, 1).numpy(), torch.cat(finals).numpy()


def answered_by(conf: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """Index of the exit that answers each input (len(thresholds): the final classifier)."""
    who = np.full(conf.shape[1], len(thresholds))
    for k in reversed(range(len(thresholds))):
        who = np.where(conf[k] >= thresholds[k], k, who)
    return who


def segment_flops(model: EarlyExitNet, example: torch.Tensor) -> list[float]:
    """Multiply-adds of each segment an input may run (up to and with exit 1, ..., the rest)."""
    from nas.measure import count_flops

    parts = _segments(model)
    out, x = [], example
    with torch.no_grad():
        for part in parts:
            out.append(float(count_flops(part, x)))
            y = part(x)
            x = y[0] if isinstance(y, tuple) else y
    return out


def calibrate_thresholds(model: EarlyExitNet, x: torch.Tensor, y: torch.Tensor, budget: float,
                         example: torch.Tensor) -> tuple[float, ...]:
    """The thresholds (from :data:`GRID`) with the least expected compute whose accuracy on
    ``x, y`` is within ``budget`` of the network run to full depth."""
    conf, preds, final = _segment_outputs(model, x)
    labels = y.numpy()
    full_acc = float((final == labels).mean())
    costs = np.cumsum(segment_flops(model, example))  # compute of answering at exit k (last: full)
    answers = np.vstack([preds, final[None]])
    best, best_key = (NEVER,) * len(conf), (float(costs[-1]), -full_acc)
    for ths in itertools.product(GRID, repeat=len(conf)):
        who = answered_by(conf, ths)
        acc = float((answers[who, np.arange(len(who))] == labels).mean())
        if acc < full_acc - budget - 1e-12:
            continue
        key = (float(costs[who].mean()), -acc)
        if key < best_key:
            best, best_key = ths, key
    return tuple(float(t) for t in best)


class _Segment(nn.Module):
    """Part of the network between two exits: features in, (features, exit logits) out; the
    last part returns the logits."""

    def __init__(self, layers: Sequence[nn.Module], head: nn.Module | None, tail: Net | None) -> None:
        super().__init__()
        self.layers = nn.Sequential(*layers)
        self.head, self.tail = head, tail

    def forward(self, x: torch.Tensor) -> Any:
        f = self.layers(x)
        if self.tail is not None:
            return self.tail.classifier(self.tail.dropout(torch.flatten(self.tail.pool(f), 1)))
        return f, self.head(f.mean((2, 3)))


def _segments(model: EarlyExitNet) -> list[_Segment]:
    parts, start = [], 0
    for k, after in enumerate(model.exit_after):
        layers = ([model.stem] if k == 0 else []) + list(model.body[start : after + 1])
        parts.append(_Segment(layers, model.exits[k], None))
        start = after + 1
    layers = ([model.stem] if not model.exit_after else []) + list(model.body[start:])
    parts.append(_Segment(layers, None, model))
    return parts


def _export_segment(part: _Segment, x: torch.Tensor, path: Path, last: bool) -> Any:
    import onnx

    from nas.onnxio import quiet_output

    part.eval()
    with quiet_output(), torch.no_grad():
        torch.onnx.export(part, (x,), str(path), dynamo=False, do_constant_folding=True, opset_version=17,
                          input_names=["x"], output_names=["logits"] if last else ["f", "l"])
    return onnx.load(str(path)).graph


def exit_graph(model: EarlyExitNet, example: torch.Tensor, path: Path) -> Path:
    """Write ``model`` as one ONNX graph: each segment runs, then an ``If`` on its exit's
    softmax maximum either answers with the exit's logits or runs the rest (nested)."""
    import onnx
    from onnx import TensorProto, helper

    parts = _segments(model)
    graphs, x = [], example
    with tempfile.TemporaryDirectory(prefix="nas-exit-") as tmp, torch.no_grad():
        for k, part in enumerate(parts):
            last = k == len(parts) - 1
            graphs.append(_export_segment(part, x, Path(tmp) / f"s{k}.onnx", last))
            if not last:
                x = part(x)[0]
    # Each segment's weights live in the (sub)graph that uses them: ONNX Runtime pre-packs a
    # convolution's weights only when they are initializers of its own graph (read from an
    # outer scope, the full-depth path ran 60% slower here).

    def inline(k: int, g: Any, source: str) -> tuple[list[Any], list[Any], dict[str, str]]:
        """Segment k's nodes and initializers with every name prefixed, reading ``source``."""
        names = {i.name: f"e{k}/{i.name}" for i in g.initializer}
        names[g.input[0].name] = source
        inits = []
        for init in g.initializer:
            t = onnx.TensorProto()
            t.CopyFrom(init)
            t.name = names[init.name]
            inits.append(t)
        nodes = []
        for n in g.node:
            m = onnx.NodeProto()
            m.CopyFrom(n)
            m.name = f"e{k}/{n.name}"
            m.ClearField("input")
            m.ClearField("output")
            m.input.extend(names.get(i, f"e{k}/{i}") if i else "" for i in n.input)
            m.output.extend(f"e{k}/{o}" if o else "" for o in n.output)
            nodes.append(m)
        return nodes, inits, {o.name: f"e{k}/{o.name}" for o in g.output}

    classes = model.arch.num_classes
    thresholds = [float(t) for t in model.exit_thresholds]

    def build(k: int, source: str, out: str) -> tuple[list[Any], list[Any]]:
        """Nodes (and their initializers) computing the logits into ``out`` from segment k on."""
        nodes, inits, outs = inline(k, graphs[k], source)
        if k == len(graphs) - 1:
            return [*nodes, helper.make_node("Identity", [outs["logits"]], [out], name=f"e{k}/out")], inits
        p = f"e{k}/exit"
        nodes += [
            helper.make_node("Softmax", [outs["l"]], [f"{p}/p"], axis=1, name=f"{p}/softmax"),
            helper.make_node("ReduceMax", [f"{p}/p"], [f"{p}/m"], axes=[1], keepdims=0, name=f"{p}/max"),
            # a batch leaves early only if every input in it is confident (batch 1: exactly the rule)
            helper.make_node("ReduceMin", [f"{p}/m"], [f"{p}/least"], keepdims=0, name=f"{p}/min"),
            helper.make_node("Constant", [], [f"{p}/t"], name=f"{p}/threshold",
                             value=helper.make_tensor(f"{p}/t", TensorProto.FLOAT, [], [thresholds[k]])),
            helper.make_node("GreaterOrEqual", [f"{p}/least", f"{p}/t"], [f"{p}/go"], name=f"{p}/confident"),
        ]
        answer = helper.make_graph([helper.make_node("Identity", [outs["l"]], [f"{p}/answer"], name=f"{p}/answer")],
                                   f"exit{k}", [], [helper.make_tensor_value_info(f"{p}/answer", TensorProto.FLOAT,
                                                                                  ["N", classes])])
        rest_nodes, rest_inits = build(k + 1, outs["f"], f"{p}/rest")
        rest = helper.make_graph(rest_nodes, f"after_exit{k}", [],
                                 [helper.make_tensor_value_info(f"{p}/rest", TensorProto.FLOAT, ["N", classes])],
                                 rest_inits)
        return [*nodes, helper.make_node("If", [f"{p}/go"], [out], then_branch=answer, else_branch=rest,
                                         name=f"{p}/if")], inits

    nodes, inits = build(0, "x", "logits")
    shape = ["N", *list(example.shape[1:])]
    graph = helper.make_graph(nodes, "early_exit", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="nas")
    onnx.checker.check_model(proto)
    tmp_path = path.with_name(path.name + ".tmp")
    onnx.save(proto, str(tmp_path))
    tmp_path.replace(path)
    return path


@register_method
class EarlyExit(Method):
    config, phase = EarlyExitConfig, "snap"
    example, effect = {"early_exit": "0"}, ("exits",)

    def extend(self, model: nn.Module, cfg: Any) -> nn.Module:
        if getattr(cfg, "prune", "none") not in ("none", None):
            raise ValueError("early_exit does not combine with structured pruning (prune must be none)")
        if int8_activations(cfg):
            raise ValueError("early_exit deploys float activations: integer weights need weight_only: true with it")
        stages = exit_stages(cfg.early_exit)
        points = exit_points(model.arch, stages)
        if len(points) != len(stages):
            present = sorted({b.stage for b in model.arch.blocks})
            raise ValueError(f"early_exit {cfg.early_exit!r}: exits go after stages {present[:-1]} of this network "
                             f"(not after its last stage {present[-1]}, nor after a stage it leaves out)")
        return _add_exits(model, points, cfg.exit_weight)

    def apply(self, model: Any, cfg: Any, ctx: Any) -> Any:
        if isinstance(model, EarlyExitNet) and ctx.training:  # pre-flight: thresholds stay NEVER (full depth)
            example = ctx.data.x_val[:1]
            ths = calibrate_thresholds(model, ctx.data.x_val, ctx.data.y_val, cfg.exit_loss, example)
            model.exit_thresholds.copy_(torch.tensor(ths))
        return model

    def deploy(self, model: nn.Module, cfg: Any, example: torch.Tensor, path: Any) -> tuple[str, str] | None:
        if not isinstance(model, EarlyExitNet):
            return None
        exit_graph(model, example, Path(path))
        return "fp32 (early-exit graph)", "torchscript"  # its segments: _export_segment

    def dynamic_latency(self, cfg: Any) -> bool:
        return self.active(cfg)

    def metrics(self, model: nn.Module, cfg: Any, data: Any) -> dict[str, Any]:
        if not isinstance(model, EarlyExitNet):
            return {}
        conf, preds, final = _segment_outputs(model, data.x_val)
        ths = [float(t) for t in model.exit_thresholds]
        who = answered_by(conf, ths)
        n = len(ths) + 1
        return {"exit_after_block": list(model.exit_after), "thresholds": ths,
                "exit_share_val": [float((who == k).mean()) for k in range(n)],
                "full_depth_val_accuracy": float((final == data.y_val.numpy()).mean())}

    def card_notes(self, cfg: Any) -> list[str]:
        if not self.active(cfg):
            return []
        return ["- Early exit: `model.onnx` answers an input from the first exit head whose softmax maximum reaches "
                "its threshold (ONNX `If` nodes); latency is the mean over the validation inputs at batch 1, and "
                "inputs unlike the validation data may run deeper (p95 in the table). A batch of several inputs "
                "leaves early only if all of them are confident; run it one input at a time."]

    def card_lines(self, cfg: Any, metrics: Mapping[str, Any]) -> list[str]:
        shares = metrics.get("exit_share_val") or []
        ths = metrics.get("thresholds") or []
        if not shares:
            return []
        parts = [f"exit {k + 1} " + (f"(threshold {t:.3g}) {s:.1%}" if t <= 1 else "never (no threshold kept "
                 "validation accuracy within the budget)") for k, (s, t) in enumerate(zip(shares, ths))]
        parts.append(f"full depth {shares[-1]:.1%}")
        full = metrics.get("full_depth_val_accuracy")
        return [f"- Which exit answered the validation inputs: {', '.join(parts)}"
                + (f"; full depth alone scores {full:.1%} on validation." if isinstance(full, float) else ".")]
