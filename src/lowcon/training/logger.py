"""Training logs: a CSV file of every logged step (always) and TensorBoard (when installed)."""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Mapping

__all__ = ["MetricLogger", "read_log"]


class MetricLogger:
    """Appends rows of scalars to ``<run>/log.csv``; new keys widen the file's columns.

    On resume, rows after the resumed step are dropped so the log matches the restored state.
    """

    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool = False, resume_step: int | None = None):
        self.path = Path(run_dir) / "log.csv"
        self.rows: list[dict] = read_log(self.path) if resume_step is not None else []
        if resume_step is not None:
            self.rows = [r for r in self.rows if int(r["step"]) <= resume_step]
        self.columns: list[str] = []
        for row in self.rows:
            self._widen(row)
        self._rewrite()
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                import warnings

                warnings.warn("tensorboard is not installed (pip install tensorboard); logging to CSV only")
            else:
                self.tb = SummaryWriter(str(Path(run_dir) / "tb"))

    def _widen(self, row: Mapping) -> bool:
        new = [k for k in row if k not in self.columns]
        self.columns += new
        return bool(new)

    def _rewrite(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.columns or ["step"])
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.path)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        row = {"step": step, **{k: float(v) for k, v in values.items()}}
        self.rows.append(row)
        if self._widen(row):
            self._rewrite()
        else:
            with open(self.path, "a", newline="") as fh:
                csv.DictWriter(fh, fieldnames=self.columns).writerow(row)
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, float(v), step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_log(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return [{k: v for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(fh)]
