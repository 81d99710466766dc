"""Forecasting with a trained checkpoint, and writing forecasts as self-describing HDF5."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta

import h5py
import numpy as np
import torch

from convgru_cli import __version__, archives, checkpoint, distributed, postprocessing
from convgru_cli.atomic import atomic_path, hdf5_bytes, refuse_existing
from convgru_cli.device import autocast, compile_failure, compile_for, pad_batch, pick_device, pick_precision
from convgru_cli.errors import UserError
from convgru_cli.georef import iso, write_cf
from convgru_cli.hdf5 import open_hdf5, pick_dataset, resolve_layout, text_attribute
from convgru_cli.model import EncoderForecaster
from convgru_cli.normalisation import Normalisation
from convgru_cli.sources import FrameSet, FrameSource, StackedFrames, check_exists, expand_paths, mask_in
from convgru_cli.tiling import DEFAULT_BUDGET, bytes_per_pixel, predict_tiled, smallest_tile
from convgru_cli.windowing import DataSpec, batches, check_batch_size, stack

log = logging.getLogger("convgru")


# On a CPU a run of the model on more positions of its finest grid (frame pixels / patch²) than this is no faster
# per sequence, only larger (benchmarks/README.md: 1 to 16 sequences of 256² with `fast`, of 64² with shi-mnist),
# so sequences are batched up to it there; a GPU gains from larger runs, up to the memory budget.
CPU_RUN_POSITIONS = 2**14


@dataclass
class Forecaster:
    """A trained model with what it needs to turn raw frames into raw-unit forecasts."""

    model: EncoderForecaster
    network: torch.nn.Module  # what forecasts run through: the model, or it compiled
    normalisation: Normalisation
    spec: DataSpec
    device: torch.device
    precision: torch.dtype
    checkpoint_path: str
    compiled_batch: int = 0  # compiled: the batch size of the first call, to which smaller batches are padded
    memory_budget: int | None = None  # bytes a run of the model may take; None: DEFAULT_BUDGET, or the smallest tile
    matching: str = "none"  # probability matching to the last input frame (postprocessing.py): none or cdf

    @classmethod
    def load(
        cls,
        path: str,
        device: str = "auto",
        precision: str = "auto",
        compile: bool = False,
        memory_budget: int | None = None,
        matching: str = "auto",
    ) -> Forecaster:
        torch_device = distributed.process_device(pick_device(device))
        saved = checkpoint.load(path, map_location=torch_device)
        model_config, spec, normalisation = checkpoint.configs(saved)
        model = EncoderForecaster(model_config)
        model.load_state_dict(saved["model"])
        model.to(torch_device).eval()
        loss = saved["train_config"].get("loss", "")
        resolved = postprocessing.resolve(matching, loss)
        if matching == "auto" and resolved != "none":
            log.info("%s was trained with --loss %s: forecasts are matched to the last observed frame's values "
                     "(--matching %s; none to turn off)", path, loss, resolved)  # fmt: skip
        return cls(
            model=model,
            network=compile_for(model, torch_device) if compile else model,
            normalisation=normalisation,
            spec=spec,
            device=torch_device,
            precision=pick_precision(precision, torch_device),
            checkpoint_path=path,
            memory_budget=memory_budget,
            matching=resolved,
        )

    def read_frames(self, file: h5py.File, dataset: str | None, layout: str | None) -> StackedFrames:
        """A file's frames as this model reads them: the dataset it was trained on and its mask, where the
        file has them, unless ``dataset`` names another; without ``layout`` or a recorded one, the layout it
        was trained on, before one read off the shape."""
        spec = self.spec
        name = pick_dataset(file, dataset or (spec.dataset if spec.dataset in file else None), spec.mask_dataset)
        stored = file[name]
        assumed = False
        if not layout and not text_attribute(stored, "layout") and len(spec.layout or "") == stored.ndim:
            layout = spec.layout  # a file like the training file, which records no layout, is read the same way
            assumed = layout != resolve_layout(stored.shape, None, name)
        source = StackedFrames(file, name, layout, None, spec.nan_policy, mask_in(file, spec.mask_dataset))
        self.check_frames(source)
        if assumed:  # said once the frames are known to fit: bad input gets its one line, the error
            log.info("%s: no layout recorded; read as %s, as the model was trained (--layout to change)", name, layout)
        return source

    def open_inputs(
        self, paths: list[str] | None, dataset: str | None, layout: str | None, importer: str | None = None
    ) -> FrameSource:
        """A forecast's input: an archive (a folder, per-time-step radar files, or files for a pysteps
        ``importer``, by default the one the model was trained with), else HDF5 files (several: a ``FrameSet``),
        or standard input where ``paths`` is None."""
        importer = importer or self.spec.importer
        names = expand_paths(paths) if paths else None
        files = archives.archive_files(names, importer) if names else None
        if files is None:
            parts = []
            for name in names or [None]:
                with open_hdf5(name) as file:
                    parts.append(self.read_frames(file, dataset, layout))
            return parts[0] if len(parts) == 1 else FrameSet(parts)
        try:
            source = archives.Archive(files, dataset or self.spec.dataset, importer, self.spec.nan_policy)
        except UserError:
            if dataset:
                raise
            source = archives.Archive(files, None, importer, self.spec.nan_policy)  # trained on other files
            log.info("%s: no field %r, as the model was trained on; reading %r", source.label, self.spec.dataset,
                     source.dataset)  # fmt: skip
        self.check_frames(source)
        return source

    def check_frames(self, source: FrameSource) -> None:
        config = self.model.config
        if source.channels != config.channels:
            raise UserError(
                f"{source.label}: {source.channels} channels, but {self.checkpoint_path} was trained on "
                f"{config.channels}"
            )
        config.check_frame_size(source.label, source.height, source.width)
        trained, given = self.normalisation.units.strip(), source.units.strip()
        if trained and given and trained.lower() != given.lower():
            log.warning(
                "%s: values in %s, but %s was trained on values in %s; they are read as if in %s",
                source.label, given, self.checkpoint_path, trained, trained,
            )  # fmt: skip

    @torch.no_grad()
    def predict(self, inputs: torch.Tensor | np.ndarray, frames: int) -> torch.Tensor:
        """Raw input frames [B, T, C, H, W] (tensor or array) -> forecast [B, frames, C, H, W], float32 in data
        units: as many sequences at a time as fit the memory budget (on a CPU, up to ``CPU_RUN_POSITIONS``), or
        one in tiles (tiling.py); probability matched to the last input frame where ``matching`` says so."""
        inputs = torch.as_tensor(inputs)
        batch, steps, channels, height, width = inputs.shape
        pixels = (self.memory_budget or DEFAULT_BUDGET) // bytes_per_pixel(self.model.config, steps, frames)
        forecast = torch.empty(batch, frames, channels, height, width, device=self.device)
        if height * width <= pixels:
            chunk = max(1, pixels // (height * width))
            if self.device.type == "cpu":
                chunk = min(chunk, max(1, CPU_RUN_POSITIONS * self.model.config.patch**2 // (height * width)))
            for first in range(0, batch, chunk):
                forecast[first : first + chunk] = self._predict(inputs[first : first + chunk], frames)
        else:
            tile, multiple = self._tile(pixels, steps, frames), self.model.config.size_multiple
            for b in range(batch):
                predict_tiled(self._runner(frames), inputs[b : b + 1], frames, tile, multiple, out=forecast[b : b + 1])
        if self.matching == "cdf":
            postprocessing.match_cdf(forecast, inputs[:, -1].to(self.device))
        return forecast

    def _runner(self, frames: int):
        return lambda inputs: self._predict(inputs, frames)

    def _tile(self, pixels: int, steps: int, frames: int) -> int:
        """The side of square tiles of ``pixels`` at most, on the model's size multiple, or the smallest tile
        where the budget was not set."""
        multiple = self.model.config.size_multiple
        tile, smallest = multiple * int(math.sqrt(pixels) // multiple), smallest_tile(frames, multiple)
        if tile >= smallest:
            return tile
        needed = smallest**2 * bytes_per_pixel(self.model.config, steps, frames)
        if self.memory_budget is not None:
            raise UserError(
                f"--memory-budget {_size(self.memory_budget)}: too small for tiles of {smallest}x{smallest} pixels, "
                f"the smallest that keep a halo for {frames} lead times; give at least {_size(needed)}"
            )
        log.info(
            "tiles of up to %dx%d pixels take about %.1f GB at most (--memory-budget)", smallest, smallest, needed / 1e9
        )
        return smallest

    def _predict(self, inputs: torch.Tensor, frames: int) -> torch.Tensor:
        """One run of the network on raw frames [B, T, C, H, W]."""
        normalised, _ = self.normalisation.normalise(inputs.to(self.device))
        batch = len(normalised)
        if self.network is not self.model:  # a file's last batch is usually smaller
            self.compiled_batch = self.compiled_batch or batch
            normalised = pad_batch(normalised, self.compiled_batch)
        with autocast(self.device, self.precision):
            try:
                prediction = self.network(normalised, frames)[:batch]
            except torch._dynamo.exc.BackendCompilerFailed as error:  # at the first compiled call
                raise compile_failure(error, "run") from None
        return self.normalisation.denormalise(prediction.float())


def _size(count: int) -> str:
    return f"{count / 1e9:.1f}GB" if count >= 1e9 else f"{count / 1e6:.0f}MB"


def write_lead(dataset: h5py.Dataset, first: int, lead: int, frames: np.ndarray) -> None:
    """One lead time of the forecasts of sequences ``first``.. ([b, C, H, W]) into ``dataset``, in its layout
    (without N for a series and without C where the input had none)."""
    layout = text_attribute(dataset, "layout")
    place = {"N": slice(first, first + len(frames)), "T": lead}
    axes = list("NCHW")
    for axis in ("N", "C"):
        if axis not in layout:
            frames = frames.take(0, axis=axes.index(axis))
            axes.remove(axis)
    index = tuple(place.get(axis, slice(None)) for axis in layout)
    dataset[index] = np.transpose(frames, [axes.index(axis) for axis in layout if axis != "T"])


def create_forecast(file: h5py.File, shape: dict[str, int], layout: str, attributes: dict) -> h5py.Dataset:
    """The forecast file's datasets, empty: ``forecast`` of ``shape`` (axis letter -> size) in the input's
    layout, chunked by frame (tiles of 512² at most), and ``lead_times``."""
    size = tuple(shape[axis] for axis in layout)
    chunks = tuple(min(shape[axis], 512) if axis in "HW" else 1 for axis in layout)
    dataset = file.create_dataset(
        "forecast", size, np.float32, chunks=chunks, compression="gzip", compression_opts=4, shuffle=True
    )
    dataset.attrs["layout"] = layout
    dataset.attrs["units"] = attributes["units"]
    leads = file.create_dataset("lead_times", data=np.arange(1, shape["T"] + 1, dtype=np.int32))
    leads.attrs["long_name"] = "lead time in time steps"
    for key, value in attributes.items():
        file.attrs[key] = value
    return dataset


def predict_file(
    data_path: str | None,
    frames: int,
    checkpoint_path: str | None = None,
    output: str | None = None,
    dataset: str | None = None,
    layout: str | None = None,
    start: int | None = None,
    batch_size: int = 16,
    force: bool = False,
    device: str = "auto",
    precision: str = "auto",
    png: str | None = None,
    gif: str | None = None,
    picture_sequence: int = 0,
    compile: bool = False,
    importer: str | None = None,
    memory_budget: int | None = None,
    matching: str = "auto",
) -> dict:
    """Forecast ``frames`` steps after the last input window of every sequence (or the window at ``start``).

    ``data_path`` None reads standard input; ``output`` None writes standard output. ``png`` and ``gif`` draw
    sequence ``picture_sequence``: its inputs, the truth where the file holds it, and the forecast.
    ``memory_budget`` (bytes) bounds a run of the model (Forecaster.predict); the file is written a batch at a
    time. ``matching``: probability matching (postprocessing.py)."""
    if frames < 1:
        raise UserError(f"--frames {frames}: must be at least 1")
    check_batch_size(batch_size)
    if output is None and sys.stdout.isatty():
        raise UserError("refusing to write HDF5 to a terminal: use -o FILE or redirect standard output")
    refuse_existing([output, png, gif], force)
    check_exists([data_path])
    forecaster = Forecaster.load(
        checkpoint_path or checkpoint.newest_best(), device, precision, compile, memory_budget, matching
    )
    source = forecaster.open_inputs([data_path] if data_path not in (None, "-") else None, dataset, layout, importer)
    spec = forecaster.spec
    sequences, first = _inputs_at(source, start, spec.input_frames)
    drawn_sequence = sequences[0] if source.is_series else picture_sequence  # a series: the segment forecast
    if (png or gif) and drawn_sequence not in sequences:
        raise UserError(f"--picture-sequence {picture_sequence}: the data has sequences 0..{source.sequences - 1}")
    forecaster.model.config.log_padding(source.label, source.height, source.width)  # once the input is known good
    times = source.times_of(sequences[0]) if source.is_series else None
    offset = sum(source.steps_of(n) for n in range(sequences[0])) if source.is_series else 0
    attributes = {
        "units": source.units,
        "software": f"convgru {__version__}",
        "checkpoint": os.path.abspath(forecaster.checkpoint_path),
        "input_file": data_path or "<stdin>",
        "input_dataset": source.dataset,
        "input_frames": f"{offset + first}..{offset + first + spec.input_frames - 1}",  # as the frames are stored
        "model_config": json.dumps(forecaster.model.config.to_dict()),
        "matching": forecaster.matching,
        "timestep_minutes": source.timestep_minutes,
    }
    valid = _valid_times(times, first + spec.input_frames - 1, frames, source.timestep_minutes)
    if valid:
        attributes["issue_time"] = iso(times[first + spec.input_frames - 1])
    grid = source.georeference if source.is_series else None
    shape = dict(N=len(sequences), T=frames, C=source.channels, H=source.height, W=source.width)
    drawn = []

    def fill(file: h5py.File) -> None:
        """Forecast a batch at a time and write it a lead time at a time: one batch's forecast in memory. The
        forecast of a series (``grid`` given) is also a CF file: valid times, x/y and the grid mapping where
        known, as HDF5 dimension scales that xarray (engine h5netcdf) reads."""
        dataset = create_forecast(file, shape, source.layout, attributes)
        for positions in batches(range(len(sequences)), batch_size):
            inputs = stack(source.read(sequences[p], first, spec.input_frames) for p in positions)
            forecast = forecaster.predict(inputs, frames).cpu().numpy()
            del inputs
            for lead in range(frames):
                write_lead(dataset, positions[0], lead, forecast[:, lead])
            if (png or gif) and sequences.index(drawn_sequence) in positions:
                drawn.append(forecast[positions.index(sequences.index(drawn_sequence))])
        if grid is not None:
            write_cf(file, [(dataset, source.layout), (file["lead_times"], "T")], valid, grid)

    if output is None:  # a pipe cannot be written in place: the file is built in memory
        sys.stdout.buffer.write(hdf5_bytes(fill))
        sys.stdout.buffer.flush()
    else:
        with atomic_path(output, force) as temporary, h5py.File(temporary, "w") as file:
            fill(file)
    if drawn:
        _draw(source, times, drawn[0], first, spec.input_frames, drawn_sequence, png, gif, force)
    return {"output": output or "<stdout>", "checkpoint": forecaster.checkpoint_path, "shape": [*shape.values()]}


def _inputs_at(source: FrameSource, start: int | None, inputs: int) -> tuple[list[int], int]:
    """The sequences to forecast and their first input frame: every sequence of [N, ...] data, or the one
    segment of a series that holds the input frames (the last one by default); ``start`` counts the frames of
    the whole series, as they are stored."""
    if not source.is_series:
        first = source.steps - inputs if start is None else start
        sequences = list(range(source.sequences))
    else:
        sequences = [source.sequences - 1]
        begin = sum(source.steps_of(n) for n in range(source.sequences - 1))
        if start is not None:
            sequences = [_segment_of(source, start)]
            begin = sum(source.steps_of(n) for n in range(sequences[0]))
        first = source.steps_of(sequences[0]) - inputs if start is None else start - begin
    steps = source.steps_of(sequences[0])
    if first < 0 or first + inputs > steps:
        where = f"frame {first if start is None else start} of {steps}"
        advice = "; use --start" if start is None else ""
        if source.sequences > 1 and source.is_series:
            where, advice = f"{where} in its segment (gaps split the series)", f"{advice}; data inspect lists the gaps"
        raise UserError(f"{source.label}: cannot take {inputs} input frames from {where}{advice}")
    return sequences, first


def _segment_of(source: FrameSource, frame: int) -> int:
    begin = 0
    for n in range(source.sequences):
        if begin <= frame < begin + source.steps_of(n):
            return n
        begin += source.steps_of(n)
    return source.sequences - 1  # past the end: refused by the caller


def _valid_times(times: list[datetime] | None, issue: int, frames: int, minutes: float) -> list[datetime] | None:
    """The valid time of every lead: issue time + lead x time step."""
    if not times or not minutes:
        return None
    return [times[issue] + timedelta(minutes=minutes * lead) for lead in range(1, frames + 1)]


def _draw(
    source: FrameSource,
    times: list[datetime] | None,
    forecast: np.ndarray,
    first: int,
    inputs: int,
    sequence: int,
    png,
    gif,
    force: bool,
) -> None:
    from convgru_cli import pictures

    frames = len(forecast)  # [frames, C, H, W], of ``sequence``
    truth_end = first + inputs + frames
    truth = source.read(sequence, first + inputs, frames)[:, 0] if truth_end <= source.steps_of(sequence) else None
    minutes = source.timestep_minutes
    if times and len(times) > 1 and not minutes:
        minutes = (times[1] - times[0]).total_seconds() / 60
    panel_times = None
    if times and minutes:  # past the data's end, forecast frames are valid a time step apart
        known = times[first : first + inputs + frames]
        panel_times = known + [
            known[-1] + timedelta(minutes=minutes * k) for k in range(1, truth_end - first - len(known) + 1)
        ]
    strip, loop = pictures.render(
        source.read(sequence, first, inputs)[:, 0].astype(np.float32),
        forecast[:, 0],
        None if truth is None else truth.astype(np.float32),
        source.units,
        minutes,
        panel_times,
        f"{source.label}, sequence {sequence}, input frames {first}..{first + inputs - 1}",
    )
    if png:
        pictures.save_png(png, strip, force)
    if gif:
        pictures.save_gif(gif, loop, force)
