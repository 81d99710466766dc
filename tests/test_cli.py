"""The command line end to end: through Typer's CliRunner and through real `convgru` subprocesses."""

import json
import os
import re
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from convgru_cli import baselines
from convgru_cli.cli import app
from tests.conftest import write_h5

runner = CliRunner()
TRAIN = ["--input-frames", "3", "--output-frames", "3", "--batch-size", "4", "--device", "cpu"]


def convgru_command() -> list[str]:
    script = shutil.which("convgru", path=os.path.dirname(sys.executable)) or shutil.which("convgru")
    assert script, "the convgru console script is not installed"
    return [script]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A directory with data.h5 and runs/r/best.pt, trained through the CLI for one epoch."""
    workdir = tmp_path_factory.mktemp("cli")
    result = runner.invoke(
        app,
        [
            "data",
            "synth",
            str(workdir / "data.h5"),
            "--sequences",
            "16",
            "--frames",
            "8",
            "--size",
            "32",
            "--digits",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        app,
        ["train", str(workdir / "data.h5"), *TRAIN, "--epochs", "1", "--out", str(workdir / "runs" / "r"), "--json"],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["epochs"] == 1 and os.path.isfile(summary["best_checkpoint"])
    return workdir


def test_predict_writes_forecast_file(trained, tmp_path):
    out = tmp_path / "forecast.h5"
    result = runner.invoke(
        app,
        [
            "predict",
            str(trained / "data.h5"),
            "--frames",
            "5",
            "-o",
            str(out),
            "--checkpoint",
            str(trained / "runs" / "r" / "best.pt"),
        ],
    )
    assert result.exit_code == 0, result.output
    with h5py.File(out) as file:
        assert file["forecast"].shape == (16, 5, 32, 32)
        assert file["forecast"].attrs["layout"] == "NTHW"
        assert list(file["lead_times"]) == [1, 2, 3, 4, 5]
        assert file.attrs["input_frames"] == "5..7"
        model_config = json.loads(file.attrs["model_config"])
        assert model_config["patch"] == 4
        assert (model_config["forecaster"], model_config["activation"]) == ("shi", "leaky")  # digits: not rain
        assert np.isfinite(file["forecast"][()]).all()
    again = runner.invoke(
        app,
        ["predict", str(trained / "data.h5"), "-o", str(out), "--checkpoint", str(trained / "runs" / "r" / "best.pt")],
    )
    assert again.exit_code == 2 and "--force" in again.stderr


def test_evaluate_json_schema(trained):
    result = runner.invoke(
        app,
        [
            "evaluate",
            str(trained / "data.h5"),
            "--split",
            "val",
            "--json",
            "--checkpoint",
            str(trained / "runs" / "r" / "best.pt"),
            "--thresholds",
            "64,128",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["lead_times"] == [1, 2, 3]
    assert set(report["scores"]) == {"model", *baselines.METHODS, "climatology"}
    for method in report["scores"].values():
        for metric in ("mse", "mae", "ssim", "psnr", "mse_frame_sum", "csi@64", "pod@128"):
            assert len(method[metric]) == 3
    assert report["mean"]["persistence"]["mse"] > 0


def test_evaluate_table_on_stdout(trained):
    result = runner.invoke(
        app, ["evaluate", str(trained / "data.h5"), "--checkpoint", str(trained / "runs" / "r" / "best.pt")]
    )
    assert result.exit_code == 0, result.output
    assert "persi" in result.stdout and "mean" in result.stdout


def test_evaluate_without_baselines_scores_the_model_alone(trained):
    best = str(trained / "runs" / "r" / "best.pt")
    result = runner.invoke(app, ["evaluate", str(trained / "data.h5"), "--checkpoint", best, "--no-baselines"])
    assert result.exit_code == 0, result.output
    assert "model" in result.stdout and "persistence" not in result.stdout
    result = runner.invoke(
        app, ["evaluate", str(trained / "data.h5"), "--checkpoint", best, "--no-baselines", "--json"]
    )
    assert list(json.loads(result.stdout)["scores"]) == ["model"]


def test_evaluate_several_files_scores_them_as_one_set(trained, tmp_path):
    with h5py.File(trained / "data.h5") as file:
        sequences = file["frames"][()]
    write_h5(tmp_path / "part-a.h5", sequences[:10])
    write_h5(tmp_path / "part-b.h5", sequences[10:])
    best = str(trained / "runs" / "r" / "best.pt")

    def scores(*data):
        result = runner.invoke(app, ["evaluate", *data, "--checkpoint", best, "--json", "--device", "cpu"])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    whole, parts = scores(str(trained / "data.h5")), scores(str(tmp_path / "part-*.h5"))
    assert parts["windows"] == whole["windows"] == 16 * 3  # windows of 6 in 8 frames
    for method, values in whole["mean"].items():
        for metric, value in values.items():
            assert parts["mean"][method][metric] == pytest.approx(value, rel=1e-5, nan_ok=True), (method, metric)


def test_info_json(trained):
    result = runner.invoke(app, ["info", str(trained / "runs" / "r" / "best.pt"), "--json"])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["model_config"]["cell"] == "convgru"


def test_pipe_form_in_a_real_subprocess(trained, tmp_path):
    """`convgru predict --frames N < in.h5 > out.h5` with the newest runs/*/best.pt found on its own."""
    out = tmp_path / "piped.h5"
    with open(trained / "data.h5", "rb") as stdin, open(out, "wb") as stdout:
        done = subprocess.run(
            [*convgru_command(), "predict", "--frames", "4"],
            stdin=stdin,
            stdout=stdout,
            stderr=subprocess.PIPE,
            cwd=trained,
            text=False,
            timeout=300,
        )
    assert done.returncode == 0, done.stderr.decode()
    assert b"best.pt" in done.stderr
    with h5py.File(out) as file:
        assert file["forecast"].shape == (16, 4, 32, 32)
    scored = subprocess.run(
        [*convgru_command(), "evaluate", "--json"],
        stdin=open(trained / "data.h5", "rb"),
        capture_output=True,
        cwd=trained,
        timeout=300,
    )
    assert scored.returncode == 0, scored.stderr.decode()
    assert json.loads(scored.stdout)["lead_times"] == [1, 2, 3]


def test_python_dash_m_entry_point():
    done = subprocess.run([sys.executable, "-m", "convgru_cli", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("convgru ")


def _bad_inputs(tmp_path, trained):
    text = tmp_path / "text.h5"
    text.write_text("not hdf5")
    short = write_h5(tmp_path / "short.h5", np.zeros((4, 4, 32, 32), dtype=np.uint8))
    flat = write_h5(tmp_path / "flat.h5", np.zeros((4, 32), dtype=np.uint8))
    best = str(trained / "runs" / "r" / "best.pt")
    data = str(trained / "data.h5")
    existing = tmp_path / "exists.h5"
    existing.write_bytes(b"")
    cases = [
        (["train", str(tmp_path / "missing.h5")], "missing.h5: no such file"),
        (["train", str(tmp_path)], "is a directory"),
        (["train", str(text)], "not a readable HDF5 file"),
        (["train", data, "--dataset", "nope"], "no dataset 'nope'"),
        (["train", flat], "not a frame sequence"),
        (["train", short, *TRAIN], "fewer than the 6 needed"),
        (["train", short, *TRAIN], "give --layout if NTHW is not how the data is stored"),
        (["train", data, "--device", "tpu"], "--device tpu"),
        (["train", data, "--loss", "l3"], "--loss l3"),
        (["train", data, "--arch", "big"], "--arch"),
        (["predict", data, "--frames", "0", "--checkpoint", best, "-o", str(tmp_path / "o.h5")], "--frames 0"),
        (["predict", data, "--checkpoint", best, "-o", str(existing)], "already exists"),
        (["predict", data, "--checkpoint", str(text), "-o", str(tmp_path / "o.h5")], "checkpoint"),
        (["predict", short, "--checkpoint", best, "-o", str(tmp_path / "o.h5"), "--start", "3"], "cannot take"),
        (["evaluate", short, "--checkpoint", best], "fewer than the 6 needed"),
        (["evaluate", data, "--checkpoint", best, "--thresholds", "a,b"], "--thresholds"),
        (["evaluate", data, "--checkpoint", best, "--memory-budget", "lots"], "--memory-budget lots: expected a size"),
        (
            [
                "predict",
                data,
                "--checkpoint",
                best,
                "-o",
                str(tmp_path / "o.h5"),
                "--frames",
                "40",
                "--memory-budget",
                "1MB",
            ],
            "too small",
        ),
    ]
    if not _has_cuda():
        cases.append((["train", data, "--device", "cuda"], "CUDA is not available"))
    return cases


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_bad_input_gives_one_line_and_exit_2(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a row that wrongly succeeded would write runs/ here, not in the checkout
    for arguments, message in _bad_inputs(tmp_path, trained):
        result = runner.invoke(app, arguments)
        assert result.exit_code == 2, (arguments, result.output)
        assert message in result.stderr, (arguments, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.output
    assert not (tmp_path / "o.h5").exists()


def test_bad_input_in_a_subprocess_has_no_traceback_unless_debug(tmp_path):
    done = subprocess.run([*convgru_command(), "evaluate", str(tmp_path / "none.h5")], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip() == f"convgru: error: {tmp_path / 'none.h5'}: no such file"
    debug = subprocess.run(
        [*convgru_command(), "--debug", "evaluate", str(tmp_path / "none.h5")], capture_output=True, text=True
    )
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_predict_refuses_to_write_to_a_terminal(trained):
    """stdout is a terminal only under a pty; simulate with `script` where it exists."""
    if not shutil.which("script"):
        pytest.skip("no `script` to give the command a terminal")
    command = " ".join(
        [
            *convgru_command(),
            "predict",
            str(trained / "data.h5"),
            "--checkpoint",
            str(trained / "runs" / "r" / "best.pt"),
        ]
    )
    done = subprocess.run(["script", "-qec", command, "/dev/null"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "refusing to write HDF5 to a terminal" in done.stdout


@pytest.mark.skipif(shutil.which("c++") is None, reason="torch.compile on a CPU needs a C++ compiler")
def test_compiled_predict_and_evaluate_match_eager(trained, tmp_path):
    from torch._dynamo.utils import counters

    # predict: 16 sequences in batches of 6, so the last batch is smaller, and is padded rather than compiled
    # again: it compiles as many graphs as evaluate's 48 windows in full batches of 8.
    best = ["--checkpoint", str(trained / "runs" / "r" / "best.pt"), "--device", "cpu"]
    forecasts, scores, graphs = {}, {}, {}
    for flags in ([], ["--compile"]):
        counters.clear()
        out = tmp_path / f"forecast{len(flags)}.h5"
        result = runner.invoke(
            app,
            ["predict", str(trained / "data.h5"), "--frames", "4", "-o", str(out), "--batch-size", "6", *best, *flags],
        )
        assert result.exit_code == 0, result.output
        graphs["predict", len(flags)] = counters["stats"]["unique_graphs"]
        with h5py.File(out) as file:
            forecasts[len(flags)] = file["forecast"][()]
        counters.clear()
        evaluate = ["evaluate", str(trained / "data.h5"), "--no-baselines", "--json", "--batch-size", "8"]
        result = runner.invoke(app, [*evaluate, *best, *flags])
        assert result.exit_code == 0, result.output
        graphs["evaluate", len(flags)] = counters["stats"]["unique_graphs"]
        scores[len(flags)] = json.loads(result.stdout)["mean"]["model"]["mse"]
    assert graphs["predict", 0] == graphs["evaluate", 0] == 0
    assert graphs["predict", 1] == graphs["evaluate", 1] > 0
    np.testing.assert_allclose(forecasts[1], forecasts[0], rtol=2e-2, atol=2e-2 * np.abs(forecasts[0]).max())
    assert scores[1] == pytest.approx(scores[0], rel=1e-2)


def test_compile_with_a_forecast_file_is_a_usage_error(trained):
    data = str(trained / "data.h5")
    result = runner.invoke(app, ["evaluate", "--forecast", data, "--truth", data, "--compile"])
    assert result.exit_code == 2
    assert "--compile: --forecast scores a file" in result.stderr


def test_failed_compilation_in_predict_is_one_clear_error(trained, tmp_path):
    """In a subprocess with no C++ compiler: Inductor caches what it found, which would outlive a monkeypatch."""
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    best = str(trained / "runs" / "r" / "best.pt")
    out = tmp_path / "forecast.h5"
    command = ["predict", str(trained / "data.h5"), "-o", str(out), "--checkpoint", best, "--compile"]
    done = subprocess.run(convgru_command() + command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stderr
    assert re.fullmatch(
        r"convgru: error: --compile: torch\.compile failed \(.+\); run without --compile\n", done.stderr
    )
    assert not out.exists()


def test_a_small_memory_budget_gives_the_same_forecast_and_scores(trained, tmp_path):
    """At 2 MB the model runs on the 32² digits three sequences at a time, not all of a batch at once."""
    best = str(trained / "runs" / "r" / "best.pt")
    outputs = {}
    for budget in ([], ["--memory-budget", "2MB"]):
        out = tmp_path / f"forecast{len(budget)}.h5"
        result = runner.invoke(
            app, ["predict", str(trained / "data.h5"), "--frames", "3", "--checkpoint", best, "-o", str(out), *budget]
        )
        assert result.exit_code == 0, result.output
        with h5py.File(out) as file:
            forecast = file["forecast"][()]
        result = runner.invoke(app, ["evaluate", str(trained / "data.h5"), "--checkpoint", best, "--json", *budget])
        assert result.exit_code == 0, result.output
        outputs[len(budget)] = forecast, json.loads(result.stdout)["scores"]
    (forecast, scores), (budgeted, budgeted_scores) = outputs[0], outputs[2]
    np.testing.assert_allclose(budgeted, forecast, atol=1e-5)
    for method, values in scores.items():
        for metric, per_lead in values.items():
            assert budgeted_scores[method][metric] == pytest.approx(per_lead, abs=1e-6, nan_ok=True), (method, metric)


def test_help_shows_the_defaults_decided_by_the_data():
    """Rich reads "[...]" as markup: the help's bracketed defaults must be escaped to be shown at all."""
    text = " ".join(runner.invoke(app, ["train", "--help"], env={"COLUMNS": "400"}).output.split())
    assert "[default: 3 for rain rates" in text and "[default: on for rain rates" in text
    assert "run 50% of them backwards" in text and "[default: 10; with --max-time" in text
    text = " ".join(runner.invoke(app, ["predict", "--help"], env={"COLUMNS": "400"}).output.split())
    assert "[default: 1GB, or the smallest tile]" in text
