import csv
import math

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from lowcon.methods.base import Method
from lowcon.training import CheckpointError, Terminated, Trainer, TrainingDiverged, epoch_order, load_checkpoint


class Noisy(Dataset):
    """Items whose values come from the global RNG, as a random augmentation would."""

    def __init__(self, n=10):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"x": torch.full((3,), float(i)) + torch.rand(3), "i": i}


class LinearFit(Method):
    name = "linear"

    def __init__(self, nan_at=None):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(3, 1)
        self.optimizers["net"] = torch.optim.Adam(self.net.parameters(), lr=0.05)
        self.schedulers["net"] = torch.optim.lr_scheduler.StepLR(self.optimizers["net"], 3, 0.5)
        self.seen = []
        self.nan_at = nan_at
        self.calls = 0
        self.mid_step = None  # called with the call count after the step's random draw, before its update

    def checkpoint_modules(self):
        return {"net": self.net}

    def train_step(self, batch):
        self.calls += 1
        self.seen.append(batch["i"].tolist())
        noise = torch.rand(1)  # model-side randomness, restored on resume
        if self.mid_step is not None:
            self.mid_step(self.calls)
        loss = (self.net(batch["x"]).squeeze(1) - batch["x"].sum(1) * noise).pow(2).mean()
        if self.nan_at is not None and self.calls == self.nan_at:
            loss = loss * float("nan")
        opt = self.optimizers["net"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        self.schedulers["net"].step()
        return {"mse": loss.item()}


def make(tmp_path, steps, log_every=1, **kw):
    method = LinearFit(**{k: v for k, v in kw.items() if k == "nan_at"})
    trainer = Trainer(method, Noisy(), tmp_path, steps=steps, batch_size=3, seed=1, log_every=log_every,
                      checkpoint_every=2, sample_every=0, progress=False)
    return method, trainer


def test_epoch_order_is_a_function_of_seed_and_epoch():
    assert torch.equal(epoch_order(10, 1, 2), epoch_order(10, 1, 2))
    assert not torch.equal(epoch_order(10, 1, 2), epoch_order(10, 1, 3))
    assert sorted(epoch_order(10, 1, 0).tolist()) == list(range(10))


def test_resume_continues_exactly(tmp_path):
    full, trainer = make(tmp_path / "full", 8)
    trainer.fit()
    half, trainer = make(tmp_path / "split", 5)
    trainer.fit()
    resumed, trainer = make(tmp_path / "split", 8)
    trainer.fit(resume=True)
    assert half.seen + resumed.seen == full.seen  # same data order, across an epoch boundary
    for a, b in zip(full.net.parameters(), resumed.net.parameters()):
        assert torch.equal(a, b)
    assert resumed.optimizers["net"].param_groups[0]["lr"] == full.optimizers["net"].param_groups[0]["lr"]
    # The log of the resumed run holds each step once.
    rows = list(csv.DictReader(open(tmp_path / "split" / "log.csv")))
    assert [int(r["step"]) for r in rows] == list(range(1, 9))


def test_each_epoch_end_reports_its_wall_clock_time_and_steps(tmp_path, monkeypatch):
    import time as real_time

    import lowcon.training.loop as loop

    clock = {"now": 1000.0}

    class FakeTime:  # each step takes 2 s of this clock; nothing else moves it
        def __getattr__(self, name):
            return getattr(real_time, name)

        def time(self):
            return clock["now"]

    monkeypatch.setattr(loop, "time", FakeTime())

    def tick(calls):
        clock["now"] += 2.0

    reports = []
    method, trainer = make(tmp_path, 5)  # 10 items, batch 3: 3 steps an epoch
    method.mid_step = tick
    trainer.on_epoch_end = lambda *args: reports.append(args)
    trainer.fit()
    assert reports == [(1, 6.0, 3)]  # step 5 is inside epoch 2: no report for it
    reports.clear()
    method, trainer = make(tmp_path, 9)
    method.mid_step = tick
    trainer.on_epoch_end = lambda *args: reports.append(args)
    trainer.fit(resume=True)  # from step 5: epoch 2 has one step left
    assert reports == [(2, 2.0, 1), (3, 6.0, 3)]


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
    method, trainer = make(tmp_path, 10, nan_at=5)
    with pytest.raises(TrainingDiverged, match=r"step 5: loss 'mse' is nan.*step 4"):
        trainer.fit()
    state = load_checkpoint(tmp_path / "last.pt", method="linear")
    assert state["step"] == 4
    assert all(math.isfinite(v.abs().sum().item()) for v in state["model"]["net"].values())


def test_checkpoint_checks(tmp_path):
    _, trainer = make(tmp_path, 2)
    trainer.fit()
    with pytest.raises(CheckpointError, match="method 'linear', not 'cut'"):
        load_checkpoint(tmp_path / "last.pt", method="cut")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_dataset_smaller_than_batch(tmp_path):
    with pytest.raises(ValueError, match="fewer than one batch"):
        Trainer(LinearFit(), Noisy(2), tmp_path, steps=1, batch_size=3)


def test_curves_png_draws_every_logged_loss_and_survives_a_resume(tmp_path, monkeypatch):
    import lowcon.report as report

    drawn = []
    real = report.plot_curves

    def spy(rows, keys, path, title="", columns=0):
        drawn.append(([int(float(r["step"])) for r in rows], list(keys), title))
        return real(rows, keys, path, title, columns)

    monkeypatch.setattr(report, "plot_curves", spy)
    _, trainer = make(tmp_path, steps=4)
    trainer.fit()
    assert drawn == [([1, 2, 3, 4], ["mse", "lr_net"], "linear: step 4 of 4")]  # at the end only
    from PIL import Image

    with Image.open(tmp_path / "curves.png") as image:  # two panels in one row, 110 dpi
        assert image.size == (int(3.2 * 2 * 110), int(2.8 * 110))
    _, trainer = make(tmp_path, steps=6)
    trainer.fit(resume=True)
    assert drawn[-1][0] == [1, 2, 3, 4, 5, 6]  # the resumed run's rows and the new ones


def test_plot_curves_wraps_panels_into_rows(tmp_path):
    from PIL import Image

    from lowcon.report import plot_curves

    rows = [{"step": s, **{f"k{i}": s * i for i in range(6)}} for s in range(1, 4)]
    path = plot_curves(rows, [f"k{i}" for i in range(6)], tmp_path / "c.png", columns=4)
    with Image.open(path) as image:
        assert image.size == (int(3.2 * 4 * 110), int(2.8 * 2 * 110))


@pytest.mark.parametrize("signals, raises, saved_step", [
    (["SIGTERM"], Terminated, 3),                # a scheduler's kill: the step finishes, is saved, then Terminated
    (["SIGINT"], KeyboardInterrupt, 3),          # Ctrl-C: the same, then KeyboardInterrupt
    (["SIGINT", "SIGINT"], KeyboardInterrupt, 2),  # Ctrl-C twice: stop at once, keep the last checkpoint
])
def test_a_signal_in_the_middle_of_a_step_never_saves_half_a_step(tmp_path, signals, raises, saved_step):
    import os
    import signal

    full, trainer = make(tmp_path / "full", 8)
    trainer.fit()
    method, trainer = make(tmp_path / "cut", 8)  # checkpoints every 2 steps
    method.mid_step = lambda call: [os.kill(os.getpid(), getattr(signal, name)) for name in signals] if call == 3 else None
    before = signal.getsignal(signal.SIGINT)  # Python's, or SIG_IGN in a shell's background job
    with pytest.raises(raises):
        trainer.fit()
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["step"] == saved_step
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are put back
    resumed, trainer = make(tmp_path / "cut", 8)
    trainer.fit(resume=True)
    assert method.seen[:saved_step] + resumed.seen == full.seen
    for a, b in zip(full.net.parameters(), resumed.net.parameters()):
        assert torch.equal(a, b)


def _logged(run_dir):
    return [(int(r["step"]), float(r["mse"])) for r in csv.DictReader(open(run_dir / "log.csv"))]


def test_a_stop_logs_the_steps_since_the_last_row(tmp_path):
    # log_every 5: a run stopped by SIGTERM after step 3 logs steps 1-3 (their mean), as the end of
    # a run does; resumed, it logs at 5 (steps 4-5) and at its end, 8 (steps 6-8).
    import os
    import signal

    full, trainer = make(tmp_path / "full", 8, log_every=1)
    trainer.fit()
    mse = dict(_logged(tmp_path / "full"))
    method, trainer = make(tmp_path / "cut", 8, log_every=5)
    method.mid_step = lambda call: os.kill(os.getpid(), signal.SIGTERM) if call == 3 else None
    with pytest.raises(Terminated, match="stopped by SIGTERM at step 3 of 8"):
        trainer.fit()
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["step"] == 3
    _, trainer = make(tmp_path / "cut", 8, log_every=5)
    assert trainer.fit(resume=True)["trained"] == 5
    want = [(3, (mse[1] + mse[2] + mse[3]) / 3), (5, (mse[4] + mse[5]) / 2), (8, (mse[6] + mse[7] + mse[8]) / 3)]
    got = _logged(tmp_path / "cut")
    assert [s for s, _ in got] == [s for s, _ in want]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-12)


def test_resuming_a_run_at_or_past_its_end_trains_nothing_and_says_so(tmp_path, capsys):
    _, trainer = make(tmp_path, 6)
    trainer.fit()
    rows = _logged(tmp_path)
    for steps in (6, 4):
        method, trainer = make(tmp_path, steps)
        assert trainer.fit(resume=True) == {"step": 6, "best": None, "run_dir": str(tmp_path), "trained": 0}
        assert method.calls == 0
        assert f"already at step 6, the run asks for {steps}: nothing to train" in capsys.readouterr().err
    assert _logged(tmp_path) == rows
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 6
