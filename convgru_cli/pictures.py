"""Forecasts people can see: PNG strips and GIF loops of inputs, truth and forecast side by side.

Rain rates and reflectivity get a discrete radar palette (white below the lowest level, as on radar maps);
anything else is drawn in grey between the data's bounds.
"""

from __future__ import annotations

from datetime import datetime

import numpy as np
from PIL import Image, ImageDraw

from convgru_cli.atomic import write_atomically
from convgru_cli.errors import UserError
from convgru_cli.metrics import PLOT_SCORES, shown

# Levels in data units and the colour from each level up (light blue through green and yellow to red, purple).
RADAR_COLOURS = [
    (0xC8, 0xE6, 0xFF), (0x78, 0xB4, 0xFF), (0x28, 0x64, 0xDC), (0x32, 0xB4, 0x32), (0x14, 0x82, 0x14),
    (0xFA, 0xE6, 0x32), (0xFA, 0x96, 0x1E), (0xE6, 0x1E, 0x1E), (0xA0, 0x00, 0x28), (0xB4, 0x3C, 0xDC),
]  # fmt: skip
RADAR_LEVELS = {
    "mm/h": [0.1, 0.5, 1, 2, 5, 10, 20, 30, 50, 100],
    "dbz": [5, 10, 15, 20, 25, 30, 40, 45, 55, 65],
}
LABEL_HEIGHT = 14


def colourise(frames: np.ndarray, units: str, low: float, high: float) -> np.ndarray:
    """[..., H, W] data -> [..., H, W, 3] uint8 RGB."""
    levels = RADAR_LEVELS.get(units.strip().lower())
    if levels is None:
        scaled = np.clip((np.nan_to_num(frames, nan=low) - low) / max(high - low, 1e-12), 0, 1)
        grey = (scaled * 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    palette = np.array([(255, 255, 255), *RADAR_COLOURS], dtype=np.uint8)
    return palette[np.digitize(np.nan_to_num(frames, nan=-np.inf), levels)]


def _tile(rgb: np.ndarray, scale: int, label: str) -> Image.Image:
    image = Image.fromarray(rgb).resize((rgb.shape[1] * scale, rgb.shape[0] * scale), Image.NEAREST)
    tile = Image.new("RGB", (image.width, image.height + LABEL_HEIGHT), (255, 255, 255))
    tile.paste(image, (0, LABEL_HEIGHT))
    ImageDraw.Draw(tile).text((2, 1), label, fill=(0, 0, 0))
    return tile


def _row(tiles: list[Image.Image], gap: int = 2) -> Image.Image:
    width = sum(t.width for t in tiles) + gap * (len(tiles) - 1)
    row = Image.new("RGB", (width, max(t.height for t in tiles)), (255, 255, 255))
    x = 0
    for tile in tiles:
        row.paste(tile, (x, 0))
        x += tile.width + gap
    return row


def _lead_label(step: int, minutes: float) -> str:
    return f"+{step * minutes:g} min" if minutes else f"+{step}"


def _frame_label(kind: str, step: int, minutes: float, time: datetime | None) -> str:
    """What a panel shows: its valid time where the data has times, and its lead (minutes where known)."""
    lead = f"{step * minutes:+g} min" if minutes else f"{step:+d}"
    return f"{kind} {time:%H:%M} ({lead})" if time else f"{kind} {lead}"


def legend(units: str, low: float, high: float) -> Image.Image:
    """The colour scale with its units: the radar palette's level from which each colour starts, or the grey ramp's
    bounds."""
    levels = RADAR_LEVELS.get(units.strip().lower())
    box = 34
    if levels is None:
        image = Image.new("RGB", (256 + 2 * box + 60, 2 * LABEL_HEIGHT + 4), "white")
        draw = ImageDraw.Draw(image)
        for x in range(256):
            draw.line([(box + x, 2), (box + x, LABEL_HEIGHT)], fill=(x, x, x))
        draw.rectangle((box, 2, box + 255, LABEL_HEIGHT), outline=(0, 0, 0))
        draw.text((box, LABEL_HEIGHT + 3), f"{low:.4g}", fill=(0, 0, 0))
        draw.text((box + 256 - 6 * len(f"{high:.4g}"), LABEL_HEIGHT + 3), f"{high:.4g}", fill=(0, 0, 0))
        draw.text((box + 262, 3), units or "(no units)", fill=(0, 0, 0))
        return image
    colours = [(255, 255, 255), *RADAR_COLOURS]
    image = Image.new("RGB", (box * len(colours) + 80, 2 * LABEL_HEIGHT + 4), "white")
    draw = ImageDraw.Draw(image)
    for index, colour in enumerate(colours):
        draw.rectangle((index * box, 2, (index + 1) * box - 1, LABEL_HEIGHT), fill=colour, outline=(0, 0, 0))
        text = f"<{levels[0]:g}" if index == 0 else f"{levels[index - 1]:g}"
        draw.text((index * box + 2, LABEL_HEIGHT + 3), text, fill=(0, 0, 0))
    draw.text((len(colours) * box + 6, 3), units, fill=(0, 0, 0))
    return image


def _stacked(parts: list[Image.Image], gap: int = 4) -> Image.Image:
    image = Image.new("RGB", (max(p.width for p in parts), sum(p.height + gap for p in parts)), "white")
    y = 0
    for part in parts:
        image.paste(part, (0, y))
        y += part.height + gap
    return image


def _title(text: str) -> Image.Image:
    image = Image.new("RGB", (6 * len(text) + 8, LABEL_HEIGHT), "white")
    ImageDraw.Draw(image).text((2, 1), text, fill=(0, 0, 0))
    return image


def render(
    inputs: np.ndarray,
    forecast: np.ndarray,
    truth: np.ndarray | None,
    units: str,
    minutes: float = 0.0,
    times: list[datetime] | None = None,
    title: str = "",
) -> tuple[Image.Image, list[Image.Image]]:
    """Inputs [T_in, H, W], forecast [T_out, H, W], truth [T_out, H, W] or None (one channel); ``times``, where the
    data has them, the valid time of each input and forecast frame; ``title`` says where the frames come from.

    Returns the PNG strip (title, rows: inputs, truth, forecast, then the colour scale) and the GIF frames (last
    input | truth | forecast, each with the title and the scale)."""
    observed = [inputs] + ([truth] if truth is not None else [])  # the colour scale follows the observations
    finite = np.concatenate([a[np.isfinite(a)] for a in observed])
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    scale = max(1, 192 // max(inputs.shape[-2:]))
    image = {name: colourise(a, units, low, high) for name, a in (("in", inputs), ("fc", forecast))}
    time_of = (lambda k: times[len(inputs) - 1 + k]) if times else (lambda k: None)  # noqa: E731
    input_tiles = [
        _tile(f, scale, _frame_label("input", i - len(inputs) + 1, minutes, time_of(i - len(inputs) + 1)))
        for i, f in enumerate(image["in"])
    ]
    rows = {"input": input_tiles}
    if truth is not None:
        image["truth"] = colourise(truth, units, low, high)
    for kind, key in (("truth", "truth"), ("forecast", "fc")):
        if key in image:
            rows[kind] = [
                _tile(f, scale, _frame_label(kind, k + 1, minutes, time_of(k + 1))) for k, f in enumerate(image[key])
            ]
    scale_bar = legend(units, low, high)
    if times and times[0].tzname():
        title = f"{title}, valid times in {times[0].tzname()}"
    heading = [_title(title)] if title else []
    strip = _stacked([*heading, *(_row(tiles) for tiles in rows.values()), scale_bar])
    loop = [
        _stacked(
            [
                *heading,
                _row([input_tiles[-1], *(rows[kind][k] for kind in ("truth", "forecast") if kind in rows)]),
                scale_bar,
            ]
        )
        for k in range(len(forecast))
    ]
    return strip, loop


def save_png(path: str, image: Image.Image, force: bool) -> None:
    write_atomically(path, lambda file: image.save(file, format="PNG"), force=force)


def save_gif(path: str, frames: list[Image.Image], force: bool, milliseconds: int = 400) -> None:
    if not frames:
        raise UserError(f"{path}: no frames to draw")
    write_atomically(
        path,
        lambda file: frames[0].save(
            file, format="GIF", save_all=True, append_images=frames[1:], duration=milliseconds, loop=0
        ),
        force=force,
    )


METHOD_COLOURS = [(0xD6, 0x27, 0x28), (0x1F, 0x77, 0xB4), (0x2C, 0xA0, 0x2C), (0x94, 0x67, 0xBD), (0x8C, 0x56, 0x4B)]


def _score_unit(metric: str, units: str) -> str:
    """The unit of a score of data in ``units`` (the bitmap font has no superscripts): squared for MSE, none for
    SSIM, the threshold's for CSI."""
    if not units or metric == "ssim":
        return ""
    return {"mse": f"({units})^2", "psnr": "dB"}.get(metric, units)


def plot_scores(report: dict, width: int = 300, height: int = 200) -> Image.Image:
    """One small panel per score (MSE, MAE, SSIM, PSNR and each CSI) against lead time, a line per method."""
    methods = list(report["scores"])
    metrics = shown(report["scores"][methods[0]], PLOT_SCORES)
    leads, minutes = report["lead_times"], report.get("lead_minutes")
    canvas = Image.new("RGB", (width * min(len(metrics), 3), height * -(-len(metrics) // 3) + 20), "white")
    draw = ImageDraw.Draw(canvas)
    x = 4
    for method, colour in zip(methods, METHOD_COLOURS, strict=False):
        draw.line([(x, 10), (x + 16, 10)], fill=colour, width=3)
        draw.text((x + 20, 4), method, fill=(0, 0, 0))
        x += 30 + 7 * len(method)
    for index, metric in enumerate(metrics):
        left, top = (index % 3) * width, 20 + (index // 3) * height
        box = (left + 44, top + 16, left + width - 10, top + height - 24)
        draw.rectangle(box, outline=(0, 0, 0))
        draw.text((left + 44, top + 2), f"{metric} {_score_unit(metric, report['units'])}".strip(), fill=(0, 0, 0))
        values = [v for m in methods for v in report["scores"][m][metric] if v == v]  # NaN != NaN
        if not values:
            continue
        low, high = min(values), max(values)
        high = high if high > low else low + 1

        def point(k: int, value: float, box=box, low=low, high=high) -> tuple[float, float]:
            fraction = (k / max(len(leads) - 1, 1), (value - low) / (high - low))
            return box[0] + fraction[0] * (box[2] - box[0]), box[3] - fraction[1] * (box[3] - box[1])

        draw.text((left + 2, box[1] - 4), f"{high:.3g}", fill=(0, 0, 0))
        draw.text((left + 2, box[3] - 8), f"{low:.3g}", fill=(0, 0, 0))
        first, last = (f"+{m:g} min" for m in (minutes[0], minutes[-1])) if minutes else (leads[0], leads[-1])
        draw.text((box[0], box[3] + 4), f"{first}", fill=(0, 0, 0))
        draw.text(((box[0] + box[2]) // 2 - 24, box[3] + 4), "lead time", fill=(0, 0, 0))
        draw.text((box[2] - 6 * len(str(last)), box[3] + 4), f"{last}", fill=(0, 0, 0))
        for method, colour in zip(methods, METHOD_COLOURS, strict=False):
            line = [point(k, v) for k, v in enumerate(report["scores"][method][metric]) if v == v]
            if len(line) > 1:
                draw.line(line, fill=colour, width=2)
    return canvas
