"""Paper baselines vs a compression-aware search on MNIST-1D, plus measurement stability and
size truth on the search's front.

1. Trains the published MNIST-1D CNN (3 Conv1d layers of 25 channels, 5,210 params) and MLP
   (15,210 params) with the paper's recipe (Adam lr 1e-2, batch 100, 6,000 steps, no weight
   decay or schedule) on the search's training split, measures them exactly like candidates
   (ONNX Runtime latency, packed fp32 file bytes), and reports, among front members at least
   as accurate on *validation* (test shown beside, never chosen on), the size ratio against
   the smallest and the latency ratio against the fastest (baselines and front timed one
   after the other within the same two passes), beside the runtime's floor (an Identity graph
   timed in the same passes).
4. Re-measures the latency of every front member twice: median IQR/median, and the rank
   correlation between the two passes.
5. Exports every front member and compares the reported size_bytes with the bundle's file.

    nas search --dataset mnist1d --space mnist1d_compress --timeout 1800 --trials 1000 \
        --storage sqlite:///b.db --study b
    python experiments/baselines.py --study b --storage sqlite:///b.db
    python experiments/baselines.py --trials 20         # or: runs its own search first

Writes experiments/results/baselines.{json,csv,png}; prints a one-line summary.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import optuna
import pandas as pd
import torch
from _common import RESULTS, compare_with_front, front_within, pyplot, write_json
from scipy.stats import spearmanr
from torch import nn

from nas.backends.optuna import run_optuna
from nas.compress.pack import pack_state
from nas.export import export_bundle
from nas.measure import count_params, export_onnx, onnx_latency
from nas.pipeline import Task, get_dataset
from nas.space import load_space
from nas.study import load_study, study_meta
from nas.train import accuracy, seed_everything


class PaperCNN(nn.Module):
    """Greydanus (2020) MNIST-1D CNN: Conv1d(1,25,5,s2,p1) -> Conv1d(25,25,3,s2,p1) x2 -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 25, (1, 5), (1, 2), (0, 1))
        self.c2 = nn.Conv2d(25, 25, (1, 3), (1, 2), (0, 1))
        self.c3 = nn.Conv2d(25, 25, (1, 3), (1, 2), (0, 1))
        self.fc = nn.Linear(25 * 5, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = torch.relu(self.c3(x))
        return self.fc(torch.flatten(x, 1))


class PaperMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(40, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(),
                                 nn.Linear(100, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def train_published(model: nn.Module, data, steps: int = 6000, batch: int = 100, lr: float = 1e-2) -> None:
    """The MNIST-1D paper's recipe (Greydanus 2020, mnist1d/train.py): Adam, lr 1e-2, batches
    of 100 taken in order through the shuffled training set, 6,000 steps, no weight decay."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(data.x_train), generator=g)
    x, y = data.x_train[order], data.y_train[order]
    model.train()
    for step in range(steps):
        i = (step * batch) % len(x)
        loss = nn.functional.cross_entropy(model(x[i : i + batch]), y[i : i + batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def measure_baseline(cls: type[nn.Module], name: str, data, tmp: Path, steps: int) -> dict:
    seed_everything(0)
    model = cls()  # built after seeding: torch seeds every new process randomly
    train_published(model, data, steps=steps)
    example = torch.zeros(1, 1, 1, 40)
    onnx_path = export_onnx(model, example, tmp / f"{name}.onnx")
    lat = onnx_latency(onnx_path, (1, 1, 1, 40))
    blob = pack_state(model.state_dict(), {})  # fp32, the same container as candidates
    (tmp / f"{name}.nasp").write_bytes(blob)
    return {"name": name, "params": count_params(model), "val_accuracy": accuracy(model, data.x_val, data.y_val),
            "test_accuracy": accuracy(model, data.x_test, data.y_test), "latency_ms": lat.median_ms,
            "latency_iqr_ms": lat.iqr_ms, "size_bytes": (tmp / f"{name}.nasp").stat().st_size,
            "onnx": str(onnx_path)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--study", default=None, help="an existing mnist1d study to compare (else one is run)")
    ap.add_argument("--storage", default=None)
    ap.add_argument("--trials", type=int, default=20, help="trials of the search run when no --study is given")
    ap.add_argument("--baseline-steps", type=int, default=6000)
    ap.add_argument("--name", default="baselines", help="results file name (experiments/results/NAME.json)")
    ap.add_argument("--within", type=float, default=None, metavar="SECONDS",
                    help="compare the front of the trials finished within this many seconds of the search's start")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="nas-base-"))
    data = get_dataset("mnist1d", 0)

    baselines = [measure_baseline(PaperCNN, "paper_cnn", data, tmp, args.baseline_steps),
                 measure_baseline(PaperMLP, "paper_mlp", data, tmp, args.baseline_steps)]
    if args.study:
        study = load_study(args.study, args.storage)
        command = (f"python experiments/baselines.py --study {args.study}"
                   + (f" --within {args.within:g}" if args.within else "")
                   + f" (study: {study_meta(study).get('config', {})})")
    else:
        space = load_space("mnist1d_compress")
        task = Task(dataset="mnist1d", artifacts_dir=str(tmp / "art"), early_stop={"eta": 3.0} if space.early_stop else None)
        study = run_optuna(space, task, study_name="mnist1d_compress", storage=f"sqlite:///{tmp}/b.db",
                           sampler="surrogate", n_trials=args.trials)
        command = f"python experiments/baselines.py --trials {args.trials}"
    front = front_within(study, args.within)
    # 1 + 4: baselines, front and the runtime floor timed within the same two passes, so a
    # latency ratio never compares figures taken minutes apart on a shared machine
    cmp = compare_with_front(study, baselines, (1, 1, 1, 40), front=front)
    for b in baselines:
        b.pop("onnx")
    ratios = cmp["ratios"]
    front_keys = [int(t) for t in front["trial"]]
    passes = cmp["passes"]
    rho = (spearmanr([passes[0][str(k)] for k in front_keys], [passes[1][str(k)] for k in front_keys]).statistic
           if len(front) > 2 else float("nan"))

    # 5. size truth: the exported bundle's packed file vs the reported size_bytes
    truth = []
    for t in front["trial"]:
        out = export_bundle(study, int(t), tmp / "bundles" / f"t{int(t)}")
        truth.append({"trial": int(t), "reported": int(study.trials[int(t)].user_attrs["size_bytes"]),
                      "file_bytes": (out / "weights.nasp").stat().st_size})
    size_exact = all(r["reported"] == r["file_bytes"] for r in truth)

    cnn = ratios["paper_cnn"]
    both = [m for m in (cnn["members"] if cnn else []) if m["test_accuracy"] >= baselines[0]["test_accuracy"]
            and m["latency_ratio"] > 1]
    best = max(both, key=lambda m: m["size_ratio"], default=None)
    summary = (f"paper CNN {baselines[0]['val_accuracy']:.3f} val / {baselines[0]['test_accuracy']:.3f} test, "
               f"{baselines[0]['size_bytes']:,} B, {cmp['same_pass_ms']['paper_cnn']:.4f} ms (floor {cmp['runtime_floor_ms']:.4f}); "
               + (f"smallest front member as accurate on val: {cnn['size_ratio']:.1f}x smaller (trial {cnn['size_trial']}), "
                  f"fastest {cnn['latency_ratio']:.2f}x faster (trial {cnn['latency_trial']}); " if cnn else "no front member as accurate; ")
               + (f"best member as accurate on val and test and faster: trial {best['trial']}, {best['size_bytes']:,} B "
                  f"({best['size_ratio']:.1f}x smaller), {best['latency_ratio']:.2f}x faster, "
                  f"{best['val_accuracy']:.3f} val / {best['test_accuracy']:.3f} test; " if best else "")
               + f"latency rank corr between passes {rho:.2f}; "
               f"size_bytes == file length for {sum(r['reported'] == r['file_bytes'] for r in truth)}/{len(truth)}")
    write_json(args.name, {
        "command": command, "trials": len(study.trials), "space": "mnist1d_compress",
        "runtime_floor_ms": cmp["runtime_floor_ms"], "same_pass_ms": cmp["same_pass_ms"],
        "baselines": baselines, "ratios": ratios, "best_member_vs_paper_cnn": best,
        "front": front[["trial", "accuracy", "test_accuracy", "latency_ms", "size_bytes", "params", "arch", "compression"]].to_dict("records"),
        "stability": {"spearman_between_passes": float(rho), "passes_ms": passes},
        "size_truth": {"all_exact": size_exact, "rows": truth},
        "summary": summary,
    })
    pd.DataFrame(baselines + front.assign(name=[f"trial {t}" for t in front["trial"]]).to_dict("records")).to_csv(
        RESULTS / f"{args.name}.csv", index=False)

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=110)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    ax.scatter([t.user_attrs["size_bytes"] for t in done], [t.user_attrs["test_accuracy"] for t in done],
               c="lightgrey", s=18, label="searched (dominated)")
    ax.scatter(front["size_bytes"], front["test_accuracy"], c="tab:red", s=36, edgecolors="black", linewidths=0.5,
               label="Pareto-optimal (accuracy, latency, size)")
    for b, marker in zip(baselines, ("s", "^")):
        ax.scatter([b["size_bytes"]], [b["test_accuracy"]], marker=marker, s=70, c="tab:blue", edgecolors="black",
                   label=f"{b['name']} ({b['params']:,} params)")
    ax.set_xscale("log")
    ax.set_xlabel("size_bytes (packed weights file, bytes)")
    ax.set_ylabel("test accuracy (fraction)")
    ax.set_title("MNIST-1D: searched architectures + compression vs published baselines", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{args.name}.png")
    print(summary)


if __name__ == "__main__":
    main()
