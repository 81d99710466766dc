"""Verification: forecasts and baselines scored per lead time on every window of a file.

Baselines: persistence (the last input frame held), optical-flow extrapolation (baselines.py) and, for our
own models, climatology (the training split's mean frame, stored in the checkpoint). On moving digits a blank
frame already beats persistence, so a model has to beat all of them to show skill.
``evaluate_forecasts`` scores forecasts made by any model, ours or not, against a truth file.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import numpy as np
import torch

from convgru_cli import baselines, checkpoint, data, distributed
from convgru_cli.errors import UserError
from convgru_cli.files import write_atomically
from convgru_cli.forecast import Forecaster
from convgru_cli.metrics import (
    MARSHALL_PALMER,
    Scores,
    default_thresholds,
    mean_over_leads,
    thresholds_in_units,
)

log = logging.getLogger("convgru")

# A batch of (inputs [B, T_in, C, H, W] raw, truth [B, T_out, C, H, W] raw, {method: forecast} or None)
Batch = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


def _score(
    batches: Iterator[Batch],
    methods: list[str],
    lead_times: int,
    data_range: float,
    thresholds: dict[str, float],
    zero_one_scale: float | None,
    device: torch.device,
    fss_scales: tuple[int, ...] = (),
) -> tuple[dict, dict]:
    """Run every batch through the scores of every method, summed over torchrun processes."""
    scores = {m: Scores(lead_times, data_range, thresholds, zero_one_scale, fss_scales) for m in methods}
    for inputs, truth, forecasts in batches:
        truth = truth.float()
        valid = torch.isfinite(truth)
        truth = torch.nan_to_num(truth)
        if "persistence" in methods:
            forecasts["persistence"] = torch.nan_to_num(baselines.persistence(inputs.float(), lead_times))
        if "optical_flow" in methods:
            forecasts["optical_flow"] = baselines.optical_flow(inputs, lead_times)
        for method in methods:
            scores[method].update(forecasts[method], truth, valid)
    for method_scores in scores.values():
        method_scores.load_state(distributed.sum_over_processes(method_scores.state(), device))
    per_lead = {method: s.compute() for method, s in scores.items()}
    return per_lead, {method: mean_over_leads(values) for method, values in per_lead.items()}


def _report(source: str, frames: data.Frames, windows: int, lead_times: int, per_lead: dict, mean: dict) -> dict:
    minutes = frames.timestep_minutes
    return {
        "data": source,
        "dataset": frames.dataset,
        "windows": windows,
        "units": frames.units,
        "lead_times": list(range(1, lead_times + 1)),
        "lead_minutes": [minutes * k for k in range(1, lead_times + 1)] if minutes else None,
        "scores": per_lead,
        "mean": mean,
    }


def evaluate_file(
    data_paths: list[str] | None,
    checkpoint_path: str | None = None,
    dataset: str | None = None,
    layout: str | None = None,
    split: str = "all",
    thresholds: tuple[str | float, ...] = (),
    batch_size: int = 16,
    device: str = "auto",
    precision: str = "auto",
    fss_scales: tuple[int, ...] = (),
    zr: tuple[float, float] = MARSHALL_PALMER,
    with_baselines: bool = True,
    compile: bool = False,
) -> dict:
    """Scores as ``{"lead_times": [...], "scores": {method: {metric: [...]}}, "mean": {method: {metric: x}}}``
    for method in model, persistence, optical_flow, climatology (the model alone without ``with_baselines``)."""
    if split not in ("all", "val"):
        raise UserError(f"--split {split}: choose all or val")
    with contextlib.ExitStack() as files:
        paths = data.expand_paths(data_paths) if data_paths else [None]  # None: standard input
        opened = [files.enter_context(data.open_hdf5(path)) for path in paths]
        forecaster = Forecaster.load(checkpoint_path or checkpoint.newest_best(), device, precision, compile)
        parts = [forecaster.read_frames(file, dataset, layout) for file in opened]
    rank, world = distributed.setup(forecaster.device)
    spec = forecaster.spec
    frames = parts[0] if len(parts) == 1 else data.FrameSet(parts)
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    chosen = data.split_windows(frames, spec)[1] if split == "val" else data.windows(frames, spec.window, spec.stride)
    if not chosen:
        raise UserError(f"--split val: {forecaster.checkpoint_path} was trained without a validation split")
    norm = forecaster.normalisation
    climatology = norm.mean_frame.to(forecaster.device)
    methods = ["model"]
    if with_baselines:
        methods += ["persistence"] + (["optical_flow"] if spec.input_frames >= 2 else [])
        if climatology.shape == (frames.channels, frames.height, frames.width):
            methods.append("climatology")
        else:
            log.warning("no climatology baseline: the frames are not the size the model was trained on")

    def batches() -> Iterator[Batch]:
        mine = chosen[rank::world]  # under torchrun each process scores a share
        for begin in range(0, len(mine), batch_size):
            batch = np.stack([frames.read(n, s, spec.window) for n, s in mine[begin : begin + batch_size]])
            batch = torch.from_numpy(batch).to(forecaster.device)
            inputs, truth = batch[:, : spec.input_frames], batch[:, spec.input_frames :]
            model = forecaster.predict(inputs, spec.output_frames)
            forecasts = {"model": model}
            if "climatology" in methods:
                forecasts["climatology"] = climatology.expand_as(model)
            yield inputs, truth, forecasts

    data_range = norm.zero_one_scale or max(norm.data_max - norm.data_min, 1e-12)
    per_lead, mean = _score(
        batches(),
        methods,
        spec.output_frames,
        data_range,
        thresholds_in_units(thresholds or default_thresholds(frames.units, frames.dataset), frames.units, zr),
        norm.zero_one_scale,
        forecaster.device,
        fss_scales,
    )
    distributed.finish()
    report = _report(", ".join(data_paths or ["<stdin>"]), frames, len(chosen), spec.output_frames, per_lead, mean)
    return {"checkpoint": forecaster.checkpoint_path, **report}


def evaluate_forecasts(
    forecast_path: str,
    truth_path: str,
    truth_start: int | None = None,
    dataset: str | None = None,
    layout: str | None = None,
    thresholds: tuple[str | float, ...] = (),
    batch_size: int = 16,
    fss_scales: tuple[int, ...] = (),
    zr: tuple[float, float] = MARSHALL_PALMER,
) -> dict:
    """Score a forecast file (dataset ``forecast`` [N, T, (C,) H, W], from any model) against the frames of a
    truth file from ``truth_start`` on: by default the frame after the forecast's recorded input window. The
    truth frames before ``truth_start`` drive the persistence and optical-flow baselines."""
    with data.open_hdf5(forecast_path) as file:
        if "forecast" not in file:
            raise UserError(f"{forecast_path}: no dataset 'forecast' (a convgru predict output, or the same layout)")
        forecast = data.Frames(file, "forecast", str(file["forecast"].attrs.get("layout", "")) or None)
        recorded = str(file.attrs.get("input_frames", ""))
    with data.open_hdf5(truth_path) as file:
        truth = data.Frames(file, data.pick_dataset(file, dataset), layout)
    if truth_start is None:
        truth_start = int(recorded.split("..")[1]) + 1 if ".." in recorded else 0
    lead_times = forecast.steps
    if (truth.sequences, truth.channels, truth.height, truth.width) != (
        forecast.sequences, forecast.channels, forecast.height, forecast.width
    ):  # fmt: skip
        raise UserError(
            f"{forecast_path} and {truth_path}: forecast has {forecast.sequences} sequences of "
            f"{forecast.channels}x{forecast.height}x{forecast.width}, truth {truth.sequences} of "
            f"{truth.channels}x{truth.height}x{truth.width}"
        )
    if not 0 <= truth_start <= truth.steps - lead_times:
        raise UserError(
            f"{truth_path}: no {lead_times} truth frames from frame {truth_start} (it has {truth.steps}); "
            "set --truth-start"
        )
    history = min(truth_start, 4)
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")

    def batches() -> Iterator[Batch]:
        for begin in range(0, truth.sequences, batch_size):
            sequences = range(begin, min(begin + batch_size, truth.sequences))
            inputs = _stack(lambda n: truth.read(n, truth_start - history, history), sequences)
            observed = _stack(lambda n: truth.read(n, truth_start, lead_times), sequences)
            predicted = _stack(lambda n: forecast.read(n, 0, lead_times), sequences)
            yield inputs, observed, {"forecast": torch.nan_to_num(predicted.float())}

    methods = ["forecast"] + (["persistence"] if history >= 1 else []) + (["optical_flow"] if history >= 2 else [])
    if truth.dtype == np.uint8:
        data_range, zero_one = 255.0, 255.0
    else:
        low, high = _value_range(truth)
        data_range, zero_one = max(high - low, 1e-12), (1.0 if low >= 0 and high <= 1 else None)
    per_lead, mean = _score(
        batches(),
        methods,
        lead_times,
        data_range,
        thresholds_in_units(thresholds or default_thresholds(truth.units, truth.dataset), truth.units, zr),
        zero_one,
        torch.device("cpu"),
        fss_scales,
    )
    report = _report(truth_path, truth, truth.sequences, lead_times, per_lead, mean)
    return {"forecast": forecast_path, "truth_start": truth_start, **report}


def _value_range(frames: data.Frames, samples: int = 512) -> tuple[float, float]:
    """Smallest and largest value in up to ``samples`` frames spread over all sequences: a radar archive's
    one long series can be far larger than memory."""
    picks = np.linspace(0, frames.sequences * frames.steps - 1, min(samples, frames.sequences * frames.steps))
    values = np.concatenate([frames.read(i // frames.steps, i % frames.steps, 1).ravel() for i in picks.astype(int)])
    values = values[np.isfinite(values)]
    return (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)


def _stack(read: Callable[[int], np.ndarray], sequences: range) -> torch.Tensor:
    return torch.from_numpy(np.stack([read(n) for n in sequences]))


def write_csv(path: str, report: dict, force: bool) -> None:
    """One row per method, metric and lead time: easy to load in a spreadsheet or pandas."""

    def write(file) -> None:
        lines = [["method", "metric", "lead_time", "value"]]
        for method, metrics in report["scores"].items():
            for metric, values in metrics.items():
                lines += [
                    [method, metric, lead, value] for lead, value in zip(report["lead_times"], values, strict=True)
                ]
        text = "\n".join(",".join(str(cell) for cell in line) for line in lines) + "\n"
        file.write(text.encode())

    write_atomically(path, write, force=force)
