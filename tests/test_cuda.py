"""The GPU paths against the CPU ones.

On the GPU the networks run on cuDNN and torchvision's deformable-convolution kernel; on the CPU
lowcon runs its own kernels (Winograd and NNPACK convolutions, the fused norm-ReLU-conv runs, the
sampled deformable convolution). Each test builds one network or method, runs it on both and
compares: two independent formulations of the same numbers. They need a CUDA device and are
skipped without one (CI has none); ``LOWCON_TEST_DEVICE=cpu`` runs them against a second CPU copy,
to try the tests themselves where there is no GPU.
"""
import copy
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from lowcon.data.embedded import write_embedded_translation_set
from lowcon.data.io import read_image
from lowcon.models.aecrnet import AECRNet
from lowcon.models.winograd import WinogradConv2d, direct
from lowcon.translation import (TranslationConfig, build_discriminator, build_generator, build_method,
                                train_translation, translate_paths)

DEVICE = os.environ.get("LOWCON_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = [pytest.mark.skipif(DEVICE is None, reason="needs a CUDA device (or LOWCON_TEST_DEVICE=cpu)"),
              pytest.mark.filterwarnings("ignore::lowcon.translation.CollapseWarning")]


@pytest.fixture(autouse=True)
def full_float32():
    """TF32 keeps 10 bits of mantissa in cuDNN's and cuBLAS's products: compare in float32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest difference over the expected tensor's largest magnitude."""
    expected = expected.detach().double().cpu()
    return ((actual.detach().double().cpu() - expected).abs().max() / expected.abs().max()).item()


def assert_near(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-3, what: str = "") -> None:
    """Largest difference within `rel` of the expected tensor's largest magnitude."""
    assert actual.shape == expected.shape, what
    assert expected.abs().max().item() > 0, f"{what}: all zero"
    err = relative_error(actual, expected)
    assert err <= rel, f"{what}: max difference {err:.3g} of the largest magnitude, above {rel:g}"


def forward_backward(net: torch.nn.Module, x: torch.Tensor, weight: torch.Tensor):
    """Output, input gradient and parameter gradients of sum(weight * net(x))."""
    x = x.clone().requires_grad_(True)
    net.zero_grad(set_to_none=True)
    out = net(x)
    (out * weight).sum().backward()
    return out, x.grad, {name: p.grad for name, p in net.named_parameters()}


def assert_gradients_near(actual: dict, expected: dict, truth: dict, rel: float, what: str) -> None:
    """Parameter gradients near the CPU's, except those that are zero in float64 (`truth`): the
    biases of convolutions that an instance norm follows. Their float32 values are rounding noise
    on both devices, so they are held only to be small against the largest gradient."""
    top = max(g.abs().max().item() for g in truth.values() if g is not None)
    kept = nonzero(truth)
    for name, grad in expected.items():
        if truth[name] is None:
            assert actual[name] is None and grad is None, name
        elif name in kept:
            assert_near(actual[name], grad, rel=rel, what=f"{what} {name} gradient")
        else:
            assert actual[name].abs().max().item() <= 1e-3 * top, f"{what} {name}: expected about zero"


def nonzero(grads: dict) -> set:
    """The names of the float64 gradients that are not zero up to rounding."""
    top = max(g.abs().max().item() for g in grads.values() if g is not None)
    return {name for name, g in grads.items() if g is not None and g.abs().max().item() > 1e-12 * top}


def test_translation_networks_agree_with_the_cpu_kernels():
    # ngf 16 at 128x128: the residual blocks have 64 channels on 32x32 maps, the PatchGAN 64 and
    # 128, so on the CPU they run as Winograd with fused norm-ReLU-conv runs; on the GPU as cuDNN
    # convolutions.
    cfg = TranslationConfig(method="cut", crop_size=128, ngf=16, ndf=32, n_blocks=2)
    for build in (build_generator, build_discriminator):
        cpu = build(cfg)
        assert sum(isinstance(m, WinogradConv2d) for m in cpu.modules()) > 0
        dev = copy.deepcopy(cpu).to(DEVICE)
        x = torch.rand(2, 3, 128, 128) * 2 - 1
        with torch.no_grad(), direct():
            plain = cpu(x)
        weight = torch.randn(plain.shape)
        truth = forward_backward(copy.deepcopy(cpu).double(), x.double(), weight.double())
        expected = forward_backward(cpu, x, weight)
        with direct():
            rounded = forward_backward(cpu, x, weight)  # plain float32 layers on the CPU
        actual = forward_backward(dev, x.to(DEVICE), weight.to(DEVICE))
        assert actual[0].device.type == torch.device(DEVICE).type
        assert not torch.equal(expected[0], plain)  # lowcon's own kernels did run on the CPU
        assert_near(actual[0], expected[0], what=f"{build.__name__} output")
        # At this init (gain 0.02) the instance norms amplify float32's rounding in backward:
        # plain float32 layers differ from float64 by up to ~1 % of the largest gradient. The
        # device's gradients are held to the float64 values within 3x that, and to the CPU's.
        err = relative_error(rounded[1], truth[1])
        assert_near(actual[1], truth[1], rel=max(1e-3, 3 * err), what=f"{build.__name__} input gradient")
        assert_near(actual[1], expected[1], rel=max(2e-3, 4 * err), what=f"{build.__name__} input gradient")
        err = max(relative_error(rounded[2][n], truth[2][n]) for n in nonzero(truth[2]))
        assert_gradients_near(actual[2], truth[2], truth[2], max(2e-3, 3 * err), build.__name__)
        assert_gradients_near(actual[2], expected[2], truth[2], max(2e-3, 4 * err), build.__name__)


def test_generator_features_for_patchnce_agree_with_the_cpu():
    cfg = TranslationConfig(method="cut", crop_size=64, ngf=16, n_blocks=2, nce_layers=(0, 4, 8, 12, 13))
    cpu = build_generator(cfg)
    dev = copy.deepcopy(cpu).to(DEVICE)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        expected = cpu.forward_features(x, cfg.nce_layers)
        actual = dev.forward_features(x.to(DEVICE), cfg.nce_layers)
    assert len(actual) == len(expected) == 5
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_near(a, e, what=f"feature {i}")


@pytest.mark.parametrize("method", ["cut", "fastcut", "cyclegan"])
def test_one_training_step_logs_the_same_losses_as_on_the_cpu(method):
    # Same initial weights, data and patch draws (PatchNCE draws its patch ids on the CPU; the
    # image pool uses Python's random): the logged losses agree. Adam's first step moves each
    # weight by +-lr whatever the gradient's size, so a sign that differs on a near-zero gradient
    # moves the losses computed after the discriminator's update a little: 1 %.
    extra = dict(lambda_NCE=10.0, nce_idt=False, flip_equivariance=True) if method == "fastcut" else {}
    if method != "cyclegan":
        extra["num_patches"] = 64
    cfg = TranslationConfig(method="cyclegan" if method == "cyclegan" else "cut", crop_size=128, ngf=16, ndf=32,
                            n_blocks=2, antialias=method != "cyclegan", antialias_up=method != "cyclegan", **extra)
    gen = torch.Generator().manual_seed(1)
    data = {"A": torch.rand(1, 3, 128, 128, generator=gen), "B": torch.rand(1, 3, 128, 128, generator=gen)}
    models = {}
    for device in ("cpu", DEVICE):
        torch.manual_seed(0)
        models[device] = build_method(cfg, steps_per_epoch=10, device=device)
    for name, module in models[DEVICE].checkpoint_modules().items():  # the same weights, the MLP head's too
        module.load_state_dict(models["cpu"].checkpoint_modules()[name].state_dict())
    logged = {}
    for device, model in models.items():
        torch.manual_seed(2)  # the same draws on both: patch ids, FastCUT's flip, the image pool
        logged[device] = model.train_step({k: v.to(device) for k, v in data.items()})
    assert logged[DEVICE].keys() == logged["cpu"].keys()
    for key, value in logged["cpu"].items():
        assert np.isfinite(logged[DEVICE][key]), key
        assert logged[DEVICE][key] == pytest.approx(value, rel=1e-2, abs=1e-4), key
    if torch.device(DEVICE).type == "cuda":  # fixed-size crops: cuDNN's autotuner, as the official code
        assert torch.backends.cudnn.benchmark


@pytest.mark.parametrize("method", ["cut", "cyclegan"])
def test_bf16_on_the_device_trains_close_to_float32(method):
    logged = {}
    for bf16 in (False, True):
        torch.manual_seed(0)
        cfg = TranslationConfig(method=method, crop_size=32, ngf=8, ndf=8, n_blocks=1, bf16=bf16,
                                num_patches=16, antialias=method != "cyclegan")
        model = build_method(cfg, steps_per_epoch=10, device=DEVICE)
        with model._autocast():
            probe = torch.nn.functional.linear(torch.rand(2, 4, device=DEVICE), torch.rand(3, 4, device=DEVICE))
        # autocast on a GPU; on a CPU (LOWCON_TEST_DEVICE=cpu) bf16 is lowcon's bf16 convolutions only
        autocast = bf16 and torch.device(DEVICE).type == "cuda"
        assert probe.dtype == (torch.bfloat16 if autocast else torch.float32)
        gen = torch.Generator().manual_seed(1)
        logged[bf16] = model.train_step({"A": torch.rand(2, 3, 32, 32, generator=gen).to(DEVICE),
                                         "B": torch.rand(2, 3, 32, 32, generator=gen).to(DEVICE)})
    assert any(logged[True][k] != logged[False][k] for k in logged[False])
    for key, value in logged[False].items():
        assert np.isfinite(logged[True][key]), key
        assert logged[True][key] == pytest.approx(value, rel=0.05, abs=0.02), key


def test_translate_on_the_device_writes_what_the_cpu_writes(tmp_path):
    write_embedded_translation_set(tmp_path / "data", "sepia", size=24, crops_per_image=2, test_names=("coffee",))
    run_dir = tmp_path / "run"
    cfg = TranslationConfig(method="cut", data=str(tmp_path / "data"), run_dir=str(run_dir), load_size=20,
                            crop_size=16, ngf=4, ndf=4, n_blocks=1, n_layers_D=2, nce_layers=(0, 4, 8, 12),
                            num_patches=16, batch_size=4, n_epochs=1, n_epochs_decay=0, log_every=1,
                            sample_every=0, checkpoint_every=0, save_epoch_every=1, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_translation(cfg, progress=False)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    gen = np.random.default_rng(0)
    for name, (w, h) in (("a.png", (37, 29)), ("b.png", (64, 48))):
        Image.fromarray(gen.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(inputs / name)
    written = {d: translate_paths([inputs], tmp_path / f"out_{d}", run_dir / "last.pt", device=d)
               for d in ("cpu", DEVICE)}
    assert [p.name for p in written[DEVICE]] == [p.name for p in written["cpu"]] == ["a.png", "b.png"]
    for ours, theirs in zip(written[DEVICE], written["cpu"]):
        a, b = read_image(ours), read_image(theirs)
        assert a.shape == b.shape and (a - b).abs().max() <= 1 / 255 + 1e-6, ours.name


def test_aecrnet_deformable_kernel_agrees_with_the_sampled_form():
    # dcn_impl auto: the sampled form (grid_sample) on the CPU, torchvision's kernel on the GPU
    cpu = AECRNet(ngf=8)
    with torch.no_grad():  # non-zero offsets: the zero init samples on the grid, where bilinear
        # interpolation has no derivative and each kernel takes its own one-sided one
        cpu.dcn_block.dcn.conv_offset_mask.weight.normal_(0, 0.3)
    dev = copy.deepcopy(cpu).to(DEVICE)
    x, weight = torch.rand(2, 3, 32, 40), torch.randn(2, 3, 32, 40)
    truth = forward_backward(copy.deepcopy(cpu).double(), x.double(), weight.double())
    expected = forward_backward(cpu, x, weight)
    actual = forward_backward(dev, x.to(DEVICE), weight.to(DEVICE))
    assert_near(actual[0], expected[0], what="output")
    assert_near(actual[1], expected[1], rel=2e-3, what="input gradient")
    assert_gradients_near(actual[2], expected[2], truth[2], 5e-3, "AECR-Net")
