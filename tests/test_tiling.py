"""Whole domains in a memory budget: tiles that cover the frame, blend without seams, and budgets checked."""

import pytest
import torch

from convgru_cli.errors import UserError
from convgru_cli.forecast import Forecaster
from convgru_cli.model import EncoderForecaster, make_config
from convgru_cli.normalisation import Normalisation
from convgru_cli.options import memory_budget
from convgru_cli.tiling import BLEND, halo, predict_tiled, ramp, smallest_tile, spans
from convgru_cli.windowing import DataSpec


def test_budgets_parse_and_bad_ones_are_refused():
    assert memory_budget("4GB") == 4 * 10**9
    assert memory_budget("512MiB") == 512 * 2**20
    assert memory_budget("2e9") == 2 * 10**9
    assert memory_budget(None) is None
    for bad in ("lots", "4XB", "0", "-1GB", "1kB", "inf", "1e999GB"):
        with pytest.raises(UserError, match="--memory-budget"):
            memory_budget(bad)


@pytest.mark.parametrize("length", [400, 1000, 4400, 3800])
def test_tiles_cover_the_axis_overlapping_by_the_halo_and_the_blend(length):
    tile, reach, multiple = 320, halo(3), 8
    overlap = 2 * reach + BLEND
    found = spans(length, tile, overlap, multiple)
    assert found[0][0] == 0 and found[-1][1] == length
    assert all(stop - start == tile and start % multiple == 0 for start, stop in found)
    assert all(previous[1] - start >= overlap for previous, (start, _) in zip(found, found[1:], strict=False))
    total = torch.zeros(length)
    for start, stop in found:
        total[start:stop] += ramp(length, start, stop, reach)
    assert float(total.min()) > 0


def _forecaster(budget: int | None = None) -> Forecaster:
    """An untrained anchored `fast` model whose correction head is not zero, so the network shapes the forecast."""
    torch.manual_seed(0)
    model = EncoderForecaster(make_config("fast", 1)).eval()
    torch.nn.init.normal_(model.head.weight, std=0.05)
    normalisation = Normalisation([0.0], [5.0], 0.0, 15.0, "float32", "mm/h", torch.zeros(1, 8, 8))
    spec = DataSpec(dataset="rain", layout="THW", input_frames=4, output_frames=3)
    return Forecaster(model, model, normalisation, spec, torch.device("cpu"), torch.float32, "none", 0, budget)


def _moving_blobs(size: int, steps: int) -> torch.Tensor:
    """[1, steps, 1, size, size]: rain cells on a grid drifting 3 px down and 4 px right per step, so that they
    cross every tile edge."""
    y, x = torch.meshgrid(torch.arange(size.__float__()), torch.arange(size.__float__()), indexing="ij")
    frames = [
        (8 * torch.sin((y - 3 * t) / 14) * torch.sin((x - 4 * t) / 17) + 2 * torch.cos((x + y - 7 * t) / 6) - 1).clamp(
            min=0
        )
        for t in range(steps)
    ]
    return torch.stack(frames)[None, :, None]


def test_tiled_forecast_has_no_seams_and_matches_the_whole_frame():
    forecaster, frames = _forecaster(), 3
    inputs = _moving_blobs(448, 4)
    tile = smallest_tile(frames, 8)
    assert len(spans(448, tile, 2 * halo(frames) + BLEND, 8)) == 2  # four tiles, edges crossing the field
    whole = forecaster._predict(inputs, frames)
    tiled = predict_tiled(forecaster._runner(frames), inputs, frames, tile, 8, out=torch.full_like(whole, 7.0))
    assert tiled.shape == whole.shape == (1, frames, 1, 448, 448)
    difference = (tiled - whole).abs()
    assert float(difference.max()) < 1e-3 * float(whole.abs().max())


def test_the_budget_chooses_chunks_of_sequences_or_tiles_and_refuses_what_cannot_fit():
    inputs = _moving_blobs(64, 4).expand(3, -1, -1, -1, -1)
    whole = _forecaster()._predict(inputs, 3)
    chunked = _forecaster(budget=75 * 10**5).predict(inputs, 3)  # one sequence at a time
    assert torch.allclose(chunked, whole, atol=1e-5)
    tiled = _forecaster(budget=12 * 10**7).predict(_moving_blobs(320, 4), 3)  # 304² tiles, the smallest
    assert tiled.shape == (1, 3, 1, 320, 320) and bool(torch.isfinite(tiled).all())
    with pytest.raises(UserError, match="--memory-budget 1MB: too small for tiles"):
        _forecaster(budget=10**6).predict(inputs, 3)
