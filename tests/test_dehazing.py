import csv
import warnings

import pytest
import torch
from PIL import Image

from lowcon.cli import main
from lowcon.config import from_dict
from lowcon.data.embedded import write_embedded_dehaze_set
from lowcon.data.io import BadImageWarning, read_image
from lowcon.dehazing import DehazeConfig, build_dehaze_method, dehaze_paths, load_dehazer, train_dehaze
from lowcon.training import load_checkpoint


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    return write_embedded_dehaze_set(tmp_path_factory.mktemp("data") / "set", size=32, per_image=2)


def tiny_cfg(splits, run_dir, **kw):
    base = dict(data=str(splits["train"]), val_data=str(splits["val"]), layout="reside", crop=16, batch_size=2,
                ngf=8, beta=0.1, vgg_weights="random", steps=4, log_every=1, val_every=2, sample_every=2,
                checkpoint_every=2, run_dir=str(run_dir), device="cpu")
    base.update(kw)
    return from_dict(DehazeConfig, base)


def test_loss_is_l1_plus_beta_cr_recomputed_independently(embedded, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        method = build_dehaze_method(tiny_cfg(embedded, tmp_path, beta=0.3))
    hazy, clear = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    torch.manual_seed(0)
    terms = method.losses(hazy, clear)
    with torch.no_grad():
        out = method.net(hazy)
        vgg = method.cr.embedding
        fo, fc, fh = vgg(out), vgg(clear), vgg(hazy)
        weights = [1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0]
        cr = sum(w * (a - c).abs().mean() / ((a - h).abs().mean() + 1e-7) for w, a, c, h in zip(weights, fo, fc, fh))
        l1 = (out - clear).abs().mean()
    assert terms["l1"].item() == pytest.approx(l1.item(), rel=1e-5)
    assert terms["cr"].item() == pytest.approx(cr.item(), rel=1e-4)
    assert terms["total"].item() == pytest.approx(l1.item() + 0.3 * cr.item(), rel=1e-4)


def test_train_resume_eval_dehaze_end_to_end(embedded, tmp_path):
    run = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_dehaze(tiny_cfg(embedded, run, steps=2), progress=False)
        train_dehaze(tiny_cfg(embedded, run, steps=4), resume=True, progress=False)
    state = load_checkpoint(run / "last.pt", method="aecrnet")
    assert state["step"] == 4 and "vgg" not in str(list(state["model"]["net"])[:3])
    assert sum(v.numel() for v in state["model"]["net"].values()) < 300_000  # no VGG inside
    rows = list(csv.DictReader(open(run / "log.csv")))
    assert {"l1", "cr", "beta_cr", "total", "lr_net"} <= set(rows[0])
    assert any(r.get("val_psnr") for r in rows) and (run / "best.pt").is_file()
    assert (run / "config.yaml").is_file() and list((run / "samples").glob("*.png"))
    # The cosine schedule reaches 0 at the last step.
    assert float([r for r in rows if r.get("lr_net")][-1]["lr_net"]) == pytest.approx(0.0, abs=1e-12)

    # eval through the CLI: per-image CSV + summary, protocol named.
    out = tmp_path / "eval"
    assert main(["--quiet", "eval", "--data", str(embedded["val"]), "--model", "hazy", "dcp", str(run / "last.pt"),
                 "--out", str(out)]) == 0
    summary = (out / "summary.md").read_text()
    assert "ffa" in summary and "hazy input" in summary and "Dark Channel" in summary
    per_image = list(csv.DictReader(open(out / "scores_last.csv")))
    assert len(per_image) == 2 and per_image[0]["protocol"] == "ffa"

    # The demo's report on this run: table with every row, grid and curves written.
    from lowcon.demo_dehaze import write_dehaze_report

    report = write_dehaze_report(tmp_path / "report", run, embedded["val"], minutes=0.1, steps=4)
    text = report.read_text()
    assert "| hazy input (do nothing) |" in text and "| DCP |" in text and "this run (4 steps)" in text
    assert (tmp_path / "report" / "comparison.png").stat().st_size > 0
    assert (tmp_path / "report" / "loss_curves.png").stat().st_size > 0


def test_training_on_validation_images_of_any_size(embedded, tmp_path):
    # SOTS-outdoor images are 413 x 550: not multiples of AECR-Net's 4. Validation and the sample
    # grids must pad them, as lowcon dehaze does.
    val = tmp_path / "val"
    g = torch.Generator().manual_seed(0)
    for folder, name in (("hazy", "7_1.png"), ("clear", "7.png")):
        (val / folder).mkdir(parents=True)
        pixels = (torch.rand(30, 42, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(val / folder / name)
    run = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_dehaze(tiny_cfg(embedded, run, val_data=str(val), steps=2), progress=False)
        method = build_dehaze_method(tiny_cfg(embedded, run))
    rows = list(csv.DictReader(open(run / "log.csv")))
    assert any(r.get("val_psnr") for r in rows) and list((run / "samples").glob("*.png"))
    hazy = torch.rand(1, 3, 30, 42, generator=g)
    visuals = method.visuals({"hazy": hazy, "clear": hazy})
    assert visuals["dehazed"].shape == (1, 3, 30, 42)
    with torch.no_grad():
        method.net.eval()
        padded = torch.nn.functional.pad(hazy, (0, 2, 0, 2), mode="reflect")
        torch.testing.assert_close(visuals["dehazed"], method.net(padded)[..., :30, :42].clamp(0, 1))


def test_dehaze_any_size_corrupt_and_dcp(embedded, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGB", (45, 31), (120, 130, 140)).save(src / "odd.jpg")
    Image.new("L", (20, 18), 90).save(src / "grey.png")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    with pytest.warns(BadImageWarning, match="skipping image: .*broken.png") as caught:
        written = dehaze_paths([str(src)], tmp_path / "out", source="dcp", progress=False)
    assert ["\n" in str(w.message) for w in caught] == [False]  # one warning, of one line
    sizes = {p.stem: read_image(p).shape for p in written}
    assert sizes == {"odd": (3, 31, 45), "grey": (3, 18, 20)}
    with pytest.raises(Exception, match="broken.png"):
        dehaze_paths([str(src / "broken.png")], tmp_path / "out2", source="dcp", on_error="raise", progress=False)


def test_dehaze_names_same_stem_inputs_apart_and_keeps_earlier_outputs(tmp_path, capsys):
    from lowcon.data.io import KeptOutputWarning, RenamedOutputWarning

    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGB", (12, 10), (200, 180, 160)).save(src / "view.jpg")
    Image.new("RGB", (14, 10), (90, 100, 110)).save(src / "view.png")
    out = tmp_path / "out"
    with pytest.warns(RenamedOutputWarning, match="view.jpg: written as .*view_1.png"):
        written = dehaze_paths([str(src)], out, source="dcp", progress=False)
    # each input has its own output (before, view.jpg's overwrote view.png's)
    assert {p.name: read_image(p).shape for p in written} == {"view_1.png": (3, 10, 12), "view.png": (3, 10, 14)}
    (out / "view.png").write_bytes(b"kept")
    with pytest.raises(FileExistsError, match=r"view_1.png: exists already \(and 1 more outputs\); nothing written"):
        dehaze_paths([str(src)], out, source="dcp", progress=False)
    assert (out / "view.png").read_bytes() == b"kept"
    (out / "view_1.png").unlink()
    with pytest.warns(UserWarning) as caught:
        written = dehaze_paths([str(src)], out, source="dcp", progress=False, existing="skip")
    assert [(w.category, str(w.message).split(": ", 1)[1]) for w in caught] == [
        (KeptOutputWarning, "1 of the 2 outputs exist already and are kept"),
        (RenamedOutputWarning, f"written as {out / 'view_1.png'} (view.png is another input's)")]
    assert written == [out / "view_1.png"] and (out / "view.png").read_bytes() == b"kept"
    with pytest.warns(RenamedOutputWarning):
        written = dehaze_paths([str(src)], out, source="dcp", progress=False, existing="overwrite")
    assert read_image(out / "view.png").shape == (3, 10, 14) and len(written) == 2
    # the command: an error of one line; with --skip-existing nothing left to do is no error
    assert main(["dehaze", str(src), "-o", str(out), "--method", "dcp", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err and "--skip-existing" in err
    assert main(["dehaze", str(src), "-o", str(out), "--method", "dcp", "--quiet", "--skip-existing"]) == 0
    assert "wrote 0 image(s)" in capsys.readouterr().out


def test_cli_errors_are_one_line(tmp_path, capsys):
    # as lowcon translate: the missing input is named, then the command fails for want of images
    assert main(["dehaze", str(tmp_path / "missing.png"), "-o", str(tmp_path / "o"), "--method", "dcp"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"lowcon: warning: skipping image: {tmp_path / 'missing.png'}: no such file or folder",
        f"lowcon: error: {tmp_path / 'missing.png'}: no image written: no readable image among the inputs "
        "(each skipped file was named above)"]
    assert not (tmp_path / "o").exists()
    assert main(["train", "aecrnet", "--data", str(tmp_path / "nothing")]) == 2
    assert "nothing/hazy: no such folder" in capsys.readouterr().err
    (tmp_path / "c.yaml").write_text("method: aecrnet\nbta: 0.1\n")
    assert main(["train", str(tmp_path / "c.yaml")]) == 2
    assert "unknown key 'bta'" in capsys.readouterr().err
    assert main(["eval", "--data", str(tmp_path), "--model", str(tmp_path / "c.yaml")]) == 2


def test_quiet_goes_before_or_after_the_command():
    from lowcon.cli import build_parser

    parser = build_parser()
    for argv, quiet in ((["train", "cut"], False), (["--quiet", "train", "cut"], True),
                        (["train", "cut", "--quiet"], True), (["--quiet", "demo", "translate"], True),
                        (["translate", "x.png", "-o", "o", "--checkpoint", "c.pt", "--quiet"], True)):
        assert parser.parse_args(argv).quiet is quiet, argv


def test_load_dehazer_rejects_other_checkpoints(tmp_path):
    from lowcon.training import save_checkpoint

    save_checkpoint(tmp_path / "cut.pt", {"method": "cut", "model": {}})
    with pytest.raises(Exception, match="method 'cut', not 'aecrnet'"):
        load_dehazer(str(tmp_path / "cut.pt"))
