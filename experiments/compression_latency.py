"""Latency of compression that changes what runs: structured pruning at ratio 0.5 and int8
deployment, against the unpruned fp32 model, timed on the exported ONNX models in ONNX Runtime
(batch 1, 1 thread). Two model sizes: a digits-sized net and a wider 32x32 net where int8
kernels pay off.

    python experiments/compression_latency.py      # ~2 min

Writes experiments/results/compression_latency.{json,png}; prints a one-line summary.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from _common import RESULTS, pyplot, write_json

from nas.builder import build
from nas.compress.deploy import deploy_onnx
from nas.compress.passes import compress
from nas.compress.prune import prune_structured, target_widths
from nas.config import ArchConfig, BlockConfig, Candidate, CompressionConfig
from nas.measure import count_flops, count_params, onnx_latency
from nas.pipeline import get_dataset


def arch_for(size: int, widths: tuple[int, int, int]) -> ArchConfig:
    w1, w2, w3 = widths
    blocks = (BlockConfig("conv", w1, 3, 1, stage=0), BlockConfig("mbconv", w1, 3, 1, 4, stage=0),
              BlockConfig("dsconv", w2, 3, 2, stage=1), BlockConfig("conv", w2, 3, 1, stage=1),
              BlockConfig("conv", w3, 3, 2, stage=2))
    return ArchConfig(1, 10, (size, size), "2d", w1, blocks)


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="nas-lat-"))
    calib = get_dataset("digits", 0).x_train[:64]
    rows = []
    for name, size, widths in (("digits-8x8", 8, (16, 32, 48)), ("wide-32x32", 32, (64, 96, 128))):
        arch = arch_for(size, widths)
        torch.manual_seed(0)
        model = build(arch).eval()
        example = torch.zeros(1, 1, size, size)
        data_calib = calib if size == 8 else torch.randn(64, 1, size, size)
        variants = {
            "fp32": (model, CompressionConfig()),
            "pruned-0.5 fp32": (prune_structured(model, target_widths(arch, [0.5, 0.5, 0.5]), "l1").eval(), CompressionConfig()),
            "int8": (model, CompressionConfig(quant="int8")),
        }
        pruned_int8_cfg = CompressionConfig(prune="l1", prune_ratio=0.5, quant="int8", finetune_epochs=0)
        variants["pruned-0.5 int8"] = (compress(build(arch), Candidate(arch, pruned_int8_cfg), None, 0, finetune=False).eval(),
                                       pruned_int8_cfg)
        for vname, (m, cfg) in variants.items():
            path, precision, _ = deploy_onnx(m, cfg, example, tmp / f"{name}-{vname}.onnx".replace(" ", "_"), data_calib)
            lat = onnx_latency(path, tuple(example.shape), repeats=1000)
            rows.append({"model": name, "variant": vname, "deploy": precision, "params": count_params(m),
                         "flops": count_flops(m, example), "latency_ms": lat.median_ms, "latency_iqr_ms": lat.iqr_ms})
    by = {(r["model"], r["variant"]): r for r in rows}
    parts = []
    for name in ("digits-8x8", "wide-32x32"):
        base = by[(name, "fp32")]["latency_ms"]
        parts.append(f"{name}: pruned {by[(name, 'pruned-0.5 fp32')]['latency_ms'] / base:.2f}x, "
                     f"int8 {by[(name, 'int8')]['latency_ms'] / base:.2f}x of fp32 latency")
    summary = "; ".join(parts)
    write_json("compression_latency", {"command": "python experiments/compression_latency.py", "rows": rows, "summary": summary})
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=110)
    for ax, name in zip(axes, ("digits-8x8", "wide-32x32")):
        rs = [r for r in rows if r["model"] == name]
        ax.bar([r["variant"] for r in rs], [r["latency_ms"] for r in rs], yerr=[r["latency_iqr_ms"] for r in rs],
               color=["tab:grey", "tab:blue", "tab:orange", "tab:red"])
        ax.set_ylabel("latency_ms (ONNX Runtime, batch 1, 1 thread)")
        ax.set_title(name, fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "compression_latency.png")
    print(summary)


if __name__ == "__main__":
    main()
