"""Ranking fidelity of the weight-sharing supernet (issue 25): does a candidate's accuracy with
inherited weights rank it where training it alone would?

``N`` random candidates of the space (a fixed draw for ``--seed``) are trained stand-alone with
one recipe (AdamW, cosine, the space's batch size) and scored on validation. Those figures do
not depend on the supernet, so they are kept in ``results/<name>_standalone.json`` after every
candidate and reused by later runs (an interrupted run goes on where it stopped). Then a
supernet is trained (``nas.supernet.train_supernet`` with the chosen ``--sandwich``), each
candidate is extracted, its BatchNorms recalibrated on 2,048 training images (what a
``--strategy supernet`` trial does) and scored on validation; Kendall tau and Spearman between
the two, and the seconds per inherited candidate (candidates per hour) beside the stand-alone
seconds per candidate.

    python experiments/supernet.py --dataset fashion-mnist --space default28 --subnets 30 \\
        --standalone-epochs 4 --supernet-epochs 6 --name supernet_fidelity_fm
    python experiments/supernet.py --only standalone ...   # the stand-alone figures only

Validation figures only: the test split is not read.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import time
from pathlib import Path

import torch
from _common import RESULTS, write_json
from safetensors.torch import load_file, save_file
from scipy.stats import kendalltau, spearmanr

from nas.builder import build
from nas.config import Recipe
from nas.pipeline import get_dataset
from nas.space import load_space
from nas.strategy import RECALIBRATION_SAMPLES
from nas.supernet import SANDWICHES, SuperNet, recalibrate_bn, train_supernet
from nas.train import accuracy, seed_everything, train


def candidates(net: SuperNet, n: int, seed: int) -> list:
    rng, seen, out = random.Random(seed + 1), set(), []
    while len(out) < n:
        arch = net.sample("random", rng)
        if arch.summary() not in seen:
            seen.add(arch.summary())
            out.append(arch)
    return out


def _table_key(recipe: Recipe, seed: int, split: int) -> str:
    # (the split seed only when it differs from the training seed: tables made before
    # --standalone-seed keep their key)
    return json.dumps(recipe.to_dict(), sort_keys=True) + f"|seed{seed}" + (f"|split{split}" if seed != split else "")


def standalone(archs, data, recipe: Recipe, seed: int, path: Path, split: int) -> dict[str, dict]:
    """Stand-alone validation accuracy of each candidate, cached in ``path`` by recipe and arch."""
    cache = json.loads(path.read_text()) if path.is_file() else {}
    table = cache.setdefault(_table_key(recipe, seed, split), {})
    for i, arch in enumerate(archs):
        name = arch.summary()
        if name in table:
            continue
        seed_everything(seed)
        model = build(arch)
        t0 = time.perf_counter()
        train(model, data.x_train, data.y_train, recipe, seed)
        table[name] = {"val": accuracy(model, data.x_val, data.y_val), "train_s": time.perf_counter() - t0,
                       "params": sum(p.numel() for p in model.parameters())}
        print(f"stand-alone {i + 1}/{len(archs)}: {table[name]['val']:.4f} in {table[name]['train_s']:.0f} s  {name}",
              flush=True)
        path.write_text(json.dumps(cache, indent=1) + "\n")
    return table


def finetune(model, x, y, steps: int, lr: float, batch: int, seed: int):
    """``steps`` SGD steps (momentum 0.9, cosine from ``lr``) of the inherited weights on random
    training batches: the cheapest stand-alone training there is, to test whether a few steps
    off the shared weights rank candidates where their full training does."""
    if steps <= 0:
        return model
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # (dropout draws from the global generator)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch,), generator=g)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        sched.step()
    return model.eval()


def _repeatability(archs, recipe: Recipe, path: Path, split: int) -> dict[str, dict]:
    """Kendall tau and Spearman between stand-alone tables of the same candidates and recipe
    trained with different seeds: how well training alone ranks them against itself."""
    cache = json.loads(path.read_text()) if path.is_file() else {}
    seeds = {int(k.split("|seed")[1].split("|")[0]) for k in cache if "|seed" in k}
    tables = {s: cache[_table_key(recipe, s, split)] for s in seeds if _table_key(recipe, s, split) in cache}
    names = [a.summary() for a in archs]
    full = sorted(s for s, t in tables.items() if all(n in t for n in names))
    out = {}
    for i, a in enumerate(full):
        for b in full[i + 1:]:
            va, vb = [tables[a][n]["val"] for n in names], [tables[b][n]["val"] for n in names]
            out[f"seed{a}_vs_seed{b}"] = {"kendall_tau": float(kendalltau(va, vb).statistic),
                                          "spearman": float(spearmanr(va, vb).statistic)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--space", default="default")
    ap.add_argument("--subnets", type=int, default=30)
    ap.add_argument("--standalone-epochs", type=int, default=10)
    ap.add_argument("--standalone-lr", type=float, default=0.01)
    ap.add_argument("--supernet-epochs", type=int, default=20)
    ap.add_argument("--supernet-lr", type=float, default=0.05)
    ap.add_argument("--randoms", type=int, default=2)
    ap.add_argument("--sandwich", choices=SANDWICHES, default=SANDWICHES[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kernel-transform", action="store_true",
                    help="Once-for-All's kernel transformation: smaller kernels are the largest's centre times a "
                         "learned matrix per layer, not the centre itself")
    ap.add_argument("--standalone-seed", type=int, default=None,
                    help="train the stand-alone candidates with this seed (default --seed); with a second seed's "
                         "table present, their own rank agreement (the ceiling of any proxy) is reported")
    ap.add_argument("--finetune-steps", type=int, nargs="+", default=[0],
                    help="score each inherited candidate after this many SGD steps off the shared weights "
                         "(several values: one scoring per value)")
    ap.add_argument("--finetune-lr", type=float, default=0.01)
    ap.add_argument("--only", choices=("all", "standalone"), default="all")
    ap.add_argument("--cache", default=None, help="folder to keep trained supernets in (reused by the same settings)")
    ap.add_argument("--name", default="supernet_fidelity", help="results file name")
    args = ap.parse_args()
    torch.set_num_threads(2)
    data = get_dataset(args.dataset, args.seed)
    space = load_space(args.space)
    torch.manual_seed(args.seed)
    net = SuperNet(space, data.in_channels, data.input_size, data.num_classes, kernel_transform=args.kernel_transform)
    archs = candidates(net, args.subnets, args.seed)
    bs = int(max(space.recipe["batch_size"].options()))  # the space's batch size (one value in the bundled spaces)
    recipe = Recipe(epochs=args.standalone_epochs, lr=args.standalone_lr, batch_size=bs)
    sa_seed = args.seed if args.standalone_seed is None else args.standalone_seed
    alone = standalone(archs, data, recipe, sa_seed, RESULTS / f"{args.name}_standalone.json", args.seed)
    repeat = _repeatability(archs, recipe, RESULTS / f"{args.name}_standalone.json", args.seed)
    if repeat:
        print("stand-alone seed against seed: " + ", ".join(f"{k} tau {v['kendall_tau']:.3f} rho {v['spearman']:.3f}"
                                                            for k, v in repeat.items()), flush=True)
    if args.only == "standalone":
        if repeat:
            write_json(f"{args.name}_standalone_repeatability", {"standalone_recipe": recipe.to_dict(), **repeat})
        return

    settings = {k: getattr(args, k) for k in ("dataset", "space", "supernet_epochs", "supernet_lr", "randoms", "sandwich", "seed")}
    if args.kernel_transform:  # (only when on: the digests of runs before the option stay the same)
        settings["kernel_transform"] = True
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    stored = Path(args.cache) / f"supernet_{digest}.safetensors" if args.cache else None
    if stored is not None and stored.is_file():  # an earlier run's weights, as safetensors (no pickle)
        net.load_state_dict(load_file(str(stored)))
        train_s = json.loads(stored.with_suffix(".json").read_text())["train_s"]
    else:
        stats = train_supernet(net, data.x_train, data.y_train, epochs=args.supernet_epochs, lr=args.supernet_lr,
                               batch_size=bs, randoms=args.randoms, sandwich=args.sandwich, seed=args.seed,
                               on_epoch=lambda e, loss: print(f"supernet epoch {e}: loss {loss:.3f}", flush=True))
        train_s = stats.seconds
        if stored is not None:
            stored.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(stored))
            stored.with_suffix(".json").write_text(json.dumps({**settings, "train_s": train_s}))
    g = torch.Generator().manual_seed(args.seed)
    calib = data.x_train[torch.randperm(len(data.y_train), generator=g)[:RECALIBRATION_SAMPLES]]
    out = {"settings": settings, "standalone_recipe": recipe.to_dict(), "standalone_seed": sa_seed,
           "subnets": len(archs), "supernet_train_s": train_s, "standalone_repeatability": repeat, "scorings": {}}
    ext = {p: recalibrate_bn(net.extract(net.sample(p)), calib) for p in ("max", "min")}
    out["largest_val"] = accuracy(ext["max"], data.x_val, data.y_val)
    out["smallest_val"] = accuracy(ext["min"], data.x_val, data.y_val)
    for steps in args.finetune_steps:
        rows = []
        for i, arch in enumerate(archs):
            t0 = time.perf_counter()
            sub = finetune(net.extract(arch), data.x_train, data.y_train, steps, args.finetune_lr, bs, args.seed + i)
            sub = recalibrate_bn(sub, calib)
            inherited = accuracy(sub, data.x_val, data.y_val)
            rows.append({"arch": arch.summary(), "inherited_val": inherited, "score_s": time.perf_counter() - t0,
                         **{f"standalone_{k}": v for k, v in alone[arch.summary()].items()}})
        inh, sa = [r["inherited_val"] for r in rows], [r["standalone_val"] for r in rows]
        score_s = sum(r["score_s"] for r in rows) / len(rows)
        alone_s = sum(r["standalone_train_s"] for r in rows) / len(rows)
        sc = {"finetune_steps": steps, "finetune_lr": args.finetune_lr,
              "kendall_tau": float(kendalltau(inh, sa).statistic), "spearman": float(spearmanr(inh, sa).statistic),
              "inherited_val_mean": sum(inh) / len(inh), "standalone_val_mean": sum(sa) / len(sa),
              "inherited_s_per_candidate": score_s, "standalone_s_per_candidate": alone_s,
              "candidates_per_hour_inherited": 3600 / score_s, "candidates_per_hour_standalone": 3600 / alone_s,
              "candidates": rows}
        out["scorings"][str(steps)] = sc
        if steps == args.finetune_steps[0]:  # the first scoring also at the top level (the old layout)
            out.update({k: v for k, v in sc.items() if k not in ("finetune_steps", "finetune_lr")})
        print(f"{args.name}: supernet {train_s:.0f} s, largest {out['largest_val']:.3f} smallest {out['smallest_val']:.3f}, "
              f"{steps} fine-tune steps: inherited mean {sc['inherited_val_mean']:.3f} vs alone "
              f"{sc['standalone_val_mean']:.3f}, tau {sc['kendall_tau']:.3f} rho {sc['spearman']:.3f}, "
              f"{score_s:.2f} s vs {alone_s:.0f} s per candidate", flush=True)

    def flag(k: str, v) -> str:
        f = "--" + k.replace("_", "-")
        return f if v is True else " ".join([f, *map(str, v)]) if isinstance(v, list) else f"{f} {v}"

    cmd = "python experiments/supernet.py " + " ".join(
        flag(k, v) for k, v in vars(args).items() if k not in ("only", "cache") and v is not None and v is not False)
    tail = ("_kt" if args.kernel_transform else "") + ("" if sa_seed == args.seed else f"_ss{sa_seed}") + (
        "" if args.finetune_steps == [0] else "_ft" + "-".join(map(str, args.finetune_steps))
        + ("" if args.finetune_lr == 0.01 else f"_lr{args.finetune_lr:g}"))
    write_json(f"{args.name}_{args.sandwich}_e{args.supernet_epochs}{tail}", {"command": cmd, **out})


if __name__ == "__main__":
    main()
