"""Value transforms: the space the model works in, chosen by the data's units.

Rain rates span orders of magnitude and most pixels are dry, so the field models them in decibels (pysteps'
habit): dBR = 10·log10(R) for R ≥ 0.1 mm/h and a fixed −15 dBR below, which the inverse maps back to 0. The
inverse has a natural ceiling in practice, since a dB value drifts additively, not exponentially as an
unbounded log(1 + x) model's intensities did. Reflectivity is already logarithmic; it is held at its no-echo
floor. Every transform is recorded in the checkpoint and undone in the output.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from convgru_cli.errors import UserError

RAIN_THRESHOLD = 0.1  # mm/h: below it, no rain
RAIN_ZERO_DB = -15.0  # dBR given to dry pixels, below the threshold's 10·log10(0.1) = −10
NO_ECHO_DBZ = -32.0  # the no-echo floor of OPERA and FMI reflectivity
RAIN_UNITS = {"mm/h", "mm h-1", "mm hr-1", "mm/hr", "mmh-1", "mm", "kg m-2 s-1", "kg m-2"}
REFLECTIVITY_UNITS = {"dbz"}


def _db_forward(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= RAIN_THRESHOLD, 10 * torch.log10(x.clamp(min=RAIN_THRESHOLD)), RAIN_ZERO_DB)


def _db_inverse(x: torch.Tensor) -> torch.Tensor:
    threshold_db = 10 * math.log10(RAIN_THRESHOLD)
    return torch.where(x >= threshold_db, torch.pow(10.0, x / 10), 0.0)


def _floor(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(min=NO_ECHO_DBZ)


def _log_forward(x: torch.Tensor) -> torch.Tensor:
    return torch.log1p(x.clamp(min=0))


def _log_inverse(x: torch.Tensor) -> torch.Tensor:
    return torch.expm1(x).clamp(min=0)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


# name -> (data units to model space, back); NaN (no data) stays NaN through every forward transform.
TRANSFORMS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]] = {
    "none": (_identity, _identity),
    "db": (_db_forward, _db_inverse),
    "log": (_log_forward, _log_inverse),
    "dbz": (_floor, _floor),
}
CHOICES = ("auto", *TRANSFORMS)


def resolve(name: str, units: str) -> str:
    """``auto`` picks by units: dB for rain rates and accumulations, the no-echo floor for reflectivity."""
    if name not in CHOICES:
        raise UserError(f"--transform {name}: choose one of {', '.join(CHOICES)}")
    if name != "auto":
        return name
    plain = units.strip().lower()
    if plain in RAIN_UNITS:
        return "db"
    return "dbz" if plain in REFLECTIVITY_UNITS else "none"


def from_saved(values: dict) -> dict:
    """Saved settings with the transform named: checkpoints from before held ``log_transform``, a bool."""
    values = dict(values)
    legacy = values.pop("log_transform", None)
    values.setdefault("transform", "log" if legacy else "none")
    return values


def forward(name: str, x: torch.Tensor) -> torch.Tensor:
    """Data units -> model space; NaN stays NaN."""
    return torch.where(torch.isnan(x), x, TRANSFORMS[name][0](x))


def inverse(name: str, x: torch.Tensor) -> torch.Tensor:
    """Model space -> data units."""
    return TRANSFORMS[name][1](x)
