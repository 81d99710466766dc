"""Baselines, scoring any model's forecast file, CSV and pictures."""

import importlib.util
import weakref

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from convgru_cli import baselines, evaluate, pictures, transforms
from convgru_cli.cli import app
from convgru_cli.motion import motion_field
from tests.conftest import write_h5

runner = CliRunner()


def _translating(steps=8, size=48, speed=(2, 3)) -> torch.Tensor:
    """[1, T, 1, H, W] smooth blobs moving ``speed`` pixels per step, no wrap-around within the frame."""
    t, y, x = torch.meshgrid(torch.arange(steps), torch.arange(size), torch.arange(size), indexing="ij")
    field = torch.zeros(steps, size, size)
    for cy, cx in ((12, 8), (20, 22)):
        field += torch.exp(-((y - cy - speed[0] * t) ** 2 + (x - cx - speed[1] * t) ** 2) / 12)
    return (10 * field)[None, :, None]


def test_persistence_holds_the_last_frame():
    inputs = torch.arange(2 * 3 * 4, dtype=torch.float32).view(1, 3, 2, 2, 2)[:, :, :1]
    held = baselines.persistence(inputs, 4)
    assert held.shape == (1, 4, 1, 2, 2) and torch.equal(held[0, 3], inputs[0, -1])


def test_motion_field_finds_a_known_shift():
    motion = motion_field(_translating()[:, :4])
    centre = motion[0, :, 12:36, 12:36]
    assert centre[0].median().item() == pytest.approx(2, abs=0.3)
    assert centre[1].median().item() == pytest.approx(3, abs=0.3)


def test_motion_field_keeps_empty_regions_still():
    frames = torch.zeros(1, 4, 1, 48, 48)
    frames[:, :, :, 2:8, 2:8] = 1  # a still square in one corner, nothing else
    motion = motion_field(frames)
    assert motion.abs().max().item() == 0  # not the first shift tried, wherever every shift costs the same


def test_optical_flow_beats_persistence_on_a_translating_field():
    sequence = _translating()
    inputs, truth = sequence[:, :4], sequence[:, 4:]
    flow_error = (baselines.optical_flow(inputs, 4) - truth).square().mean()
    persistence_error = (baselines.persistence(inputs, 4) - truth).square().mean()
    assert flow_error < 0.25 * persistence_error


def test_colours_by_units():
    rain = pictures.colourise(np.array([[0.0, 0.3, 40.0]]), "mm/h", 0, 40)
    assert tuple(rain[0, 0]) == (255, 255, 255) and len({tuple(c) for c in rain[0]}) == 3
    grey = pictures.colourise(np.array([[0.0, 0.5, 1.0]]), "", 0, 1)
    assert grey[0, :, 0].tolist() == [0, 127, 255] and (grey[..., 0] == grey[..., 2]).all()


def test_picture_has_the_expected_size_and_content():
    frames = _translating(steps=7, size=32)[0, :, 0].numpy()
    strip, loop = pictures.render(frames[:3], frames[3:], frames[3:], "mm/h", minutes=5)
    scale = 192 // 32
    scale_bar = pictures.legend("mm/h", 0, 1)
    assert strip.height == 3 * (32 * scale + pictures.LABEL_HEIGHT + 4) + scale_bar.height + 4
    assert len(loop) == 4 and loop[0].width == 3 * 32 * scale + 2 * 2
    colours = len(np.unique(np.asarray(strip).reshape(-1, 3), axis=0))
    assert colours > 5  # white background, black labels and several rain colours


def test_pictures_carry_a_colour_scale_with_units_even_where_it_is_dry():
    dry = np.zeros((3, 32, 32), dtype=np.float32)
    strip, loop = pictures.render(dry, dry, dry, "mm/h", minutes=5)
    for image in (strip, loop[0]):
        colours = {tuple(c) for c in np.asarray(image).reshape(-1, 3).tolist()}
        assert set(pictures.RADAR_COLOURS) <= colours  # every level of the palette, in the legend
    grey = np.asarray(pictures.legend("", 0, 255))
    assert len({tuple(c) for c in grey.reshape(-1, 3).tolist()}) > 200  # a ramp, not two colours


def test_predict_pictures_show_valid_times_the_source_and_the_lead_in_minutes(model_run, tmp_path, monkeypatch):
    workdir, _, best = model_run
    series = write_h5(
        tmp_path / "s.h5", (5 * np.random.default_rng(0).random((20, 32, 32))).astype(np.float32), units="mm/h"
    )
    with h5py.File(series, "a") as file:
        file["timestamps"] = [f"2010-08-26T07:{5 * k:02d}:00Z".encode() for k in range(12)] + [
            f"2010-08-26T08:{5 * k:02d}:00Z".encode() for k in range(8)
        ]
    drawn = {}

    def render(*args):
        drawn["args"] = args
        return real_render(*args)

    real_render = pictures.render
    monkeypatch.setattr(pictures, "render", render)
    arguments = [
        "predict",
        series,
        "--checkpoint",
        best,
        "--start",
        "12",
        "--frames",
        "6",
        "--png",
        str(tmp_path / "f.png"),
    ]
    result = runner.invoke(app, [*arguments, "-o", str(tmp_path / "f.h5")])
    assert result.exit_code == 0, result.output
    _, _, _, units, minutes, times, title = drawn["args"]
    assert (units, minutes) == ("mm/h", 5.0)
    assert [f"{t:%H:%M}" for t in times] == ["08:00", "08:05", "08:10", "08:15"] + [
        "08:20",
        "08:25",
        "08:30",
        "08:35",
        "08:40",
        "08:45",  # the last two past the data's end
    ]
    assert title == f"{series}:frames, sequence 0, input frames 12..15"
    assert pictures._frame_label("forecast", 2, minutes, times[5]) == "forecast 08:25 (+10 min)"
    assert pictures._frame_label("forecast", 2, 0, None) == "forecast +2"


def test_score_plots_name_units_and_minutes_where_known():
    scores = {"model": {"mse": [1.0, 2.0], "mae": [0.5, 0.7], "csi@2": [0.6, 0.4]}}
    report = {"scores": scores, "lead_times": [1, 2], "lead_minutes": None, "units": ""}
    plain = np.asarray(pictures.plot_scores(report))
    for changed in ({"lead_minutes": [5.0, 10.0]}, {"units": "mm/h"}):
        assert (np.asarray(pictures.plot_scores({**report, **changed})) != plain).any(), changed
    assert [pictures._score_unit(m, "mm/h") for m in ("mse", "mae", "ssim", "csi@2")] == [
        "(mm/h)^2",
        "mm/h",
        "",
        "mm/h",
    ]


@pytest.fixture(scope="module")
def model_run(tmp_path_factory):
    from convgru_cli.synth import font_glyphs, moving_digits

    workdir = tmp_path_factory.mktemp("verify")
    data = write_h5(workdir / "d.h5", moving_digits(16, 8, font_glyphs(), size=32, digits=1, seed=9))
    arguments = [
        "train",
        data,
        "--input-frames",
        "4",
        "--output-frames",
        "4",
        "--batch-size",
        "4",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--out",
        str(workdir / "run"),
    ]
    assert runner.invoke(app, arguments).exit_code == 0
    return workdir, data, str(workdir / "run" / "best.pt")


def test_predict_draws_png_and_gif(model_run, tmp_path):
    workdir, data, best = model_run
    png, gif = tmp_path / "f.png", tmp_path / "f.gif"
    result = runner.invoke(
        app,
        [
            "predict",
            data,
            "--checkpoint",
            best,
            "--frames",
            "4",
            "--start",
            "0",
            "-o",
            str(tmp_path / "f.h5"),
            "--png",
            str(png),
            "--gif",
            str(gif),
        ],
    )
    assert result.exit_code == 0, result.output
    with Image.open(png) as image:
        assert image.size[0] >= 4 * 32 and len(np.unique(np.asarray(image.convert("L")))) > 10
    with Image.open(gif) as animation:
        assert animation.n_frames == 4


def test_scoring_a_forecast_file_from_any_model(model_run, tmp_path):
    _, data, best = model_run
    forecast = tmp_path / "f.h5"
    assert (
        runner.invoke(
            app, ["predict", data, "--checkpoint", best, "--frames", "4", "--start", "0", "-o", str(forecast)]
        ).exit_code
        == 0
    )
    own = runner.invoke(app, ["evaluate", "--forecast", str(forecast), "--truth", data, "--json"])
    assert own.exit_code == 0, own.output
    import json

    report = json.loads(own.stdout)
    assert report["truth_start"] == 4 and set(report["scores"]) == {"forecast", *baselines.METHODS}
    direct = json.loads(
        runner.invoke(app, ["evaluate", data, "--checkpoint", best, "--json", "--precision", "fp32"]).stdout
    )
    # The same windows (one per sequence, frames 0..7): the file's scores equal evaluate's own model scores.
    assert report["scores"]["forecast"]["mse"] == pytest.approx(direct["scores"]["model"]["mse"], rel=2e-2)
    # A perfect forecast scores perfectly: the truth itself, written as a forecast file.
    with h5py.File(data) as file:
        future = file["frames"][:, 4:8].astype(np.float32)
    with h5py.File(tmp_path / "perfect.h5", "w") as file:
        file.create_dataset("forecast", data=future).attrs["layout"] = "NTHW"
    perfect = runner.invoke(
        app,
        [
            "evaluate",
            "--forecast",
            str(tmp_path / "perfect.h5"),
            "--truth",
            data,
            "--truth-start",
            "4",
            "--json",
            "--csv",
            str(tmp_path / "s.csv"),
            "--plot",
            str(tmp_path / "s.png"),
        ],
    )
    assert perfect.exit_code == 0, perfect.output
    scores = json.loads(perfect.stdout)["scores"]["forecast"]
    assert scores["mse"] == [0.0] * 4 and scores["ssim"] == pytest.approx([1.0] * 4)
    rows = (tmp_path / "s.csv").read_text().splitlines()
    assert rows[0] == "method,metric,lead_time,value" and "forecast,mse,1,0.0" in rows
    with Image.open(tmp_path / "s.png") as plot:
        assert plot.size[0] >= 600
    mismatch = runner.invoke(app, ["evaluate", "--forecast", str(forecast), "--truth", data, "--truth-start", "6"])
    assert mismatch.exit_code == 2 and "--truth-start" in mismatch.stderr


def test_a_forecast_file_is_scored_on_the_value_range_of_the_whole_truth_file(tmp_path):
    """PSNR's peak comes from frames spread over every sequence, not the first sequence alone."""
    rng = np.random.default_rng(0)
    truth = rng.uniform(0, 1, (4, 6, 16, 16)).astype(np.float32)
    truth[1:, :, 0, 0], truth[1:, :, 0, 1] = 0.0, 10.0
    write_h5(tmp_path / "truth.h5", truth)
    with h5py.File(tmp_path / "f.h5", "w") as file:
        file.create_dataset("forecast", data=truth[:, 2:4] + 1).attrs["layout"] = "NTHW"  # MSE 1 everywhere
    report = evaluate.evaluate_forecasts(str(tmp_path / "f.h5"), str(tmp_path / "truth.h5"), truth_start=2)
    assert report["scores"]["forecast"]["psnr"] == pytest.approx([20.0, 20.0], abs=1e-4)  # 10 log10(10² / 1)


def test_pysteps_baseline_is_listed_exactly_where_pysteps_is_installed():
    assert ("pysteps" in baselines.METHODS) == (importlib.util.find_spec("pysteps") is not None)


@pytest.mark.skipif(importlib.util.find_spec("pysteps") is None, reason="the optional extra convgru[pysteps] is absent")
def test_pysteps_extrapolation_follows_a_translating_field(capsys):
    sequence = _translating(size=64)
    inputs, truth = sequence[:, :4], sequence[:, 4:]
    forecast = baselines.get_method("pysteps").forecast(inputs, 4)
    assert forecast.shape == truth.shape and torch.isfinite(forecast).all()
    pysteps_error = (forecast - truth).square().mean()
    assert pysteps_error < 0.5 * (baselines.persistence(inputs, 4) - truth).square().mean()
    assert capsys.readouterr().out == ""  # nothing on stdout, which --json keeps for its document


@pytest.mark.skipif(importlib.util.find_spec("pysteps") is None, reason="the optional extra convgru[pysteps] is absent")
def test_pysteps_motion_of_rain_rates_is_estimated_in_dbr(monkeypatch):
    """pysteps' habit: Lucas–Kanade on dBR (0.1 mm/h threshold, −15 dBR below), the raw rates extrapolated."""
    from pysteps import motion

    estimate, seen = motion.get_method("LK"), []

    def recording(fields, **options):
        seen.append(fields.copy())
        return estimate(fields, **options)

    monkeypatch.setattr(motion, "get_method", lambda name: recording)
    rates = _translating(size=64)[:, :4]
    baselines.get_method("pysteps").forecast(rates, 2, "mm/h")
    raw = rates[0, 1:, 0].double().numpy()
    np.testing.assert_allclose(seen[0], np.where(raw >= 0.1, 10 * np.log10(np.maximum(raw, 0.1)), -15.0))


@pytest.mark.skipif(importlib.util.find_spec("pysteps") is None, reason="the optional extra convgru[pysteps] is absent")
@pytest.mark.parametrize("chunk_pixels", [baselines.PYSTEPS_CHUNK_PIXELS, 64])
def test_pysteps_baseline_lead_by_lead_equals_one_pysteps_call(capsys, monkeypatch, chunk_pixels):
    """One lead time per call, continued from the last displacement, is pysteps' own nowcast of all lead times;
    and interpolating the motion vectors in many chunks (64 of 8x8 pixels here) changes nothing."""
    from pysteps import motion, nowcasts

    monkeypatch.setattr(baselines, "PYSTEPS_CHUNK_PIXELS", chunk_pixels)
    rates = _translating(size=64)[:, :4] * 3
    forecast = baselines.get_method("pysteps").forecast(rates, 5, "mm/h")
    recent = rates[0, -3:, 0].double()
    velocity = motion.get_method("LK")(transforms.forward(transforms.resolve("auto", "mm/h"), recent).numpy())
    last = recent[-1].numpy()
    reference = np.nan_to_num(nowcasts.get_method("extrapolation")(last, velocity, 5), nan=last.min())
    np.testing.assert_allclose(forecast[0, :, 0].numpy(), reference, atol=1e-4)


def test_each_forecast_is_freed_once_scored(tmp_path, monkeypatch):
    """While the next method forecasts and is scored, nothing holds the forecasts already scored (at 4400x3800 a
    batch's forecast held on to by the batch stream was 0.8 GB of an 11 GB peak)."""
    rng = np.random.default_rng(0)
    truth = rng.uniform(0, 5, (3, 8, 16, 16)).astype(np.float32)
    write_h5(tmp_path / "truth.h5", truth, units="mm/h")
    with h5py.File(tmp_path / "f.h5", "w") as file:
        file.create_dataset("forecast", data=truth[:, 4:] + 1).attrs["layout"] = "NTHW"
    scored, still_held = [], []
    update = evaluate.Scores.update

    def recording(self, prediction, observed, valid=None):
        still_held.extend(ref() is not None for ref in scored)
        scored.append(weakref.ref(prediction))
        update(self, prediction, observed, valid)

    monkeypatch.setattr(evaluate.Scores, "update", recording)
    evaluate.evaluate_forecasts(str(tmp_path / "f.h5"), str(tmp_path / "truth.h5"), truth_start=4, batch_size=2)
    assert len(scored) == 2 * (1 + len(baselines.usable(4))) and not any(still_held)
