import json

import h5py
import numpy as np
import pytest
import torch

from convgru_cli import hdf5, normalisation, sources, windowing
from convgru_cli.errors import UserError
from convgru_cli.inspection import inspect_file
from convgru_cli.synth import font_glyphs, moving_digits
from tests.conftest import write_h5


def _frames(path, layout=None, cache=None, dataset=None):
    with hdf5.open_hdf5(path) as file:
        return sources.StackedFrames(file, hdf5.pick_dataset(file, dataset), layout, cache=cache)


# Each stored layout must yield the same [T, C, H, W] windows as the canonical array.
CANONICAL = np.arange(3 * 6 * 2 * 4 * 5, dtype=np.float32).reshape(3, 6, 2, 4, 5)  # N T C H W


@pytest.mark.parametrize(
    ("layout", "stored"),
    [
        ("NTCHW", CANONICAL),
        ("NTHW", CANONICAL[:, :, 0]),
        ("TCHW", CANONICAL[0]),
        ("THW", CANONICAL[0, :, 0]),
        ("NHWT", CANONICAL[:, :, 0].transpose(0, 2, 3, 1)),
        ("TNHW", CANONICAL[:, :, 0].transpose(1, 0, 2, 3)),
    ],
)
@pytest.mark.parametrize("cache", [True, False])
def test_layouts_read_as_canonical_windows(tmp_path, layout, stored, cache):
    path = write_h5(tmp_path / "d.h5", stored)
    frames = _frames(path, layout, cache)
    expected = CANONICAL if "C" in layout else CANONICAL[:, :, :1]
    if "N" not in layout:
        expected = expected[:1]
    assert frames.sequences == expected.shape[0]
    window = frames.read(expected.shape[0] - 1, 2, 3)
    np.testing.assert_array_equal(window, expected[-1, 2:5])


def test_auto_layout_by_rank(tmp_path):
    assert _frames(write_h5(tmp_path / "a.h5", np.zeros((2, 5, 4, 4)))).layout == "NTHW"
    assert _frames(write_h5(tmp_path / "b.h5", np.zeros((5, 4, 4)))).layout == "THW"
    assert _frames(write_h5(tmp_path / "c.h5", np.zeros((2, 5, 1, 4, 4)))).layout == "NTCHW"


def test_uint8_stays_uint8_until_the_batch(digits_file):
    frames = _frames(digits_file)
    item = windowing.WindowDataset(frames, windowing.windows(frames, 6, 1), 6)[0]
    assert item.dtype == torch.uint8 and item.shape == (6, 1, 32, 32)


def test_series_split_shares_no_frame(series_file):
    frames = _frames(series_file)
    spec = windowing.DataSpec("frames", "THW", 4, 4, stride=1, val_fraction=0.25)
    train, val = windowing.split_windows(frames, spec)
    train_frames = {s + k for _, s in train for k in range(spec.window)}
    val_frames = {s + k for _, s in val for k in range(spec.window)}
    assert train and val and not train_frames & val_frames
    # a gap of one window between the blocks, and nothing more is given up
    assert min(val_frames) - max(train_frames) - 1 == spec.window
    assert max(val_frames) == frames.steps - 1 and min(train_frames) == 0


def test_sequence_split_holds_out_whole_sequences(digits_file):
    frames = _frames(digits_file)
    train, val = windowing.split_windows(
        frames, windowing.DataSpec("frames", "NTHW", 3, 3, stride=1, val_fraction=0.25)
    )
    assert {n for n, _ in train}.isdisjoint({n for n, _ in val})
    assert len({n for n, _ in val}) == 6


def test_normalisation_from_training_windows(tmp_path):
    array = np.random.default_rng(0).normal(5.0, 2.0, size=(20, 6, 8, 8)).astype(np.float32)
    frames = _frames(write_h5(tmp_path / "n.h5", array))
    train, _ = windowing.split_windows(frames, windowing.DataSpec("frames", "NTHW", 3, 3, val_fraction=0.5))
    norm = normalisation.compute_normalisation(frames, train, 6)
    assert norm.offset[0] == pytest.approx(array[:10].mean(), rel=1e-4)
    assert norm.scale[0] == pytest.approx(array[:10].std(), rel=1e-3)
    batch = torch.from_numpy(array[:2]).unsqueeze(2)
    normalised, valid = norm.normalise(batch)
    assert valid.all()
    torch.testing.assert_close(norm.denormalise(normalised), batch)


def test_statistics_read_in_bands_of_rows_equal_those_of_whole_frames(tmp_path, monkeypatch):
    array = np.random.default_rng(1).gamma(0.5, 4.0, size=(3, 6, 2, 10, 8)).astype(np.float32)
    array[0, 1, 0, 3:5, 2:6] = np.nan
    with hdf5.open_hdf5(write_h5(tmp_path / "b.h5", array, layout="NTCHW")) as file:
        frames = sources.StackedFrames(file, "frames")
    every = windowing.windows(frames, 4, 1)
    whole = normalisation.compute_normalisation(frames, every, 4, transform="db")
    monkeypatch.setattr(normalisation, "BAND_PIXELS", 3 * 8 * 2)  # bands of 3 rows: 4 bands, the last of 1
    assert [band.stop - band.start for band in normalisation.row_bands(frames)] == [3, 3, 3, 1]
    banded = normalisation.compute_normalisation(frames, every, 4, transform="db")
    assert banded.offset == pytest.approx(whole.offset) and banded.scale == pytest.approx(whole.scale)
    for name in ("data_min", "data_max", "nan_fraction"):
        assert getattr(banded, name) == getattr(whole, name)
    torch.testing.assert_close(banded.mean_frame, whole.mean_frame)
    assert normalisation.value_range(frames) == (float(np.nanmin(array)), float(np.nanmax(array)))


def test_nan_is_masked_not_propagated(tmp_path):
    array = np.ones((4, 6, 8, 8), dtype=np.float32)
    array[0, 0, 0, 0] = np.nan
    frames = _frames(write_h5(tmp_path / "nan.h5", array))
    norm = normalisation.compute_normalisation(frames, windowing.windows(frames, 6, 1), 6)
    normalised, valid = norm.normalise(torch.from_numpy(array).unsqueeze(2))
    assert not valid[0, 0, 0, 0, 0] and valid.sum() == array.size - 1
    assert torch.isfinite(normalised).all()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: str(p / "missing.h5"), "no such file"),
        (lambda p: str(p), "is a directory"),
        (lambda p: (p / "text.h5").write_text("hello") and str(p / "text.h5"), "not a readable HDF5 file"),
    ],
)
def test_bad_files_are_user_errors(tmp_path, make, message):
    with pytest.raises(UserError, match=message):
        hdf5.open_hdf5(make(tmp_path))


def test_dataset_problems_are_user_errors(tmp_path):
    path = write_h5(tmp_path / "x.h5", np.zeros((2, 5, 4, 4)))
    with h5py.File(path, "a") as file:
        file["other"] = np.zeros((3, 4, 4))
        file["flat"] = np.zeros(7)
    two = write_h5(tmp_path / "two.h5", np.zeros((2, 5, 4, 4)), name="radar")
    with h5py.File(two, "a") as file:
        file["other"] = np.zeros((3, 4, 4))
    with hdf5.open_hdf5(two) as file, pytest.raises(UserError, match="--dataset"):
        hdf5.pick_dataset(file, None)
    with hdf5.open_hdf5(path) as file:
        assert hdf5.pick_dataset(file, None) == "frames"  # by its name
        with pytest.raises(UserError, match="no dataset 'nope'"):
            hdf5.pick_dataset(file, "nope")
        with pytest.raises(UserError, match="not a frame sequence"):
            sources.StackedFrames(file, "flat")
        with pytest.raises(UserError, match="layout NTCHW has 5 axes"):
            sources.StackedFrames(file, "frames", "NTCHW")
    frames = _frames(path, dataset="frames")
    with pytest.raises(UserError, match="fewer than the 6 needed"):
        windowing.windows(frames, 6, 1)


def test_digits_move_inside_frames_barely_larger_than_a_digit():
    for size in (28, 29, 30, 31):
        sequences = moving_digits(4, 12, font_glyphs(), size=size, digits=1, seed=size)
        assert sequences.shape == (4, 12, size, size) and sequences.max() > 0


def test_a_file_name_with_brackets_is_that_file_not_a_pattern(tmp_path):
    named = tmp_path / "obs[1].h5"
    named.write_bytes(b"")
    assert sources.expand_paths([str(named)]) == [str(named)]
    assert sources.expand_paths([str(tmp_path / "obs*.h5")]) == [str(named)]
    with pytest.raises(UserError, match="matches no file"):
        sources.expand_paths([str(tmp_path / "radar-[0-9].h5")])


def test_inspect_reports_byte_string_attributes_as_text_and_checks_the_window(tmp_path):
    path = write_h5(tmp_path / "d.h5", np.zeros((2, 6, 8, 8), np.uint8))
    with h5py.File(path, "a") as file:
        file.attrs["names"] = np.array([b"reflectivity", b"mask"])
    report = inspect_file(path, 3, 2)
    assert json.loads(json.dumps(report))["attributes"]["names"] == ["reflectivity", "mask"]
    with pytest.raises(UserError, match="--stride 0"):
        inspect_file(path, 3, 2, stride=0)


def test_several_files_are_held_in_memory_only_if_all_fit_together(tmp_path, monkeypatch):
    files = [write_h5(tmp_path / f"d{i}.h5", np.zeros((4, 6, 8, 8), np.uint8)) for i in range(3)]  # 1,536 B each
    monkeypatch.setattr(sources, "CACHE_BYTES", 4000)
    assert sources.open_frames(files[:1], None).in_memory
    assert sources.open_frames(files[:2], None).in_memory
    assert not sources.open_frames(files, None).in_memory
    assert sources.open_frames(files, None, cache=True).in_memory
