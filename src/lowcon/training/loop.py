"""One training loop for every method: a method plugs in with ``train_step(batch) -> losses``.

The loop owns what every run needs: a data order that a resumed run reproduces exactly, a
progress bar with ETA, per-term loss logs, validation, sample grids, atomic checkpoints (last
and best), and a stop on a non-finite loss that keeps the last good checkpoint.
"""
from __future__ import annotations

import math
import random
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .. import distributed
from .checkpoint import load_checkpoint, save_checkpoint
from .logger import MetricLogger

__all__ = ["Trainer", "TrainingDiverged", "EpochSeededDataset", "epoch_order"]


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; the last good checkpoint is kept."""


class Terminated(Exception):
    """The process was asked to stop by SIGTERM (a scheduler's kill, ``timeout``). A training run
    raises it after finishing its step and saving ``last.pt``, so that the command exits with
    128 + 15 rather than 0, as a stopped run is not a finished one."""


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of `n` items for one epoch: a function of (seed, epoch) only."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


class EpochSeededDataset(Dataset):
    """Gives each (epoch, index) its own random state, so augmentation replays exactly on resume.

    Items are addressed as ``epoch * len(base) + index``. Datasets with ``set_epoch`` are told
    the epoch; all run under global RNGs (torch, numpy, random) seeded from (seed, epoch, index)
    and restored afterwards.
    """

    def __init__(self, base: Dataset, seed: int) -> None:
        self.base = base
        self.seed = seed
        self.n = len(base)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: int):
        epoch, index = divmod(int(key), self.n)
        item_seed = (self.seed * 1_000_003 + epoch) * 1_000_033 + index
        if hasattr(self.base, "set_epoch"):  # lowcon datasets seed each item by (seed, epoch, index)
            self.base.set_epoch(epoch)
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(item_seed)
            random.seed(item_seed)
            np.random.seed(item_seed % 2**32)
            try:
                return self.base[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


class Trainer:
    """Runs `method` for `steps` optimisation steps over `dataset`.

    Args:
        method: a :class:`lowcon.methods.base.Method`.
        dataset: training items (dicts of tensors), batched with `batch_size`, last partial batch
            dropped.
        batch_size: the whole batch of a step. In data-parallel training
            (:mod:`lowcon.distributed`) each of the N processes takes its 1/N share of
            the same items, its gradients are averaged with the others' before each optimiser
            step and the logged losses are the processes' mean, so N processes train as one would
            with the whole batch; only process 0 writes files.
        run_dir: where ``last.pt``, ``best.pt``, ``log.csv``, ``curves.png`` (the logged losses,
            drawn with each sample grid and at the end), ``config.yaml`` and ``samples/`` go.
        steps: total optimisation steps.
        validate: ``fn(method) -> dict of metrics`` run every `val_every` steps; the first key
            (or `best_metric`) decides ``best.pt`` (higher is better unless `best_mode="min"`).
        config: the resolved config saved with every checkpoint.
        on_epoch_end: ``fn(epoch, seconds, steps)`` after the last step of each epoch (1-based
            `epoch`): the wall-clock seconds since the previous epoch ended, or since `fit` began,
            over `steps` steps (fewer than an epoch's in the first epoch after a mid-epoch resume).
    """

    def __init__(
        self,
        method,
        dataset: Dataset,
        run_dir: str | Path,
        steps: int,
        batch_size: int = 1,
        seed: int = 0,
        num_workers: int = 0,
        log_every: int = 10,
        checkpoint_every: int = 100,
        sample_every: int = 100,
        val_every: int = 0,
        validate: Optional[Callable] = None,
        best_metric: Optional[str] = None,
        best_mode: str = "max",
        config: Optional[dict] = None,
        tensorboard: bool = False,
        progress: bool = True,
        sample_batch: Optional[dict] = None,
        on_epoch_end: Optional[Callable[[int, float, int], None]] = None,
    ) -> None:
        if len(dataset) < batch_size:
            raise ValueError(f"dataset: {len(dataset)} items, fewer than one batch of {batch_size}")
        self.world, self.rank = distributed.world_size(), distributed.rank()
        self.share = distributed.share_of(batch_size, self.world)  # this process's items of each batch
        self.method = method
        self.dataset = EpochSeededDataset(dataset, seed)
        self.run_dir = Path(run_dir)
        self.steps = steps
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.log_every = max(1, log_every)
        self.checkpoint_every = checkpoint_every
        self.sample_every = sample_every
        self.val_every = val_every
        self.validate = validate
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.config = config or {}
        self.tensorboard = tensorboard
        self.progress = progress
        self.sample_batch = sample_batch
        self.on_epoch_end = on_epoch_end
        self.steps_per_epoch = len(dataset) // batch_size
        self.step = 0
        self.best: Optional[float] = None
        self.history: list[dict] = []

    # -- data -------------------------------------------------------------------------------
    def _batches(self) -> Iterator[dict]:
        while self.step < self.steps:
            epoch, offset = divmod(self.step, self.steps_per_epoch)
            if hasattr(self.method, "set_epoch"):
                self.method.set_epoch(epoch)
            order = epoch_order(len(self.dataset), self.seed, epoch)
            keys = (order[: self.steps_per_epoch * self.batch_size] + epoch * len(self.dataset)).tolist()
            keys = keys[offset * self.batch_size:]
            keys = [key for i, key in enumerate(keys) if (i % self.batch_size) // self.share == self.rank]
            loader = DataLoader(
                _Keys(self.dataset, keys),
                batch_size=self.share,
                num_workers=self.num_workers,
                drop_last=True,
                # Its own generator: making a loader must not draw from the global RNG, or a
                # resumed run (which makes one more loader) would diverge from an unbroken one.
                generator=torch.Generator().manual_seed(self.seed + epoch),
            )
            for batch in loader:
                yield batch
                if self.step >= self.steps:
                    return

    # -- checkpoints ------------------------------------------------------------------------
    def _state(self) -> dict:
        return {
            "method": self.method.name,
            "step": self.step,
            "steps": self.steps,
            "best": self.best,
            "config": self.config,
            "model": self.method.state_dict(),
            "training": self.method.training_state_dict(),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        }

    def save(self, name: str = "last.pt") -> Optional[Path]:
        """Write the checkpoint (process 0 only; None elsewhere)."""
        return save_checkpoint(self.run_dir / name, self._state()) if self.rank == 0 else None

    def resume(self, path: Optional[str | Path] = None) -> int:
        path = Path(path) if path is not None else self.run_dir / "last.pt"
        state = load_checkpoint(path, method=self.method.name)
        self.method.load_state_dict(state["model"])
        self.method.load_training_state_dict(state["training"])
        self.step = int(state["step"])
        self.best = state.get("best")
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        return self.step

    # -- the loop ---------------------------------------------------------------------------
    def fit(self, resume: bool | str | Path = False) -> dict:
        """Train until step ``steps`` (from the run's ``last.pt``, or `resume`'s path, when `resume`):
        a row of ``log.csv`` every ``log_every`` steps and at a stop, checkpoints, samples. Returns
        ``{"step", "best", "run_dir", "trained"}``, the last the steps this call ran (0 when the run
        was at ``steps`` or past it already). Ctrl-C and SIGTERM stop it after the step under way
        and save ``last.pt``; then it raises KeyboardInterrupt or :class:`Terminated`."""
        if resume:
            self.resume(None if resume is True else resume)
        main = self.rank == 0
        if self.step >= self.steps:
            if main:
                print(f"{self.run_dir}: already at step {self.step}, the run asks for {self.steps}: nothing to train",
                      file=sys.stderr, flush=True)
            return {"step": self.step, "best": self.best, "run_dir": str(self.run_dir), "trained": 0}
        if self.world > 1:
            distributed.broadcast_state(self.method)
            distributed.average_gradients_of(self.method)
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        logger = MetricLogger(self.run_dir, self.tensorboard, resume_step=self.step if resume else None) if main \
            else _NoLogger()
        bar = _progress(self.steps, self.step, self.progress and main)
        # SIGTERM (a scheduler's kill) and a first Ctrl-C stop the run after the step under way, with
        # a checkpoint: a step cut in half (one network updated, the other not, random draws taken)
        # would not resume exactly. A second Ctrl-C stops at once and keeps the last checkpoint.
        asked = {"signal": None}
        previous = {}

        def stop_after_step(signum, frame):
            if signum == signal.SIGINT and asked["signal"] is not None:
                raise KeyboardInterrupt
            asked["signal"] = signum
            if signum == signal.SIGINT and main:
                bar.write("Ctrl-C: finishing this step, then saving last.pt (Ctrl-C again stops at once, "
                          "keeping the last checkpoint)", file=sys.stderr)

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                previous[sig] = signal.signal(sig, stop_after_step)
            except ValueError:  # not in the main thread
                break
        stopping = False
        first = last_good = self.step
        started, window, window_steps = time.time(), {}, 0
        epoch_started, epoch_first_step = started, self.step
        try:
            for batch in self._batches():
                losses = self.method.train_step(batch)
                # every process stops at the same step: the flag travels with the losses' means
                losses, stopping = distributed.mean_over_processes(losses, asked["signal"] is not None)
                bad = [k for k, v in losses.items() if not math.isfinite(float(v))]
                if bad:
                    where = self.run_dir / "last.pt"
                    kept = f"last good checkpoint: {where} (step {last_good})" if where.exists() else "no checkpoint written yet"
                    raise TrainingDiverged(f"step {self.step + 1}: loss {bad[0]!r} is {float(losses[bad[0]])}; stopped, {kept}")
                self.step += 1
                window_steps += 1
                if self.on_epoch_end is not None and self.step % self.steps_per_epoch == 0:
                    now = time.time()
                    self.on_epoch_end(self.step // self.steps_per_epoch, now - epoch_started, self.step - epoch_first_step)
                    epoch_started, epoch_first_step = now, self.step
                for k, v in losses.items():
                    window.setdefault(k, []).append(float(v))
                # a stop (the last step, a signal) logs the steps since the last row too
                if self.step % self.log_every == 0 or self.step == self.steps or stopping:
                    row = {k: sum(v) / len(v) for k, v in window.items()}
                    row.update(self.method.log_extras())
                    row["sec_per_step"] = (time.time() - started) / window_steps
                    logger.log(self.step, row)
                    self.history.append({"step": self.step, **row})
                    bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k in losses})
                    window, started, window_steps = {}, time.time(), 0
                bar.update(1)
                sample_due = self.sample_every and (self.step % self.sample_every == 0 or self.step == self.steps)
                if main and sample_due:
                    self._write_samples(batch)
                if main and (sample_due or self.step == self.steps or stopping):
                    self._write_curves(logger.rows)
                if main and self.val_every and self.validate is not None and (self.step % self.val_every == 0 or self.step == self.steps):
                    self._run_validation(logger)
                due = self.checkpoint_every and self.step % self.checkpoint_every == 0
                if due or self.step == self.steps:
                    self.save("last.pt")
                    last_good = self.step
                if stopping:
                    break
        except KeyboardInterrupt:
            if main:
                kept = f"{self.run_dir / 'last.pt'} (step {last_good})" if (self.run_dir / "last.pt").exists() \
                    else "none written yet"
                bar.write(f"stopped at once during step {self.step + 1}; last checkpoint: {kept}", file=sys.stderr)
            raise
        finally:
            bar.close()
            logger.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if stopping:
            how = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C"}.get(asked["signal"], "another process")
            if self.save("last.pt") is not None:
                print(f"stopped by {how} at step {self.step} of {self.steps}; saved {self.run_dir / 'last.pt'} "
                      "(resume with --resume)", file=sys.stderr, flush=True)
            if asked["signal"] == signal.SIGINT and self.step < self.steps:
                raise KeyboardInterrupt
            if asked["signal"] == signal.SIGTERM and self.step < self.steps:
                raise Terminated(f"stopped by SIGTERM at step {self.step} of {self.steps}")
        return {"step": self.step, "best": self.best, "run_dir": str(self.run_dir), "trained": self.step - first}

    def _run_validation(self, logger: MetricLogger) -> None:
        metrics = self.validate(self.method)
        if not metrics:
            return
        logger.log(self.step, {f"val_{k}": v for k, v in metrics.items()})
        key = self.best_metric or next(iter(metrics))
        value = float(metrics[key])
        better = self.best is None or (value > self.best if self.best_mode == "max" else value < self.best)
        if better:
            self.best = value
            self.save("best.pt")

    def _write_curves(self, rows: list[dict]) -> None:
        """``curves.png``: every logged loss term against the step, and the first learning rate."""
        from ..report import plot_curves

        if not rows:
            return
        columns = list(dict.fromkeys(k for row in rows for k in row))
        losses = [k for k in columns if k not in ("step", "sec_per_step") and not k.startswith(("lr_", "val_"))]
        extra = [k for k in columns if k.startswith("val_")] + [k for k in columns if k.startswith("lr_")][:1]
        plot_curves(rows, losses + extra, self.run_dir / "curves.png",
                    title=f"{self.method.name}: step {self.step} of {self.steps}", columns=4)

    def _write_samples(self, batch: dict) -> None:
        from ..report import save_grid

        visuals = self.method.visuals(self.sample_batch if self.sample_batch is not None else batch)
        if visuals:
            save_grid(visuals, self.run_dir / "samples" / f"step_{self.step:07d}.png")


class _NoLogger:
    """The logger of a process that writes nothing (data-parallel processes other than 0)."""

    def log(self, step: int, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


class _Keys(Dataset):
    def __init__(self, base: Dataset, keys: list[int]) -> None:
        self.base, self.keys = base, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int):
        return self.base[self.keys[i]]


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True, smoothing=0.1)
