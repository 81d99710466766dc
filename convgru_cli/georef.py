"""Where frames lie on the map and when: a grid's projection and x/y coordinates, and the valid times of a
series, read from our own series files and written as CF conventions with HDF5 dimension scales, so that
``xarray.open_dataset(path, engine="h5netcdf")`` sees ``time``, ``y``, ``x`` and a grid mapping."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import h5py
import numpy as np

from convgru_cli.hdf5 import plain, text_attribute

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
TIME_UNITS = "seconds since 1970-01-01 00:00:00"
CRS = "crs"  # the grid-mapping variable's name in the files we write
AXES = {"T": "time", "C": "channel", "H": "y", "W": "x"}  # layout letter -> netCDF dimension
BARE_DIMENSION = "This is a netCDF dimension but not a netCDF variable."  # netCDF4's mark of a dimension alone


@dataclass
class Georeference:
    """A grid: its PROJ string (empty where unknown), CF grid-mapping attributes, and the centres of its
    columns (``x``) and rows (``y``) in ``xy_units``, None where the source does not give them."""

    projection: str = ""
    grid_mapping: dict = field(default_factory=dict)
    x: np.ndarray | None = None
    y: np.ndarray | None = None
    xy_units: str = "m"

    def __bool__(self) -> bool:
        return bool(self.projection or self.grid_mapping or self.x is not None)

    def key(self) -> tuple:
        """What must agree for two frames to lie on the same grid."""
        ends = [(float(a[0]), float(a[-1]), len(a)) if a is not None else None for a in (self.x, self.y)]
        return (self.projection.strip(), *ends)

    def write(self, file: h5py.File) -> dict[str, h5py.Dataset]:
        """The grid mapping variable and the x/y coordinate variables the grid has; returns them by dimension
        (and the grid mapping as ``crs``)."""
        written = {}
        if self.projection or self.grid_mapping:
            crs = file.create_dataset(CRS, data=np.int32(0))
            for key, value in self.grid_mapping.items():
                crs.attrs[key] = value
            if self.projection:
                crs.attrs["proj4_params"] = self.projection
            written[CRS] = crs
        for axis, values, name in (("y", self.y, "projection_y_coordinate"), ("x", self.x, "projection_x_coordinate")):
            if values is not None:
                scale = file.create_dataset(axis, data=np.asarray(values, dtype=np.float64))
                scale.attrs.update({"standard_name": name, "units": self.xy_units, "axis": axis.upper()})
                scale.make_scale(axis)
                written[axis] = scale
        return written

    @classmethod
    def read(cls, file: h5py.File) -> Georeference:
        """The georeference of a series file written by ``convgru data import`` (or any CF file laid out alike);
        empty for other files."""
        if CRS not in file and not text_attribute(file, "Conventions").startswith("CF"):
            return cls()
        grid_mapping = {k: plain(v) for k, v in file[CRS].attrs.items()} if CRS in file else {}
        projection = str(grid_mapping.pop("proj4_params", "")) or text_attribute(file, "projection")
        coordinates = {
            a: file[a][()]
            for a in ("x", "y")
            if a in file and text_attribute(file[a], "standard_name") == f"projection_{a}_coordinate"
        }  # not a bare dimension
        units = text_attribute(file["x"], "units", "m") if "x" in coordinates else "m"
        return cls(projection, grid_mapping, coordinates.get("x"), coordinates.get("y"), units)


def write_cf(
    file: h5py.File, variables: list[tuple[h5py.Dataset, str]], times: list[datetime] | None, grid: Georeference
) -> None:
    """CF coordinates for ``variables`` given as (dataset, its layout letters, e.g. THW): valid ``time`` (seconds
    since 1970, UTC), ``y``/``x`` and the grid mapping where known, and a bare netCDF dimension for every other
    axis, each an HDF5 dimension scale attached to the variables' axes."""
    file.attrs["Conventions"] = "CF-1.8"
    scales = grid.write(file)
    if times:
        seconds = [(as_utc(t) - EPOCH).total_seconds() for t in times]
        scale = file.create_dataset("time", data=np.asarray(seconds, dtype=np.float64))
        scale.attrs.update({"standard_name": "time", "units": TIME_UNITS, "calendar": "standard", "axis": "T"})
        scale.make_scale("time")
        scales["time"] = scale
    for variable, layout in variables:
        if CRS in scales and variable.ndim >= 2:
            variable.attrs["grid_mapping"] = CRS
        for index, letter in enumerate(layout):
            name = AXES[letter]
            if name not in scales:
                scales[name] = file.create_dataset(name, shape=(variable.shape[index],), dtype="f4")
                scales[name].make_scale(BARE_DIMENSION)
            variable.dims[index].attach_scale(scales[name])


def segments(times: list[datetime]) -> tuple[timedelta, list[tuple[int, int]]]:
    """The time step (the most common difference between consecutive times) and the runs of times that
    follow each other by exactly that step, as (first index, length): a missing step is a gap."""
    if len(times) < 2:
        return timedelta(0), [(0, len(times))]
    differences = [b - a for a, b in zip(times, times[1:], strict=False)]
    step = collections.Counter(differences).most_common(1)[0][0]
    runs, begin = [], 0
    for index, difference in enumerate(differences, start=1):
        if difference != step:
            runs.append((begin, index - begin))
            begin = index
    runs.append((begin, len(times) - begin))
    return step, runs


def as_utc(moment: datetime) -> datetime:
    """A time as UTC: radar times are UTC, and a time without a zone is taken as such."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def iso(moment: datetime) -> str:
    return as_utc(moment).strftime("%Y-%m-%dT%H:%M:%SZ")
