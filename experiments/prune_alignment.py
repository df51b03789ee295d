"""Does a pruned width that is not a multiple of 4 cost latency in ONNX Runtime? (``prune_multiple``)

fm6's trial 15 ran 0.037 ms unpruned and 0.10-0.21 ms in every pruned variant. This script takes
the topology of fm6's best member (trial 11: stem16 | conv k5 w32 /2 | mbconv k5 e2 w24 /2 |
conv k3 w64 x2 /2 on 28x28, Fashion-MNIST's input) and times it in ONNX Runtime (batch 1,
1 thread, the search's protocol) with one group's width changed at a time (the mbconv's
depthwise layer, the stem, a conv), and with the widths 1/8, 1/4 and 3/8 pruning give with and
without ``prune_multiple: 4``. Every graph is timed in each of ``--passes``
interleaved passes; the median over passes is reported beside the runtime's floor (an identity
graph timed in the same passes).

    python experiments/prune_alignment.py            # ~1 min on 2 cores

Writes experiments/results/prune_alignment.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from _common import write_json

from nas.blocks import hidden_width
from nas.builder import build
from nas.compress.prune import target_widths
from nas.config import ArchConfig, BlockConfig
from nas.measure import export_onnx
from nas.timing import identity_graph, onnx_latency

SHAPE = (1, 1, 28, 28)


def member(stem: int, w1: int, w2: int, w3: int, hidden: int | None = None) -> ArchConfig:
    return ArchConfig(input_size=(28, 28), stem_channels=stem, blocks=(
        BlockConfig("conv", w1, 5, 2, 1, 0), BlockConfig("mbconv", w2, 5, 2, 2, 1, hidden=hidden),
        BlockConfig("conv", w3, 3, 2, 1, 2), BlockConfig("conv", w3, 3, 1, 1, 2)))


def dsconv_after(w: int) -> ArchConfig:
    """A depthwise-separable block whose depthwise layer runs on a conv's ``w`` output channels."""
    return ArchConfig(input_size=(28, 28), stem_channels=16, blocks=(
        BlockConfig("conv", w, 5, 2, 1, 0), BlockConfig("dsconv", 64, 3, 2, 1, 1), BlockConfig("conv", 64, 3, 2, 1, 2)))


def pruned(ratio: float, multiple: int) -> ArchConfig:
    full = member(16, 32, 24, 64)
    w = target_widths(full, [ratio], multiple=multiple)
    return member(w["i0"], w["i1"], w["i2"], w["i3"], w["h1"])


def widths(a: ArchConfig) -> str:
    """stem/conv/mbconv(its depthwise layer's width)/last stage"""
    b = a.blocks
    return f"{a.stem_channels}/{b[0].out_channels}/{b[1].out_channels}({hidden_width(b[1], b[0].out_channels)})/{b[2].out_channels}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--passes", type=int, default=7)
    args = ap.parse_args()
    torch.manual_seed(0)
    variants = {
        "unpruned": member(16, 32, 24, 64),
        "depthwise 60": member(16, 32, 24, 64, 60), "depthwise 62": member(16, 32, 24, 64, 62),
        "depthwise 42": member(16, 32, 24, 64, 42), "depthwise 44": member(16, 32, 24, 64, 44),
        "depthwise 46": member(16, 32, 24, 64, 46), "depthwise 48": member(16, 32, 24, 64, 48),
        "stem 14": member(14, 32, 24, 64), "conv 30": member(16, 30, 24, 64), "conv 50 x2": member(16, 32, 24, 50),
        **{f"prune {r:g}, multiple {m}": pruned(r, m) for r in (0.125, 0.25, 0.375) for m in (1, 4)},
        **{f"dsconv on {w}": dsconv_after(w) for w in (24, 21, 20, 18, 16)},
    }
    tmp = Path(tempfile.mkdtemp(prefix="nas-align-"))
    paths = {}
    for i, (name, arch) in enumerate(variants.items()):
        paths[name] = export_onnx(build(arch).eval(), torch.zeros(SHAPE), tmp / f"g{i}.onnx")
    paths["runtime floor"] = identity_graph(SHAPE)
    times: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(args.passes):
        for name, path in paths.items():
            times[name].append(onnx_latency(path, SHAPE, threads=1).median_ms)
    rows = {name: {"widths": widths(variants[name]) if name in variants and not name.startswith("dsconv") else None,
                   "median_ms": statistics.median(t), "min_ms": min(t), "passes_ms": t} for name, t in times.items()}
    for name, r in rows.items():
        print(f"{name:26s} {r['widths'] or '':20s} {r['median_ms']:.4f} ms (min {r['min_ms']:.4f})")
    write_json("prune_alignment", {"command": f"python experiments/prune_alignment.py --passes {args.passes}",
                                   "protocol": "ONNX Runtime, batch 1, 1 thread; median of each pass's median",
                                   "rows": rows})


if __name__ == "__main__":
    main()
