"""Probability matching: a forecast's values replaced, rank for rank, by those of the last observed frame.

The field's remedy for forecasts whose intensities drift (pysteps' STEPS and S-PROG match each forecast frame's
cumulative distribution to the last observation's). The model decides where it rains and in which order of
intensity; the observation decides how much rain there is. A model trained with Shi's balanced loss needs it:
the loss weights a pixel by the observed rain there, so under uncertainty its optimum lies above the
observation, and the rain area grows with lead time (frequency bias at 2 mm/h 1.41 at 30 minutes on another
radar's event; matched, 1.07, as persistence: benchmarks/README.md, bench_radar). A model trained otherwise
keeps its own values, which score better where it learned growth and decay.
"""

from __future__ import annotations

import torch

from convgru_cli.errors import UserError

MATCHINGS = ("auto", "none", "cdf")


def resolve(name: str, loss: str) -> str:
    """``auto``: ``cdf`` for a model trained with the balanced loss, ``none`` otherwise."""
    if name not in MATCHINGS:
        raise UserError(f"--matching {name}: choose one of {', '.join(MATCHINGS)}")
    if name != "auto":
        return name
    return "cdf" if loss == "balanced" else "none"


def match_cdf(forecast: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """``forecast`` [B, L, C, H, W] with each frame's values replaced by those of ``observed`` [B, C, H, W] (the
    last input frame) at the same rank, over the pixels where the observation has data (in place; returned).
    Pixels at the forecast frame's lowest value (no rain) stay at the observation's lowest: a forecast with less
    rain area than the observation keeps its own area and takes the observation's heaviest values, rather than
    scattering rain over dry pixels that tie in rank."""
    for b in range(forecast.shape[0]):
        for c in range(forecast.shape[2]):
            valid = torch.isfinite(observed[b, c])
            values = observed[b, c][valid].to(forecast.dtype).sort().values
            if not len(values):
                continue
            for lead in range(forecast.shape[1]):
                frame = forecast[b, lead, c]
                given = frame[valid]
                wet = given > given.min()
                matched = torch.full_like(given, values[0])
                ranks = given[wet].argsort()
                heaviest = values[len(values) - len(ranks) :]
                matched[wet] = torch.empty_like(heaviest).index_copy_(0, ranks, heaviest)
                frame[valid] = matched
    return forecast
