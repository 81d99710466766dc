"""What the command line writes: errors as one line and an exit code, results as JSON or tables.

Exit codes: 0 success, 2 bad usage or input, 1 an unexpected failure, 130 interrupted (after saving).
Logs and progress go to standard error; standard output carries only results (tables, JSON, HDF5).
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass

import typer
from rich.console import Console
from rich.table import Table

from convgru_cli.errors import UserError
from convgru_cli.metrics import shown
from convgru_cli.train import Interrupted


@dataclass
class Settings:
    """The options of the command line as a whole, kept in Typer's context."""

    debug: bool = False
    quiet: bool = False


def settings(ctx: typer.Context) -> Settings:
    found = ctx.find_root().obj
    return found if isinstance(found, Settings) else Settings()


def reported(command):
    """Turn a UserError into one line on stderr and exit code 2; --debug shows the traceback instead. The
    command takes Typer's context as ``ctx``: the settings are there."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as error:
            if "ctx" in kwargs and settings(kwargs["ctx"]).debug:
                raise
            # An error raised in a DataLoader worker arrives wrapped with the worker's traceback: keep its message.
            message = str(error).strip().splitlines()[-1].split("UserError: ", 1)[-1]
            typer.echo(f"convgru: error: {message}", err=True)
            raise typer.Exit(2) from None
        except Interrupted as stop:
            typer.echo(
                f"convgru: interrupted; last.pt saved. Resume with: convgru train DATA --resume {stop.run_dir}",
                err=True,
            )
            raise typer.Exit(130) from None
        except KeyboardInterrupt:
            typer.echo("convgru: interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


def main_process() -> bool:
    """Under torchrun only rank 0 prints results."""
    return os.environ.get("RANK", "0") == "0"


def to_json(value: object) -> str:
    """JSON with NaN (an undefined score) written as null."""

    def clean(item):
        if isinstance(item, float) and not math.isfinite(item):
            return None
        if isinstance(item, dict):
            return {k: clean(v) for k, v in item.items()}
        if isinstance(item, list | tuple):
            return [clean(v) for v in item]
        return item

    return json.dumps(clean(value), indent=2)


def print_scores(report: dict) -> None:
    """The headline scores of each method per lead time and on average, as a table."""
    methods = list(report["scores"])
    metrics = shown(next(iter(report["scores"].values())))  # the rest: --json, --csv
    table = Table(title=f"{report['data']}: {report['windows']} windows, units {report['units'] or '-'}")
    table.add_column("lead", justify="right")
    for metric in metrics:
        for method in methods:
            table.add_column(f"{metric}\n{method[:5]}", justify="right")
    rows = [
        (str(lead), {m: {k: v[i] for k, v in report["scores"][m].items()} for m in methods})
        for i, lead in enumerate(report["lead_times"])
    ]
    rows.append(("mean", report["mean"]))
    for label, values in rows:
        table.add_row(label, *[f"{values[method][metric]:.4g}" for metric in metrics for method in methods])
    Console(width=max(120, 12 * len(metrics) * len(methods))).print(table)


def print_inspection(report: dict) -> None:
    """One row per dataset of `convgru data inspect`, then each dataset's problem."""
    table = Table(title=report["file"])
    for column in ("dataset", "shape", "dtype", "chunks", "compression", "layout", "range", "no data", "windows"):
        table.add_column(column)
    for d in report["datasets"]:
        value_range = f"{d['min']:.4g} .. {d['max']:.4g}" if d.get("min") is not None else ""
        no_data = f"{d['no_data_fraction']:.1%}" if "no_data_fraction" in d else ""
        table.add_row(
            d["name"],
            "x".join(map(str, d["shape"])),
            d["dtype"],
            str(d["chunks"] or "-"),
            str(d["compression"] or "-"),
            d.get("layout", ""),
            value_range,
            no_data,
            str(d.get("windows", "")),
        )
    Console(width=140).print(table)
    archive = report.get("archive")
    if archive:
        typer.echo(
            f"{archive['files']} files of {archive['quantity']}, {archive['first_time']} .. {archive['last_time']}, "
            f"every {archive['timestep_minutes']:g} min; projection {archive['projection'] or 'unknown'}"
        )
        for gap in archive["gaps"]:
            typer.echo(f"gap: no frame after {gap['after']} until {gap['before']}")
        if not archive["gaps"]:
            typer.echo("no gaps")
    for d in report["datasets"]:
        if "problem" in d:
            typer.echo(f"{d['name']}: {d['problem']}")
