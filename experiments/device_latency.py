"""Latency on the device you ship to: how well a device's latency model predicts held-out
architectures, what the probe costs per trial, and how repeatable the timing itself is.

Two "devices" are emulated on this host: ONNX Runtime with 1 thread and with 2 threads. For
each, ``nas probe profile`` times N random deployable graphs of a space (its pre-flight form);
the graphs are split by architecture into a fitting part (75%) and a held-out part (25%), and
each predictor of ``nas.latency_model`` is fitted on the first and scored on the second: the
share of held-out graphs predicted within +-10% of measured, the median relative error and
Spearman's rho. Beside it, the ceiling: the same held-out graphs timed a second time, scored
against the first timing. Probe overhead: the wall-clock of a timing through a probe on
loopback against the same timing in-process.

    python experiments/device_latency.py --samples 300      # ~10 min on 2 cores

Writes experiments/results/device_latency.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from _common import RESULTS, write_json
from scipy.stats import spearmanr

from nas.latency_model import LatencyModel
from nas.profile import profile_space
from nas.space import load_space


def score(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    rel = np.abs(pred - true) / true
    return {"within_10pct": float((rel <= 0.10).mean()), "median_rel_error": float(np.median(rel)),
            "p90_rel_error": float(np.percentile(rel, 90)), "spearman": float(spearmanr(pred, true).statistic)}


def retime(space, dataset: str, samples: int, threads: int, seed: int) -> list[float]:
    """The same graphs as ``profile_space(..., seed=seed)``, timed again (a later pass)."""
    prof = profile_space(space, dataset, samples, seed=seed, threads=threads)
    return [s["latency_ms"] for s in prof["samples"]]


def probe_overhead(space, dataset: str, n: int) -> dict[str, float]:
    from nas.probe import ProbeClient, ProbeServer

    token = "overhead-check-token-0123456789"
    server = ProbeServer(("127.0.0.1", 0), token)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = ProbeClient(server.url, token)
    local, remote = [], []
    from nas.timing import onnx_latency

    def on_probe(path: Path) -> float:
        t0 = time.perf_counter()
        ms = client.time(path)["latency"]["median_ms"]
        remote.append(time.perf_counter() - t0)
        import onnx

        shape = [d.dim_value or 1 for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]
        t0 = time.perf_counter()
        onnx_latency(path, tuple(shape), threads=1)
        local.append(time.perf_counter() - t0)
        return ms

    profile_space(space, dataset, n, seed=99, timer=on_probe, device={})
    server.shutdown()
    server.server_close()
    return {"graphs": n, "local_timing_s": float(np.median(local)), "probe_timing_s": float(np.median(remote)),
            "overhead_s": float(np.median(np.array(remote) - np.array(local)))}


def two_devices(trials: int, tmp: Path) -> dict:
    """Two emulated devices (probes with ONNX Runtime at 1 and 2 threads, on loopback): one
    default search on 8x8 digits per device; every front member of each is timed on the other
    too, and each device's pick (the knee of its front, validation accuracy x latency x size)
    is checked for optimality on the other device."""
    import optuna

    from nas.cli import main as nas_main
    from nas.pareto import knee_order, pareto_mask
    from nas.probe import ProbeClient, ProbeServer

    token = "two-devices-token-0123456789abcd"
    (tmp / "token").write_text(token)
    servers = {t: ProbeServer(("127.0.0.1", 0), token, threads=t) for t in (1, 2)}
    for srv in servers.values():
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    db = f"sqlite:///{tmp / 'dev.db'}"
    fronts = {}
    for t, srv in servers.items():
        assert nas_main(["search", "--trials", str(trials), "--study", f"device{t}", "--storage", db, "--quiet",
                         "--artifacts", str(tmp / "art"), "--latency-on", srv.url,
                         "--probe-token-file", str(tmp / "token")]) == 0
        study = optuna.load_study(study_name=f"device{t}", storage=db)
        done = [tr for tr in study.trials if tr.state.name == "COMPLETE"]
        vals = np.array([tr.values for tr in done])
        on = pareto_mask(vals, ["maximize", "minimize", "minimize"])
        fronts[t] = [tr for tr, keep in zip(done, on) if keep]
    # every member of both fronts, timed on both devices
    members = [(t, tr) for t, f in fronts.items() for tr in f]
    lat = {t: [] for t in servers}
    for t, srv in servers.items():
        client = ProbeClient(srv.url, token)
        for _, tr in members:
            lat[t].append(client.time(Path(tr.user_attrs["artifact_dir"]) / "model.onnx")["latency"]["median_ms"])
    out = {"trials_per_device": trials, "front_sizes": {f"{t}_thread": len(f) for t, f in fronts.items()}}
    for t in servers:
        other = 2 if t == 1 else 1
        own = [i for i, (d, _) in enumerate(members) if d == t]
        vals = np.array([[members[i][1].values[0], lat[t][i], members[i][1].values[2]] for i in own])
        pick = own[int(knee_order(vals, ["maximize", "minimize", "minimize"])[0])]
        allv = np.array([[m.values[0], lat[other][i], m.values[2]] for i, (_, m) in enumerate(members)])
        on_other = pareto_mask(allv, ["maximize", "minimize", "minimize"])
        out[f"pick_for_{t}_thread"] = {
            "trial": members[pick][1].number, "accuracy": members[pick][1].values[0],
            "latency_ms_here": lat[t][pick], "latency_ms_on_other": lat[other][pick],
            "optimal_on_other": bool(on_other[pick]),
            "dominated_on_other_by": [members[i][1].number for i in range(len(members)) if i != pick
                                      and allv[i][0] >= allv[pick][0] and allv[i][1] <= allv[pick][1]
                                      and allv[i][2] <= allv[pick][2] and np.any(allv[i] != allv[pick])][:5]}
    for srv in servers.values():
        srv.shutdown()
        srv.server_close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default="default")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--search-trials", type=int, default=20, help="trials of each two-device search (0: skip)")
    ap.add_argument("--out", default="device_latency")
    args = ap.parse_args()
    space = load_space(args.space)
    devices = {}
    for threads in args.threads:
        t0 = time.perf_counter()
        prof = profile_space(space, args.dataset, args.samples, seed=0, threads=threads)
        prof_s = time.perf_counter() - t0
        rows = prof["samples"]
        # split by architecture: every graph of one summary (arch + compression) on one side
        keys = sorted({r["summary"] + r["deploy_precision"] for r in rows})
        rng = np.random.default_rng(0)
        held = set(rng.choice(keys, size=max(1, len(keys) // 4), replace=False))
        fit = [(r["features"], r["latency_ms"]) for r in rows if r["summary"] + r["deploy_precision"] not in held]
        test = [r for r in rows if r["summary"] + r["deploy_precision"] in held]
        true = np.array([r["latency_ms"] for r in test])
        methods = {}
        for method in ("additive", "trees", "additive+trees"):
            model = LatencyModel(fit, method)
            methods[method] = score(np.asarray(model.predict([r["features"] for r in test])), true)
        again = retime(space, args.dataset, args.samples, threads, seed=0)
        idx = [i for i, r in enumerate(rows) if r["summary"] + r["deploy_precision"] in held]
        ceiling = score(np.array([again[i] for i in idx]), true)
        devices[f"{threads}_thread"] = {"threads": threads, "graphs": len(rows), "fit": len(fit), "held_out": len(test),
                                        "profile_s": prof_s, "latency_ms_range": [float(true.min()), float(true.max())],
                                        "methods": methods, "retimed_ceiling": ceiling, "device": prof["device"]}
        print(f"{threads} thread(s): " + "; ".join(f"{m}: {s['within_10pct']:.0%} within 10%, rho {s['spearman']:.3f}"
                                                   for m, s in methods.items())
              + f"; retimed: {ceiling['within_10pct']:.0%} within 10%", flush=True)
    overhead = probe_overhead(space, args.dataset, 20)
    both = {}
    if args.search_trials:
        with tempfile.TemporaryDirectory() as tmp:
            both = two_devices(args.search_trials, Path(tmp))
        print("two devices: " + json.dumps(both))
    print(f"probe overhead per timing: {overhead['overhead_s'] * 1000:.0f} ms "
          f"({overhead['probe_timing_s']:.2f} s through the probe vs {overhead['local_timing_s']:.2f} s in-process)")
    write_json(args.out, {
        "command": f"python experiments/device_latency.py --space {args.space} --dataset {args.dataset} "
                   f"--samples {args.samples} --threads {' '.join(map(str, args.threads))}",
        "devices": devices, "probe_overhead": overhead, "two_devices": both})
    print(json.dumps({k: v["methods"] for k, v in devices.items()}, indent=1))


if __name__ == "__main__":
    main()
