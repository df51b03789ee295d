"""The same short search on CUDA and on the CPU: accuracy within noise, trials/hour (issue 27).

    python experiments/gpu_check.py                 # needs a CUDA device; writes gpu_check.json
    python experiments/gpu_check.py --devices cpu   # the CPU half alone (for comparison elsewhere)

Each device runs `nas.search` on Fashion-MNIST (the idx files of Debian's dataset-fashion-mnist,
or $NAS_DATA_DIR) with the same seed, sampler, trial count and a short recipe (--epochs), no
finalists, with and without --amp on CUDA. Reported per run: wall time, trials/hour, the best
validation accuracy and the mean |accuracy difference| of the trials both devices trained (the
sampler proposes the same first candidates for one seed; later ones follow the measured
accuracies, so only the shared ones are compared). Latency is timed on the CPU runtime in both.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import write_json

import nas


def run(device: str, amp: bool, trials: int, epochs: int, dataset: str, root: Path) -> dict:
    name = f"gpu-check-{device.replace(':', '')}{'-amp' if amp else ''}"
    t0 = time.perf_counter()
    result = nas.search(dataset=dataset, trials=trials, epochs=epochs, study=name, storage=f"sqlite:///{root}/g.db",
                        device=device, amp=amp, finalists=0, seed=0,
                        artifacts=str(root / "art"))
    wall = time.perf_counter() - t0
    df = result.trials()
    done = df[df["state"] == "COMPLETE"]
    return {"device": device, "amp": amp, "wall_s": wall, "trials": int(len(done)),
            "trials_per_hour": len(done) / (wall / 3600), "best_val_accuracy": float(done["accuracy"].max()),
            "by_candidate": {row["candidate"]: float(row["accuracy"]) for _, row in done.iterrows()},
            "train_s": [float(x) for x in done.get("duration_s", [])]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", default="cuda,cpu")
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--dataset", default="fashion-mnist")
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="nas-gpu-"))
    runs = []
    for dev in a.devices.split(","):
        runs.append(run(dev, False, a.trials, a.epochs, a.dataset, root))
        if dev.startswith("cuda"):
            runs.append(run(dev, True, a.trials, a.epochs, a.dataset, root))
    ref = runs[-1]["by_candidate"]
    for r in runs:
        shared = [c for c in r["by_candidate"] if c in ref]
        r["shared_with_last"] = len(shared)
        r["mean_abs_accuracy_diff_vs_last"] = (sum(abs(r["by_candidate"][c] - ref[c]) for c in shared) / len(shared)
                                               if shared else None)
        r.pop("by_candidate")
    write_json("gpu_check", {"command": "python experiments/gpu_check.py " + " ".join(
        f"--{k} {v}" for k, v in vars(a).items()), "runs": runs})


if __name__ == "__main__":
    main()
