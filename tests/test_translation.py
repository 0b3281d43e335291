"""The translation pipeline: configs, exact resume, translate, checkpoint errors, evaluation, collapse."""
import io
import re
import shutil
import subprocess
import sys
import warnings
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from lowcon.config import ConfigError, load_config, preset_path
from lowcon.data.embedded import apply_known_transform, write_embedded_translation_set
from lowcon.data.io import BadImageWarning, ImageReadError, read_image
from lowcon.models.fused import fused_step
from lowcon.models.resnet_generator import ResnetGenerator
from lowcon.models.winograd import WinogradConv2d
from lowcon.training.checkpoint import CheckpointError, load_checkpoint
from lowcon.translation import (
    CollapseWarning,
    TranslationConfig,
    build_method,
    collapse_check,
    evaluate_run,
    load_translator,
    train_translation,
    translate_paths,
)


# Untrained tiny generators give every input the same grey: the collapse check rightly says so.
pytestmark = [pytest.mark.filterwarnings("ignore::lowcon.translation.CollapseWarning"),
              pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("translation_data")
    folders = write_embedded_translation_set(root, "sepia", size=24, crops_per_image=3, test_names=("coffee",))
    return {"root": root, **folders}


def tiny_config(folders: dict, run_dir: Path, method: str = "cut", **overrides) -> TranslationConfig:
    values = dict(method=method, data=str(folders["root"]), run_dir=str(run_dir), load_size=20, crop_size=16,
                  ngf=4, ndf=4, n_blocks=1, n_layers_D=2, nce_layers=(0, 4, 8, 12), num_patches=16,
                  batch_size=4, n_epochs=1, n_epochs_decay=1, log_every=1, sample_every=0, checkpoint_every=0,
                  save_epoch_every=1, device="cpu")
    if method == "fastcut":
        values.update(lambda_NCE=10.0, nce_idt=False, flip_equivariance=True)
    if method == "cyclegan":
        values.update(pool_size=50, lambda_identity=0.5, antialias=False, antialias_up=False)
        del values["nce_layers"], values["num_patches"]  # CUT-only keys: a cyclegan config refuses them
    values.update(overrides)
    return TranslationConfig(**values)


@pytest.fixture(scope="module")
def cut_run(data, tmp_path_factory) -> dict:
    """A 3-epoch CUT run (12 train images, batch 4: 3 steps an epoch), samples every 2 steps."""
    run_dir = tmp_path_factory.mktemp("cut_run") / "run"
    cfg = tiny_config(data, run_dir, n_epochs=2, n_epochs_decay=1, sample_every=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_translation(cfg, progress=False)
    return {"dir": run_dir, "cfg": cfg, "warnings": [w for w in caught if issubclass(w.category, CollapseWarning)]}


@pytest.fixture(scope="module")
def cyclegan_checkpoint(data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("cyclegan_run") / "run"
    train_translation(tiny_config(data, run_dir, "cyclegan", n_epochs=1, n_epochs_decay=0, batch_size=12), progress=False)
    return run_dir / "last.pt"


# -- configs -------------------------------------------------------------------------------------


def test_presets_load_with_the_official_defaults():
    cut = load_config(TranslationConfig, preset_path("cut"))
    assert (cut.lambda_GAN, cut.lambda_NCE, cut.nce_idt, cut.num_patches, cut.nce_T) == (1.0, 1.0, True, 256, 0.07)
    assert (cut.n_epochs, cut.n_epochs_decay, cut.lr, cut.beta1, cut.beta2) == (200, 200, 2e-4, 0.5, 0.999)
    assert (cut.batch_size, cut.load_size, cut.crop_size, cut.flip, cut.pool_size) == (1, 286, 256, True, 0)
    assert cut.nce_layers == (0, 4, 8, 12, 16) and cut.data == "datasets/horse2zebra"
    fast = load_config(TranslationConfig, preset_path("fastcut"))
    assert (fast.lambda_NCE, fast.nce_idt, fast.flip_equivariance, fast.n_epochs, fast.n_epochs_decay) == (
        10.0, False, True, 150, 50)
    sin = load_config(TranslationConfig, preset_path("sincut"))
    assert (sin.lambda_R1, sin.lambda_identity, sin.nce_negatives, sin.num_patches, sin.gan_mode) == (
        1.0, 1.0, "batch", 1, "nonsaturating")
    assert (sin.lambda_NCE, sin.lr, sin.beta1, sin.beta2, sin.batch_size, sin.crop_size) == (4.0, 0.002, 0.0, 0.99, 16, 64)
    # CycleGAN as the CUT repository's cycle_gan_model trains it: CUT's networks and schedule
    cyc = load_config(TranslationConfig, preset_path("cyclegan"))
    assert (cyc.n_epochs, cyc.n_epochs_decay, cyc.pool_size, cyc.lambda_A, cyc.lambda_B, cyc.lambda_identity) == (
        200, 200, 50, 10.0, 10.0, 0.5)
    assert (cyc.antialias, cyc.antialias_up, cyc.init_type, cyc.no_resize_in_decay) == (True, True, "xavier", True)
    assert cyc.data == "datasets/horse2zebra"
    # ... and as its own repository does
    orig = load_config(TranslationConfig, preset_path("cyclegan_original"))
    assert (orig.n_epochs, orig.n_epochs_decay, orig.pool_size, orig.lambda_identity) == (100, 100, 50, 0.5)
    assert (orig.antialias, orig.antialias_up, orig.init_type, orig.no_resize_in_decay) == (False, False, "normal", False)


@pytest.mark.parametrize("method", ["fastcut", "sincut", "cyclegan"])
def test_a_config_file_naming_only_its_method_gets_that_methods_defaults(method, tmp_path):
    # As the official --CUT_mode and model options: `method: fastcut` alone is FastCUT, not CUT.
    (tmp_path / "mine.yaml").write_text(f"method: {method}\nrun_dir: runs/mine\nlr: 0.001\n")
    mine = load_config(TranslationConfig, tmp_path / "mine.yaml")
    preset = load_config(TranslationConfig, preset_path(method))
    differ = {f.name for f in fields(TranslationConfig) if getattr(mine, f.name) != getattr(preset, f.name)}
    assert differ - {"data", "dir_a", "dir_b"} == {"run_dir", "lr"}  # what the file sets
    assert mine.lr == 0.001 and (mine.data, mine.dir_a, mine.dir_b) == (None, None, None)  # no data from the preset
    # --set method=... on the command line picks the defaults the same way
    other = load_config(TranslationConfig, tmp_path / "mine.yaml", {"method": "cut"})
    assert (other.lambda_NCE, other.nce_idt, other.n_epochs) == (1.0, True, 200)


@pytest.mark.parametrize("overrides, key", [
    ({"method": "cyclegan", "flip_equivariance": True}, "flip_equivariance"),
    ({"method": "cyclegan", "num_patches": 16}, "num_patches"),  # would be ignored: refused
    ({"pool_size": 50}, "pool_size"),
    ({"n_blocks": 1}, "nce_layers"),  # layer 16 is past the encoder of a 1-block generator
    ({"dir_a": "x", "dir_b": "y"}, "data"),
    ({"load_size": 100}, "load_size"),
    ({"lambda_NCE": -1.0}, "lambda_NCE"),
])
def test_bad_combinations_are_one_line_errors_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key) as err:
        load_config(TranslationConfig, preset_path("cut"), overrides)
    assert "\n" not in str(err.value)


# -- training ------------------------------------------------------------------------------------


def _tensors(state) -> dict:
    out = {}
    for name, module in state.items():
        for key, value in module.items():
            out[f"{name}.{key}"] = value
    return out


@pytest.mark.parametrize("method, extra", [
    ("cut", {"flip_equivariance": True}),  # exercises every random draw: crops, patches, flips
    ("cyclegan", {}),                      # and the image pools
])
def test_resume_continues_exactly(data, tmp_path, method, extra):
    # 12 images, batch 4: 3 steps an epoch, 4 epochs (2 constant + 2 decaying) = 12 steps.
    settings = dict(sample_every=4, n_epochs=2, n_epochs_decay=2, **extra)
    train_translation(tiny_config(data, tmp_path / "full", method, **settings), progress=False)
    # The same run in three pieces: N/2 steps, then a stop in the middle of an epoch, then the rest.
    parts = tiny_config(data, tmp_path / "parts", method, max_steps=6, **settings)
    train_translation(parts, progress=False)
    assert torch.load(tmp_path / "parts" / "last.pt", weights_only=False)["step"] == 6
    parts.max_steps = 8
    train_translation(parts, resume=True, progress=False)
    parts.max_steps = 0
    train_translation(parts, resume=True, progress=False)

    a = torch.load(tmp_path / "full" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "parts" / "last.pt", weights_only=False)
    assert a["step"] == b["step"] == 12
    weights_a, weights_b = _tensors(a["model"]), _tensors(b["model"])
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    for epoch in ("epoch_002.pt", "epoch_004.pt"):
        epoch_a = torch.load(tmp_path / "full" / "epochs" / epoch, weights_only=False)["generator"]
        epoch_b = torch.load(tmp_path / "parts" / "epochs" / epoch, weights_only=False)["generator"]
        assert all(torch.equal(epoch_a[n][k], epoch_b[n][k]) for n in epoch_a for k in epoch_a[n])
    rows_a = (tmp_path / "full" / "log.csv").read_text().splitlines()
    rows_b = (tmp_path / "parts" / "log.csv").read_text().splitlines()
    drop_time = lambda rows: [r.rsplit(",", 1)[0] for r in rows]  # sec_per_step is the last column
    assert drop_time(rows_a) == drop_time(rows_b)


def test_run_writes_config_epochs_samples_and_logs_every_term(cut_run):
    run_dir = cut_run["dir"]
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["method"] == "cut" and saved["nce_layers"] == [0, 4, 8, 12]
    assert sorted(p.name for p in (run_dir / "epochs").glob("*.pt")) == ["epoch_001.pt", "epoch_002.pt", "epoch_003.pt"]
    header = (run_dir / "log.csv").read_text().splitlines()[0].split(",")
    assert {"G_GAN", "NCE_X", "NCE_Y", "D_real", "D_fake", "D", "G", "lr_G"} <= set(header)
    assert len(list((run_dir / "samples").glob("*.png"))) >= 4
    # A fresh generator maps every input to the same grey: the sample-time check says so, in the log too.
    assert cut_run["warnings"], "expected a collapse warning from the untrained generator"
    log = (run_dir / "train.log").read_text()
    assert all(str(w.message).split(": ", 1)[1] in log for w in cut_run["warnings"])
    # each epoch's wall-clock time, as the official train.py prints it
    timed = re.findall(r"epoch (\d) of 3: ([0-9.]+) s, ([0-9.]+) s/step\n", log)
    assert [int(e) for e, _, _ in timed] == [1, 2, 3]
    steps_per_epoch = load_checkpoint(run_dir / "last.pt")["step"] // 3
    assert all(abs(float(t) - float(s) * steps_per_epoch) <= 0.05 + 0.0005 * steps_per_epoch for _, t, s in timed)


def test_an_existing_run_is_never_overwritten_and_resume_checks_the_config(data, cut_run, tmp_path):
    run_dir = cut_run["dir"]
    before = (run_dir / "last.pt").read_bytes()
    with pytest.raises(FileExistsError, match="resume"):
        train_translation(cut_run["cfg"], progress=False)
    changed = tiny_config(data, run_dir, n_epochs=2, n_epochs_decay=1, lambda_NCE=2.0)
    with pytest.raises(CheckpointError, match="lambda_NCE"):
        train_translation(changed, resume=True, progress=False)
    assert (run_dir / "last.pt").read_bytes() == before


def test_empty_domain_folder_is_a_one_line_error(data, tmp_path):
    empty_a, full_b = tmp_path / "A", tmp_path / "B"
    empty_a.mkdir()
    shutil.copytree(data["trainB"], full_b)
    cfg = tiny_config(data, tmp_path / "run", data=None, dir_a=str(empty_a), dir_b=str(full_b))
    with pytest.raises((FileNotFoundError, ValueError), match=str(empty_a)) as err:
        train_translation(cfg, progress=False)
    assert "\n" not in str(err.value)


def test_sincut_trains_from_two_image_files(data, tmp_path):
    image_a = sorted(Path(data["trainA"]).iterdir())[0]
    image_b = sorted(Path(data["trainB"]).iterdir())[0]
    cfg = tiny_config(data, tmp_path / "sin", "sincut", data=None, dir_a=str(image_a), dir_b=str(image_b),
                      single_image_length=8, lambda_R1=1.0, lambda_identity=1.0, nce_negatives="batch",
                      num_patches=1, gan_mode="nonsaturating")
    run_dir = train_translation(cfg, progress=False)
    header = (run_dir / "log.csv").read_text().splitlines()[0].split(",")
    assert {"D_R1", "idt", "NCE_Y"} <= set(header)
    with pytest.raises(ValueError, match="one image per domain"):
        train_translation(tiny_config(data, tmp_path / "sin2", "sincut", data=None, dir_a=str(data["trainA"]),
                                      dir_b=str(data["trainB"])), progress=False)


def test_r1_penalty_trains_with_the_winograd_patchgan():
    # The PatchGAN's 4x4 layers of >= 64 channels run as Winograd, whose backward is
    # once-differentiable; R1 differentiates D twice, so D(real) must run them directly.
    cfg = TranslationConfig(method="cut", crop_size=64, ngf=8, n_blocks=1, ndf=64, lambda_R1=1.0)
    method = build_method(cfg, steps_per_epoch=10)
    assert sum(type(m) is WinogradConv2d for m in method.D.modules()) == 3
    gen = torch.Generator().manual_seed(0)
    logged = method.train_step({"A": torch.rand(1, 3, 64, 64, generator=gen),
                                "B": torch.rand(1, 3, 64, 64, generator=gen)})
    assert logged["D_R1"] > 0 and all(np.isfinite(v) for v in logged.values())


@pytest.mark.parametrize("method", ["cut", "cyclegan"])
def test_bf16_mixed_precision_trains_close_to_float32(method, record_convolutions):
    # The same networks, data and seed in float32 and with bf16 on the CPU: the convolutions that
    # lowcon's float32 kernels do not serve compute in bf16 (lowcon.models.bf16conv; none in
    # float32), the fused runs stay on (autocast would turn them off), the first step's losses
    # agree to bf16's precision (8 bits of mantissa: about 0.4 % per rounding) and the parameters move.
    logged, moved, convolutions = {}, {}, {}
    for bf16 in (False, True):
        torch.manual_seed(0)
        cfg = TranslationConfig(method=method, crop_size=32, ngf=8, ndf=8, n_blocks=1, bf16=bf16,
                                num_patches=16, antialias=method != "cyclegan")
        model = build_method(cfg, steps_per_epoch=10)
        assert model.autocast_dtype == (torch.bfloat16 if bf16 else None)
        before = [p.detach().clone() for p in model.parameters()]
        gen = torch.Generator().manual_seed(1)
        with record_convolutions() as seen:
            logged[bf16] = model.train_step({"A": torch.rand(2, 3, 32, 32, generator=gen),
                                             "B": torch.rand(2, 3, 32, 32, generator=gen)})
        convolutions[bf16] = {dtype for dtype, _ in seen.calls}
        moved[bf16] = sum(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
        layers = model.inference_module().model
        with model._autocast():
            assert not torch.is_autocast_enabled("cpu")
            assert fused_step(layers, 2, 4, set()) is not None  # [norm, ReLU, down-conv]
    assert convolutions[False] == {torch.float32}
    assert torch.bfloat16 in convolutions[True]
    assert logged[True].keys() == logged[False].keys() and moved[True] == moved[False] > 0
    assert any(logged[True][k] != logged[False][k] for k in logged[False])  # bf16 did run
    for key, value in logged[False].items():
        assert np.isfinite(logged[True][key])
        assert logged[True][key] == pytest.approx(value, rel=0.05, abs=0.02), key


def test_bf16_on_a_cpu_without_native_bfloat16_warns(data, tmp_path, monkeypatch):
    import lowcon.translation as translation

    monkeypatch.setattr(translation, "cpu_has_native_bf16", lambda: False)
    cfg = tiny_config(data, tmp_path / "bf16", bf16=True, max_steps=1, save_epoch_every=0)
    with pytest.warns(UserWarning, match="no native bfloat16") as caught:
        run_dir = train_translation(cfg, progress=False)
    assert sum("bfloat16" in str(w.message) for w in caught) == 1
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["bf16"] is True


# -- translating ---------------------------------------------------------------------------------


def _write(path: Path, array: np.ndarray, mode: str) -> Path:
    Image.fromarray(array, mode=mode).save(path)
    return path


@pytest.fixture
def odd_inputs(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    folder = tmp_path / "inputs"
    folder.mkdir()
    _write(folder / "rgb.png", rng.integers(0, 256, (31, 45, 3), dtype=np.uint8), "RGB")
    _write(folder / "grey.png", rng.integers(0, 256, (20, 17), dtype=np.uint8), "L")
    _write(folder / "rgba.png", rng.integers(0, 256, (24, 24, 4), dtype=np.uint8), "RGBA")
    _write(folder / "dot.png", np.zeros((1, 1, 3), dtype=np.uint8), "RGB")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    return folder


def test_translate_keeps_sizes_reads_grey_and_rgba_and_reports_bad_files(cut_run, odd_inputs, tmp_path):
    checkpoint = cut_run["dir"] / "last.pt"
    with pytest.warns(BadImageWarning) as caught:
        written = translate_paths([odd_inputs], tmp_path / "out", checkpoint, batch_size=2)
    reported = [str(w.message) for w in caught if issubclass(w.category, BadImageWarning)]
    assert len(reported) == 2 and all("\n" not in m for m in reported)
    assert any("broken.png" in m for m in reported) and any("dot.png" in m for m in reported)
    assert sorted(p.name for p in written) == ["grey.png", "rgb.png", "rgba.png"]
    for name, size in (("rgb.png", (45, 31)), ("grey.png", (17, 20)), ("rgba.png", (24, 24))):
        with Image.open(tmp_path / "out" / name) as image:
            assert image.size == size and image.mode == "RGB"
    # The written file is the generator's output on the [-1, 1] input, to 8 bits.
    generator, _ = load_translator(checkpoint)
    with torch.no_grad():
        expected = (generator(read_image(odd_inputs / "rgb.png")[None] * 2 - 1)[0] + 1) / 2
    assert (read_image(tmp_path / "out" / "rgb.png") - expected.clamp(0, 1)).abs().max() <= 0.5 / 255 + 1e-6
    with pytest.raises(ImageReadError, match="broken.png"):
        translate_paths([odd_inputs / "broken.png"], tmp_path / "out2", checkpoint, on_error="raise")


def test_translate_runs_large_images_in_bands_and_writes_the_same_image(cut_run, odd_inputs, tmp_path, monkeypatch):
    import lowcon.translation as translation

    checkpoint = cut_run["dir"] / "last.pt"
    plain = translate_paths([odd_inputs / "rgb.png"], tmp_path / "plain", checkpoint)
    banded_calls = []
    forward_in_bands = ResnetGenerator.forward_in_bands
    monkeypatch.setattr(ResnetGenerator, "forward_in_bands",
                        lambda self, x: banded_calls.append(tuple(x.shape)) or forward_in_bands(self, x, band_mb=0.001))
    monkeypatch.setattr(translation, "BANDS_FROM_PIXELS", 31 * 45 - 1)  # rgb.png is 45 x 31
    banded = translate_paths([odd_inputs / "rgb.png", odd_inputs / "rgba.png"], tmp_path / "banded", checkpoint)
    assert banded_calls == [(1, 3, 31, 45)]  # rgba.png (24 x 24) is below the threshold
    assert (read_image(banded[0]) - read_image(plain[0])).abs().max() <= 1 / 255


def test_translate_shows_a_bar_over_the_images_unless_told_not_to(cut_run, odd_inputs, tmp_path, capsys):
    checkpoint = cut_run["dir"] / "last.pt"
    images = [odd_inputs / "rgb.png", odd_inputs / "rgba.png"]
    translate_paths(images, tmp_path / "quiet", checkpoint)
    assert "translate" not in capsys.readouterr().err
    translate_paths(images, tmp_path / "shown", checkpoint, progress=True)
    shown = capsys.readouterr().err
    assert "translate: 100%" in shown and "2/2" in shown


def test_translate_applies_the_runs_memory_settings_on_cpu(cut_run, odd_inputs, tmp_path, monkeypatch):
    import lowcon.translation as translation

    calls = []
    monkeypatch.setattr(translation, "configure_allocator", lambda *args: calls.append(args))
    translate_paths([odd_inputs / "rgb.png"], tmp_path / "out", cut_run["dir"] / "last.pt")
    _, cfg = load_translator(cut_run["dir"] / "last.pt")
    assert calls == [(cfg.heap_mmap_threshold_mb, cfg.retain_freed_memory)]


def test_translate_never_overwrites_its_inputs(cut_run, odd_inputs):
    before = (odd_inputs / "rgb.png").read_bytes()
    with pytest.raises(ValueError, match="overwrite"):
        translate_paths([odd_inputs / "rgb.png"], odd_inputs, cut_run["dir"] / "last.pt")
    assert (odd_inputs / "rgb.png").read_bytes() == before


def test_cli_translate_keeps_earlier_outputs_unless_told_otherwise(cut_run, data, tmp_path, capsys):
    command = ["translate", data["testA"], "-o", tmp_path / "out", "--checkpoint", cut_run["dir"] / "last.pt", "--quiet"]
    code, out, _ = _cli(capsys, *command)
    assert code == 0 and "wrote 3 image(s)" in out
    first, second, third = sorted((tmp_path / "out").iterdir())
    first.write_bytes(b"an earlier run's output")
    before = {p: p.read_bytes() for p in (first, second, third)}
    code, _, err = _cli(capsys, *command)
    _one_error_line(code, err, f"{first}: exists already (and 2 more outputs); nothing written",
                    "--overwrite", "--skip-existing")
    assert {p: p.read_bytes() for p in (first, second, third)} == before
    second.unlink()  # as after a stop: --skip-existing writes what is missing
    code, out, err = _cli(capsys, *command, "--skip-existing")
    assert code == 0 and "wrote 1 image(s)" in out and "2 of the 3 outputs exist already and are kept" in err
    assert first.read_bytes() == b"an earlier run's output" and read_image(second).shape == (3, 24, 24)
    assert third.read_bytes() == before[third]
    code, out, _ = _cli(capsys, *command, "--skip-existing")
    assert code == 0 and "wrote 0 image(s)" in out
    code, out, _ = _cli(capsys, *command, "--overwrite")
    assert code == 0 and "wrote 3 image(s)" in out and read_image(first).shape == (3, 24, 24)
    with pytest.raises(SystemExit):
        _cli(capsys, *command, "--overwrite", "--skip-existing")
    assert "not allowed with argument" in capsys.readouterr().err


def test_checkpoints_of_another_method_version_or_damaged_are_clear_errors(cut_run, cyclegan_checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match="'cyclegan', not 'cut'") as err:
        load_translator(cyclegan_checkpoint, method="cut")
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="'cut', not 'fastcut'"):
        load_translator(cut_run["dir"] / "epochs" / "epoch_001.pt", method="fastcut")
    generator_b, cfg = load_translator(cyclegan_checkpoint, direction="BtoA")
    assert cfg.method == "cyclegan" and not generator_b.training
    # a CycleGAN run of an older lowcon that took (and ignored) a PatchNCE key still translates
    older = torch.load(cyclegan_checkpoint, weights_only=False)
    older["config"]["num_patches"] = 16
    torch.save(older, tmp_path / "older_cyclegan.pt")
    assert load_translator(tmp_path / "older_cyclegan.pt")[1].num_patches == 256
    with pytest.raises(ValueError, match="one direction"):
        load_translator(cut_run["dir"] / "last.pt", direction="BtoA")

    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes((cut_run["dir"] / "last.pt").read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="not a readable checkpoint") as err:
        load_translator(damaged)
    assert str(err.value).endswith("failed finding central directory)")  # torch's reason, whole, one line
    state = torch.load(cut_run["dir"] / "last.pt", weights_only=False)
    wider = {**state, "config": {**state["config"], "ngf": state["config"]["ngf"] * 2}}
    torch.save(wider, tmp_path / "wider.pt")
    with pytest.raises(CheckpointError, match=r"do not fit the configured generator \(size mismatch for ") as err:
        load_translator(tmp_path / "wider.pt")
    assert "\n" not in str(err.value)
    state["config"]["option_of_a_later_lowcon"] = 1
    torch.save(state, tmp_path / "other_version.pt")
    with pytest.raises(CheckpointError, match="another lowcon version"):
        load_translator(tmp_path / "other_version.pt")
    no_config = {k: v for k, v in state.items() if k != "config"}
    torch.save(no_config, tmp_path / "no_config.pt")
    with pytest.raises(CheckpointError, match="a cut checkpoint without its config$"):
        load_translator(tmp_path / "no_config.pt")
    state["lowcon_checkpoint"] = 99
    torch.save(state, tmp_path / "newer.pt")
    with pytest.raises(CheckpointError, match="newer"):
        load_translator(tmp_path / "newer.pt")


# -- evaluation and collapse ---------------------------------------------------------------------


def colour_features(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def test_evaluate_run_reports_best_and_last_epoch(cut_run, data):
    result = evaluate_run(cut_run["dir"], data["testB"], data["testA"], metric_fn=colour_features)
    labels = [row["label"] for row in result["rows"]]
    assert labels == ["epoch 1", "epoch 2", "epoch 3"]
    lines = Path(result["csv"]).read_text().splitlines()[1:]
    fids = [float(line.split(",")[2]) for line in lines]
    assert result["best"]["label"] == labels[int(np.argmin(fids))]
    assert result["last"]["label"] == "epoch 3"
    report = Path(result["report"]).read_text()
    assert f"**Best epoch** (lowest FID, what papers report): {result['best']['label']}" in report
    assert "**Last epoch** (what a finished run gives you): epoch 3" in report
    assert len(list((cut_run["dir"] / "eval" / "epoch_2").glob("*.png"))) == 3
    assert "![FID and KID by step](scores.png)" in report
    chart = read_image(cut_run["dir"] / "eval" / "scores.png")  # a picture beside the table
    assert chart.shape[0] == 3 and min(chart.shape[1:]) > 100 and float(chart.std()) > 0.01


def test_evaluate_run_resizes_both_sets_to_the_crop_size_as_the_official_test(cut_run, data):
    # The official test script sets load_size = crop_size: every test image becomes 16 x 16 here
    # (the run's crop_size) before the generator, and the FID compares those outputs with the real
    # images at the same size. size=0 keeps the images' own 24 x 24.
    seen = []

    def features(x):
        seen.append(tuple(x.shape[-2:]))
        return colour_features(x)

    for size, side in ((None, 16), (0, 24), (20, 20)):
        seen.clear()
        result = evaluate_run(cut_run["dir"], data["testB"], data["testA"], metric_fn=features, size=size)
        assert set(seen) == {(side, side)}
        outputs = list((cut_run["dir"] / "eval" / "epoch_1").glob("*.png"))
        assert len(outputs) == 3 and {tuple(read_image(p).shape) for p in outputs} == {(3, side, side)}
        assert (f"both resized to {side} x {side}" in Path(result["report"]).read_text()) == (size != 0)
    with pytest.raises(ValueError, match="size: must be >= 5"):
        evaluate_run(cut_run["dir"], data["testB"], data["testA"], metric_fn=features, size=3)


def test_evaluate_run_leaves_out_unreadable_images_or_stops(cut_run, data, tmp_path):
    test_dir, real_dir = tmp_path / "testA", tmp_path / "testB"
    shutil.copytree(data["testA"], test_dir)
    shutil.copytree(data["testB"], real_dir)
    (test_dir / "broken.png").write_text("not an image")
    (real_dir / "broken.jpg").write_bytes(b"")
    with pytest.warns(BadImageWarning) as caught:
        result = evaluate_run(cut_run["dir"], real_dir, test_dir, metric_fn=colour_features)
    reported = sorted(str(w.message) for w in caught if issubclass(w.category, BadImageWarning))
    assert len(reported) == 2  # once each
    assert str(test_dir / "broken.png") in reported[0] and str(real_dir / "broken.jpg") in reported[1]
    clean = evaluate_run(cut_run["dir"], data["testB"], data["testA"], metric_fn=colour_features)
    assert [r["fid"] for r in result["rows"]] == pytest.approx([r["fid"] for r in clean["rows"]])  # left out
    assert len(list((cut_run["dir"] / "eval" / "epoch_1").glob("*.png"))) == 3
    with pytest.raises(ImageReadError, match="broken"):
        evaluate_run(cut_run["dir"], real_dir, test_dir, metric_fn=colour_features, on_error="raise")


def test_eval_cli_without_inception_weights_is_one_line_naming_the_file(cut_run, data, tmp_path, monkeypatch,
                                                                      capsys):
    from lowcon.cli import main
    from lowcon.metrics.fid import INCEPTION_WEIGHTS_FILENAME

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    code = main(["eval", "--run", str(cut_run["dir"]), "--real", str(data["testB"]), "--test", str(data["testA"])])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("lowcon: error: ") and INCEPTION_WEIGHTS_FILENAME in err
    assert str(tmp_path / "empty_torch_home" / "hub" / "checkpoints") in err


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    """An Inception weights file in the real file's format: the network's state dict, saved by
    torch.save. The real values cannot be downloaded here, so it holds the network's random
    initialisation. Returns (path, network)."""
    inception = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3",
                                    reason="torch-fidelity not installed")
    folder = tmp_path_factory.mktemp("inception")
    placeholder = folder / "placeholder.pth"
    torch.save({}, placeholder)
    with pytest.MonkeyPatch.context() as patch:  # build it once without loading, to get its keys and shapes
        patch.setattr(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        torch.manual_seed(0)
        net = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                    feature_extractor_weights_path=str(placeholder))
    weights = folder / "weights-inception.pth"
    torch.save(net.state_dict(), weights)
    return weights, net


def test_eval_cli_scores_a_run_with_an_inception_weights_file(cut_run, data, random_inception, capsys):
    """The whole `lowcon eval --run` path through torch-fidelity's Inception, from a file."""
    from lowcon.cli import main

    weights, net = random_inception
    assert main(["eval", "--run", str(cut_run["dir"]), "--real", str(data["testB"]), "--test", str(data["testA"]),
                 "--inception-weights", str(weights)]) == 0
    out = capsys.readouterr().out
    assert "best epoch: " in out and "last epoch: " in out
    rows = Path(cut_run["dir"], "eval", "scores.csv").read_text().splitlines()
    assert rows[0].startswith("label,step,fid,kid_mean") and len(rows) == 4  # header and 3 epochs
    assert all(np.isfinite(float(row.split(",")[2])) for row in rows[1:])
    # the file was loaded, not the random initialisation of a fresh network: same features as `net`
    from lowcon.metrics.fid import load_inception

    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    as_bytes = (images * 255).round().to(torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(load_inception(weights)(images), net.eval()(as_bytes)[0])


def test_eval_cli_downloads_inception_only_when_asked(cut_run, data, random_inception, tmp_path, monkeypatch,
                                                     capsys):
    """`--download-inception` fetches torch-fidelity's file into its cache (torch.hub's checkpoints
    folder); a failed download is one line; later runs find the file there without the flag."""
    import shutil
    import urllib.error

    from lowcon.cli import main
    from lowcon.metrics.fid import INCEPTION_WEIGHTS_FILENAME, INCEPTION_WEIGHTS_URL

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILENAME
    argv = ["eval", "--run", str(cut_run["dir"]), "--real", str(data["testB"]), "--test", str(data["testA"])]
    asked = []

    def offline(url, dst, progress=True):
        asked.append(url)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    assert main(argv) == 2 and asked == []  # never without the flag
    assert "--download-inception" in capsys.readouterr().err
    assert main(argv + ["--download-inception"]) == 2 and asked == [INCEPTION_WEIGHTS_URL]
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "download failed" in err and INCEPTION_WEIGHTS_FILENAME in err

    def connected(url, dst, progress=True):
        asked.append(url)
        shutil.copyfile(random_inception[0], dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", connected)
    assert main(argv + ["--download-inception"]) == 0 and cached.is_file()
    assert main(argv) == 0 and asked == [INCEPTION_WEIGHTS_URL] * 2  # the cached file, no second download
    assert "best epoch: " in capsys.readouterr().out


TINY_SET = ["ngf=4", "ndf=4", "n_blocks=1", "n_layers_D=2", "nce_layers=0,4,8,12", "num_patches=16", "load_size=20",
            "crop_size=16", "batch_size=4", "log_every=1", "sample_every=0", "checkpoint_every=1", "device=cpu"]


def _cli(capsys, *argv):
    """`lowcon ARGV` in this process: (exit code, stdout, stderr)."""
    from lowcon.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(code, err, *parts):
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("lowcon: error: "), err
    for part in parts:
        assert part in err, (part, err)


def test_cli_train_resumes_a_run_made_with_overrides_and_takes_steps(data, tmp_path, capsys):
    run = tmp_path / "run"
    tiny = [a for kv in TINY_SET for a in ("--set", kv)]
    code, out, _ = _cli(capsys, "train", "cut", "--data", data["root"], "--run-dir", run, "--steps", 2, *tiny)
    assert code == 0 and "last.pt" in out and "best.pt" not in out  # it names what it wrote
    assert [line.split(",")[0] for line in (run / "log.csv").read_text().splitlines()[1:]] == ["1", "2"]
    # The documented resume: the preset's name and the run folder; the run's own config.yaml (with its
    # overrides) is the base, so only what may change (here the step cap) is given again.
    code, _, err = _cli(capsys, "train", "cut", "--run-dir", run, "--resume", "--steps", 3)
    assert code == 0, err
    assert [line.split(",")[0] for line in (run / "log.csv").read_text().splitlines()[1:]] == ["1", "2", "3"]
    # config.yaml deleted: last.pt holds the config, and the run resumes with it
    written = (run / "config.yaml").read_text()
    (run / "config.yaml").unlink()
    code, _, err = _cli(capsys, "train", "cut", "--run-dir", run, "--resume", "--steps", 4)
    assert code == 0 and f"{run / 'config.yaml'}: missing; written again from {run / 'last.pt'}" in err, err
    assert yaml.safe_load((run / "config.yaml").read_text()) == {**yaml.safe_load(written), "max_steps": 4}
    assert [line.split(",")[0] for line in (run / "log.csv").read_text().splitlines()[1:]] == ["1", "2", "3", "4"]
    code, _, err = _cli(capsys, "train", "cyclegan", "--run-dir", run, "--resume")
    _one_error_line(code, err, f"{run}: a 'cut' run, resumed as 'cyclegan'")
    before = (run / "last.pt").read_bytes()
    code, _, err = _cli(capsys, "train", "cut", "--data", data["root"], "--run-dir", run, *tiny)
    _one_error_line(code, err, f"{run}: holds a run already")
    assert (run / "last.pt").read_bytes() == before  # nothing lost


def test_cli_bad_devices_are_one_line_errors(cut_run, data, tmp_path, capsys):
    checkpoint = cut_run["dir"] / "last.pt"
    code, _, err = _cli(capsys, "translate", data["testA"], "-o", tmp_path / "o1", "--checkpoint", checkpoint,
                        "--device", "banana")
    _one_error_line(code, err, "device: expected auto, cpu, cuda or cuda:N, got 'banana'")
    if not torch.cuda.is_available():
        code, _, err = _cli(capsys, "translate", data["testA"], "-o", tmp_path / "o2", "--checkpoint", checkpoint,
                            "--device", "cuda")
        _one_error_line(code, err, "device 'cuda': no CUDA GPU is available here")
        code, _, err = _cli(capsys, "eval", "--run", cut_run["dir"], "--real", data["testB"], "--test", data["testA"],
                            "--device", "cuda")
        _one_error_line(code, err, "device 'cuda': no CUDA GPU is available here")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_cli_sigterm_stops_translate_without_leaving_temporary_files(cut_run, data, tmp_path, capsys, monkeypatch):
    # SIGTERM while the second PNG is being written: the command exits with 128 + 15, the first
    # PNG is whole, and no hidden temporary file is left (the CLI turns SIGTERM into an exception
    # that unwinds like Ctrl-C).
    import os
    import signal

    from PIL import Image as PILImage

    real_save, calls = PILImage.Image.save, []

    def save(self, fp, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(PILImage.Image, "save", save)
    out = tmp_path / "out"
    code, _, err = _cli(capsys, "translate", data["testA"], "-o", out, "--checkpoint", cut_run["dir"] / "last.pt")
    assert code == 128 + signal.SIGTERM and "lowcon: terminated (SIGTERM)" in err
    assert sorted(p.name for p in out.iterdir()) == [sorted(p.stem for p in Path(data["testA"]).iterdir())[0] + ".png"]
    assert read_image(next(out.iterdir())).shape == (3, 24, 24)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back


def test_cli_sigterm_stops_training_after_the_step_with_a_checkpoint(data, tmp_path, capsys, monkeypatch):
    import os
    import signal

    from lowcon.methods.cut import CUT

    real_step, calls = CUT.train_step, []

    def step(self, batch):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # in the middle of step 2
        return real_step(self, batch)

    monkeypatch.setattr(CUT, "train_step", step)
    run = tmp_path / "run"
    tiny = [a for kv in TINY_SET for a in ("--set", kv)]
    code, _, err = _cli(capsys, "train", "cut", "--data", data["root"], "--run-dir", run, "--steps", 5, "--quiet",
                        *tiny)
    assert code == 128 + signal.SIGTERM and "stopped by SIGTERM at step 2 of 5" in err  # not 0: not finished
    assert load_checkpoint(run / "last.pt")["step"] == 2
    assert (run / "train.log").read_text().splitlines()[-1].endswith(
        "stopped by SIGTERM at step 2 of 5 (resume with --resume)")
    assert [line.split(",")[0] for line in (run / "log.csv").read_text().splitlines()[1:]] == ["1", "2"]


def test_cli_a_training_folder_of_only_undecodable_images_is_one_line(data, tmp_path, capsys):
    # A truncated JPEG passes the listing and fails only when decoded, in the data loader.
    bad = tmp_path / "bad"
    bad.mkdir()
    buffer = io.BytesIO()
    noise = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(noise).save(buffer, format="JPEG")
    (bad / "cut.jpg").write_bytes(buffer.getvalue()[:len(buffer.getvalue()) * 7 // 10])
    tiny = [a for kv in TINY_SET for a in ("--set", kv) if not kv.startswith("batch_size")]
    code, _, err = _cli(capsys, "train", "cut", "--set", f"dir_a={bad}", "--set", f"dir_b={data['trainB']}",
                        "--set", "batch_size=1", "--run-dir", tmp_path / "r", "--steps", 1, "--quiet", *tiny)
    assert code == 2 and err.strip().splitlines()[-1] == f"lowcon: error: {bad}: no readable images (every one failed to load)"


def test_translate_skips_an_empty_folder_among_the_inputs(cut_run, data, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _cli(capsys, "translate", empty, data["testA"], "-o", tmp_path / "out", "--checkpoint",
                        cut_run["dir"] / "last.pt", "--quiet")
    assert code == 0 and f"{empty}: no images found" in err
    assert len(list((tmp_path / "out").glob("*.png"))) == 3


def test_cli_bad_paths_are_one_line_errors(cut_run, data, tmp_path, capsys):
    a_file = Path(data["trainA"]).iterdir().__next__()
    code, _, err = _cli(capsys, "train", "cut", "--data", a_file, "--run-dir", tmp_path / "r1")
    _one_error_line(code, err, f"{a_file}: data root is a file")
    code, _, err = _cli(capsys, "train", "cut", "--set", f"dir_a={a_file}", "--set", f"dir_b={data['trainB']}",
                        "--run-dir", tmp_path / "r2")
    _one_error_line(code, err, f"{a_file}: not a folder")
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()
    taken = tmp_path / "taken.png"
    taken.write_bytes(b"x")
    code, _, err = _cli(capsys, "translate", data["testA"], "-o", taken, "--checkpoint", cut_run["dir"] / "last.pt")
    _one_error_line(code, err, f"{taken}: is a file")
    assert taken.read_bytes() == b"x"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_text("not an image")
    # as a user runs it (a process of its own, where Python prints warnings): the skipped file's
    # warning in one line, then the error; with the progress bar, each on a line of its own
    expected = [f"lowcon: warning: skipping image: {bad / 'a.png'}: cannot identify image file",
                f"lowcon: error: {bad}: no image written: no readable image among the inputs "
                "(each skipped file was named above)"]
    command = [sys.executable, "-m", "lowcon", "translate", str(bad), "-o", str(tmp_path / "out"),
               "--checkpoint", str(cut_run["dir"] / "last.pt")]
    done = subprocess.run(command + ["--quiet"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.splitlines() == expected
    done = subprocess.run(command, capture_output=True, text=True)
    lines = done.stderr.splitlines()  # the bar redraws itself after carriage returns, which split lines too
    assert done.returncode == 2 and [line for line in lines if "lowcon:" in line] == expected
    assert any(line.startswith("translate:") for line in lines)
    assert not (tmp_path / "out").exists()
    # a run folder stands for its last.pt
    code, out, err = _cli(capsys, "translate", data["testA"], "-o", tmp_path / "out2", "--checkpoint", cut_run["dir"])
    assert code == 0 and "wrote 3 image(s)" in out, err  # testA holds 3 crops
    junk = tmp_path / "junk.pth"
    junk.write_text("not torch")
    code, _, err = _cli(capsys, "eval", "--run", cut_run["dir"], "--real", data["testB"], "--test", data["testA"],
                        "--inception-weights", junk)
    _one_error_line(code, err, f"{junk}: not the FID Inception-v3 weights file")


def test_training_skips_an_unreadable_image_and_keeps_the_warning_in_train_log(data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(data["root"], root)
    (root / "trainA" / "garbage.png").write_text("not an image")
    cfg = tiny_config({"root": root}, tmp_path / "run", max_steps=1)
    with pytest.warns(BadImageWarning, match="garbage.png: cannot identify image file"):
        train_translation(cfg, progress=False)
    log = (tmp_path / "run" / "train.log").read_text()
    assert f"warning: skipping image: {root / 'trainA' / 'garbage.png'}: cannot identify image file" in log


def test_inputs_sharing_a_stem_are_all_written_and_a_png_keeps_its_name(tmp_path):
    from lowcon.data.io import RenamedOutputWarning, output_names

    files = [tmp_path / "a" / "odd.jpg", tmp_path / "a" / "odd.png", tmp_path / "b" / "odd.png", tmp_path / "c.bmp"]
    with pytest.warns(RenamedOutputWarning) as caught:
        names = output_names(files, tmp_path / "out")
    assert [n.name for n in names] == ["odd_1.png", "odd.png", "odd_2.png", "c.png"]
    assert [str(w.message) for w in caught] == [
        f"{files[0]}: written as {tmp_path / 'out' / 'odd_1.png'} (odd.png is another input's)",
        f"{files[2]}: written as {tmp_path / 'out' / 'odd_2.png'} (odd.png is another input's)"]


def test_demo_runs_what_its_minutes_buy_within_its_step_range():
    from lowcon.translation import DEMO_MAX_STEPS, _demo_epochs

    assert _demo_epochs(3, 0.1, 64) == 28  # 1800 steps' worth: 28 whole epochs of 64
    assert _demo_epochs(3, 0.01, 64) == DEMO_MAX_STEPS // 64 == 37  # a fast CPU stops at the cap
    assert _demo_epochs(0.1, 5.0, 64) == 2  # a slow one still gets a full-lr and a decay epoch


def test_collapse_check_flags_identical_and_identity_outputs_and_is_quiet_otherwise(data):
    inputs = torch.stack([read_image(p) for p in sorted(Path(data["trainA"]).iterdir())[:4]])
    others = torch.stack([read_image(p) for p in sorted(Path(data["trainA"]).iterdir())[4:8]])
    target_domain = apply_known_transform("sepia", others)

    same = inputs[:1].expand_as(inputs).clone()
    messages = collapse_check(inputs, same, targets=target_domain)
    assert len(messages) == 1 and "near-identical" in messages[0]

    messages = collapse_check(inputs, inputs.clone(), targets=target_domain)
    assert len(messages) == 1 and "nearly the inputs" in messages[0]
    # Targets with the inputs' own colours: the identity may be the right answer, so no warning.
    alike = (inputs + 0.002 * torch.randn(inputs.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert collapse_check(inputs, inputs.clone(), targets=alike) == []

    assert collapse_check(inputs, apply_known_transform("sepia", inputs), targets=target_domain) == []
    with pytest.raises(ValueError, match="outputs"):
        collapse_check(inputs, inputs[:, :, :8])


def test_the_known_answer_demo_runs_end_to_end(tmp_path):
    # `make demo-translate` at its shortest (the step count has a floor): every stage runs and the
    # report holds the two models and the identity row with real numbers. Whether they learn the
    # map takes the full three minutes (docs/translation.md).
    from lowcon.translation import demo_translation

    report = demo_translation(tmp_path / "demo", minutes=0.01, progress=False)
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in report.read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| model")}
    assert set(rows) == {"CUT", "FastCUT", "identity (a itself)"}
    assert all(5.0 < float(value) < 40.0 for value in rows.values())
    assert float(rows["identity (a itself)"]) == pytest.approx(9.51, abs=0.01)  # a against gbr(a), fixed
    for name in ("comparison.png", "curves_cut.png", "curves_fastcut.png", "cut/last.pt", "fastcut/last.pt"):
        assert (tmp_path / "demo" / name).is_file(), name
