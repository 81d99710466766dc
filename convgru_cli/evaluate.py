"""Verification: forecasts and baselines scored per lead time on every window of a file.

Baselines: those of the registry in baselines.py (persistence, optical-flow extrapolation) and, for our own
models, climatology (the training split's mean frame, stored in the checkpoint). On moving digits a blank
frame already beats persistence, so a model has to beat all of them to show skill.
``evaluate_forecasts`` scores forecasts made by any model, ours or not, against a truth file.
Scoring follows pysteps' verification: init (one ``Scores`` per method), accumulate batch by batch, merge over
torchrun processes, compute.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch

from convgru_cli import baselines, checkpoint, distributed
from convgru_cli.atomic import write_atomically
from convgru_cli.errors import UserError
from convgru_cli.forecast import Forecaster
from convgru_cli.hdf5 import open_hdf5, pick_dataset, text_attribute
from convgru_cli.metrics import (
    MARSHALL_PALMER,
    Scores,
    check_scoring,
    default_thresholds,
    mean_over_leads,
    thresholds_in_units,
    zero_one_scale,
)
from convgru_cli.normalisation import value_range
from convgru_cli.sources import FrameSource, StackedFrames, check_exists
from convgru_cli.tiling import DEFAULT_BUDGET
from convgru_cli.windowing import batches, check_batch_size, split_windows, stack, windows

log = logging.getLogger("convgru")

# A batch of (inputs [B, T_in, C, H, W] raw, truth [B, T_out, C, H, W] raw, {method: forecast})
Batch = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


def _score(
    batch_stream: Iterator[Batch],
    methods: list[str],
    lead_times: int,
    make_scores,
    device: torch.device,
    units: str,
) -> tuple[dict, dict]:
    """Run every batch through the scores of every method (baselines forecast here, from data in ``units``),
    merged over torchrun processes; ``make_scores()`` gives one empty ``Scores``."""
    scores = {method: make_scores() for method in methods}
    for inputs, truth, forecasts in batch_stream:
        truth = truth.float()
        valid = torch.isfinite(truth)
        truth = truth.nan_to_num_()  # in place: the stream's batch is not read again
        for method in methods:  # one baseline's forecast in memory at a time
            if method in baselines.METHODS:
                forecast = baselines.get_method(method).forecast(inputs, lead_times, units)
            else:  # held by the stream's dict alone: popped, it is freed once scored
                forecast = forecasts.pop(method)
            scores[method].update(forecast, truth, valid)
            del forecast
    for method_scores in scores.values():
        method_scores.load_state(distributed.sum_over_processes(method_scores.state(), device))
    per_lead = {method: s.compute() for method, s in scores.items()}
    return per_lead, {method: mean_over_leads(values) for method, values in per_lead.items()}


def sequences_per_batch(batch_size: int, memory_budget: int | None, source: FrameSource, window: int) -> int:
    """Windows read and scored together: ``batch_size``, or fewer where the raw windows, their truth and the
    forecasts of a method or two (float32) would not fit the memory budget; at least one."""
    per_window = 4 * source.channels * source.height * source.width * 3 * window
    return max(1, min(batch_size, (memory_budget or DEFAULT_BUDGET) // per_window))


def _thresholds(given: tuple[str | float, ...], source: FrameSource, zr: tuple[float, float]) -> dict[str, float]:
    return thresholds_in_units(given or default_thresholds(source.units, source.dataset), source.units, zr)


def _report(label: str, source: FrameSource, windows: int, lead_times: int, per_lead: dict, mean: dict) -> dict:
    minutes = source.timestep_minutes
    return {
        "data": label,
        "dataset": source.dataset,
        "windows": windows,
        "units": source.units,
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
    importer: str | None = None,
    memory_budget: int | None = None,
    matching: str = "auto",
) -> dict:
    """Scores as ``{"lead_times": [...], "scores": {method: {metric: [...]}}, "mean": {method: {metric: x}}}``
    for method in model, persistence, optical_flow, climatology (the model alone without ``with_baselines``).
    ``memory_budget`` (bytes) bounds the windows held at once (``sequences_per_batch``) and each run of the
    model (Forecaster.predict). ``matching``: the model's probability matching (postprocessing.py)."""
    check_scoring(thresholds, fss_scales, zr)
    if split not in ("all", "val"):
        raise UserError(f"--split {split}: choose all or val")
    check_exists(data_paths or [])
    forecaster = Forecaster.load(
        checkpoint_path or checkpoint.newest_best(), device, precision, compile, memory_budget, matching
    )
    source = forecaster.open_inputs(data_paths, dataset, layout, importer)  # None: standard input
    rank, world = distributed.setup(forecaster.device)
    spec = forecaster.spec
    check_batch_size(batch_size)
    chosen = split_windows(source, spec)[1] if split == "val" else windows(source, spec.window, spec.stride)
    if not chosen:
        raise UserError(f"--split val: {forecaster.checkpoint_path} was trained without a validation split")
    forecaster.model.config.log_padding(source.label, source.height, source.width)
    norm = forecaster.normalisation
    climatology = norm.mean_frame.to(forecaster.device)
    methods = ["model"]
    if with_baselines:
        methods += baselines.usable(spec.input_frames)
        if climatology.shape == (source.channels, source.height, source.width):
            methods.append("climatology")
        else:
            log.warning("no climatology baseline: the frames are not the size the model was trained on")

    held = sequences_per_batch(batch_size, memory_budget, source, spec.window)

    def batch_stream() -> Iterator[Batch]:
        for batch_windows in batches(chosen[rank::world], held):  # under torchrun each process scores a share
            batch = stack(source.read(n, s, spec.window) for n, s in batch_windows).to(forecaster.device)
            inputs, truth = batch[:, : spec.input_frames], batch[:, spec.input_frames :]
            forecasts = {"model": forecaster.predict(inputs, spec.output_frames)}
            if "climatology" in methods:
                forecasts["climatology"] = climatology.expand_as(forecasts["model"])
            yield inputs, truth, forecasts

    zero_one = zero_one_scale(norm.dtype, norm.data_min, norm.data_max)
    data_range = zero_one or max(norm.data_max - norm.data_min, 1e-12)
    labelled = _thresholds(thresholds, source, zr)
    per_lead, mean = _score(
        batch_stream(),
        methods,
        spec.output_frames,
        lambda: Scores(spec.output_frames, data_range, labelled, zero_one, fss_scales),
        forecaster.device,
        source.units,
    )
    distributed.finish()
    report = _report(", ".join(data_paths or ["<stdin>"]), source, len(chosen), spec.output_frames, per_lead, mean)
    return {"checkpoint": forecaster.checkpoint_path, "matching": forecaster.matching, **report}


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
    memory_budget: int | None = None,
) -> dict:
    """Score a forecast file (dataset ``forecast`` [N, T, (C,) H, W], from any model) against the frames of a
    truth file from ``truth_start`` on: by default the frame after the forecast's recorded input window. The
    truth frames before ``truth_start`` drive the persistence and optical-flow baselines. Every frame is read
    once, so neither file is cached in memory."""
    check_scoring(thresholds, fss_scales, zr)
    with open_hdf5(forecast_path) as file:
        if "forecast" not in file:
            raise UserError(f"{forecast_path}: no dataset 'forecast' (a convgru predict output, or the same layout)")
        forecast = StackedFrames(file, "forecast", text_attribute(file["forecast"], "layout") or None, cache=False)
        recorded = text_attribute(file, "input_frames")
    with open_hdf5(truth_path) as file:
        truth = StackedFrames(file, pick_dataset(file, dataset), layout, cache=False)
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
    check_batch_size(batch_size)

    held = sequences_per_batch(batch_size, memory_budget, truth, history + 2 * lead_times)

    def batch_stream() -> Iterator[Batch]:
        for sequences in batches(range(truth.sequences), held):
            inputs = stack(truth.read(n, truth_start - history, history) for n in sequences)
            observed = stack(truth.read(n, truth_start, lead_times) for n in sequences)
            forecasts = {"forecast": stack(forecast.read(n, 0, lead_times) for n in sequences).float().nan_to_num_()}
            yield inputs, observed, forecasts

    if truth.dtype == np.uint8:
        data_range, zero_one = 255.0, 255.0
    else:
        low, high = value_range(truth)
        data_range, zero_one = max(high - low, 1e-12), zero_one_scale(str(truth.dtype), low, high)
    labelled = _thresholds(thresholds, truth, zr)
    per_lead, mean = _score(
        batch_stream(),
        ["forecast", *baselines.usable(history)],
        lead_times,
        lambda: Scores(lead_times, data_range, labelled, zero_one, fss_scales),
        torch.device("cpu"),
        truth.units,
    )
    report = _report(truth_path, truth, truth.sequences, lead_times, per_lead, mean)
    return {"forecast": forecast_path, "truth_start": truth_start, **report}


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
