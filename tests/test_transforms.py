"""Value transforms: round trips, the choice by units, and what checkpoints record."""

import numpy as np
import pytest
import torch

from convgru_cli import normalisation, transforms, windowing
from convgru_cli.errors import UserError
from convgru_cli.hdf5 import open_hdf5
from convgru_cli.sources import StackedFrames
from tests.conftest import write_h5


@pytest.mark.parametrize("name", list(transforms.TRANSFORMS))
def test_every_transform_round_trips_where_it_is_defined(name):
    values = {"none": [-3.0, 0.0, 2.5], "db": [0.0, 0.1, 0.5, 2.0, 84.4], "log": [0.0, 0.3, 50.0]}
    values["dbz"] = [-32.0, 5.5, 60.0]
    x = torch.tensor(values[name])
    torch.testing.assert_close(transforms.inverse(name, transforms.forward(name, x)), x, rtol=1e-5, atol=1e-6)


def test_db_is_pysteps_decibels_with_a_fixed_zero_value():
    x = torch.tensor([0.0, 0.05, 0.1, 1.0, 10.0, float("nan")])
    db = transforms.forward("db", x)
    assert db[:5].tolist() == pytest.approx([-15.0, -15.0, -10.0, 0.0, 10.0])
    assert torch.isnan(db[5])  # no data stays no data
    # below the 0.1 mm/h threshold is dry: drizzle the model draws between -15 and -10 dBR is no rain
    assert transforms.inverse("db", torch.tensor([-15.0, -12.0, -10.0])).tolist() == pytest.approx([0.0, 0.0, 0.1])


@pytest.mark.parametrize(
    ("units", "expected"), [("mm/h", "db"), ("mm h-1", "db"), ("mm", "db"), ("dBZ", "dbz"), ("", "none"), ("K", "none")]
)
def test_auto_picks_by_units(units, expected):
    assert transforms.resolve("auto", units) == expected
    assert transforms.resolve("log", units) == "log"


def test_unknown_transform_is_a_user_error():
    with pytest.raises(UserError, match="--transform"):
        transforms.resolve("sqrt", "mm/h")


def test_checkpoints_from_before_named_transforms_are_read_as_they_were_trained():
    spec = windowing.DataSpec.from_dict({"dataset": "frames", "layout": "THW", "log_transform": True})
    assert spec.transform == "log"
    assert (
        windowing.DataSpec.from_dict({"dataset": "frames", "layout": "THW", "log_transform": False}).transform == "none"
    )


def test_rain_statistics_live_in_db_and_no_data_is_left_out(tmp_path):
    rain = np.random.default_rng(0).gamma(0.5, 4.0, size=(12, 16, 16)).astype(np.float32)
    rain[:, 0, 0] = np.nan
    with open_hdf5(write_h5(tmp_path / "r.h5", rain)) as file:
        frames = StackedFrames(file, "frames")
        norm = normalisation.compute_normalisation(frames, windowing.windows(frames, 6, 6), 6, transform="db")
    valid = rain[np.isfinite(rain)]
    expected = np.where(valid >= 0.1, 10 * np.log10(np.maximum(valid, 0.1)), -15.0)
    assert norm.offset[0] == pytest.approx(expected.mean(), rel=1e-4)
    assert norm.scale[0] == pytest.approx(expected.std(), rel=1e-3)
