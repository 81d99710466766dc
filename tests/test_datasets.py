"""Real-world files: every layout, masks, transforms, the balanced loss, inspect and import."""

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from convgru_cli import errors, hdf5, normalisation, sources, train, windowing
from convgru_cli.cli import app
from convgru_cli.synth import font_glyphs, moving_digits
from tests.conftest import write_h5
from tests.test_cli import convgru_command

runner = CliRunner()
SMALL = ["--input-frames", "3", "--output-frames", "2", "--batch-size", "2", "--epochs", "1", "--device", "cpu"]
DIGITS = moving_digits(8, 6, font_glyphs(), size=32, digits=1, seed=11)  # N T H W


@pytest.mark.parametrize(
    ("layout", "array", "name", "option"),
    [
        ("NTHW", DIGITS, "frames", []),
        ("NTCHW", DIGITS[:, :, None].repeat(2, axis=2), "frames", []),
        ("THW", DIGITS.reshape(48, 32, 32), "frames", []),
        ("TCHW", DIGITS.reshape(48, 1, 32, 32), "frames", ["--layout", "TCHW"]),
        ("NHWT", DIGITS.transpose(0, 2, 3, 1), "vil", []),  # SEVIR's layout, detected by shape
        ("TNHW", DIGITS.transpose(1, 0, 2, 3), "frames", ["--layout", "TNHW"]),  # mnist_test_seq.npy order
    ],
)
def test_every_layout_trains_predicts_and_evaluates(tmp_path, layout, array, name, option):
    path = write_h5(tmp_path / "d.h5", array, name=name)
    result = runner.invoke(app, ["train", path, *SMALL, *option, "--out", str(tmp_path / "run"), "--json"])
    assert result.exit_code == 0, result.output
    assert f"layout {layout}" in result.stderr
    best = str(tmp_path / "run" / "best.pt")
    out = tmp_path / "f.h5"
    predicted = runner.invoke(app, ["predict", path, *option, "--checkpoint", best, "--frames", "3", "-o", str(out)])
    assert predicted.exit_code == 0, predicted.output
    with h5py.File(out) as file:
        forecast = file["forecast"]
        assert forecast.attrs["layout"] == layout
        sizes = dict(zip(layout, forecast.shape, strict=True))
        assert sizes["T"] == 3 and sizes["H"] == 32 and sizes.get("N", 1) == (8 if "N" in layout else 1)
    scored = runner.invoke(app, ["evaluate", path, *option, "--checkpoint", best, "--json"])
    assert scored.exit_code == 0, scored.output
    assert len(json.loads(scored.stdout)["scores"]["model"]["mse"]) == 2


def test_predict_and_evaluate_read_a_file_as_the_model_was_trained_to(tmp_path):
    """A TNHW file with no layout attribute: --layout at training is enough; the checkpoint remembers it."""
    path = write_h5(tmp_path / "d.h5", DIGITS.transpose(1, 0, 2, 3))  # 6 frames of 8 sequences
    trained = runner.invoke(app, ["train", path, *SMALL, "--layout", "TNHW", "--out", str(tmp_path / "run")])
    assert trained.exit_code == 0, trained.output
    best = str(tmp_path / "run" / "best.pt")
    out = tmp_path / "f.h5"
    predicted = runner.invoke(app, ["predict", path, "--checkpoint", best, "--frames", "2", "-o", str(out)])
    assert predicted.exit_code == 0, predicted.output
    assert "frames: no layout recorded; read as TNHW, as the model was trained" in predicted.stderr
    with h5py.File(out) as file:
        assert file["forecast"].attrs["layout"] == "TNHW" and file["forecast"].shape == (2, 8, 32, 32)
    scored = runner.invoke(app, ["evaluate", path, "--checkpoint", best, "--json"])
    assert scored.exit_code == 0, scored.output
    assert json.loads(scored.stdout)["windows"] == 8 * 2  # read as NTHW: 6 * 4


def test_mask_dataset_marks_no_data(tmp_path):
    path = write_h5(tmp_path / "m.h5", DIGITS.astype(np.float32))
    with h5py.File(path, "a") as file:
        mask = np.ones(DIGITS.shape, dtype=bool)
        mask[:, :, :8] = False
        file["mask"] = mask
        file["short_mask"] = mask[:, :3]
    with hdf5.open_hdf5(path) as file:
        frames = sources.StackedFrames(file, "frames")
        window = frames.read(0, 0, 6)
        assert np.isnan(window[:, :, :8]).all() and np.isfinite(window[:, :, 8:]).all()
        with pytest.raises(errors.UserError, match="mask of shape"):
            sources.StackedFrames(file, "frames", mask_dataset="short_mask")


def test_nan_policy_is_about_the_datas_own_nan_not_the_masks(tmp_path):
    array = DIGITS.astype(np.float32)
    mask = np.ones(DIGITS.shape, dtype=bool)
    mask[:, :, :8] = False
    array[:, :, :8] = np.inf  # a fill value under the mask: never looked at
    path = write_h5(tmp_path / "m.h5", array)
    with h5py.File(path, "a") as file:
        file["mask"] = mask
    with hdf5.open_hdf5(path) as file:
        for policy in ("error", "zero", "mask"):
            window = sources.StackedFrames(file, "frames", nan_policy=policy).read(0, 0, 6)
            assert np.isnan(window[:, :, :8]).all() and np.isfinite(window[:, :, 8:]).all(), policy
    with h5py.File(path, "a") as file:
        file["frames"][0, 0, 20, 20] = np.nan  # a NaN the mask does not cover
    with hdf5.open_hdf5(path) as file:
        with pytest.raises(errors.UserError, match="NaN values"):
            sources.StackedFrames(file, "frames", nan_policy="error").read(0, 0, 6)
        window = sources.StackedFrames(file, "frames", nan_policy="zero").read(0, 0, 6)
        assert window[0, 0, 20, 20] == 0 and np.isnan(window[:, :, :8]).all()


def test_masked_pixels_change_neither_loss_nor_scores():
    from convgru_cli.metrics import Scores

    torch.manual_seed(0)
    prediction, target = torch.rand(2, 3, 1, 8, 8), torch.rand(2, 3, 1, 8, 8)
    valid = torch.rand(2, 3, 1, 8, 8) > 0.3
    changed = torch.where(valid, target, target + 100)
    for kind in train.LOSSES:
        assert train.weighted_loss(prediction, target, valid.float(), kind) == pytest.approx(
            train.weighted_loss(prediction, changed, valid.float(), kind).item()
        )
    one, other = Scores(3, 1.0, (0.5,)), Scores(3, 1.0, (0.5,))
    one.update(prediction, target, valid)
    other.update(prediction, changed, valid)
    assert {k: v for k, v in one.compute().items() if k not in ("ssim", "psnr")} == {
        k: v for k, v in other.compute().items() if k not in ("ssim", "psnr")
    }


def test_balanced_weights_follow_the_target():
    config = train.TrainConfig()
    weights = train.balance_weights(torch.tensor([0.0, 1.9, 2.0, 7.0, 10.0, 29.0, 31.0]), config)
    assert weights.tolist() == [1, 1, 2, 5, 10, 10, 30]


def test_log_transform_round_trips_and_statistics_live_in_log_space(tmp_path):
    rain = np.random.default_rng(0).gamma(0.5, 4.0, size=(6, 6, 16, 16)).astype(np.float32)
    with hdf5.open_hdf5(write_h5(tmp_path / "r.h5", rain)) as file:
        frames = sources.StackedFrames(file, "frames")
    norm = normalisation.compute_normalisation(
        frames, windowing.windows(frames, 6, 6), 6, transform="log", clip=(0, 50)
    )
    assert norm.offset[0] == pytest.approx(np.log1p(np.clip(rain, 0, 50)).mean(), rel=1e-4)
    batch = torch.from_numpy(np.clip(rain, 0, 50)).unsqueeze(2)
    normalised, _ = norm.normalise(batch)
    torch.testing.assert_close(norm.denormalise(normalised), batch, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(norm.mean_frame[0], batch.mean(dim=(0, 1))[0], atol=1e-4, rtol=1e-4)


def test_balanced_loss_trains_on_a_series(series_file, tmp_path):
    result = runner.invoke(
        app,
        [
            "train",
            series_file,
            "--input-frames",
            "3",
            "--output-frames",
            "3",
            "--batch-size",
            "2",
            "--epochs",
            "1",
            "--loss",
            "balanced",
            "--transform",
            "log",
            "--device",
            "cpu",
            "--val-fraction",
            "0.3",
            "--out",
            str(tmp_path / "r"),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    with h5py.File(series_file) as file:  # rain rates: the anchored forecaster, which --forecaster auto picks
        assert file["frames"].attrs["units"] == "mm/h"
    saved = torch.load(tmp_path / "r" / "best.pt", weights_only=True)
    assert (saved["model_config"]["forecaster"], saved["model_config"]["activation"]) == ("anchored", "tanh")
    assert saved["train_config"]["lr"] == 1e-3  # the balanced loss's rate, --lr left out
    report = runner.invoke(
        app,
        [
            "evaluate",
            series_file,
            "--checkpoint",
            str(tmp_path / "r" / "best.pt"),
            "--split",
            "val",
            "--thresholds",
            "0.5,2,5",
            "--json",
        ],
    )
    assert report.exit_code == 0, report.output
    assert json.loads(report.stdout)["units"] == "mm/h"
    assert "csi@0.5" in json.loads(report.stdout)["scores"]["model"]


def test_all_nan_training_data_is_refused(tmp_path):
    path = write_h5(tmp_path / "nan.h5", np.full((6, 6, 16, 16), np.nan, dtype=np.float32))
    result = runner.invoke(app, ["train", path, *SMALL, "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "no valid value" in result.stderr


def test_inspect_reports_what_training_would_use(tmp_path):
    path = write_h5(tmp_path / "i.h5", DIGITS, units="")
    result = runner.invoke(app, ["data", "inspect", path, "--input-frames", "3", "--output-frames", "2", "--json"])
    assert result.exit_code == 0, result.output
    (entry,) = json.loads(result.stdout)["datasets"]
    assert entry["layout"] == "NTHW" and entry["windows"] == 8 * 2 and entry["max"] == 255
    assert runner.invoke(app, ["data", "inspect", path]).exit_code == 0


def test_import_numpy_moving_mnist_order(tmp_path):
    source = tmp_path / "mnist_test_seq.npy"
    np.save(source, DIGITS.transpose(1, 0, 2, 3))  # [T, N, H, W] like the standard file
    result = runner.invoke(app, ["data", "import", str(source), str(tmp_path / "m.h5"), "--layout", "TNHW"])
    assert result.exit_code == 0, result.output
    with hdf5.open_hdf5(str(tmp_path / "m.h5")) as file:
        frames = sources.StackedFrames(file, "frames")
        assert frames.layout == "TNHW" and frames.sequences == 8
        np.testing.assert_array_equal(frames.read(3, 1, 4)[:, 0], DIGITS[3, 1:5])
    with h5py.File(tmp_path / "m.h5") as file:
        assert file["frames"].chunks == (6, 1, 32, 32)  # one chunk per sequence: its 6 frames
    bad = runner.invoke(app, ["data", "import", str(source), str(tmp_path / "x.h5"), "--layout", "NTCHW"])
    assert bad.exit_code == 2 and "layout NTCHW has 5 axes" in bad.stderr
    long = tmp_path / "long.npy"
    np.save(long, np.zeros((2, 100, 8, 8), np.float32))  # long sequences: a window must not read all of one
    assert runner.invoke(app, ["data", "import", str(long), str(tmp_path / "l.h5"), "--layout", "NTHW"]).exit_code == 0
    with h5py.File(tmp_path / "l.h5") as file:
        assert file["frames"].chunks == (1, 20, 8, 8)


def _peak_training_memory_mb(path, run_dir) -> float:
    """Peak resident memory of a fresh process that trains on ``path`` for 4 s with --cache off."""
    # VmHWM, the child's own high-water mark: its ru_maxrss would start from this test process's peak.
    script = (
        "import re; from convgru_cli.cli import app; "
        f"args = ['train', {str(path)!r}, '--cache', 'off', '--max-time', '4', '--val-fraction', '0.01', "
        f"'--batch-size', '8', '--device', 'cpu', '--out', {str(run_dir)!r}]; "
        "app(args, standalone_mode=False); "
        "print(re.search(r'VmHWM:\\s*(\\d+)', open('/proc/self/status').read()).group(1))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1]) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the peak from Linux's /proc")
def test_training_memory_does_not_grow_with_the_file(tmp_path):
    """--cache off reads windows lazily: a file 60x larger (490 MB of frames) costs under a third of that more."""
    block = moving_digits(100, 20, font_glyphs(), seed=12)  # 8 MB
    sizes = {"small": 100, "big": 6000}
    for name, sequences in sizes.items():
        with h5py.File(tmp_path / f"{name}.h5", "w") as file:
            frames = file.create_dataset(
                "frames", (sequences, 20, 64, 64), "u1", chunks=(1, 20, 64, 64), compression="lzf"
            )
            for start in range(0, sequences, 100):
                frames[start : start + 100] = block
    small = _peak_training_memory_mb(tmp_path / "small.h5", tmp_path / "run-small")
    big = _peak_training_memory_mb(tmp_path / "big.h5", tmp_path / "run-big")
    data_mb = sizes["big"] * 20 * 64 * 64 / 2**20
    assert big - small < data_mb / 3, (small, big, data_mb)


def _unreadable_filter_file(path) -> str:
    """Chunks that claim a compression filter (an id from the range kept for testing, which no plugin
    provides) that h5py cannot decode."""
    with h5py.File(path, "w") as file:
        dataset = file.create_dataset(
            "frames", shape=(4, 6, 32, 32), dtype=np.uint8, chunks=(1, 6, 32, 32), compression=40000,
            allow_unknown_filter=True,
        )  # fmt: skip
        for n in range(4):
            dataset.id.write_direct_chunk((n, 0, 0, 0), DIGITS[n].tobytes(), filter_mask=0)
    return str(path)


def test_the_frames_are_found_beside_other_datasets_and_named(tmp_path):
    """A layout attribute, then the name frames or data, tells the frames from what sits beside them."""
    positions = np.zeros((8, 2, 6, 2), dtype=np.float32)  # [N, 2, T, 2]: two digits' x, y per frame
    with_layout = write_h5(tmp_path / "layout.h5", DIGITS, layout="NTHW")
    plain = write_h5(tmp_path / "plain.h5", DIGITS, name="data")
    for path in (with_layout, plain):
        with h5py.File(path, "a") as file:
            file["position"] = positions
    result = runner.invoke(app, ["train", with_layout, *SMALL, "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert f"{with_layout}: frames from dataset 'frames' (it has a layout attribute; not position)" in result.stderr
    result = runner.invoke(app, ["train", plain, *SMALL, "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert f"{plain}: frames from dataset 'data' (by its name; not position)" in result.stderr
    open_choice = write_h5(tmp_path / "open.h5", DIGITS, name="radar")
    with h5py.File(open_choice, "a") as file:
        file["position"] = positions
    result = runner.invoke(app, ["train", open_choice, *SMALL, "--out", str(tmp_path / "c")])
    assert result.exit_code == 2
    assert "cannot tell which dataset holds the frames (position, radar); name it with --dataset" in result.stderr


def test_bad_dataset_rows(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a row that wrongly succeeded would write runs/ here
    masked = write_h5(tmp_path / "masked.h5", DIGITS.astype(np.float32))
    with h5py.File(masked, "a") as file:
        file["short_mask"] = np.ones(DIGITS[:, :3].shape, dtype=bool)
    unreadable = _unreadable_filter_file(tmp_path / "blosc.h5")
    rows = [
        (["train", write_h5(tmp_path / "rank.h5", DIGITS[0]), *SMALL, "--layout", "NTHW"], "layout NTHW has 4 axes"),
        (["train", write_h5(tmp_path / "short.h5", DIGITS[:, :4]), *SMALL], "fewer than the 5 needed"),
        (["train", masked, *SMALL, "--mask-dataset", "short_mask"], "mask of shape"),
        (["train", str(tmp_path / "nowhere-*.h5"), *SMALL], "nowhere-*.h5"),
        (["train", unreadable, *SMALL], "HDF5 filter 40000"),
        (["train", unreadable, *SMALL, "--cache", "off", "--workers", "0"], "HDF5 filter 40000"),
        (["data", "import", str(tmp_path / "none.npy"), str(tmp_path / "o.h5"), "--layout", "TNHW"], "none.npy"),
    ]
    for arguments, message in rows:
        result = runner.invoke(app, arguments)
        assert result.exit_code == 2, (arguments, result.output)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, (arguments, result.stderr)


def test_files_compressed_with_hdf5plugin_filters_train_and_evaluate(tmp_path):
    hdf5plugin = pytest.importorskip("hdf5plugin")
    path = tmp_path / "zstd.h5"
    with h5py.File(path, "w") as file:
        file.create_dataset("frames", data=DIGITS, chunks=(1, 6, 32, 32), **hdf5plugin.Zstd())
    # a fresh process, where only convgru itself can have loaded the plugin
    done = subprocess.run(
        [*convgru_command(), "train", str(path), *SMALL, "--cache", "off", "--out", str(tmp_path / "run")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    scored = runner.invoke(app, ["evaluate", str(path), "--checkpoint", str(tmp_path / "run" / "best.pt"), "--json"])
    assert scored.exit_code == 0, scored.output
