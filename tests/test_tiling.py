"""Whole domains in a memory budget: tiles that cover the frame, blend without seams, and budgets checked."""

import pytest
import torch

from convgru_cli.errors import UserError
from convgru_cli.forecast import Forecaster
from convgru_cli.model import EncoderForecaster, make_config
from convgru_cli.normalisation import Normalisation
from convgru_cli.options import memory_budget
from convgru_cli.tiling import BLEND, fitted, halo, predict_tiled, ramp, smallest_tile, spans
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


@pytest.mark.parametrize(("height", "width", "tile"), [(1024, 1024, 992), (768, 704, 712), (4400, 3800, 880)])
def test_tiles_are_cut_no_larger_than_their_share_of_the_frame(height, width, tile):
    overlap, multiple = 2 * halo(12) + BLEND, 8

    def count(side):
        return len(spans(height, side, overlap, multiple)) * len(spans(width, side, overlap, multiple))

    side = fitted(height, width, tile, overlap, multiple)
    assert side <= tile and side % multiple == 0
    assert count(side) == count(tile) < count(side - multiple)
    assert fitted(1024, 1024, 992, overlap, multiple) == 736  # four tiles either way, of 0.54 the pixels


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


def _recorded_runs(monkeypatch) -> list[torch.Size]:
    """The input shape of every run of the network that Forecaster.predict makes, in order."""
    runs = []
    original = Forecaster._predict
    monkeypatch.setattr(
        Forecaster, "_predict", lambda self, x, frames: runs.append(x.shape) or original(self, x, frames)
    )
    return runs


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


def test_the_budget_chooses_chunks_of_sequences_or_tiles_and_refuses_what_cannot_fit(monkeypatch):
    inputs = _moving_blobs(64, 4).expand(3, -1, -1, -1, -1)
    whole = _forecaster()._predict(inputs, 3)
    runs = _recorded_runs(monkeypatch)
    chunked = _forecaster(budget=3 * 10**6).predict(inputs, 3)
    assert torch.allclose(chunked, whole, atol=1e-5)
    assert [shape[0] for shape in runs] == [1, 1, 1]  # a sequence of 64² takes 2.7 MB by bytes_per_pixel
    runs.clear()
    tiled = _forecaster(budget=62 * 10**6).predict(_moving_blobs(320, 4), 3)
    assert tiled.shape == (1, 3, 1, 320, 320) and bool(torch.isfinite(tiled).all())
    # The budget allows the smallest tiles, 304²; the 2 x 2 that cover 320² need no more than 240².
    assert {shape[-2:] for shape in runs} == {(240, 240)} and len(runs) == 4
    with pytest.raises(UserError, match="--memory-budget 1MB: too small for tiles"):
        _forecaster(budget=10**6).predict(inputs, 3)


def test_a_cpu_batches_sequences_up_to_its_run_size_however_large_the_budget(monkeypatch):
    import convgru_cli.forecast as forecast

    inputs = _moving_blobs(64, 4).expand(5, -1, -1, -1, -1)  # 16² positions of the `fast` model's grid each
    runs = _recorded_runs(monkeypatch)
    monkeypatch.setattr(forecast, "CPU_RUN_POSITIONS", 2 * 16**2)
    _forecaster(budget=10**10).predict(inputs, 3)
    assert [shape[0] for shape in runs] == [2, 2, 1]
