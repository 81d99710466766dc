"""Runs users can trust: interrupts, configs, early stopping, and every bad input as one clean line."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from convgru_cli import checkpoint, train, windowing
from convgru_cli.cli import app
from convgru_cli.synth import font_glyphs, moving_digits
from tests.conftest import write_h5
from tests.test_cli import TRAIN, convgru_command

runner = CliRunner()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 32x32 single-channel checkpoint trained for one epoch, and its data."""
    workdir = tmp_path_factory.mktemp("trust")
    data = write_h5(workdir / "data.h5", moving_digits(16, 6, font_glyphs(), size=32, digits=1, seed=3))
    result = runner.invoke(app, ["train", data, *TRAIN, "--epochs", "1", "--out", str(workdir / "run")])
    assert result.exit_code == 0, result.output
    return workdir


def test_config_file_with_command_line_overrides_and_repeat(run, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(
        f'data = "{run / "data.h5"}"\ninput-frames = 3\noutput-frames = 3\nbatch_size = 4\nepochs = 3\n'
        'device = "cpu"\nlr = 0.001\n'
    )
    result = runner.invoke(app, ["train", "--config", str(config), "--epochs", "1", "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    saved = checkpoint.load(str(tmp_path / "a" / "last.pt"))
    assert saved["train_config"]["epochs"] == 1 and saved["train_config"]["lr"] == 0.001
    repeat = runner.invoke(
        app, ["train", "--config", str(tmp_path / "a" / "config.toml"), "--out", str(tmp_path / "b")]
    )
    assert repeat.exit_code == 0, repeat.output
    again = checkpoint.load(str(tmp_path / "b" / "last.pt"))
    assert again["train_config"] == saved["train_config"]
    for name, tensor in saved["model"].items():
        torch.testing.assert_close(tensor, again["model"][name])
    config.write_text("epoch = 3\n")
    bad = runner.invoke(app, ["train", "--config", str(config)])
    assert bad.exit_code == 2 and "unknown train option 'epoch'" in bad.stderr
    config.write_text('batch-size = "two"\n')  # checked as the command line checks --batch-size
    bad = runner.invoke(app, ["train", "--config", str(config)])
    assert (
        bad.exit_code == 2 and bad.stderr.startswith("convgru: error: --config") and "batch-size = 'two'" in bad.stderr
    )
    assert len(bad.stderr.strip().splitlines()) == 1
    config.write_text(  # a TOML array where the command line takes a comma list
        f'data = "{run / "data.h5"}"\ninput-frames = 3\noutput-frames = 3\nbatch_size = 4\nepochs = 1\n'
        'device = "cpu"\nclip = [0, 200]\n'
    )
    clipped = runner.invoke(app, ["train", "--config", str(config), "--out", str(tmp_path / "c")])
    assert clipped.exit_code == 0, clipped.output
    assert list(checkpoint.load(str(tmp_path / "c" / "last.pt"))["data_spec"]["clip"]) == [0.0, 200.0]


def test_patience_stops_early(digits_file, tmp_path, monkeypatch):
    losses = iter([1.0, 2.0, 3.0, 4.0, 5.0])
    monkeypatch.setattr(train, "validate", lambda *args: next(losses))
    spec = windowing.DataSpec(None, None, 3, 3, stride=2, val_fraction=0.25)
    config = train.TrainConfig(epochs=5, batch_size=4, patience=2, device="cpu", precision="fp32")
    from convgru_cli.model import make_config

    summary = train.train(digits_file, spec, make_config("fast", 1), config, str(tmp_path / "r"), show_progress=False)
    assert summary["epochs"] == 3 and summary["best_epoch"] == 1


def _interrupt_training(tmp_path, signal_number: int, once_exists: str, seed: int):
    """Start a long training subprocess, send it a signal once ``once_exists`` is in its run directory."""
    data = write_h5(tmp_path / "d.h5", moving_digits(64, 6, font_glyphs(), size=32, digits=1, seed=seed))
    run_dir = tmp_path / "run"
    command = [*convgru_command(), "train", data, *TRAIN, "--epochs", "100", "--out", str(run_dir)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    deadline = time.time() + 120
    while not (run_dir / once_exists).exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)  # into the next epoch
    process.send_signal(signal_number)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    return data, run_dir, stderr


def test_sigint_saves_a_checkpoint_that_resume_finishes(tmp_path):
    data, run_dir, stderr = _interrupt_training(tmp_path, signal.SIGINT, "metrics.jsonl", seed=4)
    assert f"--resume {run_dir}" in stderr and "Traceback" not in stderr
    done = checkpoint.load(str(run_dir / "last.pt"))["progress"]
    finish = done["epoch"] + 1
    resumed = subprocess.run(
        [*convgru_command(), "train", data, "--resume", str(run_dir), "--epochs", str(finish), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["epochs"] == finish


def test_sigterm_also_saves(tmp_path):
    _, run_dir, _ = _interrupt_training(tmp_path, signal.SIGTERM, "config.json", seed=5)
    assert (run_dir / "last.pt").is_file()
    assert not [name for name in os.listdir(run_dir) if name.startswith(".tmp-")]


def _invoke(arguments):
    result = runner.invoke(app, arguments)
    return result.exit_code, result.stderr


def test_bad_data_rows(run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a row that wrongly succeeded would write runs/ here, not in the checkout
    best = str(run / "run" / "best.pt")
    empty = tmp_path / "empty.h5"
    with h5py.File(empty, "w") as file:
        file.create_dataset("frames", shape=(0, 6, 32, 32), dtype="f4")
    nan = np.random.default_rng(0).random((8, 6, 32, 32)).astype(np.float32)
    nan[:, :, :4] = np.nan
    nan_file = write_h5(tmp_path / "nan.h5", nan)
    inf = nan.copy()
    inf[2, 3, 10, 10] = np.inf
    inf_file = write_h5(tmp_path / "inf.h5", np.where(np.isnan(inf), 0.0, inf))
    two_channels = write_h5(tmp_path / "c2.h5", np.zeros((4, 6, 2, 32, 32), dtype=np.float32))
    output = str(tmp_path / "o.h5")
    rows = [
        (["train", str(empty)], "dataset is empty"),
        (["train", nan_file, *TRAIN, "--nan-policy", "error"], "NaN values (--nan-policy error)"),
        (["train", nan_file, *TRAIN, "--nan-policy", "maybe"], "--nan-policy maybe"),
        (["train", inf_file, *TRAIN], "infinite values"),
        (["predict", two_channels, "--checkpoint", best, "-o", output], "2 channels, but"),
        (["predict", str(run / "data.h5"), "--checkpoint", best, "-o", str(tmp_path / "no" / "o.h5")], "no/o.h5"),
        (["train", str(run / "data.h5"), *TRAIN, "--out", str(run / "data.h5" / "run")], "--out"),
        (["train", str(run / "data.h5"), *TRAIN, "--batch-size", "500"], "--batch-size 500"),
        (["train", str(run / "data.h5"), *TRAIN, "--out", str(run / "run")], "--resume"),
        (["info", str(run / "data.h5")], "not a readable convgru checkpoint"),
    ]
    for arguments, message in rows:
        code, stderr = _invoke(arguments)
        assert code == 2, (arguments, stderr)
        assert message in stderr and len(stderr.strip().splitlines()) == 1, (arguments, stderr)
    assert not os.path.exists(output)


def test_numbers_that_are_not_numbers_are_refused_in_one_line(run, tmp_path, monkeypatch):
    """NaN slips through range checks (every comparison with it is false); infinity means nothing here either."""
    monkeypatch.chdir(tmp_path)
    data, best = str(run / "data.h5"), str(run / "run" / "best.pt")
    rows = [
        (["train", data, *TRAIN, "--lr", "nan"], "--lr nan"),
        (["train", data, *TRAIN, "--lr", "inf"], "--lr inf"),
        (["train", data, *TRAIN, "--grad-clip", "nan"], "--grad-clip nan"),
        (["train", data, *TRAIN, "--grad-clip", "inf"], "--grad-clip inf"),
        (["train", data, *TRAIN, "--distribution-weight", "inf"], "--distribution-weight inf"),
        (["train", data, *TRAIN, "--max-time", "nan"], "--max-time nan"),
        (["train", data, *TRAIN, "--val-fraction", "nan"], "--val-fraction nan"),
        (["train", data, *TRAIN, "--clip", "0,nan"], "--clip nan"),
        (["train", data, *TRAIN, "--balance-weights", "1,2,5,10,inf"], "--balance-weights inf"),
        (["train", data, *TRAIN, "--balance-thresholds", "2,5,10,nan"], "--balance-thresholds nan"),
        (["evaluate", data, "--checkpoint", best, "--zr", "nan,1.6"], "--zr nan"),
        (["evaluate", data, "--checkpoint", best, "--thresholds", "0.5,nan"], "--thresholds nan"),
        (["evaluate", data, "--checkpoint", best, "--thresholds", "1", "--fss-scales", "inf"], "--fss-scales inf"),
    ]
    for arguments, message in rows:
        code, stderr = _invoke(arguments)
        assert code == 2, (arguments, stderr)
        assert stderr == f"convgru: error: {message}: expected a finite number\n", (arguments, stderr)
    assert not os.path.exists(tmp_path / "runs")


def test_nan_is_masked_with_one_warning(tmp_path):
    array = moving_digits(8, 6, font_glyphs(), size=32, digits=1, seed=6).astype(np.float32)
    array[:, :, :8] = np.nan
    path = write_h5(tmp_path / "nan.h5", array)
    result = runner.invoke(app, ["train", path, *TRAIN, "--epochs", "1", "--out", str(tmp_path / "r"), "--json"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if "NaN" in line]
    assert len(warnings) == 1 and "25.00%" in warnings[0]
    assert np.isfinite(json.loads(result.stdout)["best_val_loss"])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=5).map(tuple),
    dtype=st.sampled_from(["uint8", "int16", "float32", "float64"]),
    special=st.sampled_from([None, np.nan, np.inf, -9999.0]),
    size=st.sampled_from([None, 32]),
)
@example(shape=(1, 3, 3, 2), dtype="uint8", special=None, size=None)  # read by the trained layout, then refused
def test_any_array_predicts_or_fails_cleanly(run, tmp_path, shape, dtype, special, size):
    if size:  # often enough a shape the model can take
        shape = (*shape[:-2], size, size) if len(shape) >= 3 else shape
    array = np.random.default_rng(0).random(shape) * 100
    if special is not None and np.issubdtype(np.dtype(dtype), np.floating):
        array.flat[0] = special
    path = write_h5(tmp_path / "random.h5", array.astype(dtype))
    output = tmp_path / "out.h5"
    if output.exists():
        output.unlink()
    result = runner.invoke(
        app, ["predict", path, "--frames", "2", "--checkpoint", str(run / "run" / "best.pt"), "-o", str(output)]
    )
    assert result.exit_code in (0, 2), (shape, dtype, special, result.output)
    if result.exit_code == 0:
        with h5py.File(output) as file:
            forecast = file["forecast"][()]
        assert forecast.shape[-2:] == shape[-2:] and np.isfinite(forecast).all()
    else:
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_debug_flag_shows_the_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "convgru_cli", "--debug", "info", str(tmp_path / "x.pt")], capture_output=True, text=True
    )
    assert done.returncode == 1 and "Traceback" in done.stderr and "UserError" in done.stderr


def test_resume_refuses_options_it_would_ignore(run):
    result = runner.invoke(app, ["train", str(run / "data.h5"), "--resume", str(run / "run"), "--lr", "0.1"])
    assert result.exit_code == 2 and "--lr 0.1 (saved: 0.002) cannot change" in result.stderr
    zero = runner.invoke(app, ["train", str(run / "data.h5"), *TRAIN, "--epochs", "0"])
    assert zero.exit_code == 2 and "--epochs must be at least 1" in zero.stderr


def test_resume_with_the_original_command_accepts_the_options_it_was_saved_with(run, tmp_path):
    """Users add --resume to the command that started the run: repeating a saved value is not a change."""
    shutil.copytree(run / "run", tmp_path / "run")
    original = [
        "train",
        str(run / "data.h5"),
        *TRAIN,
        "--epochs",
        "2",
        "--arch",
        "fast",
        "--forecaster",
        "auto",
        "--activation",
        "auto",
        "--out",
        str(tmp_path / "run"),
    ]
    resumed = runner.invoke(app, [*original, "--resume", str(tmp_path / "run"), "--json"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["epochs"] == 2
    changed = runner.invoke(app, [*original, "--seed", "7", "--resume", str(tmp_path / "run")])
    assert changed.exit_code == 2
    assert (
        changed.stderr
        == "convgru: error: --resume continues a run as it was saved: --seed 7 (saved: 0) cannot change\n"
    )
    bounded = runner.invoke(app, [*original, "--activation", "tanh", "--resume", str(tmp_path / "run")])
    assert bounded.exit_code == 2 and "--activation tanh (saved: leaky) cannot change" in bounded.stderr
    elsewhere = runner.invoke(app, [*original[:-1], str(tmp_path / "other"), "--resume", str(tmp_path / "run")])
    assert elsewhere.exit_code == 2 and "continues the run in its own directory" in elsewhere.stderr


def test_a_short_series_holds_out_one_window_and_says_so(tmp_path):
    """60 frames, windows of 8: the last 10 % (6 frames) hold no window, so the last 8 frames are held out."""
    frames = np.random.default_rng(0).random((60, 16, 16)).astype(np.float32)
    data = write_h5(tmp_path / "short.h5", frames)
    arguments = ["--input-frames", "4", "--output-frames", "4", "--batch-size", "4", "--device", "cpu", "--epochs", "1"]
    result = runner.invoke(app, ["train", data, *arguments, "--out", str(tmp_path / "r"), "--json"])
    assert result.exit_code == 0, result.output
    assert "holding out the last 8 frames (13%) instead, after a gap of 8" in result.stderr
    assert "on 37 windows (1 held out)" in result.stderr
    assert json.loads(result.stdout)["best_val_loss"] > 0
    tiny = write_h5(tmp_path / "tiny.h5", frames[:20])  # a window held out, a gap, and no window left to train on
    result = runner.invoke(app, ["train", tiny, *arguments, "--out", str(tmp_path / "t")])
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines()[-1] == (
        f"convgru: error: {tiny}:frames: no training window left after holding out the last 8 of 20 frames and a "
        "gap of 8 for validation; lower --val-fraction or the frame counts"
    )


def test_validation_on_another_event_and_a_warning_when_the_held_out_part_is_dry(tmp_path):
    """One day of radar whose evening is dry: its held-out end says nothing; --val-data validates elsewhere."""
    rng = np.random.default_rng(1)
    day = (5 * rng.random((60, 16, 16))).astype(np.float32)
    day[40:] = 0.05  # below 0.1 mm/h: dry
    data = write_h5(tmp_path / "day.h5", day, units="mm/h")
    other = write_h5(tmp_path / "other.h5", (5 * rng.random((30, 32, 32))).astype(np.float32), units="mm/h")
    arguments = ["--input-frames", "4", "--output-frames", "4", "--batch-size", "4", "--device", "cpu", "--epochs", "1"]
    dry = runner.invoke(app, ["train", data, *arguments, "--out", str(tmp_path / "a")])
    assert dry.exit_code == 0, dry.output
    warning = "100% of the 1 validation windows are dry (below 0.1 mm/h) or constant in the frames they forecast"
    assert warning in dry.stderr and "--val-data FILE" in dry.stderr
    elsewhere = [*arguments, "--val-data", other, "--val-fraction", "0", "--out", str(tmp_path / "b"), "--json"]
    result = runner.invoke(app, ["train", data, *elsewhere])
    assert result.exit_code == 0, result.output
    assert "on 53 windows (0 held out, 23 from --val-data)" in result.stderr
    assert "validation windows are" not in result.stderr
    assert json.loads(result.stdout)["best_val_loss"] > 0.1
    saved = checkpoint.load(str(tmp_path / "b" / "last.pt"))["train_config"]
    assert saved["val_data"] == (other,)
    resumed = runner.invoke(app, ["train", data, *elsewhere[:-1], "--epochs", "2", "--resume", str(tmp_path / "b")])
    assert resumed.exit_code == 0, resumed.output
    assert "23 from --val-data" in resumed.stderr
    wrong = write_h5(tmp_path / "wrong.h5", np.zeros((30, 2, 32, 32), dtype=np.float32), layout="TCHW")
    refused = runner.invoke(app, ["train", data, *arguments, "--val-data", wrong, "--out", str(tmp_path / "c")])
    assert refused.exit_code == 2, refused.output
    assert f"{wrong}:frames: layout THW has 3 axes" in refused.stderr


def test_data_in_other_units_than_the_model_was_trained_on_is_said(tmp_path):
    """An archive of accumulations read as mm/h by a model trained on them in mm (before they were read as rates),
    or any file in other units: the forecast would be off by the factor between them, so predict says so."""
    rng = np.random.default_rng(2)
    rates = write_h5(tmp_path / "rates.h5", (5 * rng.random((12, 16, 16))).astype(np.float32), units="mm/h")
    depths = write_h5(tmp_path / "depths.h5", (rng.random((6, 16, 16))).astype(np.float32), units="mm")
    arguments = ["--input-frames", "3", "--output-frames", "2", "--batch-size", "4", "--device", "cpu", "--epochs", "1"]
    trained = runner.invoke(app, ["train", rates, *arguments, "--val-fraction", "0", "--out", str(tmp_path / "r")])
    assert trained.exit_code == 0, trained.output
    model = str(tmp_path / "r" / "last.pt")
    predict = ["predict", "--checkpoint", model, "--frames", "2", "-o"]
    same = runner.invoke(app, [*predict, str(tmp_path / "a.h5"), rates])
    assert same.exit_code == 0 and "trained on values in" not in same.stderr, same.output
    other = runner.invoke(app, [*predict, str(tmp_path / "b.h5"), depths])
    assert other.exit_code == 0, other.output
    assert f"{depths}:frames: values in mm, but {model} was trained on values in mm/h" in other.stderr


def test_no_validation_split_keeps_the_last_epoch_as_best(tmp_path):
    data = write_h5(tmp_path / "d.h5", moving_digits(8, 6, font_glyphs(), size=32, digits=1, seed=13))
    result = runner.invoke(
        app, ["train", data, *TRAIN, "--epochs", "2", "--val-fraction", "0", "--out", str(tmp_path / "r"), "--json"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["best_epoch"] == 2 and summary["best_val_loss"] is None
    records = [json.loads(line) for line in open(tmp_path / "r" / "metrics.jsonl")]
    assert [r["val_loss"] for r in records] == [None, None]
    val = runner.invoke(app, ["evaluate", data, "--checkpoint", str(tmp_path / "r" / "best.pt"), "--split", "val"])
    assert val.exit_code == 2 and "without a validation split" in val.stderr


def test_one_input_frame_and_another_frame_size_still_evaluate(tmp_path):
    data = write_h5(tmp_path / "d.h5", moving_digits(8, 4, font_glyphs(), size=32, digits=1, seed=14))
    arguments = [
        "train",
        data,
        "--input-frames",
        "1",
        "--output-frames",
        "2",
        "--batch-size",
        "4",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "r"),
    ]
    assert runner.invoke(app, arguments).exit_code == 0
    bigger = write_h5(tmp_path / "big.h5", moving_digits(4, 4, font_glyphs(), size=64, digits=1, seed=15))
    result = runner.invoke(app, ["evaluate", bigger, "--checkpoint", str(tmp_path / "r" / "best.pt"), "--json"])
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.stdout)["scores"]) == {"model", "persistence"}
    assert "no climatology baseline" in result.stderr


def test_sigterm_while_writing_leaves_no_temporary_file(tmp_path):
    """kill, timeout and batch schedulers send SIGTERM: it stops like Ctrl-C, exit 130, nothing half-written."""
    array = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.uint8, shape=(1500, 20, 64, 64))
    array[:] = np.random.default_rng(0).integers(0, 256, array.shape, dtype=np.uint8)  # slow to compress
    array.flush()
    del array
    out = tmp_path / "out"
    out.mkdir()
    command = [*convgru_command(), "data", "import", str(tmp_path / "big.npy"), str(out / "big.h5"), "--layout", "NTHW"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(out.iterdir()) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, "the import ended before it could be stopped"
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "convgru: interrupted" in stderr and "Traceback" not in stderr
    assert list(out.iterdir()) == []


def test_training_notes_a_signal_and_stops_at_the_next_check():
    """The handler raises nothing (raised there, KeyboardInterrupt can land in a finalizer and be ignored); the
    next check does, and a second signal before it raises at once."""
    from convgru_cli import signals

    before = signal.getsignal(signal.SIGINT)  # SIG_IGN in a background job, as CI may run it
    with signals.deferred():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # handlers run between bytecodes of the main thread
        with pytest.raises(KeyboardInterrupt):
            signals.check()
        signals.check()  # acted on once
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert signal.getsignal(signal.SIGINT) is before
