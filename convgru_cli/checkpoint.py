"""Checkpoints: weights plus plain data, written atomically, read with ``weights_only=True``.

A checkpoint never runs code when loaded, and a crash while writing one leaves the previous file intact.
"""

from __future__ import annotations

import glob
import logging
import os

import torch

from convgru_cli import __version__
from convgru_cli.atomic import write_atomically
from convgru_cli.errors import UserError
from convgru_cli.model import ModelConfig
from convgru_cli.normalisation import Normalisation
from convgru_cli.windowing import DataSpec

log = logging.getLogger("convgru")

FORMAT = "convgru-checkpoint"
FORMAT_VERSION = 1
# What predict, evaluate, inspect and resume all read.
CONTENTS = ("model_config", "data_spec", "normalisation", "train_config", "progress", "model")


def save(path: str, contents: dict) -> None:
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "software_version": __version__, **contents}
    write_atomically(path, lambda file: torch.save(payload, file))


def load(path: str, map_location: str | torch.device = "cpu") -> dict:
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such checkpoint file")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many types for damaged or foreign files
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{path}: not a readable convgru checkpoint ({reason[:200]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path}: not a convgru checkpoint")
    if payload.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{path}: checkpoint format {payload.get('format_version')} is not supported by convgru "
            f"{__version__} (which reads format {FORMAT_VERSION})"
        )
    missing = [key for key in CONTENTS if key not in payload]
    if missing:
        raise UserError(f"{path}: a damaged convgru checkpoint, without its {', '.join(missing)}")
    return payload


def configs(saved: dict) -> tuple[ModelConfig, DataSpec, Normalisation]:
    """The model, data and normalisation objects that a loaded checkpoint's plain data describes."""
    return (
        ModelConfig.from_dict(saved["model_config"]),
        DataSpec.from_dict(saved["data_spec"]),
        Normalisation.from_dict(saved["normalisation"]),
    )


def describe(path: str) -> dict:
    """What a checkpoint holds, as plain data: versions, parameter count, the model, data and train
    configuration, normalisation and progress (without the mean frame and the per-epoch history)."""
    saved = load(path)
    return {
        "checkpoint": path,
        "software_version": saved["software_version"],
        "format_version": saved["format_version"],
        "parameters": sum(t.numel() for t in saved["model"].values()),
        "model_config": saved["model_config"],
        "data_spec": saved["data_spec"],
        "normalisation": {k: v for k, v in saved["normalisation"].items() if k != "mean_frame"},
        "train_config": saved["train_config"],
        "progress": {k: v for k, v in saved["progress"].items() if k != "history"},
    }


def newest_best(pattern: str = os.path.join("runs", "*", "best.pt")) -> str:
    """The most recently written best checkpoint under runs/, the default for predict and evaluate."""
    found = glob.glob(pattern)
    if not found:
        raise UserError(f"no checkpoint given and none found at {pattern}; train one or pass --checkpoint")
    newest = max(found, key=os.path.getmtime)
    log.info("using checkpoint %s (the newest %s)", newest, pattern)
    return newest
