from __future__ import annotations

import os

import pytest
import torch

# Tiny models and 2 cores: more threads only add contention.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_lock(tmp_path_factory, monkeypatch):
    # Tests time latency concurrently with nothing else, but keep their lock file private.
    monkeypatch.setenv("NAS_MEASURE_LOCK", str(tmp_path_factory.getbasetemp() / "measure.lock"))
    yield


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


os.environ.setdefault("PYTHONHASHSEED", "0")
