"""Forecast scores per lead time, accumulated batch by batch and mergeable across workers.

Continuous: MSE and MAE per pixel (data units), OpenSTL's per-frame sum of squared errors on [0, 1] data
(``mse_frame_sum``, the unit of the Moving MNIST tables), SSIM (Gaussian window 11, σ 1.5) and PSNR. No-data
pixels are left out of every score but SSIM, which is computed over whole frames (frames without any data
are left out of it too).
Categorical, at thresholds in data units: hits, misses, false alarms and correct negatives over all valid
pixels, from which CSI, POD, FAR, HSS, ETS and frequency bias follow; optionally the fractions skill score
(Roberts and Lean 2008) of event fractions in square windows of ``fss_scales`` pixels. Undefined scores (a
zero denominator: no event observed or forecast) are NaN.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from convgru_cli.errors import UserError, finite

CONTINUOUS = ("mse", "mae", "ssim", "psnr")
CATEGORICAL = ("csi", "pod", "far", "hss", "ets", "bias")


MARSHALL_PALMER = (200.0, 1.6)  # Z = a R^b, Z in mm^6/m^3, R in mm/h
# The field's event thresholds when none are given: HKO-7 rain rates, reflectivity, SEVIR's VIL levels (0-255).
DEFAULT_THRESHOLDS = {"mm/h": (0.5, 2, 5, 10, 30), "dbz": (20, 30, 40), "vil": (16, 74, 133, 160, 181, 219)}


def default_thresholds(units: str, dataset: str) -> tuple[float, ...]:
    """Thresholds by the data's units, or SEVIR's for a dataset named ``vil``; none for other data."""
    if dataset.rsplit("/", 1)[-1].lower() == "vil":
        return DEFAULT_THRESHOLDS["vil"]
    return DEFAULT_THRESHOLDS.get(units.strip().lower(), ())


UNIT_SUFFIXES = {"mm/h": "mm/h", "dbz": "dBZ"}
# The scores a table shows (the rest are in --json and --csv) and the ones a plot draws; and each CSI.
TABLE_SCORES = ("mse", "mae", "ssim")
PLOT_SCORES = CONTINUOUS


def shown(names, continuous: tuple[str, ...] = TABLE_SCORES) -> list[str]:
    """Of the score ``names``, those to show: the ``continuous`` ones and the CSI at each threshold."""
    return [name for name in names if name in continuous or name.startswith("csi@")]


def zero_one_scale(dtype: str, low: float, high: float) -> float | None:
    """Divisor that maps the data onto [0, 1] where that is its natural range (uint8, or floats in 0-1)."""
    if dtype == "uint8":
        return 255.0
    if low >= 0 and high <= 1:
        return 1.0
    return None


def check_scoring(thresholds: tuple, fss_scales: tuple[int, ...], zr: tuple[float, ...]) -> None:
    """The scoring options make sense together: a Z-R relation of two positive numbers, FSS only at thresholds."""
    if len(zr) != 2 or min(zr) <= 0:
        raise UserError(f"--zr {','.join(f'{v:g}' for v in zr)}: expected two positive numbers a,b")
    if fss_scales and (not thresholds or min(fss_scales) < 1):
        raise UserError("--fss-scales needs --thresholds, and window sizes of at least 1 pixel")


def format_threshold(threshold: float) -> str:
    return f"{threshold:g}"


def rain_rate_to_dbz(rate: float, zr: tuple[float, float] = MARSHALL_PALMER) -> float:
    a, b = zr
    return 10 * math.log10(a * rate**b) if rate > 0 else -math.inf


def dbz_to_rain_rate(dbz: float, zr: tuple[float, float] = MARSHALL_PALMER) -> float:
    a, b = zr
    return (10 ** (dbz / 10) / a) ** (1 / b)


def thresholds_in_units(
    given: tuple[str | float, ...], units: str, zr: tuple[float, float] = MARSHALL_PALMER
) -> dict[str, float]:
    """Label (as given) -> threshold in the data's units. A value may carry a unit, "1mm/h" or "35dBZ"; one in the
    other unit than the data's is converted with the Z-R relation ``zr`` (Marshall-Palmer by default)."""
    data_unit = UNIT_SUFFIXES.get(units.strip().lower())
    levels = {}
    for item in given:
        text = str(item).strip()
        unit = next((u for s, u in UNIT_SUFFIXES.items() if text.lower().endswith(s)), None)
        number = text[: len(text) - len(unit)] if unit else text
        try:
            value = finite(float(number), "--thresholds")
        except ValueError:
            raise UserError(f"--thresholds {text}: expected a number, optionally with mm/h or dBZ") from None
        if unit and unit != data_unit:
            if data_unit is None:
                raise UserError(f"--thresholds {text}: the data's units ({units or 'none'}) are neither mm/h nor dBZ")
            value = rain_rate_to_dbz(value, zr) if unit == "mm/h" else dbz_to_rain_rate(value, zr)
        levels[text if unit else format_threshold(value)] = value
    return levels


SCORE_PIXELS = 2**20  # pixels scored at once (at least a frame; SSIM: a band of rows), whatever the batch


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """The 1-D Gaussian whose outer product with itself is SSIM's 2-D window."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


FILTER_BLOCK = 64  # output pixels per product with the banded window matrix


def _filter(images: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """``images`` [..., H, W] filtered by the separable 2-D ``window`` ⊗ ``window`` over the region it fully
    covers, as two 1-D passes, each a product with a banded matrix a block of pixels at a time: float64 in
    the memory of about two images, where a 2-D ``conv2d`` on the CPU unfolds the image into a copy per tap."""
    size = len(window)
    block = min(FILTER_BLOCK, max(images.shape[-2:]))
    banded = torch.zeros(block + size - 1, block, dtype=images.dtype, device=images.device)
    for j in range(block):
        banded[j : j + size, j] = window.to(images)
    rows = _along_last(images.transpose(-1, -2), banded, size).transpose(-1, -2)
    return _along_last(rows, banded, size)


def _along_last(images: torch.Tensor, banded: torch.Tensor, size: int) -> torch.Tensor:
    width, block = images.shape[-1] - size + 1, banded.shape[1]
    parts = []
    for first in range(0, width, block):
        count = min(block, width - first)
        parts.append(images[..., first : first + count + size - 1] @ banded[: count + size - 1, :count])
    return torch.cat(parts, dim=-1)


def ssim_per_frame(prediction: torch.Tensor, truth: torch.Tensor, data_range: float) -> torch.Tensor:
    """Mean SSIM of each [H, W] image of [..., H, W] inputs, over the region the window fully covers (a window
    cut to the frame where the frame is smaller), in float64; computed in bands of rows, so that its memory is
    a few times ``SCORE_PIXELS`` however large the frames."""
    shape, (height, width) = prediction.shape[:-2], prediction.shape[-2:]
    x, y = prediction.reshape(-1, height, width), truth.reshape(-1, height, width)
    window = _gaussian_window()
    size = min(len(window), height, width)
    window = window[:size] / window[:size].sum()
    rows = height - size + 1  # of the SSIM map
    band = max(1, SCORE_PIXELS // (len(x) * width))
    total = torch.zeros(len(x), dtype=torch.float64, device=x.device)
    for top in range(0, rows, band):
        bottom = min(top + band, rows) + size - 1
        total += _ssim_map(x[:, top:bottom].double(), y[:, top:bottom].double(), window, data_range).sum((1, 2))
    return (total / (rows * (width - size + 1))).view(shape)


def _ssim_map(x: torch.Tensor, y: torch.Tensor, window: torch.Tensor, data_range: float) -> torch.Tensor:
    mu_x, mu_y, xx, yy, xy = _filter(torch.stack([x, y, x * x, y * y, x * y]), window)  # the five moments at once
    var_x, var_y, cov = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    return ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))


class Scores:
    """Running sums for one forecast method over [B, T, C, H, W] batches of data-unit frames."""

    def __init__(
        self,
        lead_times: int,
        data_range: float,
        thresholds: tuple[float, ...] | dict[str, float] = (),
        zero_one_scale: float | None = None,
        fss_scales: tuple[int, ...] = (),
    ):
        """``thresholds``: values in data units, or {label: value} to name them as the user gave them."""
        self.lead_times = lead_times
        self.data_range = data_range
        if not isinstance(thresholds, dict):
            thresholds = {format_threshold(t): t for t in thresholds}
        self.labels = list(thresholds)
        self.thresholds = tuple(thresholds.values())
        self.zero_one_scale = zero_one_scale
        self.fss_scales = tuple(fss_scales)
        # per threshold, scale and lead: sum of (Pf - Po)^2 and of Pf^2 + Po^2
        self.fss = torch.zeros(len(self.thresholds), len(self.fss_scales), lead_times, 2, dtype=torch.float64)
        names = ["sse", "sae", "pixels", "frame_sse01", "ssim", "psnr", "frames"]
        self.sums = {name: torch.zeros(lead_times, dtype=torch.float64) for name in names}
        self.table = torch.zeros(len(self.thresholds), lead_times, 4, dtype=torch.float64)

    def update(self, prediction: torch.Tensor, truth: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """[B, T, C, H, W] forecasts and truth in data units (``valid``: the pixels with data), scored up to
        ``SCORE_PIXELS`` at a time (whole sequences of small frames, a few lead times of large ones): the
        float64 copies and the temporaries of the scores then take memory of a few frames, not of the batch."""
        if valid is None:
            valid = torch.ones_like(truth, dtype=torch.bool)
        steps, frame = prediction.shape[1], prediction[0, 0].numel()
        leads_at_once = max(1, min(steps, SCORE_PIXELS // frame))
        sequences_at_once = max(1, SCORE_PIXELS // (frame * steps)) if leads_at_once == steps else 1
        for b in range(0, prediction.shape[0], sequences_at_once):
            for first in range(0, steps, leads_at_once):
                part = (slice(b, b + sequences_at_once), slice(first, min(first + leads_at_once, steps)))
                self._add(prediction[part], truth[part], valid[part], part[1])

    def _add(self, prediction: torch.Tensor, truth: torch.Tensor, valid: torch.Tensor, leads: slice) -> None:
        """The sums of [S, L, C, H, W] frames of lead times ``leads``."""
        if prediction.device.type == "mps":  # no float64 there: score on the CPU
            prediction, truth, valid = prediction.cpu(), truth.cpu(), valid.cpu()
        prediction, truth = prediction.double(), truth.double()
        weight = valid.double()
        error = (prediction - truth) * weight
        per_frame = (2, 3, 4)
        add = self.sums
        frame_sse = (error**2).sum(per_frame)  # [S, L]
        frame_pixels = weight.sum(per_frame)
        add["sse"][leads] += frame_sse.sum(0).cpu()
        add["sae"][leads] += error.abs().sum(per_frame).sum(0).cpu()
        add["pixels"][leads] += frame_pixels.sum(0).cpu()
        # Per-frame scores count only frames with data; SSIM is computed over the whole frame.
        has_data = (frame_pixels > 0).double()
        if self.zero_one_scale:
            add["frame_sse01"][leads] += (frame_sse / self.zero_one_scale**2).sum(0).cpu()
        frame_mse = frame_sse / frame_pixels.clamp(min=1)
        psnr = 10 * torch.log10(self.data_range**2 / frame_mse.clamp(min=1e-12))
        add["psnr"][leads] += (psnr * has_data).sum(0).cpu()
        del error, weight
        ssim = ssim_per_frame(prediction, truth, self.data_range).mean(dim=2)
        add["ssim"][leads] += (ssim * has_data).sum(0).cpu()
        add["frames"][leads] += has_data.sum(0).cpu()
        for i, threshold in enumerate(self.thresholds):
            self._add_events(i, prediction >= threshold, truth >= threshold, valid, leads)

    def _add_events(
        self, i: int, forecast_yes: torch.Tensor, observed_yes: torch.Tensor, valid: torch.Tensor, leads: slice
    ) -> None:
        """Contingency counts and FSS sums at threshold ``i`` of [S, L, C, H, W] frames."""
        counts = [
            forecast_yes & observed_yes,  # hits
            ~forecast_yes & observed_yes,  # misses
            forecast_yes & ~observed_yes,  # false alarms
            ~forecast_yes & ~observed_yes,  # correct negatives
        ]
        for j, event in enumerate(counts):
            self.table[i, leads, j] += (event & valid).sum(dim=(0, 2, 3, 4)).double().cpu()
        for k, scale in enumerate(self.fss_scales):
            pf, po = (
                F.avg_pool2d((yes & valid).double().flatten(0, 2)[:, None], scale, 1, scale // 2).view(
                    *valid.shape[:3], -1
                )
                for yes in (forecast_yes, observed_yes)
            )
            self.fss[i, k, leads, 0] += (pf - po).square().sum(dim=(0, 2, 3)).cpu()
            self.fss[i, k, leads, 1] += (pf.square() + po.square()).sum(dim=(0, 2, 3)).cpu()

    def state(self) -> torch.Tensor:
        """All running sums as one tensor: states add up (across workers, batches or torchrun ranks, in one
        all-reduce), and ``load_state`` of the sum is the merge."""
        return torch.cat([torch.stack(list(self.sums.values())).flatten(), self.table.flatten(), self.fss.flatten()])

    def load_state(self, flat: torch.Tensor) -> None:
        size = len(self.sums) * self.lead_times
        for i, name in enumerate(self.sums):
            self.sums[name] = flat[i * self.lead_times : (i + 1) * self.lead_times].clone()
        self.table = flat[size : size + self.table.numel()].view_as(self.table).clone()
        self.fss = flat[size + self.table.numel() :].view_as(self.fss).clone()

    def compute(self) -> dict[str, list[float]]:
        s = self.sums
        frames = s["frames"].clamp(min=1)
        scores = {
            "mse": (s["sse"] / s["pixels"].clamp(min=1)).tolist(),
            "mae": (s["sae"] / s["pixels"].clamp(min=1)).tolist(),
            "ssim": (s["ssim"] / frames).tolist(),
            "psnr": (s["psnr"] / frames).tolist(),
        }
        if self.zero_one_scale:
            scores["mse_frame_sum"] = (s["frame_sse01"] / frames).tolist()
        for i, label in enumerate(self.labels):
            for name, values in categorical_scores(self.table[i]).items():
                scores[f"{name}@{label}"] = values
            for k, scale in enumerate(self.fss_scales):
                difference, reference = self.fss[i, k].unbind(-1)
                scores[f"fss@{label}/{scale}"] = [1 - r for r in _ratio(difference, reference)]
        return scores


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> list[float]:
    return [n / d if d else math.nan for n, d in zip(numerator.tolist(), denominator.tolist(), strict=True)]


def categorical_scores(counts: torch.Tensor) -> dict[str, list[float]]:
    """Scores from [lead_times, 4] contingency counts (hits, misses, false alarms, correct negatives)."""
    h, m, f, n = counts.unbind(-1)
    total = h + m + f + n
    random_hits = (h + m) * (h + f) / total.clamp(min=1)
    return {
        "csi": _ratio(h, h + m + f),
        "pod": _ratio(h, h + m),
        "far": _ratio(f, h + f),
        "hss": _ratio(2 * (h * n - m * f), (h + m) * (m + n) + (h + f) * (f + n)),
        "ets": _ratio(h - random_hits, h + m + f - random_hits),
        "bias": _ratio(h + f, h + m),
    }


def mean_over_leads(scores: dict[str, list[float]]) -> dict[str, float]:
    """Each score averaged over lead times, ignoring lead times where it is undefined."""
    means = {}
    for name, values in scores.items():
        defined = [v for v in values if not math.isnan(v)]
        means[name] = sum(defined) / len(defined) if defined else math.nan
    return means
