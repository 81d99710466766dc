"""Verification: the model's forecasts and the baselines, scored per lead time on every window of a file.

Baselines: persistence (the last input frame held) and climatology (the training split's mean frame,
stored in the checkpoint). On moving digits a blank frame already beats persistence, so a model has to
beat both to show skill.
"""

from __future__ import annotations

import numpy as np
import torch

from convgru_cli import checkpoint, data, distributed
from convgru_cli.errors import UserError
from convgru_cli.forecast import Forecaster
from convgru_cli.metrics import Scores, mean_over_leads

METHODS = ("model", "persistence", "climatology")


def evaluate_file(
    data_path: str | None,
    checkpoint_path: str | None = None,
    dataset: str | None = None,
    layout: str | None = None,
    split: str = "all",
    thresholds: tuple[float, ...] = (),
    batch_size: int = 16,
    device: str = "auto",
    precision: str = "auto",
) -> dict:
    """Scores as ``{"lead_times": [...], "scores": {method: {metric: [...]}}, "mean": {method: {metric: x}}}``."""
    if split not in ("all", "val"):
        raise UserError(f"--split {split}: choose all or val")
    rank, world = distributed.setup()
    with data.open_hdf5(data_path) as file:
        forecaster = Forecaster.load(checkpoint_path or checkpoint.newest_best(), device, precision)
        spec = forecaster.spec
        name = data.pick_dataset(file, dataset or (spec.dataset if spec.dataset in file else None))
        frames = data.Frames(file, name, layout, nan_policy=spec.nan_policy)
    forecaster.check_frames(frames)
    if split == "val":
        _, chosen = data.split_windows(frames, spec)
    else:
        chosen = data.windows(frames, spec.window, spec.stride)

    norm = forecaster.normalisation
    data_range = norm.zero_one_scale or max(norm.data_max - norm.data_min, 1e-12)
    scores = {m: Scores(spec.output_frames, data_range, thresholds, norm.zero_one_scale) for m in METHODS}
    climatology = norm.mean_frame.to(forecaster.device)
    mine = chosen[rank::world]  # under torchrun each process scores a share; the sums are merged below
    for begin in range(0, len(mine), batch_size):
        batch = np.stack([frames.read(n, s, spec.window) for n, s in mine[begin : begin + batch_size]])
        batch = torch.from_numpy(batch).to(forecaster.device)
        inputs, truth = batch[:, : spec.input_frames], batch[:, spec.input_frames :].float()
        valid = torch.isfinite(truth)
        truth = torch.nan_to_num(truth)
        last = torch.nan_to_num(inputs[:, -1:].float())
        candidates = {
            "model": forecaster.predict(inputs, spec.output_frames),
            "persistence": last.expand_as(truth),
            "climatology": climatology.expand_as(truth),
        }
        for method, prediction in candidates.items():
            scores[method].update(prediction, truth, valid)

    for method_scores in scores.values():
        method_scores.load_state(distributed.sum_over_processes(method_scores.state(), forecaster.device))
    per_lead = {method: s.compute() for method, s in scores.items()}
    minutes = frames.timestep_minutes
    return {
        "checkpoint": forecaster.checkpoint_path,
        "data": data_path or "<stdin>",
        "dataset": name,
        "windows": len(chosen),
        "units": norm.units,
        "lead_times": list(range(1, spec.output_frames + 1)),
        "lead_minutes": [minutes * k for k in range(1, spec.output_frames + 1)] if minutes else None,
        "scores": per_lead,
        "mean": {method: mean_over_leads(values) for method, values in per_lead.items()},
    }
