"""PostgreSQL storage on a throwaway server this test session starts (conftest.postgres_server):
one-line errors, two search processes on one study, a killed worker's trial retried, and a Ray
search read back by front/report/export from other processes."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import optuna
import pytest

from nas.cli import main

PG = pytest.mark.usefixtures("postgres_server")


def _search(url: str, study: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "nas.cli", "search", "--trials", "6", "--epochs", "1", "--study", study,
            "--storage", url, "--quiet", "--no-early-stop", "--sampler", "random", *extra]


def test_bad_postgres_storage_is_one_line_with_the_password_masked(postgres_server, capsys):
    host, port, user, password = postgres_server
    cases = [
        (f"postgresql://{user}:{password}@{host}:{port}/no_such_db", "no_such_db"),
        (f"postgresql://{user}:wrong-{password}@{host}:{port}/nas", "password authentication failed"),
        (f"postgresql://{user}:{password}@{host}:1/nas", "connect"),  # nothing listens on port 1
    ]
    for url, says in cases:
        capsys.readouterr()
        assert main(["front", "x", "--storage", url]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert says in err and password not in err and ":***@" in err, err


def _finish(procs: list[subprocess.Popen], seconds: float) -> None:
    """Wait for every process within one deadline (generous: a busy 2-core host runs these
    searches several times slower; an idle one is not slowed by it); kill any still running."""
    deadline = time.time() + seconds
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        for p in procs:  # only the processes this test started
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.mark.slow  # a long multi-process run: deselected by default, CI runs it (`pytest -m slow`)
def test_two_search_processes_share_one_postgres_study(postgres_url, in_tmp):
    logs = [in_tmp / f"search{i}.err" for i in range(2)]  # files, not pipes: a full pipe cannot stall either search
    procs = []
    for log in logs:
        with open(log, "w") as err:
            procs.append(subprocess.Popen(_search(postgres_url, "two"), cwd=in_tmp, stdout=subprocess.DEVNULL, stderr=err))
    _finish(procs, 1800)
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log.read_text()[-2000:]
    study = optuna.load_study(study_name="two", storage=postgres_url.replace("postgresql://", "postgresql+psycopg://"))
    numbers = sorted(t.number for t in study.trials)
    assert numbers == list(range(len(numbers)))  # unique and contiguous
    assert all(t.state.is_finished() for t in study.trials)
    assert len({t.user_attrs["worker"] for t in study.trials}) == 2  # both did work
    finished = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert 6 <= len(finished) <= 7  # --trials is a total; at most one in flight overshoots


@pytest.mark.slow  # a long multi-process run: deselected by default, CI runs it (`pytest -m slow`)
def test_killed_worker_trial_fails_and_is_retried_once(postgres_url, in_tmp):
    url = postgres_url.replace("postgresql://", "postgresql+psycopg://")
    args = _search(postgres_url, "kill")
    args[args.index("--epochs") + 1] = "6"
    proc = subprocess.Popen(args, cwd=in_tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = None
    deadline = time.time() + 1200  # a condition, not a sleep: an idle host meets it in seconds
    while time.time() < deadline and killed is None and proc.poll() is None:
        time.sleep(0.3)
        try:
            trials = optuna.load_study(study_name="kill", storage=url).trials
        except KeyError:
            continue
        done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        running = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING and "candidate" in t.user_attrs]
        if len(done) >= 1 and running:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed = running[0].number
    if killed is None:
        _finish([proc], 0)
    assert killed is not None, "never caught the search mid-trial"
    before = {t.number: t.values for t in optuna.load_study(study_name="kill", storage=url).trials
              if t.state == optuna.trial.TrialState.COMPLETE}
    again = subprocess.run(args, cwd=in_tmp, capture_output=True, text=True, timeout=1800)
    assert again.returncode == 0, again.stderr[-2000:]
    trials = optuna.load_study(study_name="kill", storage=url).trials
    assert trials[killed].state == optuna.trial.TrialState.FAIL and trials[killed].user_attrs["killed"]
    retry = [t for t in trials if t.system_attrs.get("retry_of") == killed]
    assert len(retry) == 1 and retry[0].params == trials[killed].params
    complete = {t.number: t.values for t in trials if t.state == optuna.trial.TrialState.COMPLETE}
    assert all(complete[n] == v for n, v in before.items())  # nothing completed lost or changed
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]


@pytest.mark.slow  # a long multi-process run: deselected by default, CI runs it (`pytest -m slow`)
@PG
def test_ray_search_into_postgres_then_front_report_export_elsewhere(postgres_url, in_tmp, tmp_path_factory):
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning",
             _temp_dir=str(tmp_path_factory.mktemp("ray-pg")))
    try:
        assert main(["search", "--backend", "ray", "--workers", "2", "--trials", "3", "--epochs", "1", "--study", "r",
                     "--storage", postgres_url, "--quiet", "--no-early-stop", "--sampler", "random"]) == 0
    finally:
        ray.shutdown()
    for cmd in (["front", "r"], ["report", "r", "--out", str(in_tmp / "rep")], ["export", "r", "--pick", "knee",
                                                                               "--out", str(in_tmp / "b")]):
        done = subprocess.run([sys.executable, "-m", "nas.cli", *cmd, "--storage", postgres_url], cwd=in_tmp,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (cmd, done.stderr[-2000:])
    assert (in_tmp / "rep" / "report.html").is_file() and (in_tmp / "b" / "manifest.json").is_file()
    assert subprocess.run([sys.executable, "-m", "nas.cli", "verify", str(in_tmp / "b")], cwd=in_tmp,
                          capture_output=True, text=True, timeout=300).returncode == 0
