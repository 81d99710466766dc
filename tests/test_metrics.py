import math

import pytest
import torch

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


def test_merged_state_equals_one_pass():
    torch.manual_seed(0)
    truth, prediction = torch.rand(6, 3, 1, 16, 16) * 10, torch.rand(6, 3, 1, 16, 16) * 10
    whole = Scores(3, 10.0, thresholds=(2.0, 5.0))
    whole.update(prediction, truth)
    first, second = Scores(3, 10.0, thresholds=(2.0, 5.0)), Scores(3, 10.0, thresholds=(2.0, 5.0))
    first.update(prediction[:2], truth[:2])
    second.update(prediction[2:], truth[2:])
    first.merge(second)
    for name, values in whole.compute().items():
        assert first.compute()[name] == pytest.approx(values), name
    restored = Scores(3, 10.0, thresholds=(2.0, 5.0))
    restored.load_state(first.state())
    assert restored.compute() == first.compute()
