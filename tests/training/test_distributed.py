"""Data-parallel training: N processes (gloo, on the CPU) train as one process with the whole batch.

Each test starts real processes, as ``torchrun`` would, and compares them with one process that
holds the whole batch: the same losses, the same averaged gradients, PatchNCE's negatives from the
whole minibatch (the official code's issue #67), and ``torchrun ... -m lowcon train`` end to end.
"""
import csv
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lowcon.contrast.patchnce import patch_nce_loss
from lowcon.data.embedded import write_embedded_translation_set
from lowcon import distributed
from lowcon.training.checkpoint import load_checkpoint
from lowcon.translation import TranslationConfig, build_method

pytestmark = [pytest.mark.filterwarnings("ignore::lowcon.translation.CollapseWarning"),
              pytest.mark.usefixtures("one_thread")]

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_processes(script: str, tmp_path: Path, world: int = 2, timeout: int = 180) -> list[dict]:
    """Run `script` in `world` processes joined as torchrun joins them; each saves its result
    to ``OUT`` (a torch file); return the results in rank order."""
    path = tmp_path / "worker.py"
    path.write_text(textwrap.dedent(script))
    port = str(_free_port())
    procs = []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, OMP_NUM_THREADS="1", OUT=str(tmp_path / f"out{r}.pt"))
        procs.append(subprocess.Popen([sys.executable, str(path)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log[-3000:]}"
    return [torch.load(tmp_path / f"out{r}.pt") for r in range(world)]


def test_one_process_needs_no_process_group(monkeypatch):
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main()
    distributed.leave()  # nothing to leave
    monkeypatch.setenv("RANK", "1")  # torchrun's process 1, before joining or after leaving: it does not report
    assert not distributed.is_main()
    monkeypatch.setenv("RANK", "0")
    assert distributed.is_main()
    x = torch.randn(3, 2)
    gathered, start = distributed.gather_rows(x)
    assert gathered is x and start == 0
    assert distributed.mean_over_processes({"a": 1.5}, True) == ({"a": 1.5}, True)
    assert distributed.launched_processes({}) == 1 and distributed.launched_processes({"WORLD_SIZE": "4"}) == 4
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        distributed.launched_processes({"WORLD_SIZE": "two"})


PATCHNCE_WORKER = """
    import os, torch
    from lowcon.contrast.patchnce import patch_nce_loss
    from lowcon import distributed
    distributed.setup(torch.device("cpu"))
    r = distributed.rank()
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(4, 6, 8, generator=g, dtype=torch.float64), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(4, 6, 8, generator=g, dtype=torch.float64), dim=-1)
    mine = q[2 * r:2 * r + 2].clone().requires_grad_(True)
    loss = patch_nce_loss(mine, k[2 * r:2 * r + 2], negatives="batch")
    loss.backward()
    local = patch_nce_loss(q[2 * r:2 * r + 2], k[2 * r:2 * r + 2], negatives="image")
    images = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 2, 2)  # image i is all i
    from lowcon.contrast import CRSampler
    cr = {mode: CRSampler(2, 3, mode)(images[2 * r:2 * r + 2], images[2 * r:2 * r + 2] + 10) for mode in ("others", "flip")}
    from lowcon.contrast import negative_groups
    _, keys, start = negative_groups(mine.detach(), k[2 * r:2 * r + 2], "batch")
    torch.save({"loss": loss.detach(), "grad": mine.grad, "image": local, "cr": cr, "keys": keys, "start": start},
               os.environ["OUT"])
    distributed.leave()
"""


def test_patchnce_batch_negatives_come_from_every_process(tmp_path):
    results = _run_processes(PATCHNCE_WORKER, tmp_path)
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(4, 6, 8, generator=g, dtype=torch.float64), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(4, 6, 8, generator=g, dtype=torch.float64), dim=-1)
    q.requires_grad_(True)
    whole = patch_nce_loss(q, k, negatives="batch")  # one process, the whole minibatch
    whole.backward()
    # the negatives are the keys of the whole batch, each process's own from its first row on
    for r, result in enumerate(results):
        assert torch.equal(result["keys"], k.reshape(1, -1, 8)) and result["start"] == 12 * r
    # the processes' losses average to the whole batch's; each one's gradient is its share's
    assert torch.allclose(torch.stack([r["loss"] for r in results]).mean(), whole.detach(), rtol=1e-12)
    assert torch.allclose(torch.cat([r["grad"] for r in results]) / 2, q.grad, rtol=1e-10, atol=1e-14)
    # #67: each process on its own share alone (what DataParallel's split gave) is another loss
    alone = torch.stack([patch_nce_loss(q[i:i + 2].detach(), k[i:i + 2], negatives="batch") for i in (0, 2)]).mean()
    assert abs(float(alone) - float(whole.detach())) > 1e-3
    # "image" negatives never cross images, so they need nothing from the other processes
    assert torch.allclose(torch.stack([r["image"] for r in results]).mean(),
                          patch_nce_loss(q.detach(), k, negatives="image"), rtol=1e-12)
    # CR's samples from other images of the batch (Table 4's r:r) come from the whole batch too:
    # anchor i's negatives are hazy images i, i+1, i+2 (mod 4), its positives clear images i, i+1
    for r, result in enumerate(results):
        positives, negatives = result["cr"]["others"]
        for j in range(2):
            i = 2 * r + j
            assert negatives[j, :, 0, 0, 0].tolist() == [i, (i + 1) % 4, (i + 2) % 4]
            assert positives[j, :, 0, 0, 0].tolist() == [10 + i, 10 + (i + 1) % 4]
        positives, negatives = result["cr"]["flip"]  # the last images of the whole batch, for all
        assert negatives[:, :, 0, 0, 0].tolist() == [[3, 2, 1]] * 2


STEP_WORKER = """
    import os, sys, torch
    sys.path.insert(0, {tests!r})
    from test_distributed import tiny_method, batch_of_four, record_gradients
    from lowcon import distributed
    distributed.setup(torch.device("cpu"))
    world, r = distributed.world_size(), distributed.rank()
    method = tiny_method({method!r})
    distributed.average_gradients_of(method)
    seen = record_gradients(method)
    losses = []
    for step in range({steps}):
        share = {{k: v[2 * r:2 * r + 2] for k, v in batch_of_four(step).items()}}
        losses.append(distributed.mean_over_processes(method.train_step(share))[0])
    generator = method.inference_module().state_dict()
    pools = [torch.stack(p.images) for p in (getattr(method, "pool_A", None), getattr(method, "pool_B", None)) if p]
    torch.save({{"losses": losses, "grads": seen, "G": generator, "pools": pools}}, os.environ["OUT"])
    distributed.leave()
"""


def tiny_method(method: str = "cut"):
    """A tiny CUT with batch negatives; a tiny FastCUT whose flip-equivariance draw always flips
    (the path where the keys come from a pass of their own); a tiny CycleGAN whose pools hold 2
    fakes (so that a batch of 4 already draws from them)."""
    torch.manual_seed(0)
    extra = {"fastcut": dict(lambda_NCE=10.0, nce_idt=False, flip_equivariance=True),
             "cyclegan": dict(pool_size=2, lambda_identity=0.5, antialias=False, antialias_up=False)}.get(method, {})
    nce = {} if method == "cyclegan" else dict(nce_layers=(0, 4, 8, 12), num_patches=16, nce_negatives="batch")
    cfg = TranslationConfig(method=method, data=None, load_size=20, crop_size=16, ngf=4, ndf=4, n_blocks=1,
                            n_layers_D=2, batch_size=4, device="cpu", **nce, **extra)
    built = build_method(cfg, steps_per_epoch=10)
    if method == "fastcut":
        translate = built.translate_for_training
        built.translate_for_training = lambda real_A, real_B, flip=None: translate(real_A, real_B, flip=True)
    return built


def batch_of_four(step: int = 0) -> dict:
    g = torch.Generator().manual_seed(1 + step)
    return {"A": torch.rand(4, 3, 16, 16, generator=g), "B": torch.rand(4, 3, 16, 16, generator=g)}


def record_gradients(method) -> dict:
    """Each optimiser's gradients as its step sees them (after the processes' averaging)."""
    seen = {}
    for name, opt in method.optimizers.items():
        inner = opt.optimizer if isinstance(opt, distributed.GradientAveraging) else opt
        original = inner.step

        def step(*args, _name=name, _inner=inner, _original=original, **kwargs):
            seen[_name] = [p.grad.clone() for group in _inner.param_groups for p in group["params"]
                           if p.grad is not None]
            return _original(*args, **kwargs)

        inner.step = step
    return seen


@pytest.mark.parametrize("method, steps", [("cut", 1), ("fastcut", 1), ("cyclegan", 2)])
def test_two_processes_take_the_steps_one_process_takes_with_the_whole_batch(tmp_path, method, steps):
    results = _run_processes(STEP_WORKER.format(tests=str(Path(__file__).parent), method=method, steps=steps),
                             tmp_path)
    method = tiny_method(method)
    seen = record_gradients(method)
    losses = [method.train_step(batch_of_four(step)) for step in range(steps)]
    for r in results:
        for got, want in zip(r["losses"], losses, strict=True):
            assert got.keys() == want.keys()
            for key, value in want.items():
                assert abs(got[key] - value) <= 1e-5 * max(1.0, abs(value)), (key, got[key], value)
        for name in seen:  # the last step's gradients (G, D and, for CUT, the projection head F)
            assert len(r["grads"][name]) == len(seen[name]) > 0
            got, want = torch.cat([g.flatten() for g in r["grads"][name]]), torch.cat([g.flatten() for g in seen[name]])
            # float32 sums in another order; the biases before an instance norm have a gradient of
            # zero up to that rounding, so the tolerance is set by the network's largest gradient.
            # After a first step, Adam has moved those biases apart by up to lr: the networks of
            # the second step differ that little, and so do its gradients.
            error = ((got - want).norm() / want.norm()).item()
            if steps == 1:
                assert torch.allclose(got, want, rtol=1e-4, atol=1e-6 * want.abs().max().item()), name
                assert error <= 1e-5, (name, error)
            else:
                assert error <= 1e-3, (name, error)
    # both processes hold the same generator afterwards
    for key, value in results[0]["G"].items():
        assert torch.equal(value, results[1]["G"][key]), key
    # CycleGAN: each process keeps the pools one process would, of the whole batch's fakes
    pools = [torch.stack(p.images) for p in (getattr(method, "pool_A", None), getattr(method, "pool_B", None)) if p]
    assert len(pools) == (2 if steps == 2 else 0)
    for r in results:
        for got, want in zip(r["pools"], pools, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("distributed_data")
    return {"root": root, **write_embedded_translation_set(root, "sepia", size=24, crops_per_image=3,
                                                           test_names=("coffee",))}


TINY = ["ngf=4", "ndf=4", "n_blocks=1", "n_layers_D=2", "nce_layers=0,4,8,12", "num_patches=16", "load_size=20",
        "crop_size=16", "batch_size=4", "log_every=1", "sample_every=2", "checkpoint_every=1", "device=cpu",
        "nce_negatives=batch"]


def _log_rows(run: Path) -> list[dict]:
    with open(run / "log.csv") as f:
        return list(csv.DictReader(f))


def _torchrun(*argv, timeout=240) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "lowcon", *map(str, argv)], env=env, capture_output=True, text=True, timeout=timeout)


def test_torchrun_lowcon_train_is_one_run_written_once_and_resumes(data, tmp_path):
    run = tmp_path / "two"
    tiny = [a for kv in TINY for a in ("--set", kv)]
    done = _torchrun("train", "cut", "--data", data["root"], "--run-dir", run, "--steps", 2, "--quiet", *tiny)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run folder:") == 1  # process 0 reports; the other one is silent
    assert "2 processes" in (run / "train.log").read_text()
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_0000002.png"]

    # one process with the whole batch of 4 takes the same two steps: the same command, in this process
    from lowcon.cli import main

    one = tmp_path / "one"
    assert main(["train", "cut", "--data", str(data["root"]), "--run-dir", str(one), "--steps", "2", "--quiet",
                 *tiny]) == 0
    rows_two, rows_one = _log_rows(run), _log_rows(one)
    assert [r["step"] for r in rows_two] == [r["step"] for r in rows_one] == ["1", "2"]
    for a, b in zip(rows_two, rows_one):
        for key in ("G_GAN", "NCE_X", "NCE_Y", "D_real", "D_fake", "G"):
            assert abs(float(a[key]) - float(b[key])) <= 1e-4 * max(1.0, abs(float(b[key]))), (key, a[key], b[key])
    g_two = load_checkpoint(run / "last.pt")["model"]["G"]
    g_one = load_checkpoint(one / "last.pt")["model"]["G"]
    # Adam moves every parameter by about lr whatever the gradient's size, so the biases before an
    # instance norm (a gradient of zero up to rounding) may move apart by up to lr a step; all
    # the filters agree
    worst = max((g_two[k] - g_one[k]).abs().max().item() for k in g_one if k.endswith("weight"))
    assert worst < 1e-5, worst
    assert all((g_two[k] - g_one[k]).abs().max().item() <= 2 * 2 * 2e-4 for k in g_one)

    resumed = _torchrun("train", "cut", "--run-dir", run, "--resume", "--steps", 3, "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in _log_rows(run)] == ["1", "2", "3"]


def test_a_batch_that_does_not_split_over_the_processes_is_a_one_line_error(data, tmp_path):
    tiny = [a for kv in TINY if not kv.startswith("batch_size") for a in ("--set", kv)]
    done = _torchrun("train", "cut", "--data", data["root"], "--run-dir", tmp_path / "r", "--steps", 1, "--quiet",
                     *tiny, "--set", "batch_size=3")
    assert done.returncode != 0
    assert "lowcon: error: batch_size: 3 does not split evenly over 2 processes" in done.stderr
    assert not (tmp_path / "r").exists()



@pytest.mark.filterwarnings("ignore:VGG19Features.weights='random'")
def test_torchrun_lowcon_train_aecrnet_is_one_run_with_cr_samples_from_the_whole_batch(tmp_path):
    from lowcon.data.embedded import write_embedded_dehaze_set

    splits = write_embedded_dehaze_set(tmp_path / "set", size=32, per_image=2)
    settings = {"val_data": splits["val"], "layout": "reside", "crop": 16, "batch_size": 4, "ngf": 8, "beta": 0.1,
                "vgg_weights": "random", "num_positives": 2, "num_negatives": 3, "log_every": 1, "val_every": 2,
                "sample_every": 2, "checkpoint_every": 1, "device": "cpu"}
    tiny = [a for k, v in settings.items() for a in ("--set", f"{k}={v}")]
    run = tmp_path / "two"
    done = _torchrun("train", "aecrnet", "--data", splits["train"], "--run-dir", run, "--steps", 2, "--quiet", *tiny)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run folder:") == 1
    assert (run / "best.pt").is_file() and (run / "val_ids.txt").is_file()

    from lowcon.config import from_dict
    from lowcon.dehazing import DehazeConfig, train_dehaze

    one = tmp_path / "one"
    train_dehaze(from_dict(DehazeConfig, {**settings, "val_data": str(splits["val"]), "data": str(splits["train"]),
                                          "run_dir": str(one), "steps": 2}), progress=False)
    rows_two, rows_one = _log_rows(run), _log_rows(one)
    assert [r["step"] for r in rows_two] == [r["step"] for r in rows_one] == ["1", "2", "2"]  # 2: validation too
    for a, b in zip(rows_two, rows_one):
        for key in ("l1", "cr", "total", "val_psnr"):
            if b.get(key):
                assert abs(float(a[key]) - float(b[key])) <= 1e-5 * max(1.0, abs(float(b[key]))), (key, a[key], b[key])
    net_two = load_checkpoint(run / "last.pt")["model"]["net"]
    net_one = load_checkpoint(one / "last.pt")["model"]["net"]
    diffs = {k: (net_two[k].float() - net_one[k].float()).abs().max().item() for k in net_one}
    worst = max(diffs.values())
    assert worst < 1e-5, sorted(diffs.items(), key=lambda kv: -kv[1])[:8]
