"""Fixtures shared by several test modules."""
import random

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode


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


class _ConvolutionCalls(TorchDispatchMode):
    """Records ``(input dtype, filter shape)`` of every aten convolution and convolution backward
    run inside it, in order, in ``calls``."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten.convolution:
            self.calls.append((args[0].dtype, tuple(args[1].shape)))
        elif func.overloadpacket is torch.ops.aten.convolution_backward:
            self.calls.append((args[1].dtype, tuple(args[2].shape)))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def record_convolutions():
    """``with record_convolutions() as seen: ...``: then ``seen.calls`` lists ``(input dtype,
    filter shape)`` of the aten convolutions (forward and backward) that ran in the block."""
    return _ConvolutionCalls
