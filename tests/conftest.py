"""Shared test setup: CPU threads, offline Hugging Face, and the `gpu` marker."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on a download that cannot happen

import fmpolicy_envs  # noqa: F401  (registers the fmpolicy/ gymnasium ids that train_rl builds)
import pytest
import torch

# two threads by default; an explicit OMP_NUM_THREADS wins, so that `OMP_NUM_THREADS=1 pytest` really
# runs single-threaded (the float32 comparisons must hold under any thread count: tests/helpers.py)
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """One torch thread for the test: the tiny RL networks run many times faster on one thread than on
    two when other jobs share the 2 cores. Modules use it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
