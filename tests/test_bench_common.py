"""benchmarks/common.py: cases stepped in turn in live processes (run_paired) and their ratios."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def common():
    spec = importlib.util.spec_from_file_location("bench_common_under_test", BENCH / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CASES = f'''
import sys
sys.path.insert(0, {str(BENCH)!r})
from common import time_repeats


def tick(name, log):
    def step():
        with open(log, "a") as f:
            f.write(name)
    return time_repeats(step, repeats=99, warmup=99)  # paired mode ignores both counts


def broken(log):
    raise RuntimeError("case could not be built")
'''


def test_run_paired_steps_cases_in_turn_alternating_order(common, tmp_path):
    script = tmp_path / "cases.py"
    script.write_text(CASES)
    log = tmp_path / "order.txt"
    specs = [("a", "tick", {"name": "A", "log": str(log)}), ("b", "tick", {"name": "B", "log": str(log)}),
             ("bad", "broken", {"log": str(log)})]
    out = common.run_paired(str(script), specs, repeats=3, warmup=1)
    # One warm-up round, then three timed ones; the order flips every round.
    assert log.read_text() == "AB" + "BA" + "AB" + "BA"
    for key in ("a", "b"):
        assert out[key]["paired"] is True
        assert len(out[key]["seconds_all"]) == 3 and len(out[key]["cpu_seconds_all"]) == 3
        assert out[key]["peak_rss_gb"] > 0
    assert "case could not be built" in out["bad"]["error"]
    assert common.paired_ratio(out["a"], out["b"]) is not None


def test_paired_ratio_is_round_by_round(common):
    a = {"paired": True, "seconds_all": [1.0, 2.0, 3.0]}
    b = {"paired": True, "seconds_all": [2.0, 2.0, 2.0]}
    assert common.paired_ratio(a, b) == (1.0, 0.5, 1.5)
    assert common.paired_cell(a, b) == "1.00 (0.50-1.50)"
    # Not paired, or different numbers of steps: no ratio.
    assert common.paired_ratio({"seconds_all": [1.0, 2.0, 3.0]}, b) is None
    assert common.paired_ratio(a, {"paired": True, "seconds_all": [1.0]}) is None
    assert common.paired_cell(None, b) == "-"


def test_time_repeats_outside_paired_mode_runs_its_own_counts(common, monkeypatch):
    monkeypatch.delenv(common.STEP_SERVER_ENV, raising=False)
    calls = []
    out = common.time_repeats(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(calls) == 5 and len(out["seconds_all"]) == 3 and "paired" not in out
    with pytest.raises(ValueError, match="repeats"):
        common.time_repeats(lambda: None, repeats=0, warmup=0)



def test_split_files_each_convolution_under_its_kind():
    # benchmarks/bench_split.py: the kinds come from the calls' own arguments, as a
    # TorchDispatchMode sees them
    import torch
    import torch.nn.functional as F
    from torch.utils._python_dispatch import TorchDispatchMode

    spec = importlib.util.spec_from_file_location("bench_split_under_test", BENCH / "bench_split.py")
    split = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(split)
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket).split(".")[-1]
            if name in ("convolution", "convolution_backward", "bmm", "mm"):
                seen.append(split.kind_of(name, args))
            return func(*args, **(kwargs or {}))

    x = torch.randn(1, 4, 12, 12, requires_grad=True)
    calls = [
        (lambda: F.conv2d(x, torch.randn(6, 4, 3, 3), padding=1), split.KINDS[0]),
        (lambda: F.conv2d(x, torch.randn(6, 4, 3, 3), stride=2, padding=1), split.KINDS[1]),
        (lambda: F.conv_transpose2d(x, torch.randn(4, 6, 3, 3), stride=2, padding=1, output_padding=1),
         split.KINDS[1]),
        (lambda: F.conv2d(x, torch.randn(6, 4, 7, 7), padding=3), split.KINDS[2]),
        (lambda: F.conv2d(x, torch.randn(4, 1, 3, 3), stride=2, groups=4), split.KINDS[3]),
        # a Winograd transform: 36 kernels over one channel, at the tile's stride
        (lambda: F.conv2d(x.detach().view(4, 1, 12, 12), torch.randn(36, 1, 6, 6), stride=4), split.KINDS[0]),
        (lambda: torch.bmm(torch.randn(36, 5, 4), torch.randn(36, 4, 3)), split.KINDS[0]),
        (lambda: torch.bmm(torch.randn(1, 5, 4), torch.randn(1, 4, 3)), split.KINDS[4]),  # PatchNCE's logits
        (lambda: torch.mm(torch.randn(16, 36), torch.randn(36, 8)), split.KINDS[0]),
    ]
    for fn, kind in calls:
        seen.clear()
        with Record():
            out = fn()
            if out.requires_grad:
                out.sum().backward()
        assert seen and set(seen) == {kind}, (kind, seen)


def test_layer_ops_times_each_case_and_reports_its_difference(monkeypatch, tmp_path):
    # benchmarks/bench_layer_ops.py on small shapes: every kind of case runs, lowcon's result
    # agrees with aten's, and the report has a row per case
    import torch

    import lowcon.training.memory

    monkeypatch.syspath_prepend(str(BENCH))
    import bench_layer_ops

    # the process settings the benchmark makes stay out of the test process
    monkeypatch.setattr(lowcon.training.memory, "configure_allocator", lambda *args: None)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    monkeypatch.setattr(bench_layer_ops, "CASES", [("norm", 4, 8, "norm"), ("pad", 4, 8, 1), ("pad 3", 4, 9, 3),
                                                   ("up", 4, 8, "up")])
    results = bench_layer_ops.main(["--repeats", "1", "--out", str(tmp_path / "ops.json")])
    assert [r["case"] for r in results["cases"]] == ["norm", "pad", "pad 3", "up"]
    for row in results["cases"]:
        assert row["aten_ms"] > 0 and row["lowcon_ms"] > 0 and row["max_abs_difference"] < 1e-5
    report = (tmp_path / "ops_report.md").read_text()
    assert all(f"| {name} |" in report for name in ("norm", "pad", "pad 3", "up"))


FAKE_TRAIN = '''
import sys, time
from options.train_options import TrainOptions
from models.cycle_gan_model import CycleGANModel

opt = TrainOptions().parse()
assert opt.amp is False  # set by the launcher: the CUT repository's CycleGAN reads it, no option defines it
CycleGANModel().data_dependent_initialize({"A": None})  # as train.py passes the first batch
print("options", " ".join(sys.argv[1:]), flush=True)
for epoch in range(1, 1000):
    time.sleep(0.25)
    print("End of epoch %d / %d \\t Time Taken: %d sec" % (epoch, 400, 0), flush=True)
'''


def test_bench_epochs_times_an_official_train_py_by_its_epoch_lines_and_stops_it(monkeypatch, tmp_path):
    # A stand-in for the official checkout: a train.py that prints the official epoch line every
    # 0.25 s, and the two modules the launcher patches (opt.amp, data_dependent_initialize).
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_epochs

    official = tmp_path / "official"
    (official / "options").mkdir(parents=True)
    (official / "models").mkdir()
    (official / "train.py").write_text(FAKE_TRAIN)
    (official / "options" / "train_options.py").write_text(
        "class TrainOptions:\n    def parse(self):\n        return type('Opt', (), {})()\n")
    (official / "models" / "__init__.py").write_text("")
    (official / "models" / "cycle_gan_model.py").write_text(
        "class CycleGANModel:\n    def data_dependent_initialize(self):\n        return None\n")
    log = tmp_path / "official.log"
    result = bench_epochs.run_official(official, "cyclegan", tmp_path / "data", epochs=3, log=log)
    assert len(result["epochs_s"]) == 2 and all(0.2 < s < 1.5 for s in result["epochs_s"]), result
    assert result["first_epoch_s"] == 0.0 and 0 < result["peak_rss_gb"] < 1, result
    assert "Traceback" not in log.read_text()
    # the report: medians of the later epochs, per-step times, ratios and peaks as given
    entry = {"lowcon": {"first_epoch_s": 30.0, "epochs_s": [20.0], "peak_rss_gb": 1.5},
             "official": {"first_epoch_s": 60.0, "epochs_s": [50.0], "peak_rss_gb": 2.0}}
    entry["ratio"] = bench_epochs.round_ratio(entry)
    machine = {"date_utc": "d", "cpu": "c", "nproc": 2, "threads": 2, "cpu_capability": "x", "native_bf16": False,
               "python": "p", "torch": "t", "torchvision": "v"}
    text = bench_epochs.report({"machine": machine, "data": ["a", "b"], "steps_per_epoch": 10, "epochs": 2,
                                "bf16": [], "runs": {"fastcut": [entry]}})
    assert "| fastcut | 20.0 (2.00) | 50.0 (5.00) | 0.400 | 0.50 | 1.50 / 2.00 | 0.75 |" in text
