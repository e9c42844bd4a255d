"""Shared test set-up: deterministic, single-threaded torch (CI has 2 cores) and a CLI runner."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("DIT_BENCH_OFFLINE", "1")  # tests never reach the network, except 127.0.0.1

import pytest
import torch

torch.set_num_threads(int(os.environ.get("DIT_BENCH_TEST_THREADS", "1")))


@pytest.fixture
def cli_runner():
    from typer.testing import CliRunner

    return CliRunner()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    # Every test gets its own asset cache, so nothing from a user's real cache leaks in.
    monkeypatch.setenv("DIT_BENCH_CACHE", str(tmp_path / "cache"))
