"""How well do candidates inherit from a supernet? A first probe (issue 25): 8x8 digits by
default, any dataset and space with ``--dataset`` and ``--space``.

For each supernet layout below: train it (nas.supernet.train_supernet: sandwich rule, in-place
distillation), then extract random candidates, recalibrate their BatchNorms on 1,000 training
images and score them on validation; beside them, the same candidates trained stand-alone from
scratch with the same recipe, and the rank correlations (Kendall tau, Spearman) between the two.

Layouts: the bundled ``default`` space as it is (five block types per stage, a stage that may
be left out, a searchable stem), and the same stages with one block type each (``conv``,
``mbconv``): elastic depth, width, kernel and expansion only.

    python experiments/supernet_probe.py            # ~2 min on 2 cores
    python experiments/supernet_probe.py --epochs 200 --layouts default --name supernet_probe_200  # ~5 min
    python experiments/supernet_probe.py --dataset fashion-mnist --space default28 --epochs 4 --candidates 8 \
        --standalone-epochs 4 --layouts default --name supernet_probe_fashion

Writes experiments/results/supernet_probe.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time

import torch
from _common import write_json
from scipy.stats import kendalltau, spearmanr

from nas.builder import build
from nas.config import Recipe
from nas.pipeline import get_dataset
from nas.space import load_space
from nas.supernet import SuperNet, recalibrate_bn, train_supernet
from nas.train import accuracy, seed_everything, train


def _one_type(space, block: str):
    stages = tuple(dataclasses.replace(st, block=dataclasses.replace(st.block, kind="fixed", values=(block,)))
                   for st in space.stages)
    return dataclasses.replace(space, name=f"{space.name}-{block}", stages=stages)


def probe(space, data, epochs: int, candidates: int, standalone_epochs: int, seed: int) -> dict:
    torch.manual_seed(seed)
    net = SuperNet(space, data.in_channels, data.input_size, data.num_classes)
    stats = train_supernet(net, data.x_train, data.y_train, epochs=epochs, lr=0.05, seed=seed)
    rng = random.Random(seed + 1)
    rows = []
    for _ in range(candidates):
        arch = net.sample("random", rng)
        t0 = time.perf_counter()
        sub = recalibrate_bn(net.extract(arch), data.x_train[:1000])
        inherited = accuracy(sub, data.x_val, data.y_val)
        score_s = time.perf_counter() - t0
        seed_everything(seed)
        alone = build(arch)
        train(alone, data.x_train, data.y_train, Recipe(epochs=standalone_epochs, lr=0.01, batch_size=64 if len(data.y_train) < 10_000 else 128), seed)
        rows.append({"arch": arch.summary(), "inherited_val": inherited, "standalone_val": accuracy(alone, data.x_val, data.y_val),
                     "score_s": score_s})
    inh, alone = [r["inherited_val"] for r in rows], [r["standalone_val"] for r in rows]
    largest = recalibrate_bn(net.extract(net.sample("max")), data.x_train[:1000])
    smallest = recalibrate_bn(net.extract(net.sample("min")), data.x_train[:1000])
    return {"space": space.name, "supernet_epochs": epochs, "supernet_train_s": stats.seconds,
            "largest_val": accuracy(largest, data.x_val, data.y_val), "smallest_val": accuracy(smallest, data.x_val, data.y_val),
            "kendall_tau": float(kendalltau(inh, alone).statistic), "spearman": float(spearmanr(inh, alone).statistic),
            "inherited_val_mean": sum(inh) / len(inh), "standalone_val_mean": sum(alone) / len(alone),
            "candidates": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--candidates", type=int, default=12)
    ap.add_argument("--standalone-epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layouts", default="default,conv,mbconv", help="default (the space as it is) and/or block types")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--space", default="default")
    ap.add_argument("--name", default="supernet_probe", help="results file name")
    args = ap.parse_args()
    torch.set_num_threads(2)
    data = get_dataset(args.dataset, args.seed)
    space = load_space(args.space)
    layouts = [space if name == "default" else _one_type(space, name) for name in args.layouts.split(",")]
    results = [probe(s, data, args.epochs, args.candidates, args.standalone_epochs, args.seed) for s in layouts]
    for r in results:
        print(f"{r['space']:16s} supernet {r['supernet_train_s']:5.0f} s  largest {r['largest_val']:.3f} smallest "
              f"{r['smallest_val']:.3f}  inherited mean {r['inherited_val_mean']:.3f} vs stand-alone "
              f"{r['standalone_val_mean']:.3f}  tau {r['kendall_tau']:.2f} rho {r['spearman']:.2f}")
    command = "python experiments/supernet_probe.py" + ("" if args.name == "supernet_probe" else
                                                         f" --dataset {args.dataset} --space {args.space} --epochs {args.epochs} --candidates "
                                                         f"{args.candidates} --standalone-epochs {args.standalone_epochs} "
                                                         f"--layouts {args.layouts} --name {args.name}")
    write_json(args.name, {"command": command, "dataset": args.dataset,
                                       "args": vars(args), "results": results})


if __name__ == "__main__":
    main()
