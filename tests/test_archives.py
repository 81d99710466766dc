"""Radar archives as services publish them (one ODIM_H5 or CF netCDF file per time step): decoding against the
raw values, time order, gaps, refusals, odd grid sizes, import, georeferenced forecasts, pysteps importers.
The files are written here; the checks on the real archives of ../shared skip when it is absent."""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime, timedelta

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from convgru_cli import archives
from convgru_cli.cli import app
from convgru_cli.errors import UserError
from convgru_cli.forecast import _valid_times
from convgru_cli.georef import segments
from convgru_cli.sources import StackedFrames, open_frames
from convgru_cli.windowing import DataSpec, split_windows, windows

runner = CliRunner()
SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "radar", "archives")
START = datetime(2021, 7, 4, 15, 0, tzinfo=UTC)
TRAIN = ["--input-frames", "3", "--output-frames", "3", "--batch-size", "4", "--device", "cpu"]


def blob(step: int, size: tuple[int, int] = (20, 20)) -> np.ndarray:
    """A rain blob drifting east, in mm/h."""
    y, x = np.meshgrid(np.arange(size[0]), np.arange(size[1]), indexing="ij")
    return 10 * np.exp(-((y - size[0] / 2) ** 2 + (x - (step % size[1])) ** 2) / 8)


def write_odim(path, time: datetime, raw: np.ndarray, version: str = "2.0", **what) -> str:
    """An ODIM_H5 composite: ``what`` (quantity, gain, offset, nodata, undetect) at the dataset level (2.0) or
    the data level (2.4), a QIND quality field beside it, and RMI's kind of grid."""
    with h5py.File(path, "w") as file:
        file.attrs["Conventions"] = np.bytes_(f"ODIM_H5/V{version.replace('.', '_')}")
        file.create_group("what").attrs.update(
            {"date": np.bytes_(time.strftime("%Y%m%d")), "time": np.bytes_(time.strftime("%H%M%S"))}
        )
        where = file.create_group("where")
        where.attrs.update({"projdef": np.bytes_("+proj=lcc +lat_1=49.8 +lat_2=51.2 +lat_0=50.8 +lon_0=4.4 +units=m")})
        where.attrs.update({"xscale": 1000.0, "yscale": 1000.0, "UL_lat": 53.7, "UL_lon": -0.9})
        file.create_group("dataset1/where").attrs.update({"UL_x": 300000.0, "UL_y": 1000000.0})
        for n, (quantity, data) in enumerate([(what.pop("quantity", "RATE"), raw), ("QIND", np.ones_like(raw))], 1):
            file.create_dataset(f"dataset{n}/data1/data", data=data)
            level = f"dataset{n}/data1/what" if version >= "2.4" else f"dataset{n}/what"
            group = file.require_group(level)
            group.attrs["quantity"] = np.bytes_(quantity)
            if n == 1:
                group.attrs.update(what)
    return str(path)


def write_cf(path, time: datetime, raw: np.ndarray, name: str = "rain", **attrs) -> str:
    """A CF netCDF file (netCDF4 is HDF5): ``name`` on y/x dimension scales with a grid mapping, and a time
    variable in minutes since a reference."""
    with h5py.File(path, "w") as file:
        file.attrs["Conventions"] = np.bytes_("CF-1.6")
        field = file.create_dataset(name, data=raw)
        field.attrs.update({"units": np.bytes_("mm/h"), "grid_mapping": np.bytes_("projection"), **attrs})
        for axis, size in (("y", raw.shape[0]), ("x", raw.shape[1])):
            scale = file.create_dataset(axis, data=np.arange(size, dtype=np.float32) * 2000.0)
            scale.attrs["units"] = np.bytes_("m")
            scale.make_scale(axis)
            field.dims[0 if axis == "y" else 1].attach_scale(scale)
        projection = file.create_dataset("projection", data=np.int32(0))
        projection.attrs.update({"grid_mapping_name": np.bytes_("lambert_azimuthal_equal_area"), "proj4": "+proj=laea"})
        reference = datetime(2018, 6, 1, tzinfo=UTC)
        time_variable = file.create_dataset("time", data=[(time - reference).total_seconds() / 60])
        time_variable.attrs["units"] = np.bytes_("minutes since 2018-06-01 00:00:00")
    return str(path)


def odim_archive(folder, minutes: list[int], size=(20, 20)) -> str:
    """RATE frames at these minutes after START, as uint8 with gain 0.1: undetect 0, nodata 255 (a corner). The
    file names run backwards in time, so only the files' own times give the order."""
    os.makedirs(folder, exist_ok=True)
    for k, minute in enumerate(minutes):
        raw = np.clip(np.round(blob(k, size) / 0.1), 0, 250).astype(np.uint8)
        raw[:2, :2] = 255
        name = f"radar_{len(minutes) - k:03d}.h5"
        write_odim(os.path.join(folder, name), START + timedelta(minutes=minute), raw, gain=0.1, offset=0.0,
                   nodata=255.0, undetect=0.0)  # fmt: skip
    return str(folder)


# -- decoding


@pytest.mark.parametrize("version", ["2.0", "2.4"])
def test_odim_values_are_raw_times_gain_plus_offset_with_nodata_and_undetect(tmp_path, version):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (12, 10)).astype(np.uint8)
    write_odim(tmp_path / "a.h5", START, raw, version, quantity="DBZH", gain=0.5, offset=-32.0, nodata=255.0,
               undetect=0.0)  # fmt: skip
    source = open_frames([str(tmp_path / "a.h5")], None)
    assert isinstance(source, archives.Archive)
    assert (source.units, source.dataset, source.height, source.width) == ("dBZ", "DBZH", 12, 10)
    assert source.frames[0].field == "dataset1/data1/data"
    expected = raw * 0.5 - 32.0
    expected[raw == 0] = -32.0  # undetect: the no-echo floor
    expected[raw == 255] = np.nan  # nodata
    np.testing.assert_allclose(source.read(0, 0, 1)[0, 0], expected.astype(np.float32), rtol=0, atol=1e-6)
    grid = source.georeference
    assert grid.projection.startswith("+proj=lcc")
    assert grid.x[0] == 300500.0 and grid.y[0] == 999500.0 and len(grid.x) == 10  # pixel centres


def test_the_field_is_picked_by_quantity_and_quality_fields_are_left_aside(tmp_path):
    path = write_odim(tmp_path / "a.h5", START, np.ones((4, 4), np.float32), quantity="RATE")
    assert archives.Archive([path]).quantity == "RATE"  # QIND beside it is no candidate
    assert archives.Archive([path], "QIND").frames[0].field == "dataset2/data1/data"
    with h5py.File(path, "a") as file:
        file["dataset2/what"].attrs["quantity"] = np.bytes_("DBZH")
    with pytest.raises(UserError, match="cannot tell which field.*--dataset"):
        archives.Archive([path])
    assert archives.Archive([path], "DBZH").units == "dBZ"
    with pytest.raises(UserError, match="no field 'ACRR'"):
        archives.Archive([path], "ACRR")


def test_accumulations_are_read_as_rain_rates_over_their_period(tmp_path):
    """ACRR in mm over five minutes is 12 times that in mm/h, so the rain transform's 0.1 mm/h threshold means
    0.1 mm/h; each file by its own period (start to end), whatever the time step. Depths over a period some file
    does not give stay in mm."""
    raw = np.arange(12, dtype=np.uint16).reshape(3, 4) * 7
    paths = []
    for k, minutes in enumerate([5, 5, 15]):
        end = START + timedelta(minutes=5 * k)
        path = write_odim(tmp_path / f"{k}.h5", end, raw, quantity="ACRR", gain=0.01)
        with h5py.File(path, "a") as file:
            edges = {"start": end - timedelta(minutes=minutes), "end": end}
            for edge, moment in edges.items():
                file["dataset1/what"].attrs[f"{edge}date"] = np.bytes_(moment.strftime("%Y%m%d"))
                file["dataset1/what"].attrs[f"{edge}time"] = np.bytes_(moment.strftime("%H%M%S"))
        paths.append(path)
    source = open_frames([str(tmp_path)], None)
    assert (source.quantity, source.units, source.timestep_minutes) == ("ACRR", "mm/h", 5)
    frames = source.read(0, 0, 3)[:, 0]
    np.testing.assert_allclose(frames[0], raw * 0.01 * 12, rtol=1e-6)
    np.testing.assert_allclose(frames[2], raw * 0.01 * 4, rtol=1e-6)
    with h5py.File(paths[1], "a") as file:
        del file["dataset1/what"].attrs["enddate"]
    unsaid = archives.Archive(paths)
    assert unsaid.units == "mm"
    np.testing.assert_allclose(unsaid.read_frame(0), raw * 0.01, rtol=1e-6)


def test_cf_accumulations_are_read_as_rates_over_their_time_bounds(tmp_path):
    """CF's way of saying what a sum covers: the time variable's ``bounds``. Without them (NWC SAF's hourly sums,
    every 15 minutes) the depths stay in mm."""
    raw = np.arange(6, dtype=np.float32).reshape(2, 3)
    for k in range(2):
        path = write_cf(tmp_path / f"{k}.nc", START + timedelta(minutes=15 * k), raw, name="amount", units="mm")
        with h5py.File(path, "a") as file:
            file["time"].attrs["bounds"] = np.bytes_("time_bnds")
            end = float(file["time"][0])
            file.create_dataset("time_bnds", data=[[end - 60, end]])  # minutes: an hourly sum
    source = open_frames([str(tmp_path)], None)
    assert (source.units, source.timestep_minutes) == ("mm/h", 15)
    np.testing.assert_allclose(source.read(0, 1, 1)[0, 0], raw, rtol=1e-6)
    for k in range(2):
        with h5py.File(tmp_path / f"{k}.nc", "a") as file:
            del file["time"].attrs["bounds"]
    assert open_frames([str(tmp_path)], None).units == "mm"


def test_cf_values_use_scale_offset_fill_and_valid_range(tmp_path):
    raw = np.array([[0, 10, 500], [501, 65535, 250]], dtype=np.uint16)
    path = write_cf(tmp_path / "c.nc", START, raw, scale_factor=np.float32(0.1), add_offset=np.float32(1.0),
                    _FillValue=np.uint16(65535), valid_range=np.array([0, 500], np.uint16))  # fmt: skip
    source = open_frames([path], None)
    expected = np.where((raw == 65535) | (raw > 500), np.nan, raw * np.float64(np.float32(0.1)) + 1.0)
    np.testing.assert_allclose(source.read(0, 0, 1)[0, 0], expected.astype(np.float32), atol=1e-6)
    assert source.frames[0].time == START
    assert source.units == "mm/h" and source.georeference.grid_mapping["grid_mapping_name"].startswith("lambert")
    assert list(source.georeference.x) == [0.0, 2000.0, 4000.0]


@pytest.mark.parametrize("kind", ["odim", "cf", "imported"])
def test_a_region_read_is_the_crop_of_the_whole_frame(tmp_path, kind):
    minutes = [0, 5, 10]
    if kind == "cf":
        for k, minute in enumerate(minutes):
            raw = np.round(blob(k, (20, 24)) * 10).astype(np.uint16)
            raw[0, :3] = 65535
            write_cf(tmp_path / f"c{k}.nc", START + timedelta(minutes=minute), raw, scale_factor=np.float32(0.1),
                     _FillValue=np.uint16(65535))  # fmt: skip
        source = open_frames([str(tmp_path / "*.nc")], None)
    else:
        source = open_frames([odim_archive(tmp_path / "odim", minutes, (20, 24))], None)
        if kind == "imported":
            assert runner.invoke(app, ["data", "import", str(tmp_path / "odim"), str(tmp_path / "s.h5")]).exit_code == 0
            source = open_frames([str(tmp_path / "s.h5")], None)
    region = (slice(0, 9), slice(1, 20))  # holding no-data pixels of every kind of file
    cut = source.read(0, 0, 3, region)
    np.testing.assert_array_equal(cut, source.read(0, 0, 3)[:, :, 0:9, 1:20])
    assert cut.shape == (3, 1, 9, 19) and np.isnan(cut).any()


def test_cf_time_units():
    file = h5py.File("t.h5", "w", driver="core", backing_store=False)
    variable = file.create_dataset("time", data=[1.5])
    variable.attrs["units"] = "hours since 2020-01-01T00:00:00Z"
    assert archives.cf_time(variable, "t.h5") == datetime(2020, 1, 1, 1, 30, tzinfo=UTC)
    variable.attrs["units"] = "fortnights since 2020-01-01"
    with pytest.raises(UserError, match="fortnights"):
        archives.cf_time(variable, "t.h5")


# -- times, gaps and refusals


def test_files_are_ordered_by_their_own_time_and_gaps_split_the_series(tmp_path):
    minutes = [0, 5, 10, 15, 20, 35, 40, 45, 50, 55, 60, 65]  # two steps missing after 20
    source = open_frames([odim_archive(tmp_path / "a", minutes)], None)
    assert source.timestep_minutes == 5 and source.segments == [(0, 5), (5, 7)]
    assert [source.steps_of(n) for n in range(source.sequences)] == [5, 7]
    assert source.times_of(1)[0] == START + timedelta(minutes=35)
    np.testing.assert_allclose(source.read(1, 0, 1)[0, 0], np.where(_corner(), np.nan, _decoded(5)), atol=1e-6)
    found = windows(source, 4, 1)
    assert found == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (1, 3)]  # none spans the gap
    train, val = split_windows(source, DataSpec(None, None, 2, 2, val_fraction=0.25))
    assert train and val and not set(train) & set(val)
    assert all(w[0] == 1 for w in val)  # held out from the end of the series


def _corner() -> np.ndarray:
    mask = np.zeros((20, 20), bool)
    mask[:2, :2] = True
    return mask


def _decoded(k: int) -> np.ndarray:
    return np.clip(np.round(blob(k) / 0.1), 0, 250).astype(np.uint8) * 0.1


def test_nan_policy_applies_to_the_archives_no_data(tmp_path):
    folder = odim_archive(tmp_path / "a", [0, 5])
    assert open_frames([folder], None, nan_policy="zero").read(0, 0, 2)[:, 0, 0, 0].tolist() == [0.0, 0.0]
    with pytest.raises(UserError, match="no-data pixels.*--nan-policy error"):
        open_frames([folder], None, nan_policy="error").read(0, 0, 1)


def test_segments_take_the_most_common_step():
    times = [START + timedelta(minutes=m) for m in (0, 10, 20, 25, 30, 35, 40)]
    step, runs = segments(times)
    assert step == timedelta(minutes=5) and runs == [(0, 1), (1, 1), (2, 5)]


def test_same_time_or_other_grid_is_refused_in_one_line_naming_both_files(tmp_path):
    folder = odim_archive(tmp_path / "a", [0, 5, 10])
    write_odim(tmp_path / "a" / "copy.h5", START + timedelta(minutes=5), np.zeros((20, 20), np.uint8))
    result = runner.invoke(app, ["data", "inspect", folder])
    assert result.exit_code == 2
    assert "copy.h5" in result.stderr and "radar_002.h5" in result.stderr and "both hold time" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    os.remove(tmp_path / "a" / "copy.h5")
    write_odim(tmp_path / "a" / "big.h5", START + timedelta(minutes=15), np.zeros((24, 20), np.uint8))
    result = runner.invoke(app, ["data", "inspect", folder])
    assert (
        result.exit_code == 2 and "big.h5: grid of 24x20" in result.stderr and "differs from that of" in result.stderr
    )


def test_a_file_of_no_known_format_in_an_archive_is_named(tmp_path):
    folder = odim_archive(tmp_path / "a", [0, 5])
    (tmp_path / "a" / "notes.txt").write_text("not radar")
    result = runner.invoke(app, ["data", "inspect", folder])
    assert result.exit_code == 2 and "notes.txt: neither ODIM_H5 nor CF netCDF" in result.stderr


def test_a_folder_without_radar_files_is_not_an_archive(tmp_path):
    (tmp_path / "notes.txt").write_text("not radar")
    result = runner.invoke(app, ["data", "inspect", str(tmp_path)])
    assert result.exit_code == 2 and "is a directory holding no ODIM_H5 or CF netCDF file" in result.stderr


def test_inspect_lists_the_gaps(tmp_path):
    folder = odim_archive(tmp_path / "a", [0, 5, 10, 30, 35])
    result = runner.invoke(app, ["data", "inspect", folder, "--input-frames", "1", "--output-frames", "1", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["archive"]["gaps"] == [{"after": "2021-07-04T15:10:00Z", "before": "2021-07-04T15:30:00Z"}]
    assert report["archive"]["timestep_minutes"] == 5 and report["datasets"][0]["windows"] == 3
    text = runner.invoke(app, ["data", "inspect", folder])
    assert "gap: no frame after 2021-07-04T15:10:00Z until 2021-07-04T15:30:00Z" in text.stdout


# -- import, training, forecasts


def test_import_writes_a_series_file_that_keeps_values_times_gaps_and_grid(tmp_path):
    folder = odim_archive(tmp_path / "a", [0, 5, 10, 15, 25, 30])
    out = tmp_path / "series.h5"
    result = runner.invoke(app, ["data", "import", folder, str(out)])
    assert result.exit_code == 0, result.output
    archive = open_frames([folder], None)
    with h5py.File(out) as file:
        assert file["frames"].shape == (6, 20, 20) and file["frames"].chunks == (1, 20, 20)
        assert file["frames"].compression == "gzip" and file.attrs["units"] == "mm/h"
        assert list(file["timestamps"].asstr()[:2]) == ["2021-07-04T15:00:00Z", "2021-07-04T15:05:00Z"]
        assert not file["mask"][0, 0, 0] and file["mask"][0, 5, 5]
        series = StackedFrames(file, "frames")
    assert series.segments == [(0, 4), (4, 2)] and series.timestep_minutes == 5
    np.testing.assert_array_equal(series.read(1, 0, 2), archive.read(1, 0, 2))
    assert series.georeference.projection == archive.georeference.projection
    np.testing.assert_array_equal(series.georeference.x, archive.georeference.x)
    again = runner.invoke(app, ["data", "import", folder, str(out)])
    assert again.exit_code == 2 and "--force" in again.stderr


@pytest.fixture(scope="module")
def trained_archive(tmp_path_factory):
    """A 20x20 archive (not a multiple of the model's 8) of 24 frames, and a model trained on it for 1 epoch."""
    root = tmp_path_factory.mktemp("archive")
    folder = odim_archive(root / "odim", [5 * k for k in range(24)])
    result = runner.invoke(app, ["train", folder, *TRAIN, "--epochs", "1", "--out", str(root / "run"), "--json"])
    assert result.exit_code == 0, result.output
    return root, folder, str(root / "run" / "best.pt")


def test_train_and_predict_pad_an_odd_grid_and_crop_it_back(trained_archive, tmp_path, caplog):
    root, folder, best = trained_archive
    out = tmp_path / "forecast.h5"
    result = runner.invoke(app, ["predict", folder, "--checkpoint", best, "--frames", "4", "-o", str(out)])
    assert result.exit_code == 0, result.output
    with h5py.File(out) as file:
        assert file["forecast"].shape == (4, 20, 20) and file["forecast"].attrs["layout"] == "THW"
        assert file.attrs["issue_time"] == "2021-07-04T16:55:00Z" and file.attrs["input_frames"] == "21..23"


def test_forecast_opens_in_xarray_with_valid_times_and_coordinates(trained_archive, tmp_path):
    xarray = pytest.importorskip("xarray")
    pytest.importorskip("h5netcdf")
    root, folder, best = trained_archive
    out = tmp_path / "forecast.h5"
    assert runner.invoke(app, ["predict", folder, "--checkpoint", best, "--frames", "3", "-o", str(out)]).exit_code == 0
    with xarray.open_dataset(out, engine="h5netcdf") as forecast:
        assert forecast["forecast"].dims == ("time", "y", "x")
        issue = np.datetime64("2021-07-04T16:55:00")
        expected = [issue + np.timedelta64(5 * lead, "m") for lead in (1, 2, 3)]
        assert list(forecast["time"].values) == [np.datetime64(t, "ns") for t in expected]
        assert forecast["x"].values[0] == 300500.0 and forecast["y"].values[-1] == 1000000.0 - 19500.0
        assert forecast["forecast"].attrs["grid_mapping"] == "crs"
        assert forecast["crs"].attrs["proj4_params"].startswith("+proj=lcc")


def test_predict_and_evaluate_an_imported_series_as_the_archive(trained_archive, tmp_path):
    root, folder, best = trained_archive
    series = tmp_path / "series.h5"
    assert runner.invoke(app, ["data", "import", folder, str(series)]).exit_code == 0
    outputs = []
    for data in (folder, str(series)):
        out = tmp_path / f"f{len(outputs)}.h5"
        result = runner.invoke(app, ["predict", data, "--checkpoint", best, "--frames", "2", "-o", str(out)])
        assert result.exit_code == 0, result.output
        with h5py.File(out) as file:
            outputs.append((file["forecast"][()], file["x"][()], file["time"][()]))
    for a, b in zip(*outputs, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    result = runner.invoke(app, ["evaluate", folder, "--checkpoint", best, "--json", "--no-baselines"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["windows"] == 19 and report["lead_minutes"] == [5.0, 10.0, 15.0]


def test_predict_takes_the_last_segment_and_refuses_inputs_across_a_gap(trained_archive, tmp_path):
    root, _, best = trained_archive
    folder = odim_archive(tmp_path / "gappy", [0, 5, 10, 15, 20, 40, 45, 50, 55])
    out = tmp_path / "f.h5"
    result = runner.invoke(app, ["predict", folder, "--checkpoint", best, "--frames", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    with h5py.File(out) as file:
        assert file.attrs["issue_time"] == "2021-07-04T15:55:00Z" and file.attrs["input_frames"] == "6..8"
    result = runner.invoke(app, ["predict", folder, "--checkpoint", best, "--start", "3", "-o", str(out), "--force"])
    assert result.exit_code == 2 and "gaps split the series" in result.stderr


def test_valid_times_are_issue_time_plus_lead_times_step():
    times = [START + timedelta(minutes=5 * k) for k in range(3)]
    assert _valid_times(times, 2, 2, 5.0) == [START + timedelta(minutes=15), START + timedelta(minutes=20)]
    assert _valid_times(None, 2, 2, 5.0) is None


# -- pysteps importers


def test_importer_reads_files_through_pysteps_get_method(tmp_path, monkeypatch):
    pysteps_io = pytest.importorskip("pysteps.io")
    calls = []

    def fake_importer(path, **kwargs):
        calls.append(path)
        values = np.load(path)
        return values, None, {"unit": "mm", "accutime": 10.0, "projection": "+proj=stere", "x1": 0.0,
                              "y2": 100.0, "xpixelsize": 10.0, "ypixelsize": 10.0, "yorigin": "upper"}  # fmt: skip

    monkeypatch.setattr(pysteps_io, "get_method", lambda name, kind: fake_importer)
    for minute in (10, 0, 5):
        np.save(tmp_path / f"RAD_{(START + timedelta(minutes=minute)):%Y%m%d%H%M}.npy", np.full((4, 6), minute, float))
    source = open_frames([str(tmp_path / "*.npy")], None, importer="fake")
    assert source.units == "mm/h" and source.timestep_minutes == 5 and (source.height, source.width) == (4, 6)
    assert source.dataset == "fake"  # the importer names what is read
    # in time order, and 10-minute accumulations (the importer's accutime, not the time step) as mm/h
    assert [float(source.read(0, k, 1).max()) for k in range(3)] == [0.0, 30.0, 60.0]
    assert source.georeference.x[0] == 5.0 and source.georeference.y[0] == 95.0


def test_importer_without_pysteps_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pysteps", None)
    monkeypatch.setitem(sys.modules, "pysteps.io", None)
    np.save(tmp_path / "RAD_202107041500.npy", np.zeros((4, 4)))
    result = runner.invoke(app, ["data", "inspect", str(tmp_path), "--importer", "knmi_hdf5"])
    assert result.exit_code == 2 and "--importer knmi_hdf5: needs pysteps" in result.stderr


def test_time_from_a_file_name():
    assert archives.time_from_name("RAD_NL25_RAP_5min_201008260005.h5") == datetime(2010, 8, 26, 0, 5, tzinfo=UTC)
    with pytest.raises(UserError, match="no time"):
        archives.time_from_name("radar.h5")


# -- the real archives (../shared), checked against our own decoding of the raw values


def _shared(name: str) -> str:
    folder = os.path.join(SHARED, name)
    if not os.path.isdir(folder):
        pytest.skip(f"{folder} is absent")
    return folder


def test_real_rmi_archive_is_its_float32_rate_in_time_order():
    folder = _shared("rmi-odim")
    source = open_frames([folder], None)
    assert (len(source.frames), source.height, source.width, source.units) == (39, 700, 700, "mm/h")
    assert source.timestep_minutes == 5 and source.sequences == 1
    with h5py.File(source.frames[7].path) as file:
        raw = file["dataset1/data1/data"][()]
        assert file["what"].attrs["time"].decode() == source.frames[7].time.strftime("%H%M%S")
    np.testing.assert_array_equal(source.read(0, 7, 1)[0, 0], raw)


def test_real_opera_archive_maps_nodata_to_nan_and_undetect_to_zero():
    folder = _shared("opera-odim")
    source = open_frames([folder], None)
    assert (source.quantity, source.height, source.width, source.timestep_minutes) == ("RATE", 2200, 1900, 15)
    with h5py.File(source.frames[3].path) as file:
        raw = file["dataset1/data1/data"][()]
    expected = np.where(raw == -9999000, np.nan, np.where(raw == -8888000, 0.0, raw * 1.0 + 0.0))
    np.testing.assert_array_equal(source.read(0, 3, 1)[0, 0], expected.astype(np.float32))


def test_real_saf_archive_decodes_crr_intensity():
    folder = _shared("saf-crr-netcdf")
    with pytest.raises(UserError, match="cannot tell which field"):
        open_frames([folder], None)  # crr_intensity and crr_accum both qualify
    source = open_frames([folder], "crr_intensity")
    assert source.timestep_minutes == 15 and source.frames[0].time == datetime(2018, 6, 1, 7, 0, tzinfo=UTC)
    with h5py.File(source.frames[2].path) as file:
        raw = file["crr_intensity"][()]
    expected = np.where((raw == 65535) | (raw > 500), np.nan, raw * np.float64(np.float32(0.1)))
    np.testing.assert_allclose(source.read(0, 2, 1)[0, 0], expected.astype(np.float32), atol=1e-6)


def test_real_knmi_archive_through_the_pysteps_importer():
    folder = _shared("knmi-hdf5")
    pytest.importorskip("pysteps")
    source = open_frames([folder], None, importer="knmi_hdf5")
    assert (len(source.frames), source.height, source.width, source.timestep_minutes) == (92, 765, 700, 5)
    with h5py.File(source.frames[40].path) as file:
        raw = file["image1/image_data"][()]
    expected = np.where(raw == 65535, np.nan, raw * 0.01 * 12)  # mm per 5 minutes, read as mm/h
    assert source.units == "mm/h"
    np.testing.assert_allclose(source.read(0, 40, 1)[0, 0], expected, atol=1e-5)
