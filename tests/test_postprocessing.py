"""Probability matching: the forecast's order, the observation's values."""

import h5py
import numpy as np
import pytest
import torch

from convgru_cli import postprocessing
from convgru_cli.cli import app
from convgru_cli.errors import UserError
from tests.test_cli import runner


def _reference(forecast: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """Plain rank matching of one frame with no ties: the k-th smallest forecast pixel gets the k-th smallest
    observed value."""
    matched = np.empty_like(forecast)
    matched.flat[np.argsort(forecast, axis=None)] = np.sort(observed, axis=None)
    return matched


def test_each_frame_takes_the_observed_values_in_the_forecast_order():
    generator = torch.Generator().manual_seed(0)
    forecast = torch.rand(2, 3, 2, 9, 7, generator=generator) + 0.1
    observed = torch.rand(2, 2, 9, 7, generator=generator) * 20
    matched = postprocessing.match_cdf(forecast.clone(), observed)
    for b in range(2):
        for lead in range(3):
            for c in range(2):
                expected = _reference(forecast[b, lead, c].numpy(), observed[b, c].numpy())
                np.testing.assert_array_equal(matched[b, lead, c].numpy(), expected)


def test_dry_pixels_stay_dry_and_pixels_without_data_are_left_alone():
    forecast = torch.zeros(1, 1, 1, 4, 4)
    forecast[..., 0, :] = torch.tensor([1.0, 3.0, 2.0, 0.5])  # four wet pixels, twelve dry
    observed = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)  # fifteen wet, one dry
    observed[..., 3, 3] = float("nan")
    forecast[..., 3, 3] = 7.0
    matched = postprocessing.match_cdf(forecast.clone(), observed)[0, 0, 0]
    assert matched[0].tolist() == [12.0, 14.0, 13.0, 11.0]  # the heaviest observed values, in the forecast's order
    assert (matched[1:3] == 0).all() and (matched[3, :3] == 0).all()  # no rain scattered over tied dry pixels
    assert matched[3, 3] == 7.0


def test_auto_matches_models_trained_with_the_balanced_loss_only():
    assert postprocessing.resolve("auto", "balanced") == "cdf"
    assert postprocessing.resolve("auto", "mse+mae") == "none"
    assert postprocessing.resolve("none", "balanced") == "none"
    with pytest.raises(UserError, match="--matching"):
        postprocessing.resolve("quantile", "mse")


def test_a_balanced_model_forecasts_the_last_frames_values_unless_told_not_to(series_file, tmp_path):
    run = tmp_path / "r"
    train = ["train", series_file, "--input-frames", "3", "--output-frames", "3", "--batch-size", "2"]
    train += ["--epochs", "1", "--loss", "balanced", "--transform", "none", "--device", "cpu", "--val-fraction", "0"]
    assert runner.invoke(app, [*train, "--out", str(run)]).exit_code == 0
    with h5py.File(series_file) as file:
        last = np.sort(file["frames"][-4], axis=None)  # --start 34: inputs 34..36, the truth 37..39
    forecasts = {}
    for matching in ("auto", "none"):
        out = tmp_path / f"{matching}.h5"
        predict = ["predict", series_file, "--checkpoint", str(run / "last.pt"), "--start", "34", "--frames", "2"]
        result = runner.invoke(app, [*predict, "--matching", matching, "-o", str(out)])
        assert result.exit_code == 0, result.output
        with h5py.File(out) as file:
            forecasts[matching] = file["forecast"][()]  # a series: [T, H, W]
            assert file.attrs["matching"] == ("cdf" if matching == "auto" else "none")
    for lead in range(2):
        matched = np.sort(forecasts["auto"][lead], axis=None)
        wet = (matched > last[0]).sum()  # the forecast's pixels above its lowest value (a few tie there)
        assert wet > 200 and (matched[-wet:] == last[-wet:]).all() and (matched[:-wet] == last[0]).all()
    assert not np.isin(forecasts["none"], last).all()
    result = runner.invoke(app, ["evaluate", series_file, "--checkpoint", str(run / "last.pt"), "--matching", "x"])
    assert result.exit_code == 2 and "--matching x" in result.output
