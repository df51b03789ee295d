"""A two-node Ray cluster on this machine, as the README's "Running on a cluster" sets one up:
a head (`ray start --head`) and a worker (`ray start --address`), one CPU each, a PostgreSQL
study and a shared artifacts folder. The worker node is killed mid-trial: the trial is retried
on the surviving node and the search finishes with every completed trial kept once; `nas front`
and `nas export` then run from another process on the head.

Each node is a `ray start --block` process started by this test in a session of its own, so
stopping it (its process group) ends exactly the Ray processes of that node and nothing else
on the machine: never a host-wide stop, which would end a user's own cluster too. Ray's token authentication gets a token of this test's own
through the environment, so no file in the user's ~/.ray is read or written.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest

from nas.cli import main

RAY = str(Path(sys.executable).parent / "ray")
SPACE = ("name: tiny\nstem_channels: [8, 16]\nstages:\n  - block: [conv, dsconv, mbconv]\n    width: [8, 16, 24]\n"
         "    stride: 2\n    expansion: [2]\nrecipe: {epochs: 8}\n")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """End one node: its own process group (the `ray start --block` process and its children)."""
    if proc.poll() is not None and not _group_alive(proc.pid):
        return
    for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline and _group_alive(proc.pid):
            time.sleep(0.2)
            proc.poll()
        if not _group_alive(proc.pid):
            return


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture
def cluster(tmp_path):
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="nasray", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--num-cpus", "1", "--block", "--disable-usage-stats"]
    head = subprocess.Popen([RAY, "start", "--head", "--port", str(port), "--include-dashboard", "false",
                             "--temp-dir", temp, *common], env=env, start_new_session=True,
                            stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT)
    nodes = [head]
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert head.poll() is None, (tmp_path / "head.log").read_text()[-2000:]
                time.sleep(0.5)
        worker = subprocess.Popen([RAY, "start", "--address", f"127.0.0.1:{port}", *common], env=env,
                                  start_new_session=True, stdout=open(tmp_path / "worker.log", "w"), stderr=subprocess.STDOUT)
        nodes.append(worker)
        deadline = time.time() + 60
        while time.time() < deadline:  # wait for both nodes to be up
            status = subprocess.run([RAY, "status", "--address", f"127.0.0.1:{port}"], env=env, capture_output=True,
                                    text=True, timeout=60).stdout
            if status.count(" node_") >= 2:
                break
            time.sleep(1)
        else:
            pytest.fail("the worker node did not join: " + (tmp_path / "worker.log").read_text()[-2000:])
        yield {"address": f"127.0.0.1:{port}", "env": env, "head": head, "worker": worker, "temp": temp}
    finally:
        for p in reversed(nodes):
            _stop(p)
        leftover = subprocess.run(["pgrep", "-f", temp], capture_output=True, text=True).stdout.split()
        assert not leftover, f"Ray processes of this test still running: {leftover}"


@pytest.mark.slow  # a long multi-process run: deselected by default, CI runs it (`pytest -m slow`)
def test_killed_worker_node_trial_is_retried_on_the_head(cluster, postgres_url, tmp_path, capsys):
    (tmp_path / "space.yaml").write_text(SPACE)
    shared = tmp_path / "shared"  # the README's shared --artifacts folder
    args = [sys.executable, "-m", "nas.cli", "search", "--backend", "ray", "--ray-address", cluster["address"],
            "--workers", "2", "--trials", "8", "--study", "c", "--storage", postgres_url, "--artifacts", str(shared),
            "--space", str(tmp_path / "space.yaml"), "--no-early-stop", "--log-format", "json"]
    search = subprocess.Popen(args, cwd=tmp_path, env=cluster["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    killed_running: list[int] = []
    before: dict[int, tuple] = {}
    try:
        deadline = time.time() + 300
        while time.time() < deadline and search.poll() is None:
            try:
                trials = optuna.load_study(study_name="c", storage=postgres_url).get_trials(deepcopy=False)
            except KeyError:
                time.sleep(0.5)
                continue
            done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
            running = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
            # both nodes have finished a trial, and both are busy: one running trial is on the worker
            if len({t.user_attrs.get("ray_node") for t in done}) >= 2 and len(running) == 2:
                before = {t.number: tuple(t.values) for t in done}
                killed_running = [t.number for t in running]
                _stop(cluster["worker"])  # SIGTERM, then SIGKILL: the node dies with its trial
                break
            time.sleep(0.3)
        out, err = search.communicate(timeout=400)
    finally:
        if search.poll() is None:
            search.kill()
    assert search.returncode == 0, err[-3000:]
    assert killed_running, "never saw both nodes busy: " + err[-2000:]

    study = optuna.load_study(study_name="c", storage=postgres_url)
    trials = study.trials
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 8 and [t.number for t in trials] == list(range(len(trials)))
    assert len({t.number for t in complete}) == 8  # each kept once
    for number, values in before.items():  # nothing completed before the kill was lost or changed
        assert tuple(study.trials[number].values) == values
    retried = [t for t in trials if t.user_attrs.get("retries")]
    assert len(retried) == 1 and retried[0].number in killed_running and retried[0].user_attrs["retries"] == 1
    assert retried[0].state == optuna.trial.TrialState.COMPLETE
    nodes = {t.user_attrs["ray_node"] for t in complete}
    assert len(nodes) == 2  # trials ran on both nodes
    survivor = retried[0].user_attrs["ray_node"]
    assert all(t.user_attrs["ray_node"] == survivor for t in complete if t.number not in before)  # after: head only

    # from another process on the head: the front, and an export of a trial the dead node trained
    capsys.readouterr()
    assert main(["front", "c", "--storage", postgres_url, "--format", "json"]) == 0
    on_dead = next(t for t in complete if t.user_attrs["ray_node"] != survivor)
    assert Path(on_dead.user_attrs["artifact_dir"]).is_relative_to(shared)
    assert main(["export", "c", "--storage", postgres_url, "--trial", str(on_dead.number),
                 "--out", str(tmp_path / "bundle")]) == 0
    assert main(["verify", str(tmp_path / "bundle"), "--no-latency"]) == 0
