"""Fashion-MNIST at real size (51,000 training images): the default search against baselines
from the dataset's own benchmark table, rebuilt and trained here.

The data: Zalando's idx files (Debian ``dataset-fashion-mnist``), ``nas search --dataset
fashion-mnist``; the t10k files are the test split, 15% of the training files (9,000 images)
the validation split, by the study's seed.

The baselines (the table in the dataset's README, ``/usr/share/doc/dataset-fashion-mnist``):
- ``two_conv``: "2 Conv <100K parameters" (published 92.5%, no augmentation). The entry links a
  notebook whose layers the package does not carry, so it is rebuilt as the table describes it:
  5x5 convs of 16 and 32 channels, each followed by ReLU and 2x2 max pooling, then 1568-50-10
  fully connected (92,208 parameters);
- ``small_mobilenet``: a MobileNet-v1-style net sized for 28x28 (3x3 stem of 16,
  depthwise-separable 32/2, 64/2, 128/2, 128, global pooling; 31K parameters). The published
  MobileNet (95.0%, with flips) is the full-size one; this one is the small version a user
  would try on 28x28 images.

Each is trained with a standard recipe (SGD with momentum 0.9, lr 0.05, weight decay 5e-4,
cosine schedule, batch 64, 15 epochs) on the study's training split, once without
augmentation and once with each augmentation the default space offers (``shift``,
``affine``); the run best on validation is the "better-trained" baseline the acceptance
compares with (on 16x16 digits the search won only against baselines trained without it).
``--init-seeds 0,1,2`` also trains the 2-conv from several initialisations (its test accuracy
moved 0.2 points between two retrainings): the best of all its runs by validation is then the
baseline.
Like the front's models, each ships with its input normalisation inside (``nas.preprocess``),
is timed in ONNX Runtime (batch 1, 1 thread) in the same passes as every front member and the
runtime's floor, and its size is its fp32 weights in the same packed container.

    python experiments/fashion_mnist.py --baselines                  # trains the 6 runs (~25 min, 1 thread)
    python experiments/fashion_mnist.py --baselines --augments none  # only the standard-recipe runs
    python experiments/fashion_mnist.py --baselines --augments none --init-seeds 0,1,2 --threads 2
    nas search --dataset fashion-mnist --timeout 5400 --trials 10000 --study fm --storage sqlite:///runs/fm.db
    python experiments/fashion_mnist.py --study fm --storage sqlite:///runs/fm.db

Writes experiments/results/fashion_mnist.json (and keeps the trained baselines in
runs/fashion_baselines/ as safetensors, so the comparison can be re-run without training).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from _common import compare_with_front, front_within, write_json
from digits16 import _dw_sep, train_standard  # the same recipe as the 16x16 digits benchmark
from safetensors.torch import load_file, save_file
from torch import nn

from nas.compress.pack import pack_state
from nas.measure import count_params, export_onnx
from nas.pipeline import get_dataset
from nas.preprocess import with_normalization
from nas.study import load_study, study_meta, trials_frame
from nas.train import accuracy, seed_everything

PUBLISHED = {"two_conv": 0.925, "small_mobilenet": 0.950}
AUGMENTS = ("none", "shift", "affine")
STORE = Path(__file__).resolve().parent.parent / "runs" / "fashion_baselines"  # ignored by git


class TwoConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 7 * 7, 50), nn.ReLU(), nn.Linear(50, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class SmallMobileNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                      _dw_sep(16, 32, 2), _dw_sep(32, 64, 2), _dw_sep(64, 128, 2), _dw_sep(128, 128, 1),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


MODELS = {"two_conv": TwoConv, "small_mobilenet": SmallMobileNet}


def _key(name: str, aug: str, seed: int, init: int) -> str:
    return f"{name}_{aug}_split{seed}" + (f"_init{init}" if init else "")


def _inits(name: str, inits: tuple[int, ...]) -> tuple[int, ...]:
    return inits if name == "two_conv" else (0,)  # only the acceptance's baseline gets several


def train_baselines(seed: int, epochs: int, augments: tuple[str, ...] = AUGMENTS, inits: tuple[int, ...] = (0,)) -> None:
    data = get_dataset("fashion-mnist", seed)
    STORE.mkdir(parents=True, exist_ok=True)
    for name, cls in MODELS.items():
        for aug, init in ((a, i) for a in augments for i in _inits(name, inits)):
            key = _key(name, aug, seed, init)
            if (STORE / f"{key}.json").is_file() and json.loads((STORE / f"{key}.json").read_text())["epochs"] == epochs:
                continue  # trained before with this recipe
            seed_everything(init)
            model = cls()
            t0 = time.perf_counter()
            train_standard(model, data, epochs, aug=aug)
            rec = {"name": name, "augment": aug, "init_seed": init, "epochs": epochs, "split_seed": seed, "train_s": time.perf_counter() - t0,
                   "params": count_params(model), "val_accuracy": accuracy(model, data.x_val, data.y_val),
                   "test_accuracy": accuracy(model, data.x_test, data.y_test), "published": PUBLISHED[name]}
            save_file(model.state_dict(), str(STORE / f"{key}.safetensors"))
            (STORE / f"{key}.json").write_text(json.dumps(rec, indent=1))
            print(json.dumps(rec), flush=True)


def _baseline(name: str, aug: str, seed: int, data, tmp: Path, init: int = 0) -> dict:
    key = _key(name, aug, seed, init)
    rec = json.loads((STORE / f"{key}.json").read_text())
    model = MODELS[name]()
    model.load_state_dict(load_file(str(STORE / f"{key}.safetensors")))
    model.eval()
    shipped = with_normalization(model, data.mean, data.std)  # raw inputs, as the front's models take them
    shape = (1, *data.x_train.shape[1:])
    onnx_path = export_onnx(shipped, torch.zeros(shape), tmp / f"{key}.onnx")
    blob = pack_state(model.state_dict(), {})  # fp32, the same container as candidates
    label = name + ("" if aug == "none" else f"_{aug}") + (f"_init{init}" if init else "")
    return {**rec, "init_seed": init, "name": label, "size_bytes": len(blob),
            "fp32_weight_bytes": 4 * rec["params"], "onnx": str(onnx_path)}


def compare(study_name: str, storage: str, out_name: str, passes: int = 10, augments: tuple[str, ...] = AUGMENTS,
            inits: tuple[int, ...] = (0,)) -> None:
    study = load_study(study_name, storage)
    seed = int(study_meta(study)["task"]["seed"])
    data = get_dataset("fashion-mnist", seed)
    tmp = Path(tempfile.mkdtemp(prefix="nas-fm-"))
    runs = {name: [_baseline(name, aug, seed, data, tmp, init) for aug in augments
                   for init in _inits(name, inits)] for name in MODELS}
    standard = [r[0] for r in runs.values()]
    # the better-trained baseline: best validation accuracy over the augmentations and initialisation
    # seeds (test only reported)
    better = [max(r, key=lambda b: (b["val_accuracy"], -AUGMENTS.index(b["augment"]), -b["init_seed"]))
              for r in runs.values()]
    import pandas as pd

    df = trials_frame(study)
    for col in ("datetime_start", "datetime_complete"):
        df[col] = pd.to_datetime(df[col])
    t0 = df["datetime_start"].min()
    done = df[df["datetime_complete"].notna()]
    wall = (done["datetime_complete"].max() - t0).total_seconds()
    checkpoints = {}
    marks = [m for m in (30, 60, 90) if m * 60 <= wall + 60]
    for minutes in marks + ([wall / 60 + 1e-3] if not marks or marks[-1] * 60 < wall - 60 else []):
        front = front_within(study, minutes * 60)
        baselines = {b["name"]: b for b in standard + better}
        cmp = compare_with_front(study, list(baselines.values()), (1, *data.x_train.shape[1:]), front=front,
                                 passes=passes)
        for b in baselines.values():
            b["latency_ms"] = cmp["same_pass_ms"][b["name"]]
        two = next(b for b in better if b["name"].startswith("two_conv"))
        # as accurate (val and test) and 10x smaller; faster: on the mean over the passes. Each such
        # member's ratio pass by pass beside it (a ratio near 1 is a tie within the timing's noise)
        near = [{**m, "latency_ratio_by_pass": [q[two["name"]] / q[str(m["trial"])] for q in cmp["passes"]]}
                for m in (cmp["ratios"][two["name"]] or {}).get("members", [])
                if m["test_accuracy"] >= two["test_accuracy"] and m["size_bytes"] * 10 <= two["fp32_weight_bytes"]]
        for m in near:
            r = sorted(m["latency_ratio_by_pass"])
            m.update(faster_in_passes=sum(x > 1 for x in r), latency_ratio_median=r[len(r) // 2])
        wins = [m for m in near if m["latency_ratio"] > 1]
        n_done = int(((done["datetime_complete"] - t0).dt.total_seconds() <= minutes * 60).sum())
        checkpoints[f"{minutes:.0f}min" if minutes in marks else f"{minutes:.1f}min (stopped)"] = {
            "trials_finished": n_done, "trials_per_hour": n_done / (minutes / 60), "front_size": len(front),
            "runtime_floor_ms": cmp["runtime_floor_ms"],
            "baselines": {k: {kk: v[kk] for kk in ("val_accuracy", "test_accuracy", "size_bytes", "latency_ms", "augment")}
                          for k, v in baselines.items()},
            "ratios": cmp["ratios"],
            "acceptance_vs_better_two_conv": {"baseline": two["name"], "better_over_augments": list(augments),
                                              "better_over_init_seeds": list(inits),
                                              "passes": passes, "members": wins,
                                              "accurate_and_10x_smaller": near, "met": bool(wins)},
            "front": [{k: (float(r[k]) if k not in ("trial", "arch", "compression") else r[k]) for k in
                       ("trial", "accuracy", "test_accuracy", "latency_ms", "size_bytes", "arch", "compression")}
                      for _, r in front.iterrows()]}
    states = df["state"].value_counts().to_dict()
    write_json(out_name, {
        "command": f"python experiments/fashion_mnist.py --study {study_name} --storage {storage} --passes {passes}"
                   + (f" --augments {','.join(augments)}" if augments != AUGMENTS else "")
                   + (f" --init-seeds {','.join(map(str, inits))}" if inits != (0,) else ""),
        "augments": list(augments), "init_seeds": list(inits),
        "search": {"trials": len(df), "states": {str(k): int(v) for k, v in states.items()}, "wall_s": wall,
                   "trials_per_hour": len(done) / (wall / 3600) if wall else None,
                   "space": study_meta(study).get("space", {}).get("name")},
        "baseline_runs": {n: [{k: v for k, v in b.items() if k != "onnx"} for b in r] for n, r in runs.items()},
        "checkpoints": checkpoints})


def main() -> None:
    global STORE  # --store: the one place baselines are kept, for training and comparing alike
    ap = argparse.ArgumentParser()
    ap.add_argument("--baselines", action="store_true", help="train the baselines (kept in runs/fashion_baselines)")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0, help="the study's split seed")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--study")
    ap.add_argument("--storage")
    ap.add_argument("--name", default="fashion_mnist")
    ap.add_argument("--passes", type=int, default=10, help="timing passes over every model (each model's mean is compared)")
    ap.add_argument("--augments", default=",".join(AUGMENTS),
                    help="the baselines' training augmentations, trained and compared (default: all; a subset when the "
                         "others' weights are not kept here, and an earlier run measured them losing on validation)")
    ap.add_argument("--store", type=Path, default=STORE, help=f"where trained baselines are kept (default {STORE})")
    ap.add_argument("--init-seeds", default="0",
                    help="initialisation seeds the 2-conv (the acceptance's baseline) is trained with, comma-separated; "
                         "the better-trained 2-conv is the best by validation over augmentations and these")
    args = ap.parse_args()
    try:
        inits = tuple(dict.fromkeys(int(v) for v in args.init_seeds.split(",")))
    except ValueError:
        inits = ()
    if not inits or any(i < 0 for i in inits):
        ap.error(f"--init-seeds: give non-negative integers, comma-separated (got {args.init_seeds!r})")
    given = [a for a in args.augments.split(",") if a]
    augments = tuple(a for a in AUGMENTS if a in given)  # the standard recipe first
    if not given or any(a not in AUGMENTS for a in given):
        ap.error(f"--augments: give some of {', '.join(AUGMENTS)}, comma-separated (got {args.augments!r})")
    if "none" not in augments:
        ap.error("--augments: the standard recipe (none) is always a baseline")
    STORE = args.store
    torch.set_num_threads(args.threads)
    if args.baselines:
        train_baselines(args.seed, args.epochs, augments, inits)
        return
    if not (args.study and args.storage):
        ap.error("give --baselines, or --study and --storage")
    compare(args.study, args.storage, args.name, args.passes, augments, inits)


if __name__ == "__main__":
    main()
