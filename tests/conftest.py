"""Fixtures shared by several test modules."""
import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state: this torch seeds its default generator
    differently in each process, and a test's draws should not depend on the run."""
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny networks: threads only add contention on a shared machine. A module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def saved_bytes():
    """``saved_bytes(fn, *args)``: bytes of the distinct storages autograd keeps for backward
    while ``fn(*args)`` runs."""

    def measure(fn, *args) -> int:
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(*args)
        return sum(storages.values())

    return measure
