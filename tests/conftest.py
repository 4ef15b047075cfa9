"""Settings shared by the whole test suite."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_intra_op_thread():
    """The test models are tiny: one intra-op thread runs them as fast as two, and far faster when
    other processes (the suite's own multi-process launches) compete for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
