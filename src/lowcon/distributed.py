"""Data-parallel training over processes (``torchrun``), where N processes act as one run.

``torchrun --nproc_per_node N -m lowcon train PRESET ...`` starts N processes; each reads its
rank from the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) and joins a process group (NCCL on GPUs, one GPU per process; gloo on the CPU).
The run then behaves as one process with the whole batch:

- each optimisation step's batch (``batch_size``, the whole batch as in the official code) is
  split evenly, process r taking its r-th share of the same items with the same augmentation;
- :class:`GradientAveraging` averages the gradients over the processes before every optimiser
  step, and the logged losses are averaged too;
- PatchNCE with ``negatives="batch"`` takes its negatives from the keys of every process
  (:func:`lowcon.contrast.samples.negative_groups`), the whole minibatch. The official code's ``DataParallel`` split them
  per GPU (official issue #67). CR's samples from other images of the batch (Table 4's r:1,
  1:r and r:r) are picked from the whole batch too, and its distances are averaged over the
  whole batch before their ratio is taken (:func:`mean_over_batch`). AECR-Net's deconvolution
  layer takes its statistics from every process's patches, and CycleGAN's image pools are
  queried with every process's fakes;
- only process 0 writes (checkpoints, logs, samples) and validates.

With one process, every function here is a no-op.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Iterable, Iterator, Union

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["GradientAveraging", "average_gradients", "average_gradients_of", "broadcast_state", "gather_rows",
           "in_every_process", "is_main", "launched_processes", "leave", "leaving", "mean_over_batch",
           "mean_over_processes", "rank", "setup", "share_of", "world_size"]


def world_size() -> int:
    """Processes in this run (1 when there is no process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 when there is no process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this process writes the run's files and reports: rank 0 of the process group,
    or, before joining it or after leaving it, of torchrun's ``RANK`` (0 when unset)."""
    if dist.is_available() and dist.is_initialized():
        return rank() == 0
    return os.environ.get("RANK", "0").strip() in ("0", "")


def launched_processes(environ: Union[dict, None] = None) -> int:
    """``WORLD_SIZE`` from the environment (``torchrun`` sets it), 1 when unset."""
    env = os.environ if environ is None else environ
    value = env.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"WORLD_SIZE: expected a number of processes, got {value!r}") from None


def share_of(batch_size: int, processes: int) -> int:
    """Each process's items of a step's whole batch of `batch_size`; an error where it does not
    split evenly."""
    if batch_size % processes:
        raise ValueError(f"batch_size: {batch_size} does not split evenly over {processes} processes "
                         f"(it is the whole batch of a step, as in the official code)")
    return batch_size // processes


def setup(device: torch.device) -> torch.device:
    """Join the process group that ``torchrun`` describes in the environment, once, and return
    this process's device: ``cuda:LOCAL_RANK`` for a CUDA `device`, else `device`.

    Does nothing with one process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``)."""
    processes = launched_processes()
    if processes <= 1:
        return device
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={processes}: this torch has no torch.distributed")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={processes} but {', '.join(missing)} unset: start the processes with "
                           f"torchrun --nproc_per_node {processes} -m lowcon train ...")
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local}: this machine has {torch.cuda.device_count()} GPU(s)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=30),
                                **({"device_id": device} if device.type == "cuda" else {}))
    return device


def leave(wait: bool = True) -> None:
    """Leave the process group, with `wait` once every process has come here. A process that
    exits with its group still alive can abort in gloo's or NCCL's destructors, and a process
    that finishes early must not tear the group down under the others."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


@contextmanager
def leaving() -> Iterator[None]:
    """Run the block, then :func:`leave` the process group: after every process has finished it,
    or at once when it raises (the others may never get there)."""
    try:
        yield
    except BaseException:
        leave(wait=False)
        raise
    leave()


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Replace each parameter's gradient by its mean over the processes, in one all-reduce. A
    process with no gradient for a parameter counts as a zero; a parameter with no gradient
    anywhere keeps none (so the optimiser still skips it)."""
    if world_size() == 1:
        return
    params = [p for p in params]
    if not params:
        return
    reference = params[0]
    present = torch.tensor([p.grad is not None for p in params], dtype=reference.dtype, device=reference.device)
    flat = torch.cat([p.grad.reshape(-1).to(reference.dtype) if p.grad is not None
                      else reference.new_zeros(p.numel()) for p in params] + [present])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for p, anywhere in zip(params, flat[-len(params):].tolist()):
        values = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
        if anywhere > 0:
            if p.grad is None:
                p.grad = values.to(p.dtype).clone()
            else:
                p.grad.copy_(values)


class GradientAveraging:
    """An optimiser (or lowcon's ``DeferredOptimizer``) whose ``step`` first averages the
    gradients of its parameters over the processes; everything else is the optimiser's own."""

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer

    def step(self, *args, **kwargs):
        average_gradients(p for group in self.optimizer.param_groups for p in group["params"])
        return self.optimizer.step(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.optimizer, name)


def average_gradients_of(method) -> None:
    """Wrap each of `method.optimizers` in :class:`GradientAveraging` (once)."""
    for name, optimizer in method.optimizers.items():
        if not isinstance(optimizer, GradientAveraging):
            method.optimizers[name] = GradientAveraging(optimizer)


def broadcast_state(module: torch.nn.Module) -> None:
    """Process 0's parameters and buffers, in every process."""
    if world_size() == 1:
        return
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src=0)


def mean_over_processes(values: dict[str, float], flag: bool = False) -> tuple[dict[str, float], bool]:
    """The mean of each value over the processes (every process passes the same keys), and
    whether `flag` is set in any process."""
    if world_size() == 1:
        return values, flag
    keys = sorted(values)
    packed = torch.tensor([float(values[k]) for k in keys] + [float(flag)], dtype=torch.float64,
                          device=_collective_device())
    dist.all_reduce(packed)
    means = dict(zip(keys, (packed[:-1] / world_size()).tolist()))
    return {k: means[k] for k in values}, bool(packed[-1].item() > 0)


def _collective_device() -> torch.device:
    """Where small tensors for a collective live: NCCL takes CUDA tensors, gloo CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def in_every_process(flag: bool) -> bool:
    """Whether `flag` holds in every process (one all-reduce; `flag` itself with one process)."""
    if world_size() == 1:
        return flag
    missing = torch.tensor([0.0 if flag else 1.0], device=_collective_device())
    dist.all_reduce(missing)
    return bool(missing.item() == 0)


def mean_over_batch(x: Tensor) -> Tensor:
    """``x.mean(0)`` over the whole batch, every process's rows of `x` (B, ...) (equal B in every
    process). Its gradient reaches this process's rows as that of its own mean does, so that the
    gradients averaged over the processes are the whole batch's (what a ratio of batch means,
    as in CR, needs: the mean of the processes' ratios would be another loss)."""
    local = x.mean(0)
    if world_size() == 1:
        return local
    whole = local.detach().clone()
    dist.all_reduce(whole)
    return local + (whole / world_size() - local).detach()


def gather_rows(x: Tensor) -> tuple[Tensor, int]:
    """`x` (N, ...) of every process, concatenated in rank order along dim 0 (every process's N
    the same), and the row where this process's `x` starts. No gradient flows back."""
    if world_size() == 1:
        return x, 0
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts), rank() * x.shape[0]

