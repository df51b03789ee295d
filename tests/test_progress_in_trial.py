"""A trial is minutes at real size: the live bar and the json log say where each running trial is."""

from __future__ import annotations

import io
import json

from nas.progress import SearchProgress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_live_bar_shows_each_running_trials_epoch_before_any_trial_finishes():
    out = _Tty()
    p = SearchProgress(["accuracy"], ["maximize"], 5, stream=out, live=True)
    p.trial_progress(3, "screen 2/12")
    p.trial_progress(4, "epoch 5/12")
    p.trial_progress(3, "epoch 1/12")
    text = out.getvalue()
    assert "#3 screen 2/12" in text and "#3 epoch 1/12  #4 epoch 5/12" in text
    p.finished([])


def test_json_progress_events_name_the_trial_and_where_it_is():
    out = io.StringIO()
    p = SearchProgress(["accuracy"], ["maximize"], 5, stream=out, log_format="json")
    p.trial_progress(7, "epoch 2/6")
    (event,) = [json.loads(line) for line in out.getvalue().splitlines()]
    assert event["event"] == "progress" and event["trial"] == 7 and event["at"] == "epoch 2/6"
    quiet = io.StringIO()
    SearchProgress(["accuracy"], ["maximize"], 5, stream=quiet, quiet=True).trial_progress(1, "epoch 1/2")
    assert quiet.getvalue() == ""


def test_a_search_reports_every_epoch_of_its_running_trials(tmp_path):
    from nas.backends.optuna import run_optuna
    from nas.pipeline import Task
    from nas.space import parse_space

    space = parse_space({"name": "p", "stem_channels": 8, "stages": [{"block": "conv", "width": 8, "stride": 2}],
                         "recipe": {"epochs": 3}}, "p.yaml")
    seen = []
    run_optuna(space, Task(dataset="digits"), study_name="p", storage=f"sqlite:///{tmp_path}/p.db", sampler="random",
               n_trials=2, on_progress=lambda n, text: seen.append((n, text)))
    assert [t for n, t in seen if n == 0] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert {n for n, _ in seen} == {0, 1}
