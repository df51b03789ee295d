"""Feasibility study for issue 16 (early exit): does a cascade of ONNX Runtime sessions that
stops at a confident exit cut mean latency by >= 30% at <= 1 point of accuracy, where compute
dominates the runtime's fixed cost?

Not the product feature yet (no gene, no registry method): one hand-built CNN on the 16x16
digits task upsampled to 32x32 (`experiments/digits16.py --make`), trained twice with the same
recipe: without exits, and with exit heads (global pooling + linear) after stages 1 and 2 and
a joint loss. The exit model ships as three ONNX files (stem+stage 1 -> features, exit logits;
stage 2 -> ...; stage 3 -> logits), run one after another at batch 1 until the softmax maximum
of an exit reaches its threshold. The thresholds are chosen on the validation split (the
fastest pair keeping validation accuracy within 0.5 point of the exit model's full depth);
test is reported. Latency: each input's cascade timed 5 times (median), then the mean and p95
over the validation inputs, beside the no-exit model's single session timed the same way.

    python experiments/digits16.py --make runs/digits16.npz
    python experiments/early_exit.py --data runs/digits16.npz      # ~4 min on 2 cores

Writes experiments/results/early_exit.json.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import write_json
from torch import nn
from torch.nn import functional as F

from nas.measure import _session, export_onnx
from nas.pipeline import get_dataset
from nas.train import seed_everything


def block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                         nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Part(nn.Module):
    """One piece of the cascade: features in, (features out, exit logits) or final logits."""

    def __init__(self, body: nn.Module, head: nn.Module, last: bool) -> None:
        super().__init__()
        self.body, self.head, self.last = body, head, last

    def forward(self, x: torch.Tensor):  # noqa: ANN201
        f = self.body(x)
        logits = self.head(f.mean((2, 3)))
        return logits if self.last else (f, logits)


class ExitNet(nn.Module):
    def __init__(self, classes: int = 10, widths=(32, 64, 128)) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.parts = nn.ModuleList([
            Part(nn.Sequential(nn.Conv2d(1, w1, 3, 1, 1, bias=False), nn.BatchNorm2d(w1), nn.ReLU(), block(w1, w1, 2)),
                 nn.Linear(w1, classes), last=False),
            Part(block(w1, w2, 2), nn.Linear(w2, classes), last=False),
            Part(block(w2, w3, 2), nn.Linear(w3, classes), last=True)])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for p in self.parts[:-1]:
            x, logits = p(x)
            outs.append(logits)
        outs.append(self.parts[-1](x))
        return outs


class Full(nn.Module):
    """The whole network as one graph, final logits only (what ships without exits)."""

    def __init__(self, net: ExitNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[-1]


def train(net: ExitNet, data, exit_weight: float, epochs: int) -> None:
    seed_everything(0)
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    x, y = up(data.x_train), data.y_train
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(y)).split(64):
            outs = net(x[idx])
            loss = F.cross_entropy(outs[-1], y[idx]) + exit_weight * sum(F.cross_entropy(o, y[idx]) for o in outs[:-1])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    net.eval()


def up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)


def per_input_ms(run, xs: np.ndarray, repeats: int = 5) -> np.ndarray:
    out = np.empty(len(xs))
    for i in range(len(xs)):
        x = xs[i : i + 1]
        for _ in range(2):
            run(x)
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter_ns()
            run(x)
            ts.append((time.perf_counter_ns() - t0) / 1e6)
        out[i] = statistics.median(ts)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--budget", type=float, default=0.005, help="validation accuracy the exits may lose (fraction)")
    ap.add_argument("--widths", default="32,64,128", help="channels of the three stages")
    ap.add_argument("--name", default="early_exit", help="results file name")
    args = ap.parse_args()
    data = get_dataset(str(args.data.resolve()), 0)
    tmp = Path(tempfile.mkdtemp(prefix="nas-exit-"))
    torch.set_num_threads(2)

    widths = tuple(int(w) for w in args.widths.split(","))
    plain, exits = ExitNet(widths=widths), ExitNet(widths=widths)
    train(plain, data, 0.0, args.epochs)
    train(exits, data, 0.5, args.epochs)
    ex = torch.zeros(1, 1, 32, 32)
    full_path = export_onnx(Full(plain), ex, tmp / "plain.onnx")
    full_exit_path = export_onnx(Full(exits), ex, tmp / "exit_full.onnx")
    part_paths = []
    shape = ex
    for k, part in enumerate(exits.parts):
        part_paths.append(tmp / f"part{k}.onnx")
        torch.onnx.export(part, (shape,), str(part_paths[-1]), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["logits"] if part.last else ["features", "logits"])
        with torch.no_grad():
            shape = part(shape)[0] if not part.last else shape
    sess_plain, sess_full = _session(full_path, 1), _session(full_exit_path, 1)
    parts = [_session(p, 1) for p in part_paths]

    def probs_all(xs: np.ndarray) -> list[np.ndarray]:
        """Softmax of every exit for each input, from the shipped part files."""
        outs = [[], [], []]
        for i in range(len(xs)):
            f = xs[i : i + 1]
            for k, s in enumerate(parts):
                r = s.run(None, {"x": f})
                logits = r[-1]
                if k < 2:
                    f = r[0]
                e = np.exp(logits - logits.max())
                outs[k].append(e[0] / e.sum())
        return [np.stack(o) for o in outs]

    xv, yv = up(data.x_val).numpy(), data.y_val.numpy()
    xt, yt = up(data.x_test).numpy(), data.y_test.numpy()
    pv, pt = probs_all(xv), probs_all(xt)

    def cascade_pred(p: list[np.ndarray], taus: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
        pred, depth = p[2].argmax(1), np.full(len(p[2]), 2)
        for k in (1, 0):  # earliest confident exit wins
            hit = p[k].max(1) >= taus[k]
            pred, depth = np.where(hit, p[k].argmax(1), pred), np.where(hit, k, depth)
        return pred, depth

    full_val = float((pv[2].argmax(1) == yv).mean())
    grid = [0.8, 0.9, 0.95, 0.97, 0.99, 0.995, 0.999, 1.01]
    best = None
    for taus in itertools.product(grid, grid):  # chosen on validation only
        pred, depth = cascade_pred(pv, taus)
        acc = float((pred == yv).mean())
        cost = float(np.mean([(0.3, 0.6, 1.0)[d] for d in depth]))  # rough share of the work done
        if acc >= full_val - args.budget and (best is None or cost < best[0]):
            best = (cost, taus)
    taus = best[1]

    def run_cascade(x: np.ndarray) -> None:
        f = x
        for k, s in enumerate(parts):
            r = s.run(None, {"x": f})
            logits = r[-1][0]
            if k < 2:
                e = np.exp(logits - logits.max())
                if (e / e.sum()).max() >= taus[k]:
                    return
                f = r[0]

    lat_plain = per_input_ms(lambda x: sess_plain.run(None, {"x": x}), xv)
    lat_full_exit = per_input_ms(lambda x: sess_full.run(None, {"x": x}), xv)
    lat_cascade = per_input_ms(run_cascade, xv)
    pred_v, depth_v = cascade_pred(pv, taus)
    pred_t, depth_t = cascade_pred(pt, taus)
    plain_val = float((np.concatenate([sess_plain.run(None, {"x": xv[i:i + 1]})[0] for i in range(len(xv))]).argmax(1) == yv).mean())
    plain_test = float((np.concatenate([sess_plain.run(None, {"x": xt[i:i + 1]})[0] for i in range(len(xt))]).argmax(1) == yt).mean())
    res = {
        "command": f"python experiments/early_exit.py --data runs/digits16.npz --widths {args.widths} --name {args.name}",
        "epochs": args.epochs, "widths": list(widths),
        "input": "digits16 upsampled to 32x32", "thresholds": list(taus), "budget": args.budget,
        "no_exits": {"val_accuracy": plain_val, "test_accuracy": plain_test, "mean_ms": float(lat_plain.mean()),
                     "p95_ms": float(np.percentile(lat_plain, 95)), "bytes": full_path.stat().st_size},
        "exits_full_depth": {"val_accuracy": full_val, "test_accuracy": float((pt[2].argmax(1) == yt).mean()),
                             "mean_ms": float(lat_full_exit.mean()), "p95_ms": float(np.percentile(lat_full_exit, 95))},
        "cascade": {"val_accuracy": float((pred_v == yv).mean()), "test_accuracy": float((pred_t == yt).mean()),
                    "mean_ms": float(lat_cascade.mean()), "p95_ms": float(np.percentile(lat_cascade, 95)),
                    "bytes": sum(p.stat().st_size for p in part_paths),
                    "exit_share_val": [float((depth_v == k).mean()) for k in range(3)]},
    }
    c, p = res["cascade"], res["no_exits"]
    res["summary"] = (f"cascade mean {c['mean_ms']:.4f} ms (p95 {c['p95_ms']:.4f}) vs no exits {p['mean_ms']:.4f} ms "
                      f"(p95 {p['p95_ms']:.4f}): {1 - c['mean_ms'] / p['mean_ms']:.0%} lower; val "
                      f"{100 * c['val_accuracy']:.1f}% vs {100 * p['val_accuracy']:.1f}%, test {100 * c['test_accuracy']:.1f}% vs "
                      f"{100 * p['test_accuracy']:.1f}%; exits taken {', '.join(f'{s:.0%}' for s in c['exit_share_val'])}")
    write_json(args.name, res)
    print(res["summary"])


if __name__ == "__main__":
    main()
