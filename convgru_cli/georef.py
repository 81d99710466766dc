"""Where frames lie on the map and when: a grid's projection and x/y coordinates, and the valid times of a
series, read from our own series files and written as CF conventions with HDF5 dimension scales, so that
``xarray.open_dataset(path, engine="h5netcdf")`` sees ``time``, ``y``, ``x`` and a grid mapping."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

import h5py
import numpy as np

from convgru_cli.hdf5 import plain, text_attribute

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
TIME_UNITS = "seconds since 1970-01-01 00:00:00"
CRS = "crs"  # the grid-mapping variable's name in the files we write


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

    def write(self, file: h5py.File, variable: h5py.Dataset, dims: str) -> None:
        """The grid mapping, and x/y dimension scales attached to ``variable``'s axes named by ``dims``."""
        if self.projection or self.grid_mapping:
            crs = file.create_dataset(CRS, data=np.int32(0))
            for key, value in self.grid_mapping.items():
                crs.attrs[key] = value
            if self.projection:
                crs.attrs["proj4_params"] = self.projection
            variable.attrs["grid_mapping"] = CRS
        for axis, values, name in (("y", self.y, "projection_y_coordinate"), ("x", self.x, "projection_x_coordinate")):
            if values is None or axis not in dims:
                continue
            scale = file.create_dataset(axis, data=np.asarray(values, dtype=np.float64))
            scale.attrs.update({"standard_name": name, "units": self.xy_units, "axis": axis.upper()})
            scale.make_scale(axis)
            variable.dims[dims.index(axis)].attach_scale(scale)

    @classmethod
    def read(cls, file: h5py.File) -> Georeference:
        """The georeference of a series file written by ``convgru data import`` (or any file laid out alike)."""
        grid_mapping = {k: plain(v) for k, v in file[CRS].attrs.items()} if CRS in file else {}
        projection = str(grid_mapping.pop("proj4_params", "")) or text_attribute(file, "projection")
        coordinates = {a: file[a][()] for a in ("x", "y") if a in file and file[a].ndim == 1}
        units = text_attribute(file["x"], "units", "m") if "x" in coordinates else "m"
        return cls(projection, grid_mapping, coordinates.get("x"), coordinates.get("y"), units)


def write_times(file: h5py.File, variable: h5py.Dataset, times: list[datetime], axis: int = 0) -> h5py.Dataset:
    """A CF ``time`` dimension scale (seconds since 1970, UTC) attached to ``variable``'s axis ``axis``."""
    seconds = [(as_utc(t) - EPOCH).total_seconds() for t in times]
    scale = file.create_dataset("time", data=np.asarray(seconds, dtype=np.float64))
    scale.attrs.update({"standard_name": "time", "units": TIME_UNITS, "calendar": "standard", "axis": "T"})
    scale.make_scale("time")
    variable.dims[axis].attach_scale(scale)
    return scale


def as_utc(moment: datetime) -> datetime:
    """A time as UTC: radar times are UTC, and a time without a zone is taken as such."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def iso(moment: datetime) -> str:
    return as_utc(moment).strftime("%Y-%m-%dT%H:%M:%SZ")
