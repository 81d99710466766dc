"""Motion estimation and advection, which the optical-flow baseline and the anchored forecaster share."""

import pytest
import torch

from convgru_cli.motion import advect, motion_field, warp


def _smooth_field(size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(1, 1, size, size, generator=generator)
    return torch.nn.functional.avg_pool2d(noise, 15, stride=1, padding=7)


@pytest.mark.parametrize(("dy", "dx"), [(5, -12), (-3, 14), (0, 2)])
def test_fast_motion_is_found(dy, dx):
    """12 px per step is common (a 60 km/h band on 0.5-km, 6-minute data); the single-scale search reached 6."""
    field = _smooth_field(400)
    frames = [field[..., 60 - dy * t : 60 - dy * t + 256, 60 - dx * t : 60 - dx * t + 256] for t in range(5)]
    motion = motion_field(torch.stack(frames, dim=1))
    centre = motion[0, :, 64:192, 64:192]
    assert centre[0].median().item() == pytest.approx(dy, abs=0.25)
    assert centre[1].median().item() == pytest.approx(dx, abs=0.25)


def test_flat_regions_take_the_motion_of_the_rain_around_them():
    """Rain carried into a dry region must not stop at its edge: the dry region moves as the rain does."""
    frames = torch.zeros(1, 4, 1, 96, 96)
    blob = _smooth_field(40)[0, 0] * 4
    for t in range(4):
        frames[0, t, 0, 20:60, 10 + 3 * t : 50 + 3 * t] = blob
    motion = motion_field(frames)
    assert motion[0, 1, 40, 80].item() == pytest.approx(3, abs=0.3)  # dry, ahead of the rain
    assert motion[0, 0, 90, 90].item() == pytest.approx(0, abs=0.3)


def test_advection_of_an_integer_shift_is_exact():
    image = _smooth_field(64)
    motion = torch.zeros(1, 2, 64, 64)
    motion[:, 0], motion[:, 1] = 2.0, -1.0
    forecast = advect(image, motion, 3)
    torch.testing.assert_close(forecast[0, 2, 0, 10:50, 10:50], image[0, 0, 4:44, 13:53], atol=1e-5, rtol=0)
    torch.testing.assert_close(warp(image, motion)[0, 0, 10:50, 10:50], image[0, 0, 8:48, 11:51], atol=1e-5, rtol=0)
