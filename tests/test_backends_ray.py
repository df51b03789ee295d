from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest

from nas.backends.ray import experiment_dir
from nas.cli import main

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """One 2-CPU Ray instance of this test module's own, shared by every test here (starting
    Ray costs ~5 s): a new local instance (``address="local"``: never a cluster that is already
    running on this machine) with its own temp folder, stopped by ``ray.shutdown()``, which ends
    only the processes it started."""
    import ray

    ctx = ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                   logging_level="warning", _temp_dir=str(tmp_path_factory.mktemp("ray")))
    try:
        yield ctx.address_info["gcs_address"]
    finally:
        ray.shutdown()


SPACE = ("name: tiny\nstem_channels: [8, 16]\nstages:\n  - block: [conv, dsconv, mbconv]\n    width: [8, 16, 24]\n"
         "    stride: 2\n    expansion: [2]\nrecipe: {epochs: 3}\n")


@pytest.mark.slow  # a long multi-process run: deselected by default, CI runs it (`pytest -m slow`)
def test_ray_search_lands_in_the_same_storage_with_same_fields_and_runs_concurrently(ray_head, in_tmp):
    (in_tmp / "space.yaml").write_text(SPACE)
    db = f"sqlite:///{in_tmp}/s.db"
    common = ["--space", "space.yaml", "--storage", db, "--quiet", "--no-early-stop", "--trials", "4"]
    assert main(["search", "--backend", "ray", "--ray-address", ray_head, "--workers", "2", "--study", "ray", *common]) == 0
    assert main(["search", "--study", "opt", *common]) == 0
    ray_study = optuna.load_study(study_name="ray", storage=db)
    opt_study = optuna.load_study(study_name="opt", storage=db)
    done = [t for t in ray_study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 4
    assert set(done[0].user_attrs) - {"ray_node"} == set(opt_study.trials[0].user_attrs)  # + the Ray node it ran on
    assert ray_study.user_attrs["nas"]["objectives"] == opt_study.user_attrs["nas"]["objectives"]
    assert ray_study.user_attrs["nas"]["backend"] == "ray"
    spans = sorted((t.datetime_start, t.datetime_complete) for t in done)
    overlapping = any(a[1] > b[0] for a, b in zip(spans, spans[1:]))
    assert overlapping, f"trials ran one after another: {spans}"
    workers = {t.user_attrs["worker"] for t in done}  # what the trials recorded, not only the clock
    assert len(workers) >= 2, f"every trial ran in one worker process: {workers}"
    # front reads the Ray-run study unchanged
    assert main(["front", "ray", "--storage", db, "--format", "json"]) == 0


@pytest.mark.slow  # a long multi-process run: deselected by default, CI runs it (`pytest -m slow`)
def test_ray_workers_inherit_from_the_study_supernet(ray_head, in_tmp):
    """--strategy supernet on Ray: the driver trains the supernet once into the study's artifacts
    folder, every worker loads it from there; trials record no training epochs."""
    (in_tmp / "space.yaml").write_text(SPACE)
    db = f"sqlite:///{in_tmp}/sn.db"
    assert main(["search", "--backend", "ray", "--ray-address", ray_head, "--workers", "2", "--study", "sn",
                 "--space", "space.yaml", "--storage", db, "--quiet", "--trials", "4", "--strategy", "supernet",
                 "--supernet-epochs", "1"]) == 0
    (meta,) = (in_tmp / "runs").rglob("supernet.json")
    done = [t for t in optuna.load_study(study_name="sn", storage=db).trials if t.state.name == "COMPLETE"]
    assert len(done) == 4 and all(t.user_attrs["epochs"] == 0 for t in done)
    # trained by the driver before Tune started; the workers only loaded it
    written = meta.with_name("supernet.safetensors").stat().st_mtime
    assert written < min(t.datetime_start.timestamp() for t in done)
    assert "ray_node" in done[0].user_attrs and len(__import__("json").loads(meta.read_text())["key"]) == 24


def _complete(db: str, name: str) -> dict[int, tuple]:
    try:
        study = optuna.load_study(study_name=name, storage=db)
    except KeyError:
        return {}
    return {t.number: tuple(t.values) for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}


def _wait(condition, seconds: float, proc: subprocess.Popen, every: float = 0.2) -> bool:
    """Whether ``condition()`` came true within ``seconds``, checked every ``every`` s; gives up at
    once if ``proc`` has exited (a driver that crashed or finished will not make it true)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return condition()
        time.sleep(every)
    return False


def _last_write(folder) -> float:
    """The newest modification time of the files directly in ``folder`` (Tune's experiment state)."""
    return max((f.stat().st_mtime for f in folder.iterdir() if f.is_file()), default=0.0)


@pytest.mark.slow  # a long multi-process run: deselected by default, CI runs it (`pytest -m slow`)
def test_killed_driver_resumes_keeping_every_completed_trial_once(ray_head, in_tmp):
    (in_tmp / "space.yaml").write_text(SPACE)
    db = f"sqlite:///{in_tmp}/k.db"
    args = [sys.executable, "-m", "nas.cli", "search", "--backend", "ray", "--ray-address", ray_head, "--workers", "2",
            "--study", "k", "--space", "space.yaml", "--storage", db, "--quiet", "--trials", "12", "--no-early-stop"]
    driver = subprocess.Popen(args, cwd=in_tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        # Every wait is on a condition, with a deadline far beyond what a busy 2-core host needs
        # (an idle one meets each in seconds): a timing never decides what the test checks.
        assert _wait(lambda: len(_complete(db, "k")) >= 3, 1200, driver), "3 trials never completed"
        # kill as soon as Tune has saved its experiment state once after those trials (not after a
        # fixed sleep: how many trials finish in a fixed time depends on the machine) ...
        mark = time.time()
        state_dir = experiment_dir(in_tmp / "runs", "k")
        assert _wait(lambda: any(f.stat().st_mtime > mark for f in state_dir.glob("experiment_state*.json")), 600, driver), \
            "Tune never saved its experiment state"
        # ... and has finished writing it: the searcher's state and the callbacks' are copied in right
        # after, so wait until no file of the experiment has changed for a second (do not kill mid-write)
        assert _wait(lambda: time.time() - _last_write(state_dir) > 1.0, 600, driver, every=0.1)
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)  # the driver's own process group (start_new_session)
        except ProcessLookupError:  # it had already exited, and everything it started
            pass
        driver.wait()
    before = _complete(db, "k")
    assert 3 <= len(before) < 12, "kill the driver mid-run"

    resumed = subprocess.run([*args, "--resume"], cwd=in_tmp, capture_output=True, text=True, timeout=1800)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    study = optuna.load_study(study_name="k", storage=db)
    after = _complete(db, "k")
    for number, values in before.items():
        assert after[number] == values  # kept, unchanged
    assert len(after) == 12, [(t.number, t.state.name, t.user_attrs.get("fail_reason")) for t in study.trials]
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    # trials the killed driver had started but not recorded are FAIL with a reason, never COMPLETE
    for t in study.trials:
        if t.state == optuna.trial.TrialState.FAIL:
            assert t.user_attrs["fail_reason"]


def test_resume_without_a_previous_run_is_a_clear_error(ray_head, in_tmp, capsys):
    assert main(["search", "--backend", "ray", "--ray-address", ray_head, "--resume", "--study", "none",
                 "--storage", f"sqlite:///{in_tmp}/n.db"]) == 2
    assert "nothing to resume for study 'none'" in capsys.readouterr().err


def test_ray_scheduler_judges_rungs_from_the_study_storage(in_tmp):
    """The Ray scheduler compares against every trial recorded at the rung in the storage (as the
    Optuna backend does), so a resumed driver stops the same trials; it starts with no memory."""
    from ray.tune.schedulers import TrialScheduler

    from nas.backends.ray import _make_scheduler_class
    from nas.early_stop import RungRule

    db = f"sqlite:///{in_tmp}/r.db"
    study = optuna.create_study(study_name="r", storage=db, directions=["maximize", "minimize"])
    for i in range(6):  # earlier trials (another driver, before a resume): accurate and cheap
        t = study.ask()
        t.set_user_attr("rung_2", 0.9 + i / 100)
        t.set_user_attr("costs", {"latency_ms": 0.01, "size_bytes": 1000.0, "flops": 1.0, "params": 1.0})
        study.tell(t, state=optuna.trial.TrialState.PRUNED)
    judged = study.ask()
    names = ["accuracy", "latency_ms"]

    class FakeTrial:
        config = {"optuna_number": judged.number}

    scheduler = _make_scheduler_class()(RungRule(calibrate=0), names, db, "r")
    verdict = scheduler.on_trial_result(None, FakeTrial(), {"rung": 2, "rung_accuracy": 0.2, "latency_ms": 0.05})
    assert verdict == TrialScheduler.STOP
    recorded = optuna.load_study(study_name="r", storage=db).trials[judged.number].user_attrs
    assert recorded["rung_2"] == 0.2 and recorded["costs"]["latency_ms"] == 0.05  # written for later drivers
    best = study.ask()
    assert scheduler.on_trial_result(None, type("T", (), {"config": {"optuna_number": best.number}})(),
                                     {"rung": 2, "rung_accuracy": 0.99, "latency_ms": 0.001}) == TrialScheduler.CONTINUE
