"""Does `mnist1d_compress` contain a model that beats the paper CNN on every count? One
hand-built candidate of the space (the paper CNN's shape, narrower and compressed: stride-2 k5
stem of 24, two stride-2 k3 convs of 24, flatten; L1 pruning 0.25, int4 weight-only, Huffman,
distillation) trained by the pipeline like any trial, against the paper CNN trained with its
published recipe; both deployed ONNX files and the runtime floor timed in the same passes.

    python experiments/space_reach.py        # ~1 min

Writes experiments/results/space_reach.json.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from _common import write_json
from baselines import PaperCNN, measure_baseline

from nas.config import ArchConfig, BlockConfig, Candidate, CompressionConfig, Recipe
from nas.measure import identity_graph, onnx_latency
from nas.pipeline import Task, evaluate, get_dataset


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="nas-reach-"))
    data = get_dataset("mnist1d", 0)
    paper = measure_baseline(PaperCNN, "paper_cnn", data, tmp, 6000)
    arch = ArchConfig(in_channels=1, num_classes=10, input_size=(1, 40), spatial="1d", stem_channels=24, stem_kernel=5,
                      stem_stride=2, blocks=(BlockConfig("conv", 24, 3, 2, stage=0), BlockConfig("conv", 24, 3, 2, stage=1)),
                      head="flatten")
    comp = CompressionConfig(prune="l1", prune_ratio=0.25, quant="int4", weight_only=True, huffman=True,
                             distill_alpha=0.5, distill_T=4.0, finetune_epochs=3)
    cand = Candidate(arch, comp, Recipe(epochs=20, lr=0.01))
    res = evaluate(cand, Task(dataset="mnist1d", artifacts_dir=str(tmp / "art")), trial_id="hand")
    m = res.metrics
    models = {"paper_cnn": Path(paper["onnx"]), "candidate": Path(res.artifact_dir) / "model.onnx",
              "runtime_floor": identity_graph((1, 1, 1, 40))}
    passes = [{k: onnx_latency(p, (1, 1, 1, 40)).median_ms for k, p in models.items()} for _ in range(3)]
    ms = {k: float(np.mean([p[k] for p in passes])) for k in models}
    out = {
        "candidate": {"arch": arch.summary(), "compression": comp.summary(), "val_accuracy": m["val_accuracy"],
                      "test_accuracy": m["test_accuracy"], "size_bytes": m["size_bytes"], "params": m["params"],
                      "deploy_precision": m["deploy_precision"], "latency_ms_same_passes": ms["candidate"]},
        "paper_cnn": {"val_accuracy": paper["val_accuracy"], "test_accuracy": paper["test_accuracy"],
                      "size_bytes": paper["size_bytes"], "latency_ms_same_passes": ms["paper_cnn"]},
        "runtime_floor_ms": ms["runtime_floor"], "passes_ms": passes,
        "size_ratio": paper["size_bytes"] / m["size_bytes"], "latency_ratio": ms["paper_cnn"] / ms["candidate"],
    }
    out["beats_paper_cnn"] = bool(m["val_accuracy"] >= paper["val_accuracy"] and m["test_accuracy"] >= paper["test_accuracy"]
                                  and out["size_ratio"] >= 10 and out["latency_ratio"] > 1)
    write_json("space_reach", {"command": "python experiments/space_reach.py", **out})
    print(f"candidate {m['val_accuracy']:.3f}/{m['test_accuracy']:.3f}, {m['size_bytes']:,} B, {ms['candidate']:.4f} ms; "
          f"paper CNN {paper['val_accuracy']:.3f}/{paper['test_accuracy']:.3f}, {paper['size_bytes']:,} B, "
          f"{ms['paper_cnn']:.4f} ms; floor {ms['runtime_floor']:.4f} ms: {out['size_ratio']:.1f}x smaller, "
          f"{out['latency_ratio']:.2f}x faster; beats it on every count: {out['beats_paper_cnn']}")


if __name__ == "__main__":
    main()
