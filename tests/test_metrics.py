import math

import pytest
import torch
import torch.nn.functional as F

from convgru_cli import metrics
from convgru_cli.metrics import Scores, categorical_scores, mean_over_leads, ssim_per_frame


def _batch(values):
    """[T, H, W] nested lists -> [1, T, 1, H, W]."""
    return torch.tensor(values, dtype=torch.float64)[None, :, None]


def test_continuous_scores_by_hand():
    truth = _batch([[[0, 0], [0, 4]], [[1, 1], [1, 1]]])
    prediction = _batch([[[1, 0], [0, 2]], [[1, 1], [1, 1]]])
    scores = Scores(2, data_range=4.0)
    scores.update(prediction, truth)
    result = scores.compute()
    assert result["mse"] == pytest.approx([(1 + 4) / 4, 0.0])
    assert result["mae"] == pytest.approx([(1 + 2) / 4, 0.0])
    assert result["psnr"][0] == pytest.approx(10 * math.log10(16 / 1.25))


def test_frame_sum_mse_is_in_zero_one_units():
    truth = torch.zeros(1, 1, 1, 4, 4)
    prediction = torch.full((1, 1, 1, 4, 4), 255.0)
    scores = Scores(1, data_range=255.0, zero_one_scale=255.0)
    scores.update(prediction, truth)
    assert scores.compute()["mse_frame_sum"] == pytest.approx([16.0])


def test_mask_excludes_pixels():
    truth = torch.zeros(1, 1, 1, 2, 2)
    prediction = torch.tensor([[[[[1.0, 1.0], [1.0, 100.0]]]]])
    valid = torch.ones_like(truth, dtype=torch.bool)
    valid[..., 1, 1] = False
    scores = Scores(1, data_range=1.0)
    scores.update(prediction, truth, valid)
    assert scores.compute()["mse"] == pytest.approx([1.0])


def test_contingency_scores_by_hand():
    # hits 2, misses 1, false alarms 1, correct negatives 4
    counts = torch.tensor([[2.0, 1.0, 1.0, 4.0]])
    s = {k: v[0] for k, v in categorical_scores(counts).items()}
    assert s["csi"] == pytest.approx(2 / 4)
    assert s["pod"] == pytest.approx(2 / 3)
    assert s["far"] == pytest.approx(1 / 3)
    assert s["bias"] == pytest.approx(1.0)
    assert s["hss"] == pytest.approx(2 * (2 * 4 - 1 * 1) / ((2 + 1) * (1 + 4) + (2 + 1) * (1 + 4)))
    random_hits = 3 * 3 / 8
    assert s["ets"] == pytest.approx((2 - random_hits) / (4 - random_hits))


def test_no_event_gives_undefined_not_a_crash():
    s = categorical_scores(torch.tensor([[0.0, 0.0, 0.0, 10.0]]))
    assert math.isnan(s["csi"][0]) and math.isnan(s["pod"][0]) and math.isnan(s["far"][0])
    assert mean_over_leads({"csi": [math.nan, 0.5]})["csi"] == 0.5


def test_thresholds_count_events_from_data():
    truth = _batch([[[0, 3], [5, 0]]])
    prediction = _batch([[[2, 3], [0, 0]]])
    scores = Scores(1, data_range=5.0, thresholds=(2.0,))
    scores.update(prediction, truth)
    result = scores.compute()
    # hits: (0,1); misses: (1,0); false alarms: (0,0); correct negatives: (1,1)
    assert result["csi@2"] == pytest.approx([1 / 3])
    assert result["pod@2"] == pytest.approx([0.5])


def test_ssim_of_identical_images_is_one_and_falls_with_noise():
    torch.manual_seed(0)
    image = torch.rand(1, 32, 32)
    assert ssim_per_frame(image, image, 1.0).item() == pytest.approx(1.0)
    noisy = ssim_per_frame(image + 0.3 * torch.randn(1, 32, 32), image, 1.0).item()
    assert noisy < 0.9


def test_ssim_in_chunks_of_1d_passes_equals_the_2d_gaussian_window():
    """The 11x11 window applied in two 1-D passes, a few frames at a time, is SSIM with the 2-D window."""
    torch.manual_seed(0)
    x, y = torch.rand(2, 7, 40, 50, dtype=torch.float64)
    torch.testing.assert_close(ssim_per_frame(x, y, 1.0), _reference_ssim(x, y, 1.0), rtol=1e-12, atol=1e-12)


def test_merged_state_equals_one_pass():
    torch.manual_seed(0)
    truth, prediction = torch.rand(6, 3, 1, 16, 16) * 10, torch.rand(6, 3, 1, 16, 16) * 10
    whole = Scores(3, 10.0, thresholds=(2.0, 5.0))
    whole.update(prediction, truth)
    first, second = Scores(3, 10.0, thresholds=(2.0, 5.0)), Scores(3, 10.0, thresholds=(2.0, 5.0))
    first.update(prediction[:2], truth[:2])
    second.update(prediction[2:], truth[2:])
    first.load_state(first.state() + second.state())
    for name, values in whole.compute().items():
        assert first.compute()[name] == pytest.approx(values), name
    restored = Scores(3, 10.0, thresholds=(2.0, 5.0))
    restored.load_state(first.state())
    assert restored.compute() == first.compute()


def test_fractions_skill_score_by_hand_and_perfect_match():
    # One event pixel, forecast one pixel to the right: no overlap at scale 1, FSS 0; perfect at the whole field.
    truth = torch.zeros(1, 1, 1, 3, 3)
    truth[..., 1, 1] = 1
    prediction = torch.zeros(1, 1, 1, 3, 3)
    prediction[..., 1, 2] = 1
    scores = Scores(1, 1.0, thresholds=(0.5,), fss_scales=(1, 3))
    scores.update(prediction, truth)
    result = scores.compute()
    assert result["fss@0.5/1"] == pytest.approx([0.0])
    assert 0 < result["fss@0.5/3"][0] < 1
    same = Scores(1, 1.0, thresholds=(0.5,), fss_scales=(3,))
    same.update(truth, truth)
    assert same.compute()["fss@0.5/3"] == pytest.approx([1.0])


def test_thresholds_in_the_other_unit_use_the_zr_relation():
    from convgru_cli.errors import UserError
    from convgru_cli.metrics import dbz_to_rain_rate, rain_rate_to_dbz, thresholds_in_units

    assert rain_rate_to_dbz(1.0) == pytest.approx(10 * math.log10(200))
    assert dbz_to_rain_rate(rain_rate_to_dbz(7.5)) == pytest.approx(7.5)
    levels = thresholds_in_units(("1mm/h", "30", "35dBZ"), "dBZ")
    assert levels == pytest.approx({"1mm/h": 10 * math.log10(200), "30": 30.0, "35dBZ": 35.0})
    in_rain = thresholds_in_units(("23.0103dBZ",), "mm/h", zr=(200.0, 1.6))
    assert in_rain["23.0103dBZ"] == pytest.approx(1.0, rel=1e-4)
    with pytest.raises(UserError, match="neither mm/h nor dBZ"):
        thresholds_in_units(("1mm/h",), "K")
    with pytest.raises(UserError, match="expected a number"):
        thresholds_in_units(("heavy",), "mm/h")


def test_default_thresholds_follow_units_and_sevir():
    from convgru_cli.metrics import default_thresholds

    assert default_thresholds("mm/h", "frames") == (0.5, 2, 5, 10, 30)
    assert default_thresholds("dBZ", "frames") == (20, 30, 40)
    assert default_thresholds("", "data/vil") == (16, 74, 133, 160, 181, 219)
    assert default_thresholds("", "frames") == ()


def _reference_ssim(x: torch.Tensor, y: torch.Tensor, data_range: float) -> torch.Tensor:
    """SSIM as it is usually written: [N, H, W] -> [N], one 2-D float64 Gaussian conv2d per moment."""
    x, y = x.double()[:, None], y.double()[:, None]
    size = min(11, *x.shape[-2:])
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5**2))[:size]
    window = g[:, None] * g[None, :]
    window = (window / window.sum()).view(1, 1, size, size)
    mu_x, mu_y = F.conv2d(x, window), F.conv2d(y, window)
    var_x = F.conv2d(x * x, window) - mu_x**2
    var_y = F.conv2d(y * y, window) - mu_y**2
    cov = F.conv2d(x * y, window) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim.mean(dim=(1, 2, 3))


@pytest.mark.parametrize("shape", [(4, 32, 40), (3, 11, 11), (2, 7, 9), (2, 1, 5)])
@pytest.mark.parametrize("pixels", [2**21, 1])  # one band of rows, or one row at a time
def test_separable_ssim_equals_the_2d_convolution(shape, pixels, monkeypatch):
    monkeypatch.setattr(metrics, "SCORE_PIXELS", pixels)
    torch.manual_seed(0)
    truth = torch.rand(shape) * 10
    prediction = (truth + 3 * torch.randn(shape)).float()
    expected = _reference_ssim(prediction, truth, 10.0)
    assert torch.allclose(ssim_per_frame(prediction, truth, 10.0), expected, rtol=0, atol=1e-6)


def _reference_sums(prediction, truth, valid, data_range, thresholds, scale):
    """The scores of one [B, T, C, H, W] batch computed at once, plainly, per lead time."""
    p, t, w = prediction.double(), truth.double(), valid.double()
    error = (p - t) * w
    frame_mse = (error**2).sum((2, 3, 4)) / w.sum((2, 3, 4))
    ssim = _reference_ssim(p.flatten(0, 2), t.flatten(0, 2), data_range).view(p.shape[:3]).mean(2)
    scores = {
        "mse": (error**2).sum((0, 2, 3, 4)) / w.sum((0, 2, 3, 4)),
        "mae": error.abs().sum((0, 2, 3, 4)) / w.sum((0, 2, 3, 4)),
        "psnr": (10 * torch.log10(data_range**2 / frame_mse)).mean(0),
        "ssim": ssim.mean(0),
    }
    for threshold in thresholds:
        yes_f, yes_o = (p >= threshold) & valid, (t >= threshold) & valid
        hits, misses = (yes_f & yes_o).sum((0, 2, 3, 4)), (~yes_f & yes_o).sum((0, 2, 3, 4))
        alarms = (yes_f & ~yes_o).sum((0, 2, 3, 4))
        scores[f"csi@{threshold:g}"] = hits / (hits + misses + alarms)
        pf, po = (F.avg_pool2d(yes.double().flatten(0, 2)[:, None], scale, 1, scale // 2) for yes in (yes_f, yes_o))
        pf, po = pf.view(*p.shape[:3], -1), po.view(*p.shape[:3], -1)
        difference = (pf - po).square().sum((0, 2, 3))
        scores[f"fss@{threshold:g}/{scale}"] = 1 - difference / (pf.square() + po.square()).sum((0, 2, 3))
    return scores


@pytest.mark.parametrize("pixels", [2**21, 2000, 300])  # all at once, two leads at a time, a frame in bands
def test_scores_in_groups_of_frames_equal_the_whole_batch_at_once(pixels, monkeypatch):
    monkeypatch.setattr(metrics, "SCORE_PIXELS", pixels)
    torch.manual_seed(1)
    truth = torch.rand(3, 4, 2, 20, 24) * 10
    prediction = (truth + 2 * torch.randn_like(truth)).clamp(min=0)
    valid = torch.rand_like(truth) > 0.1
    scores = Scores(4, 10.0, thresholds=(2.0, 5.0), fss_scales=(3,))
    scores.update(prediction, truth, valid)
    result = scores.compute()
    for name, values in _reference_sums(prediction, truth, valid, 10.0, (2.0, 5.0), 3).items():
        assert result[name] == pytest.approx(values.tolist(), abs=1e-6), name
