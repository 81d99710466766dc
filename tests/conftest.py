"""Small generated data for the tests: nothing here needs ../shared or a download."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from convgru_cli.synth import font_glyphs, moving_digits


def write_h5(path, array, name="frames", **attrs) -> str:
    with h5py.File(path, "w") as file:
        dataset = file.create_dataset(name, data=array)
        for key, value in attrs.items():
            dataset.attrs[key] = value
    return str(path)


@pytest.fixture(scope="session")
def digits_file(tmp_path_factory) -> str:
    """[24, 8, 32, 32] uint8 moving digits: enough for a model to learn something in seconds."""
    array = moving_digits(24, 8, font_glyphs(), size=32, digits=1, seed=0)
    return write_h5(tmp_path_factory.mktemp("data") / "digits.h5", array)


@pytest.fixture
def series_file(tmp_path) -> str:
    """A long [T, H, W] float series of a blob drifting east, in mm/h."""
    t, y, x = np.meshgrid(np.arange(40), np.arange(16), np.arange(16), indexing="ij")
    array = (10 * np.exp(-((y - 8) ** 2 + (x - (t % 16)) ** 2) / 8)).astype(np.float32)
    return write_h5(tmp_path / "series.h5", array, units="mm/h")
