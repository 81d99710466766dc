"""Radar archives as services publish them: one file per time step (ODIM_H5, CF netCDF, or any format a pysteps
importer reads), seen as one time series of physical values.

Each format has a small reader behind ``get_reader(name)`` (pysteps' ``get_method`` habit): ``describe`` reads
what a file holds without its pixels (time, field, units, grid), ``read`` decodes its one frame. ``Archive``
orders the files by their own times, finds the time step and the gaps, and reads frames lazily, one file per
frame, so a year of files is never in memory. A gap splits the series into segments, each a sequence of its own,
so that no window spans it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import h5py
import numpy as np

from convgru_cli.errors import UserError
from convgru_cli.georef import Georeference, as_utc, iso, segments
from convgru_cli.hdf5 import dataset_names, plain, text_attribute
from convgru_cli.sources import Region, apply_nan_policy, check_nan_policy
from convgru_cli.transforms import NO_ECHO_DBZ

log = logging.getLogger("convgru")

# ODIM quantity -> (units, value of "undetect": measured, nothing there)
ODIM_QUANTITIES = {
    "DBZH": ("dBZ", NO_ECHO_DBZ),
    "DBZV": ("dBZ", NO_ECHO_DBZ),
    "TH": ("dBZ", NO_ECHO_DBZ),
    "TV": ("dBZ", NO_ECHO_DBZ),
    "RATE": ("mm/h", 0.0),
    "ACRR": ("mm", 0.0),
}
TIME_UNITS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
# Units of a rain depth: an accumulation, read as the rain rate over its period (mm/h) where the files give it, as
# pysteps nowcasts do, so that the rain transform's threshold (0.1 mm/h) and the scores' mean the same on any archive.
DEPTH_UNITS = {"mm", "kg m-2"}


@dataclass
class Frame:
    """One file of an archive: everything but its pixels."""

    path: str
    time: datetime
    field: str  # where the frame is in the file: an HDF5 path, or the importer's name
    quantity: str
    units: str
    height: int
    width: int
    grid: Georeference
    accumulation_minutes: float | None = None  # the period a depth (mm) was gathered over, where the file says


# -- ODIM_H5


class OdimReader:
    """ODIM_H5 2.x: the field at /datasetN/dataN/data; its ``what`` attributes looked up at the data level first,
    then the dataset level, then the root (2.0 keeps gain and quantity per dataset, 2.4 per data)."""

    name = "odim"

    @staticmethod
    def recognises(file: h5py.File) -> bool:
        return text_attribute(file, "Conventions").startswith("ODIM_H5")

    def describe(self, file: h5py.File, path: str, wanted: str | None) -> Frame:
        fields = {name: self._what(file, name).get("quantity", "") for name in self._fields(file)}
        name = _choose(fields, wanted, path, known=ODIM_QUANTITIES)
        root = self._what(file, "")
        try:
            time = datetime.strptime(f"{root['date']}{root['time'][:6]}", "%Y%m%d%H%M%S").replace(tzinfo=UTC)
        except (KeyError, ValueError):
            raise UserError(f"{path}: no nominal time (root what/date and what/time) in this ODIM_H5 file") from None
        quantity = fields[name]
        units = ODIM_QUANTITIES.get(quantity, (quantity, None))[0]
        height, width = file[name].shape
        grid = self._grid(file, name, height, width)
        return Frame(path, time, name, quantity, units, height, width, grid, self._period(self._what(file, name)))

    def read(self, file: h5py.File, frame: Frame, region: Region | None = None) -> np.ndarray:
        """raw x gain + offset; ``nodata`` -> NaN, ``undetect`` -> the quantity's "nothing there" value. In
        place, in float64: a 2200x1900 composite costs one copy of itself, not five."""
        what = self._what(file, frame.field)
        raw = file[frame.field][region or ()]
        nodata = raw == what["nodata"] if "nodata" in what else None
        undetect = raw == what["undetect"] if "undetect" in what else None
        values = raw if raw.dtype == np.float64 else raw.astype(np.float64)
        values *= np.float64(what.get("gain", 1.0))
        values += np.float64(what.get("offset", 0.0))
        if undetect is not None:
            values[undetect] = ODIM_QUANTITIES.get(frame.quantity, (None, 0.0))[1]
        if nodata is not None:
            values[nodata] = np.nan
        return values.astype(np.float32)

    @staticmethod
    def _period(what: dict) -> float | None:
        """Minutes from ``startdate``/``starttime`` to ``enddate``/``endtime`` (an ACRR's accumulation), where
        both are given."""
        try:
            start, end = (
                datetime.strptime(f"{what[f'{edge}date']}{what[f'{edge}time'][:6]}", "%Y%m%d%H%M%S")
                for edge in ("start", "end")
            )
        except (KeyError, ValueError):
            return None
        return (end - start).total_seconds() / 60

    @staticmethod
    def _fields(file: h5py.File) -> list[str]:
        pattern = re.compile(r"dataset\d+/data\d+/data")
        return [name for name in dataset_names(file) if pattern.fullmatch(name) and file[name].ndim == 2]

    @staticmethod
    def _nearest(file: h5py.File, field: str, kind: str) -> dict:
        """The ``kind`` (what, where) attributes that apply to ``field``: root, then dataset, then data level,
        the nearest winning."""
        parts = field.split("/")[:-1]
        merged: dict = {}
        for depth in range(len(parts) + 1):
            group = "/".join(parts[:depth] + [kind])
            if group in file:
                merged.update({k: plain(v) for k, v in file[group].attrs.items()})
        return merged

    def _what(self, file: h5py.File, field: str) -> dict:
        return self._nearest(file, field, "what")

    def _grid(self, file: h5py.File, field: str, height: int, width: int) -> Georeference:
        where = self._nearest(file, field, "where")
        projection = str(where.get("projdef", "")).strip()
        corners = {k: v for k, v in where.items() if re.fullmatch(r"[UL][LR]_l(at|on)", k)}
        grid = Georeference(projection, {"odim_" + k: v for k, v in corners.items()})
        upper_left = _upper_left(where, projection)
        if upper_left and "xscale" in where and "yscale" in where:
            x0, y0 = upper_left  # the outer corner of the upper left pixel; coordinates are pixel centres
            grid.x = x0 + (np.arange(width) + 0.5) * float(where["xscale"])
            grid.y = y0 - (np.arange(height) + 0.5) * float(where["yscale"])
        return grid


def _upper_left(where: dict, projection: str) -> tuple[float, float] | None:
    """The grid's upper left corner in projected metres: ``UL_x``/``UL_y`` where the file has them (RMI), else
    the corner lat/lon projected with pyproj where it is installed."""
    if "UL_x" in where and "UL_y" in where:
        return float(where["UL_x"]), float(where["UL_y"])
    if not projection or "UL_lon" not in where:
        return None
    try:
        import pyproj
    except ImportError:
        return None
    return pyproj.Proj(projection)(float(where["UL_lon"]), float(where["UL_lat"]))


# -- CF netCDF


class CfReader:
    """CF netCDF (netCDF4 is HDF5 inside): a 2-D variable on two dimension scales, decoded with scale_factor,
    add_offset, _FillValue and valid_range; the time from a ``time`` variable ("seconds since ..."), else the
    global ``nominal_product_time`` (NWC SAF)."""

    name = "cf"

    @classmethod
    def recognises(cls, file: h5py.File) -> bool:
        """CF with a 2-D field: one time step (a CF series file, such as ``data import`` writes, is not)."""
        return text_attribute(file, "Conventions").startswith("CF") and bool(cls._fields(file))

    def describe(self, file: h5py.File, path: str, wanted: str | None) -> Frame:
        fields = {name: name for name in self._fields(file)}
        name = _choose(fields, wanted, path)
        variable = file[name]
        height, width = variable.shape
        units = text_attribute(variable, "units")
        time = self._time_variable(file)
        grid = self._grid(file, variable)
        period = self._period(file, time, path)
        return Frame(path, self._time(file, time, path), name, name, units, height, width, grid, period)

    def read(self, file: h5py.File, frame: Frame, region: Region | None = None) -> np.ndarray:
        variable = file[frame.field]
        raw = variable[region or ()]
        attrs = variable.attrs
        invalid = np.zeros(raw.shape, dtype=bool)
        for key in ("_FillValue", "missing_value"):
            if key in attrs:
                invalid |= np.isin(raw, np.atleast_1d(attrs[key]))
        low, high = _valid_range(attrs)
        if low is not None:
            invalid |= raw < low
        if high is not None:
            invalid |= raw > high
        scale = float(np.atleast_1d(attrs.get("scale_factor", 1.0))[0])
        offset = float(np.atleast_1d(attrs.get("add_offset", 0.0))[0])
        values = raw.astype(np.float64) * scale + offset
        return np.where(invalid, np.nan, values).astype(np.float32)

    @staticmethod
    def _fields(file: h5py.File) -> list[str]:
        """2-D variables on two dimension scales that hold a quantity with units, not flags; those with a
        grid_mapping first."""

        def is_field(name: str) -> bool:
            variable = file[name]
            if variable.ndim != 2 or variable.is_scale or "flag_values" in variable.attrs:
                return False
            units = text_attribute(variable, "units").strip().lower()
            return all(len(axis) for axis in variable.dims) and units not in ("", "1", "unitless")

        fields = [name for name in dataset_names(file) if is_field(name)]
        mapped = [name for name in fields if "grid_mapping" in file[name].attrs]
        return mapped or fields

    @staticmethod
    def _time_variable(file: h5py.File) -> h5py.Dataset | None:
        names = [n for n in dataset_names(file) if n == "time" or text_attribute(file[n], "standard_name") == "time"]
        return file[names[0]] if names else None

    @staticmethod
    def _time(file: h5py.File, time: h5py.Dataset | None, path: str) -> datetime:
        if time is not None:
            return cf_time(time, path)
        nominal = text_attribute(file, "nominal_product_time")
        try:
            return as_utc(datetime.fromisoformat(nominal))
        except ValueError:
            raise UserError(f"{path}: no time variable and no nominal_product_time attribute") from None

    @staticmethod
    def _period(file: h5py.File, time: h5py.Dataset | None, path: str) -> float | None:
        """Minutes between the time variable's ``bounds`` (CF: the interval a sum covers), where it has them."""
        bounds = text_attribute(time, "bounds") if time is not None else ""
        if not bounds or bounds not in file:
            return None
        edges = np.atleast_1d(file[bounds][()]).astype(np.float64).ravel()
        if edges.size < 2:
            return None
        return (edges[-1] - edges[0]) * TIME_UNITS[_time_units(time, path).group(1)] / 60

    @staticmethod
    def _grid(file: h5py.File, variable: h5py.Dataset) -> Georeference:
        y, x = (axis[0] for axis in variable.dims)
        grid = Georeference(x=x[()].astype(np.float64), y=y[()].astype(np.float64))
        grid.xy_units = text_attribute(x, "units", "m")
        mapping = text_attribute(variable, "grid_mapping")
        if mapping and mapping in file:
            grid.grid_mapping = {k: plain(v) for k, v in file[mapping].attrs.items() if not k.startswith("_")}
            grid.projection = str(grid.grid_mapping.pop("proj4_params", grid.grid_mapping.pop("proj4", "")))
        grid.projection = grid.projection or text_attribute(file, "gdal_projection").strip()
        return grid


def _valid_range(attrs) -> tuple[float | None, float | None]:
    if "valid_range" in attrs:
        low, high = np.atleast_1d(attrs["valid_range"])[:2]
        return float(low), float(high)
    low, high = (attrs.get(key) for key in ("valid_min", "valid_max"))
    return tuple(None if bound is None else float(np.atleast_1d(bound)[0]) for bound in (low, high))


def _time_units(variable: h5py.Dataset, path: str) -> re.Match:
    """``units`` of a CF time variable as (unit, origin) groups."""
    units = text_attribute(variable, "units")
    match = re.fullmatch(r"\s*(second|minute|hour|day)s?\s+since\s+(.+?)\s*", units)
    if not match:
        raise UserError(f"{path}: time units {units!r} are not '<seconds|minutes|hours|days> since <time>'")
    return match


def cf_time(variable: h5py.Dataset, path: str) -> datetime:
    """The first value of a CF time variable ("<unit>s since <time>") as a UTC datetime."""
    match = _time_units(variable, path)
    try:
        origin = as_utc(datetime.fromisoformat(match.group(2).replace(" UTC", "").replace("Z", "+00:00")))
    except ValueError:
        raise UserError(f"{path}: cannot read the time origin in {match.group(0)!r}") from None
    value = float(np.atleast_1d(variable[()])[0])
    return origin + timedelta(seconds=value * TIME_UNITS[match.group(1)])


def _choose(fields: dict[str, str], wanted: str | None, path: str, known: dict | None = None) -> str:
    """The field named by --dataset (its path or its quantity), else the only one (of a known quantity, where
    ``known`` says which are)."""
    if wanted:
        picked = [name for name, quantity in fields.items() if wanted.strip("/") in (name, quantity)]
        if not picked:
            raise UserError(f"{path}: no field {wanted!r} (has {_listed(fields)})")
        return picked[0]
    candidates = [name for name, quantity in fields.items() if known is None or quantity in known]
    if len(candidates) != 1:
        found = _listed({n: fields[n] for n in candidates}) if candidates else "no field of a known quantity"
        raise UserError(f"{path}: cannot tell which field to read ({found}); name it with --dataset")
    return candidates[0]


def _listed(fields: dict[str, str]) -> str:
    return ", ".join(name if name == quantity else f"{quantity} ({name})" for name, quantity in fields.items())


# -- pysteps' importers


class PystepsReader:
    """Any format pysteps reads (``pysteps.io.get_method(name, "importer")``): KNMI HDF5, MeteoSwiss GIF, FMI
    PGM, MRMS GRIB, ... The time comes from the file name (YYYYmmddHHMM[SS]), as pysteps' own archives do."""

    def __init__(self, name: str):
        try:
            with contextlib.redirect_stdout(sys.stderr):  # pysteps announces its configuration file on stdout
                from pysteps.io import get_method
        except ImportError:
            raise UserError(f"--importer {name}: needs pysteps; pip install -e '.[pysteps]'") from None
        try:
            self.importer = get_method(name, "importer")
        except ValueError as error:
            raise UserError(f"--importer {name}: {error}".splitlines()[0]) from None
        self.name = name

    def describe(self, path: str, wanted: str | None) -> Frame:
        values, metadata = self._import(path)
        height, width = values.shape
        grid = Georeference(str(metadata.get("projection", "") or ""))
        if all(k in metadata for k in ("x1", "y2", "xpixelsize", "ypixelsize")):
            grid.x = float(metadata["x1"]) + (np.arange(width) + 0.5) * float(metadata["xpixelsize"])
            grid.y = float(metadata["y2"]) - (np.arange(height) + 0.5) * float(metadata["ypixelsize"])
        units = str(metadata.get("unit", ""))
        period = float(metadata["accutime"]) if metadata.get("accutime") else None
        return Frame(path, time_from_name(path), self.name, self.name, units, height, width, grid, period)

    def read(self, path: str, frame: Frame, region: Region | None = None) -> np.ndarray:
        """pysteps' importers read whole files: the region is cut afterwards."""
        values = self._import(path)[0]
        return values if region is None else np.ascontiguousarray(values[region])

    def _import(self, path: str) -> tuple[np.ndarray, dict]:
        try:
            values, _, metadata = self.importer(path)
        except Exception as error:  # a foreign importer's failure on one file: name the file
            raise UserError(f"{path}: pysteps importer {self.name} failed ({type(error).__name__}: {error})") from None
        values = np.ma.filled(np.ma.asarray(values, dtype=np.float32), np.nan)
        if values.ndim != 2:
            raise UserError(f"{path}: pysteps importer {self.name} returned {values.ndim} dimensions, expected 2")
        if metadata.get("yorigin") == "lower":  # row 0 is the north edge here
            values = values[::-1]
        return np.ascontiguousarray(values), metadata


def time_from_name(path: str) -> datetime:
    match = re.search(r"(?<!\d)(\d{14}|\d{12})(?!\d)", os.path.basename(path))
    if not match:
        raise UserError(f"{path}: no time (YYYYmmddHHMM) in the file name, which --importer reads it from")
    digits = match.group(1)
    return datetime.strptime(digits, "%Y%m%d%H%M%S" if len(digits) == 14 else "%Y%m%d%H%M").replace(tzinfo=UTC)


READERS = {"odim": OdimReader, "cf": CfReader}


def get_reader(name: str):
    """The reader of a format: odim, cf, or the name of a pysteps importer (``pysteps:knmi_hdf5`` or plain
    ``knmi_hdf5``)."""
    if name in READERS:
        return READERS[name]()
    return PystepsReader(name.removeprefix("pysteps:"))


def reader_for(path: str):
    """The reader of our own that knows this file, None where none does (or it is not HDF5)."""
    try:
        with h5py.File(path, "r") as file:
            return next((reader() for reader in READERS.values() if reader.recognises(file)), None)
    except OSError:
        return None


def archive_files(paths: list[str], importer: str | None = None) -> list[str] | None:
    """The files of an archive: a folder's files, the files an ``importer`` is to read, or files that are
    single-frame radar files (ODIM_H5, CF). None: these are not an archive (a stacked HDF5 file, say)."""
    if len(paths) == 1 and os.path.isdir(paths[0]):
        folder = paths[0]
        names = sorted(os.path.join(folder, n) for n in os.listdir(folder) if not n.startswith("."))
        files = [n for n in names if os.path.isfile(n)]
        if not importer and not any(reader_for(n) for n in files):  # stops at the first radar file
            raise UserError(
                f"{folder}: is a directory holding no ODIM_H5 or CF netCDF file; name an HDF5 file, or read an "
                "archive of another format with --importer NAME"
            )
        return files
    if importer or (paths and all(os.path.isfile(p) for p in paths) and reader_for(paths[0]) is not None):
        return paths
    return None


# -- the archive


class Archive:
    """Per-time-step files as one series [T, 1, H, W] of float32 physical values (NaN: no data), split into
    segments at gaps; each segment is a sequence."""

    layout = "THW"
    dtype = np.dtype(np.float32)
    channels = 1
    is_series = True
    in_memory = False

    def __init__(
        self, paths: list[str], dataset: str | None = None, importer: str | None = None, nan_policy: str = "mask"
    ):
        check_nan_policy(nan_policy)
        self.importer = importer
        self.nan_policy = nan_policy  # no data (nodata, fill, outside valid range): masked, zero, or refused
        frames = [self._describe(path, dataset) for path in paths]
        frames.sort(key=lambda frame: frame.time)
        self._check(frames)
        first = frames[0]
        self.frames = frames
        self.label = f"{os.path.dirname(first.path) or '.'} ({len(frames)} files)"
        self.dataset = self.quantity = first.quantity  # what --dataset names (the field's path: in frames)
        self.units = first.units
        self.height, self.width = first.height, first.width
        self.georeference = first.grid
        for frame in frames:
            frame.grid = first.grid  # one grid held, not one per file
        step, self.segments = segments([frame.time for frame in frames])
        self.timestep_minutes = step.total_seconds() / 60
        self.sequences = len(self.segments)
        self.steps = min(length for _, length in self.segments)
        self.per_hour = self._per_hour(frames)
        if self.per_hour is not None:
            self.units = "mm/h"

    def _per_hour(self, frames: list[Frame]) -> list[float] | None:
        """Per frame, the factor from its depth to a rate in mm/h (60 / the period the file gives); None where
        the frames are not depths, or not every file gives a positive period (NWC SAF's hourly sums come every 15
        minutes: the time step is no guide)."""
        if self.units.strip().lower() not in DEPTH_UNITS:
            return None
        periods = [frame.accumulation_minutes for frame in frames]
        if not all(period is not None and period > 0 for period in periods):
            log.info("%s: depths in %s over a period the files do not give: read as they are", self.label, self.units)
            return None
        shown = ", ".join(f"{period:g}" for period in sorted(set(periods)))
        log.info("%s: %s-minute accumulations in %s, read as rain rates in mm/h", self.label, shown, self.units)
        return [60 / period for period in periods]

    def _reader(self, path: str):
        if self.importer:
            self._pysteps = getattr(self, "_pysteps", None) or get_reader(self.importer)
            return self._pysteps
        reader = reader_for(path)
        if reader is None:
            raise UserError(f"{path}: neither ODIM_H5 nor CF netCDF; read other formats with --importer NAME (pysteps)")
        return reader

    def _describe(self, path: str, dataset: str | None) -> Frame:
        reader = self._reader(path)
        if isinstance(reader, PystepsReader):
            return reader.describe(path, dataset)
        with h5py.File(path, "r") as file:
            return reader.describe(file, path, dataset)

    @staticmethod
    def _check(frames: list[Frame]) -> None:
        """One grid, one quantity and one file per time."""
        first = frames[0]
        for before, frame in zip(frames, frames[1:], strict=False):
            if frame.time == before.time:
                raise UserError(f"{before.path} and {frame.path}: both hold time {iso(frame.time)}")
        for frame in frames[1:]:
            if (frame.height, frame.width) != (first.height, first.width) or frame.grid.key() != first.grid.key():
                raise UserError(
                    f"{frame.path}: grid of {frame.height}x{frame.width} ({frame.grid.projection or 'no projection'}) "
                    f"differs from that of {first.path} ({first.height}x{first.width}, "
                    f"{first.grid.projection or 'no projection'})"
                )
            if frame.quantity != first.quantity:
                raise UserError(f"{frame.path}: holds {frame.quantity}, but {first.path} holds {first.quantity}")

    def steps_of(self, sequence: int) -> int:
        return self.segments[sequence][1]

    def times_of(self, sequence: int) -> list[datetime]:
        begin, length = self.segments[sequence]
        return [frame.time for frame in self.frames[begin : begin + length]]

    def gaps(self) -> list[tuple[datetime, datetime]]:
        """(last time before, first time after) of every gap."""
        return [(self.frames[begin - 1].time, self.frames[begin].time) for begin, _ in self.segments[1:]]

    def read(self, sequence: int, start: int, length: int, region: Region | None = None) -> np.ndarray:
        begin, steps = self.segments[sequence]
        if start < 0 or start + length > steps:
            raise IndexError(f"frames {start}..{start + length - 1} of a segment of {steps}")
        block = np.stack([self.read_frame(begin + start + k, region) for k in range(length)])[:, np.newaxis]
        refusal = (
            f"{self.label}: no-data pixels in segment {sequence}, frames from {start} (--nan-policy error); "
            "use --nan-policy mask or zero"
        )
        return apply_nan_policy(block, self.nan_policy, refusal)

    def read_frame(self, index: int, region: Region | None = None) -> np.ndarray:
        """Frame ``index`` of the whole archive (segments one after another), [H, W] float32; only ``region``'s
        rows and columns where given (HDF5 then decodes only the chunks under it)."""
        frame = self.frames[index]
        reader = self._reader(frame.path)
        if isinstance(reader, PystepsReader):
            values = reader.read(frame.path, frame, region)
        else:
            try:
                with h5py.File(frame.path, "r") as file:
                    values = reader.read(file, frame, region)
            except OSError as error:
                raise UserError(f"{frame.path}: cannot read {frame.field} ({error})") from None
            if np.isinf(values).any():
                raise UserError(f"{frame.path}: {frame.field} decodes to infinite values")
        return values if self.per_hour is None else values * np.float32(self.per_hour[index])
