"""Options shared between commands, their choices taken from the library's registries, the parsers of
option text, and train's ``--config`` file: what the command line needs beyond Typer itself."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tomllib
from typing import Annotated

import typer

from convgru_cli.device import PRECISIONS
from convgru_cli.errors import UserError, finite
from convgru_cli.model import ACTIVATION_CHOICES, ARCHITECTURES, CELLS, FORECASTER_CHOICES
from convgru_cli.sources import NAN_POLICIES
from convgru_cli.train import BALANCED_LR, LOSSES, LR, RAIN_DISTRIBUTION_WEIGHT, REVERSED_SHARE, TrainConfig
from convgru_cli.transforms import CHOICES as TRANSFORMS
from convgru_cli.windowing import DataSpec


def one_of(choices) -> str:
    """ "a, b or c"."""
    names = list(choices)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


DataArg = Annotated[
    str | None,
    typer.Argument(
        help="HDF5 file, or an archive folder or quoted glob of per-time-step files; standard input when omitted.",
        show_default=False,
    ),
]
DataFilesArg = Annotated[
    list[str] | None,
    typer.Argument(help="HDF5 file(s), globs or an archive folder, scored as one set (default: stdin)."),
]
DatasetOpt = Annotated[
    str | None,
    typer.Option(help="HDF5 dataset holding the frames, or an archive's quantity (DBZH, RATE) or CF variable."),
]
LayoutOpt = Annotated[str | None, typer.Option(help="Axis letters, e.g. NTHW, NTCHW, THW, TCHW (auto by rank).")]
CheckpointOpt = Annotated[str | None, typer.Option(help="Checkpoint; default: the newest runs/*/best.pt.")]
DeviceOpt = Annotated[str, typer.Option(help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.")]
PrecisionOpt = Annotated[str, typer.Option(help=f"{one_of(PRECISIONS)}; auto: bf16 where fast.")]
CompileOpt = Annotated[
    bool, typer.Option(help="torch.compile the model (CUDA graphs on CUDA); minutes to start, pays on long runs.")
]
BatchSizeOpt = Annotated[int, typer.Option(help="Sequences per batch.")]
ImporterOpt = Annotated[
    str | None,
    typer.Option(
        help="Read an archive's files with this pysteps importer (knmi_hdf5, mch_gif, fmi_pgm, mrms_grib, ...; "
        "needs pysteps); ODIM_H5 and CF netCDF are read without it."
    ),
]
MemoryBudgetOpt = Annotated[
    str | None,
    typer.Option(
        help="Memory a run of the model may take, e.g. 4GB: whole frames, fewer sequences at a time, or "
        "overlapping tiles blended back \\[default: 1GB, or the smallest tile].",
        show_default=False,
    ),
]
MatchingOpt = Annotated[
    str,
    typer.Option(
        help="Probability matching of the model's forecast to the last observed frame's values: cdf, none; auto: "
        "cdf for a model trained with --loss balanced (which grows rain with lead time), none otherwise."
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]

# train's own
NanPolicyOpt = Annotated[
    str, typer.Option(help=f"NaN (no data): {one_of(NAN_POLICIES)} (mask: out of loss and scores).")
]
ArchOpt = Annotated[str, typer.Option(help=f"Architecture: {one_of(ARCHITECTURES)}.")]
CellOpt = Annotated[str, typer.Option(help=f"{one_of(CELLS)}.")]
ForecasterOpt = Annotated[
    str,
    typer.Option(
        help=f"{one_of(FORECASTER_CHOICES)}: anchored carries the last frame along its estimated motion and learns "
        "the corrections; shi redraws every frame from hidden state (Shi et al. 2017); auto: anchored for rain and "
        "reflectivity (a --transform other than none), shi for other data such as video."
    ),
]
ActivationOpt = Annotated[
    str,
    typer.Option(
        help=f"{one_of(ACTIVATION_CHOICES)}: the cells' activation; tanh bounds their states, leaky (Shi et al.'s) "
        "does not; auto: tanh for rain and reflectivity (a --transform other than none), leaky for other data."
    ),
]
TransformOpt = Annotated[
    str,
    typer.Option(
        help=f"Space the model works in: {one_of(TRANSFORMS)}; auto: dB for rain (mm/h, mm), the no-echo floor "
        "for dBZ, none otherwise."
    ),
]
AugmentOpt = Annotated[
    bool | None,
    typer.Option(
        "--augment/--no-augment",
        help=f"Turn, mirror, run {REVERSED_SHARE:.0%} of them backwards in time and (rain) rescale by 1/2 to 4 the "
        "training windows, drawn by the seed \\[default: on for rain rates, which are modelled in dB; else off].",
        show_default=False,
    ),
]
DistributionWeightOpt = Annotated[
    float | None,
    typer.Option(
        help="Weight of the loss on each frame's sorted values: keeps the observed intensities "
        f"\\[default: {RAIN_DISTRIBUTION_WEIGHT:g} for rain rates, which are modelled in dB; else 0].",
        show_default=False,
    ),
]
LrOpt = Annotated[
    float | None,
    typer.Option(
        help=f"Peak learning rate (AdamW, warm-up then cosine decay) \\[default: {LR:g}; {BALANCED_LR:g} with --loss "
        "balanced, which diverged half the time at the higher rate].",
        show_default=False,
    ),
]
LossOpt = Annotated[str, typer.Option(help=f"{one_of(LOSSES)} (balanced: Shi 2017, for rain).")]
EpochsOpt = Annotated[
    int | None,
    typer.Option(
        help=f"Passes over the training windows \\[default: {TrainConfig.epochs}; with --max-time, until it is up]."
    ),
]
CacheOpt = Annotated[str, typer.Option(help="Hold the data in memory: auto (if it fits in 2 GiB), on, off.")]

# Options that say how to run, not what to train: never read from or saved to a config file, and given anew
# when a run is resumed.
NOT_IN_CONFIG = {"config", "out", "resume", "force", "as_json"}
NOT_OF_THE_RUN = {"data", "resume", "threads", "as_json"}


def floats(text: str | None, option: str) -> tuple[float, ...]:
    """ "0.5,2,5" -> (0.5, 2.0, 5.0); nothing -> ()."""
    if not text:
        return ()
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UserError(f"{option} {text}: expected numbers separated by commas, e.g. 0.5,2,5") from None
    return tuple(finite(value, option) for value in values)


def words(text: str | None) -> tuple[str, ...]:
    """ "0.5, 2mm/h" -> ("0.5", "2mm/h")."""
    return tuple(part.strip() for part in (text or "").split(",") if part.strip())


def crop_size(text: str | None) -> tuple[int, int] | None:
    """ "256" -> (256, 256); "128,256" -> (128, 256); nothing -> None."""
    if not text:
        return None
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) not in (1, 2) or min(sizes) < 1:
        raise UserError(f"--crop {text}: expected SIZE or HEIGHT,WIDTH in pixels, e.g. 256 or 128,256")
    return (sizes[0], sizes[-1])


BYTE_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def memory_budget(text: str | None) -> int | None:
    """ "4GB", "512MiB", "2e9" -> bytes; nothing -> None (the default)."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", text)
    try:
        value = float(match.group(1)) * BYTE_UNITS[match.group(2).lower()] if match else math.nan
    except (KeyError, ValueError):
        value = math.nan
    if not 1e6 <= value < math.inf:
        raise UserError(f"--memory-budget {text}: expected a size of at least 1MB, e.g. 4GB, 512MB or 8GiB")
    return int(value)


def cache_choice(choice: str) -> bool | None:
    if choice not in ("auto", "on", "off"):
        raise UserError(f"--cache {choice}: choose auto, on or off")
    return None if choice == "auto" else choice == "on"


def fields_of(cls, options: dict) -> dict:
    """The options named as the fields of dataclass ``cls``, as its keyword arguments."""
    return {f.name: options[f.name] for f in dataclasses.fields(cls) if f.name in options}


def epochs_of(options: dict) -> int | None:
    """--epochs as given; without it, None (until the time is up) where --max-time is given, else the default."""
    if options["epochs"] is not None:
        return options["epochs"]
    return None if options["max_time"] else TrainConfig.epochs


def train_configs(options: dict) -> tuple[DataSpec, TrainConfig]:
    """The data spec and train configuration that train's (merged) options describe."""
    clip = floats(options["clip"], "--clip") if options["clip"] else None
    spec = DataSpec(**{**fields_of(DataSpec, options), "clip": clip})
    config = TrainConfig(
        **{
            **fields_of(TrainConfig, options),
            "epochs": epochs_of(options),
            "balance_thresholds": floats(options["balance_thresholds"], "--balance-thresholds"),
            "balance_weights": floats(options["balance_weights"], "--balance-weights"),
            "cache": cache_choice(options["cache"]),
            "crop": crop_size(options["crop"]),
            "val_data": tuple(options["val_data"] or ()),
        }
    )
    return spec, config


def train_options(ctx: typer.Context, config_path: str | None) -> dict:
    """train's options with the --config file's merged in, naming at least one data file."""
    options = merge_config(ctx, config_path)
    if not options["data"]:
        raise UserError("no data file: name one, or give 'data' in --config")
    if isinstance(options["data"], str):
        options["data"] = [options["data"]]
    return options


def resume_changes(ctx: typer.Context, options: dict) -> dict:
    """The run's options given on the command line with --resume, as the run records them (train.resume
    compares them with the saved run and says which may change)."""
    given = {name for name in ctx.params if ctx.get_parameter_source(name).name == "COMMANDLINE"}
    if "force" in given:
        raise UserError("--force starts a run over and --resume continues one: give one of them")
    if "out" in given:
        if os.path.normpath(options["out"]) != os.path.normpath(options["resume"]):
            raise UserError(
                f"--out {options['out']}: --resume {options['resume']} continues the run in its own directory"
            )
        given.remove("out")
    spec, config = train_configs(options)
    recorded = {**options, **dataclasses.asdict(spec), **dataclasses.asdict(config)}
    return {name: recorded[name] for name in given - NOT_OF_THE_RUN}


def merge_config(ctx: typer.Context, path: str | None) -> dict:
    """The command's options: a TOML file's values where the command line left the default."""
    options = dict(ctx.params)
    if path is None:
        return options
    try:
        with open(path, "rb") as file:
            from_file = tomllib.load(file)
    except OSError as error:
        raise UserError(f"--config {path}: cannot read ({error.strerror})") from None
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"--config {path}: not valid TOML ({error})") from None
    parameters = {parameter.name: parameter for parameter in ctx.command.params}
    for key, value in from_file.items():
        name = key.replace("-", "_")
        if name not in options or name in NOT_IN_CONFIG:
            raise UserError(f"--config {path}: unknown train option {key!r}")
        parameter = parameters[name]
        single = parameter.nargs == 1 and not parameter.multiple
        if isinstance(value, list) and single:
            value = ",".join(str(item) for item in value)  # clip = [0, 200], as --clip 0,200
        elif isinstance(value, str) and not single:
            value = [value]  # data = "radar.h5"
        try:
            value = parameter.process_value(ctx, value)  # the checks the command line gets
        except typer.BadParameter as error:
            raise UserError(f"--config {path}: {key} = {value!r}: {error.message}") from None
        source = ctx.get_parameter_source(name)
        if source is None or source.name in ("DEFAULT", "DEFAULT_MAP"):
            options[name] = value
    return options


def to_toml(options: dict) -> str:
    """Flat TOML of the options that go in a config file; JSON's literals for strings, numbers and booleans
    are valid TOML."""
    lines = [
        f"{name.replace('_', '-')} = {json.dumps(value)}"
        for name, value in options.items()
        if value is not None and name not in NOT_IN_CONFIG
    ]
    return "\n".join(lines) + "\n"
