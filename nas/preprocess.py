"""The input normalisation a model ships with, so raw inputs work in every runtime.

The search trains on inputs normalised with the training split's mean and std. A bundle's
models take the dataset's *raw* inputs instead (digits as ``images / 16``, image folders and
idx files as ``pixels / 255``, a ``.npz`` as stored): ``model.onnx`` starts with ``Sub`` and
``Div`` nodes holding the mean and std, and the PyTorch model (``model.pt2``,
``load_bundle(...).torch_model``) with :class:`Normalize`. Both compute ``(x - mean) / std`` in
float32, the same operations :mod:`nas.data` applies, so the normalised values are
bit-identical and so are the recorded accuracies.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["Normalize", "with_normalization", "prepend_normalization", "NORMALIZED"]

# Name of the normalised tensor inside model.onnx (the graph input keeps the exporter's name).
NORMALIZED = "normalized_input"


def _stat(values: float | Sequence[float], channels: int) -> torch.Tensor:
    v = torch.as_tensor(np.asarray(values, dtype=np.float32).reshape(-1))
    if v.numel() not in (1, channels):
        raise ValueError(f"normalization has {v.numel()} values for {channels} input channels")
    return v.reshape(1, -1, 1, 1) if v.numel() > 1 else v.reshape(())


class Normalize(nn.Module):
    """``(x - mean) / std`` in float32, mean and std as persistent buffers (a ``torch.export``
    program stores them with the weights: nothing pickled)."""

    def __init__(self, mean: float | Sequence[float], std: float | Sequence[float], channels: int = 1) -> None:
        super().__init__()
        self.register_buffer("mean", _stat(mean, channels))
        self.register_buffer("std", _stat(std, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Normalized(nn.Module):
    """A trained network behind its input normalisation: what a bundle's PyTorch model is."""

    def __init__(self, net: nn.Module, normalize: Normalize) -> None:
        super().__init__()
        self.normalize, self.net = normalize, net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def with_normalization(net: nn.Module, mean: float | Sequence[float], std: float | Sequence[float]) -> nn.Module:
    """``net`` taking raw inputs; channels are read from the network's architecture when it has one."""
    arch = getattr(net, "arch", None)
    return Normalized(net, Normalize(mean, std, getattr(arch, "in_channels", 1))).eval()


def prepend_normalization(path: Path, mean: float | Sequence[float], std: float | Sequence[float]) -> Path:
    """Rewrite the ONNX model at ``path`` so its input is raw: ``Sub`` (mean) and ``Div`` (std)
    come first, and every node that read the input (also inside subgraphs: early exits) reads
    the normalised tensor instead. The graph input keeps its name, shape and dtype."""
    import onnx
    from onnx import helper, numpy_helper

    from nas.trust import graphs_in

    model = onnx.load(str(path))
    g = model.graph
    src = g.input[0].name
    channels = g.input[0].type.tensor_type.shape.dim[1].dim_value or 1
    for sub in graphs_in(g):
        for node in sub.node:
            for i, name in enumerate(node.input):
                if name == src:
                    node.input[i] = NORMALIZED
    mean_t = numpy_helper.from_array(_stat(mean, channels).numpy(), "input_mean")
    std_t = numpy_helper.from_array(_stat(std, channels).numpy(), "input_std")
    g.initializer.extend([mean_t, std_t])
    nodes = [helper.make_node("Sub", [src, "input_mean"], ["centered_input"], name="/normalize/Sub"),
             helper.make_node("Div", ["centered_input", "input_std"], [NORMALIZED], name="/normalize/Div")]
    rest = list(g.node)
    del g.node[:]
    g.node.extend(nodes + rest)
    tmp = path.with_name(path.name + ".norm")
    onnx.save(model, str(tmp))
    tmp.replace(path)
    return path
