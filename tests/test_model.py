import copy

import pytest
import torch
import torch.nn.functional as F

from convgru_cli.errors import UserError
from convgru_cli.model import (
    ARCHITECTURES,
    CELLS,
    FORECASTERS,
    ConvRNNCell,
    EncoderForecaster,
    ModelConfig,
    anchor,
    make_config,
)
from convgru_cli.motion import advect, motion_field


def _gate_convs(conv, gates):
    """Split a fused convolution into one (weight, bias) per gate, as a plain implementation would hold them."""
    return list(zip(conv.weight.chunk(gates), conv.bias.chunk(gates), strict=True))


def _conv(x, weight_bias, kernel):
    weight, bias = weight_bias
    return F.conv2d(x, weight, bias, padding=kernel // 2)


def reference_gru(cell, x, h, textbook):
    """ConvGRU written gate by gate with six separate convolutions."""
    wr, wu, wn = _gate_convs(cell.input_conv, 3)
    rr, ru, rn = _gate_convs(cell.hidden_conv, 3)
    ki, kh = cell.input_conv.kernel_size[0], cell.hidden_conv.kernel_size[0]
    r = torch.sigmoid(_conv(x, wr, ki) + _conv(h, rr, kh))
    u = torch.sigmoid(_conv(x, wu, ki) + _conv(h, ru, kh))
    hidden_term = _conv(r * h, rn, kh) if textbook else r * _conv(h, rn, kh)
    n = torch.tanh(_conv(x, wn, ki) + hidden_term)
    return u * h + (1 - u) * n


def reference_lstm(cell, x, h, c):
    wi, wf, wg, wo = _gate_convs(cell.input_conv, 4)
    ri, rf, rg, ro = _gate_convs(cell.hidden_conv, 4)
    ki, kh = cell.input_conv.kernel_size[0], cell.hidden_conv.kernel_size[0]
    i = torch.sigmoid(_conv(x, wi, ki) + _conv(h, ri, kh))
    f = torch.sigmoid(_conv(x, wf, ki) + _conv(h, rf, kh))
    g = torch.tanh(_conv(x, wg, ki) + _conv(h, rg, kh))
    o = torch.sigmoid(_conv(x, wo, ki) + _conv(h, ro, kh))
    c = f * c + i * g
    return o * torch.tanh(c), c


@pytest.mark.parametrize("kind", ["convgru", "convgru-textbook"])
def test_gru_cell_equals_per_gate_reference(kind):
    torch.manual_seed(0)
    cell = ConvRNNCell(3, 8, kind, input_kernel=3, hidden_kernel=5, activation="tanh")
    x, h = torch.randn(2, 3, 12, 10), torch.randn(2, 8, 12, 10)
    ours = cell.step(cell.input_gates(x), h)
    expected = reference_gru(cell, x, h, textbook=kind == "convgru-textbook")
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_the_two_gru_forms_differ():
    """Same weights, different functions: the option changes the model, it is not a no-op."""
    torch.manual_seed(0)
    fused = ConvRNNCell(3, 8, "convgru", 3, 5, "tanh")
    textbook = ConvRNNCell(3, 8, "convgru-textbook", 3, 5, "tanh")
    textbook.load_state_dict(fused.state_dict())
    x, h = torch.randn(2, 3, 8, 8), torch.randn(2, 8, 8, 8)
    assert (fused.step(fused.input_gates(x), h) - textbook.step(textbook.input_gates(x), h)).abs().max() > 1e-3


def test_lstm_cell_equals_per_gate_reference():
    torch.manual_seed(0)
    cell = ConvRNNCell(3, 8, "convlstm", input_kernel=3, hidden_kernel=5, activation="tanh")
    x, h, c = torch.randn(2, 3, 12, 10), torch.randn(2, 8, 12, 10), torch.randn(2, 8, 12, 10)
    state = cell.step(cell.input_gates(x), torch.cat([h, c], dim=1))
    expected_h, expected_c = reference_lstm(cell, x, h, c)
    torch.testing.assert_close(cell.output(state), expected_h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state[:, 8:], expected_c, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", CELLS)
def test_zero_state_shortcut_equals_convolving_zeros(kind):
    torch.manual_seed(0)
    cell = ConvRNNCell(3, 8, kind, input_kernel=3, hidden_kernel=5, activation="tanh")
    x_gates, zeros = cell.input_gates(torch.randn(2, 3, 12, 10)), torch.zeros(2, cell.state_channels, 12, 10)
    torch.testing.assert_close(cell.step(x_gates, zeros, state_is_zero=True), cell.step(x_gates, zeros))


def _live(model: EncoderForecaster) -> EncoderForecaster:
    """The anchored forecaster's head starts at zero (the model extrapolates); give it weights, as training
    does, so that every layer shapes the forecast and its gradients."""
    if model.config.anchored:
        torch.nn.init.normal_(model.head.weight, std=0.05)
    return model


@pytest.mark.parametrize("forecaster", FORECASTERS)
@pytest.mark.parametrize("cell", ["convgru", "convlstm"])
@pytest.mark.parametrize("recompute", [False, True])
def test_only_the_encoders_first_step_skips_its_hidden_convolution(cell, recompute, forecaster, monkeypatch):
    """Same forecast and gradients as convolving every state, with one hidden convolution fewer per level."""
    torch.manual_seed(0)
    model = _live(EncoderForecaster(make_config("shi-mnist", 1, cell, forecaster), recompute=recompute))
    x, levels = torch.randn(2, 4, 1, 16, 16), len(model.encoder_cells)
    convolved = []
    for module in model.modules():
        if isinstance(module, ConvRNNCell):
            module.hidden_conv.register_forward_hook(lambda *_: convolved.append(1))

    def run():
        model.zero_grad()
        out = model(x, 3)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    out, grads = run()
    assert len(convolved) == levels * (4 + 3) - levels + (levels * (4 + 3) - levels if recompute else 0)
    monkeypatch.setattr(ConvRNNCell, "_hidden_gates", lambda self, h, state_is_zero: self.hidden_conv(h).float())
    expected_out, expected_grads = run()
    torch.testing.assert_close(out, expected_out, atol=1e-6, rtol=1e-5)
    for grad, expected in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("arch", "size", "channels"),
    [("fast", 64, 1), ("fast", 96, 2), ("fast", 256, 1), ("shi-mnist", 32, 1), ("hko7", 60, 1)],
)
@pytest.mark.parametrize("cell", ["convgru", "convlstm"])
def test_shapes_through_the_stack(arch, size, channels, cell):
    model = EncoderForecaster(make_config(arch, channels, cell))
    with torch.no_grad():
        out = model(torch.randn(1, 3, channels, size, size), 4)
    assert out.shape == (1, 4, channels, size, size)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("forecaster", FORECASTERS)
@pytest.mark.parametrize(("arch", "size"), [("shi-mnist", 16), ("fast", 32)])
@pytest.mark.parametrize("recompute", [False, True])
def test_each_sequence_of_a_batch_is_forecast_on_its_own(arch, size, recompute, forecaster):
    """Inside the model the frames of all steps share the batch axis; no sequence may see another's frames."""
    torch.manual_seed(0)
    model = _live(EncoderForecaster(make_config(arch, 1, forecaster=forecaster), recompute=recompute))
    x = torch.randn(3, 4, 1, size, size)
    together = model(x, 3)
    alone = torch.cat([model(x[i : i + 1], 3) for i in range(3)])
    torch.testing.assert_close(together, alone, atol=5e-5, rtol=1e-5)  # float32 sums in another order


@pytest.mark.parametrize("forecaster", FORECASTERS)
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize(("arch", "size"), [("shi-mnist", 16), ("fast", 32)])
def test_a_forecast_without_gradients_runs_step_by_step_to_the_same_frames(arch, size, cell, forecaster):
    """Without gradients the model runs a step at a time through all levels; in training, level by level. Both
    give the same forecast, and the stepwise one never convolves more than one step's frames at once."""
    torch.manual_seed(0)
    model = _live(EncoderForecaster(make_config(arch, 1, cell, forecaster)))
    x = torch.randn(2, 4, 1, size, size)
    level_by_level = model(x, 5).detach()
    largest_batch = []
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d | torch.nn.ConvTranspose2d):
            module.register_forward_hook(lambda _m, args, _out: largest_batch.append(args[0].shape[0]))
    with torch.no_grad():
        stepwise = model(x, 5)
    torch.testing.assert_close(stepwise, level_by_level, atol=1e-5, rtol=1e-5)
    assert max(largest_batch) == 2


def test_forecast_length_is_free():
    """The forecaster takes no frames, so any horizon can be asked for, longer than trained included."""
    model = EncoderForecaster(make_config("fast", 1))
    with torch.no_grad():
        out = model(torch.randn(2, 5, 1, 32, 32), 13)
    assert out.shape == (2, 13, 1, 32, 32)
    assert out.is_contiguous()


@pytest.mark.parametrize("forecaster", FORECASTERS)
def test_frame_size_that_does_not_fit_is_padded_and_cropped_back(forecaster):
    """A 30x36 frame runs at 32x40 with the padding as no data (0); the forecast of the real pixels is the one of
    the frame padded by hand."""
    torch.manual_seed(0)
    model = _live(EncoderForecaster(make_config("fast", 1, forecaster=forecaster))).eval()
    x = torch.randn(1, 3, 1, 30, 36)
    with torch.no_grad():
        out = model(x, 2)
        by_hand = model(F.pad(x, (0, 4, 0, 2)), 2)[..., :30, :36]
    assert out.shape == (1, 2, 1, 30, 36)
    torch.testing.assert_close(out, by_hand)


@pytest.mark.parametrize("forecaster", FORECASTERS)
def test_bf16_autocast_close_to_fp32(forecaster):
    torch.manual_seed(0)
    model = _live(EncoderForecaster(make_config("fast", 1, forecaster=forecaster))).eval()
    x = torch.randn(2, 5, 1, 32, 32)
    with torch.no_grad():
        reference = model(x, 5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, 5)
    assert low.dtype == torch.float32
    relative = (low - reference).norm() / reference.norm()
    assert relative < 1e-2


@pytest.mark.parametrize("forecaster", FORECASTERS)
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("low_precision", [False, True])
def test_recompute_gives_the_same_gradients_and_keeps_less(cell, low_precision, forecaster):
    torch.manual_seed(0)
    plain = _live(EncoderForecaster(make_config("shi-mnist", 1, cell, forecaster)))
    recomputed = copy.deepcopy(plain)
    recomputed.recompute = True
    x, y = torch.randn(2, 4, 1, 32, 32), torch.randn(2, 3, 1, 32, 32)
    kept = {}
    for model in (plain, recomputed):
        sizes = {}

        def keep(tensor, sizes=sizes):
            storage = tensor.untyped_storage()
            sizes[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low_precision):
                loss = (model(x, 3).float() - y).square().mean()
        loss.backward()
        kept[model is recomputed] = sum(sizes.values())
    for (name, a), b in zip(plain.named_parameters(), recomputed.parameters(), strict=True):
        if low_precision:
            # Recomputing runs the input convolutions step by step rather than batched, and bf16 rounds the
            # two orders of summation differently.
            assert (a.grad - b.grad).norm() / a.grad.norm() < 2e-2, name
        else:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)
    assert kept[True] < kept[False] / 4  # measured: 4.6x less for ConvLSTM, 8x for ConvGRU


def test_channels_last_input_gives_the_same_forecast():
    torch.manual_seed(0)
    model = _live(EncoderForecaster(make_config("fast", 1))).eval()
    x = torch.randn(2, 4, 1, 32, 32)
    with torch.no_grad():
        plain = model(x, 3)
        strided = model(x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3), 3)
    torch.testing.assert_close(plain, strided, atol=1e-5, rtol=1e-5)


def test_config_round_trips_through_plain_data():
    for arch in ARCHITECTURES:
        config = make_config(arch, 3, "convlstm")
        assert ModelConfig.from_dict(config.to_dict()) == config


def test_unknown_arch_and_cell_are_user_errors():
    with pytest.raises(UserError, match="--arch"):
        make_config("nope", 1)
    with pytest.raises(UserError, match="unknown cell"):
        make_config("fast", 1, "gru")


def _moving_blob(steps: int, velocity: tuple[float, float], size: int = 64) -> torch.Tensor:
    """A smooth blob moving at ``velocity`` (dy, dx) pixels per step: [1, steps, 1, size, size]."""
    ys, xs = torch.meshgrid(
        torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij"
    )
    frames = [
        torch.exp(-((ys - 20 - velocity[0] * t) ** 2 + (xs - 16 - velocity[1] * t) ** 2) / 40) for t in range(steps)
    ]
    return torch.stack(frames)[None, :, None]


@pytest.mark.parametrize("arch", ["fast", "shi-mnist"])
def test_untrained_anchored_forecaster_extrapolates_the_last_frame(arch):
    """With its zero correction and zero change of motion, the model is semi-Lagrangian extrapolation of the
    last observation along the estimated motion, and so forecasts a moving blob where it goes."""
    sequence = _moving_blob(10, (1.0, 3.0))
    inputs, truth = sequence[:, :5], sequence[:, 5:]
    model = EncoderForecaster(make_config(arch, 1)).eval()
    with torch.no_grad():
        forecast = model(inputs, 5)
    torch.testing.assert_close(forecast, advect(inputs[:, -1], motion_field(inputs), 5))
    persistence_error = (inputs[:, -1:] - truth).abs().max()
    assert (forecast - truth).abs().max() < 0.05 * persistence_error  # interpolation error only


def test_anchor_adds_corrections_that_travel_with_the_rain():
    last = torch.zeros(1, 1, 32, 32)
    motion = torch.zeros(1, 2, 32, 32)
    motion[:, 1] = 2.0  # everything moves 2 pixels to the right per step
    outputs = torch.zeros(1, 3, 3, 32, 32)
    outputs[0, 0, 2, 10, 10] = 1.0  # a new cell at lead 1 ...
    outputs[0, 1:, 1] = 1.0  # ... and from lead 2 on, one pixel more to the right per step
    forecast = anchor(last, motion, outputs, bounds=(torch.tensor([[-5.0]]), torch.tensor([[5.0]])))
    assert forecast[0, 0, 0, 10, 10] == 1.0
    assert forecast[0, 1, 0, 10, 13] == pytest.approx(1.0)  # carried along 2 + 1 pixels
    assert forecast[0, 2, 0, 10, 16] == pytest.approx(1.0)
    assert forecast.sum(dim=(2, 3, 4))[0].tolist() == pytest.approx([1.0, 1.0, 1.0])  # nothing lost or made


def test_anchored_forecasts_stay_within_the_range_of_the_input_frames():
    """However large the correction, no lead leaves the range of values of the input frames, per sequence."""
    last = torch.zeros(2, 1, 16, 16)
    outputs = torch.zeros(2, 4, 3, 16, 16)
    outputs[:, :, 2, 5:9, 5:9] = 3.0  # a cell growing by 3 per lead
    outputs[:, :, 2, 12:, 12:] = -3.0  # and a region drying by 3 per lead
    bounds = torch.tensor([[-1.0], [-4.0]]), torch.tensor([[4.0], [7.0]])
    forecast = anchor(last, torch.zeros(2, 2, 16, 16), outputs, bounds)
    assert forecast[:, :, 0, 6, 6].tolist() == [[3.0, 4.0, 4.0, 4.0], [3.0, 6.0, 7.0, 7.0]]
    assert forecast[:, :, 0, 14, 14].tolist() == [[-1.0] * 4, [-3.0, -4.0, -4.0, -4.0]]
    model = EncoderForecaster(make_config("fast", 1)).eval()
    inputs = _moving_blob(5, (0.0, 1.0))
    for correction, extreme in ((1.0, inputs.max()), (-1.0, inputs.min())):
        torch.nn.init.constant_(model.head.bias, correction)  # at every pixel and step (and a change of motion)
        with torch.no_grad():
            forecast = model(inputs, 4)
        assert float(forecast.max() if correction > 0 else forecast.min()) == pytest.approx(float(extreme))
        assert inputs.min() <= forecast.min() and forecast.max() <= inputs.max()


def test_corrections_held_at_a_bound_still_learn_their_way_back():
    """A pixel pushed past the top of the range forecasts the top, yet the loss still pulls its correction down."""
    last = torch.zeros(1, 1, 8, 8)
    outputs = torch.zeros(1, 2, 3, 8, 8)
    outputs[0, :, 2] = 10.0  # far above the range everywhere
    outputs.requires_grad_(True)
    forecast = anchor(last, torch.zeros(1, 2, 8, 8), outputs, bounds=(torch.tensor([[-1.0]]), torch.tensor([[1.0]])))
    assert forecast.max().item() == 1.0
    forecast.square().sum().backward()  # the observation: all zero
    assert (outputs.grad[0, :, 2] > 0).all()  # every correction is pushed back down


def test_a_bound_passes_no_gradient_that_points_further_out():
    """Where the observation lies beyond the inputs' range, the held forecast is as close as it may come: the
    correction is not pushed further out (upwards above the range, downwards below it)."""
    last = torch.zeros(1, 1, 4, 4)
    outputs = torch.zeros(1, 1, 3, 4, 4)
    outputs[0, 0, 2, :2] = 3.0  # top rows above the range
    outputs[0, 0, 2, 2:] = -3.0  # bottom rows below it
    outputs.requires_grad_(True)
    forecast = anchor(last, torch.zeros(1, 2, 4, 4), outputs, bounds=(torch.tensor([[-1.0]]), torch.tensor([[1.0]])))
    observation = torch.cat([torch.full((1, 1, 1, 2, 4), 5.0), torch.full((1, 1, 1, 2, 4), -5.0)], dim=3)
    (forecast - observation).square().sum().backward()
    assert forecast[0, 0, 0, :2].eq(1.0).all() and forecast[0, 0, 0, 2:].eq(-1.0).all()
    assert outputs.grad[0, 0, 2].eq(0.0).all()


def test_checkpoints_from_before_the_anchored_forecaster_rebuild_shis():
    saved = make_config("fast", 1, forecaster="shi").to_dict()
    del saved["forecaster"]
    assert ModelConfig.from_dict(saved).forecaster == "shi"
    assert make_config("fast", 1).forecaster == "anchored"


def _reference_trajgru_step(cell: ConvRNNCell, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """TrajGRU written out from Shi et al. 2017, one link and one gate at a time:
    z = σ(Wxz*x + Σ_l Whz^l*warp(h, f_l)), r likewise, h~ = f(Wxh*x + r ⊙ Σ_l Whh^l*warp(h, f_l)),
    h' = (1 − z) ⊙ h~ + z ⊙ h, with the flows f_l = γ(x, h)."""
    hidden, links = cell.hidden, cell.flow_out.out_channels // 2
    w_in, b_in = cell.input_conv.weight, cell.input_conv.bias
    pad = cell.input_conv.padding
    x_r, x_z, x_h, x_flow = (
        torch.nn.functional.conv2d(x, w_in[k], b_in[k], padding=pad)
        for k in (slice(0, hidden), slice(hidden, 2 * hidden), slice(2 * hidden, 3 * hidden), slice(3 * hidden, None))
    )
    features = torch.nn.functional.leaky_relu(cell.flow_hidden(h) + x_flow, 0.2)
    flows = cell.flow_out(features)
    height, width = h.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(height).float(), torch.arange(width).float(), indexing="ij")
    w_h, b_h = cell.hidden_conv.weight[:, :, 0, 0], cell.hidden_conv.bias
    totals = [b_h[k * hidden : (k + 1) * hidden].view(1, -1, 1, 1) for k in range(3)]
    for link in range(links):
        dy, dx = flows[:, 2 * link], flows[:, 2 * link + 1]
        grid = torch.stack([2 * (xs - dx) / (width - 1) - 1, 2 * (ys - dy) / (height - 1) - 1], dim=-1)
        warped = torch.nn.functional.grid_sample(h, grid, padding_mode="border", align_corners=True)
        for k in range(3):
            weight = w_h[k * hidden : (k + 1) * hidden, link * hidden : (link + 1) * hidden]
            totals[k] = totals[k] + torch.einsum("oc,bchw->bohw", weight, warped)
    r = torch.sigmoid(x_r + totals[0])
    z = torch.sigmoid(x_z + totals[1])
    candidate = torch.nn.functional.leaky_relu(x_h + r * totals[2], 0.2)
    return (1 - z) * candidate + z * h


def test_trajgru_step_equals_the_paper_written_out():
    torch.manual_seed(0)
    cell = ConvRNNCell(3, 8, "trajgru", 3, 5, "leaky")
    torch.nn.init.normal_(cell.flow_out.weight, std=0.3)  # flows that vary over the frame, up to pixels
    x, h = torch.randn(2, 3, 12, 12), torch.randn(2, 8, 12, 12)
    step = cell.step(cell.input_gates(x), h)
    torch.testing.assert_close(step, _reference_trajgru_step(cell, x, h), atol=1e-5, rtol=1e-5)
    assert _reference_trajgru_step(cell, x, h).sub(h).abs().max() > 0.1  # the step does change the state
