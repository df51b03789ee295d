"""Export and verify every front member of a `mnist1d_compress` study, exactly as a user would.

    python experiments/verify_front.py [--trials 20] [--seed 0]

Runs ``nas search --dataset mnist1d --space mnist1d_compress --trials N`` in a fresh folder,
then ``nas export`` + ``nas verify`` (latency included) for every Pareto-optimal trial, and
writes experiments/results/verify_front.json: per member its compression, deployed precision,
deployed and packed accuracy, and every verify check.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

RESULTS = Path(__file__).resolve().parent / "results"


def nas(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nas.cli", *args], cwd=cwd, capture_output=True, text=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="nas-verify-front-") as tmp:
        cwd = Path(tmp)
        t0 = time.time()
        cmd = ["search", "--dataset", "mnist1d", "--space", "mnist1d_compress", "--trials", str(a.trials),
               "--seed", str(a.seed), "--quiet"]
        r = nas(*cmd, cwd=cwd)
        if r.returncode:
            print(r.stderr, file=sys.stderr)
            return 1
        search_s = time.time() - t0
        study = optuna.load_study(study_name="mnist1d-mnist1d_compress", storage=f"sqlite:///{cwd}/runs/nas.db")
        members = []
        for t in sorted(study.best_trials, key=lambda t: t.number):
            out = cwd / f"b{t.number}"
            e = nas("export", "mnist1d-mnist1d_compress", "--trial", str(t.number), "--out", str(out), cwd=cwd)
            v = nas("verify", str(out), cwd=cwd) if e.returncode == 0 else e
            m = json.loads((out / "manifest.json").read_text())["metrics"] if e.returncode == 0 else {}
            members.append({
                "trial": t.number, "compression": t.user_attrs.get("candidate", {}).get("compression"),
                "summary": t.user_attrs.get("summary"), "deploy_precision": m.get("deploy_precision"),
                "val_accuracy": m.get("val_accuracy"), "test_accuracy": m.get("test_accuracy"),
                "packed_val_accuracy": m.get("packed_val_accuracy"), "packed_test_accuracy": m.get("packed_test_accuracy"),
                "size_bytes": m.get("size_bytes"), "latency_ms": m.get("latency_ms"),
                "verify_exit": v.returncode, "verify": v.stdout.splitlines() or v.stderr.splitlines(),
            })
            print(f"trial {t.number}: {m.get('deploy_precision')} verify exit {v.returncode}", flush=True)
    passed = sum(m["verify_exit"] == 0 for m in members)
    result = {"command": "nas " + " ".join(cmd), "trials": a.trials, "search_minutes": round(search_s / 60, 2),
              "front_size": len(members), "verified": passed, "members": members}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "verify_front.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{passed}/{len(members)} front members verified ({search_s / 60:.1f} min search)")
    return 0 if passed == len(members) else 1


if __name__ == "__main__":
    sys.exit(main())
