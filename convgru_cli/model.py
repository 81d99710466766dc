"""Convolutional recurrent cells and the encoder–forecaster of Shi et al. (2015, 2017).

The model takes and returns [batch, time, channels, height, width]. In training, inside, the frames of all
steps share the batch axis, time-major ([time*batch, channels, height, width]); without gradients it runs one
step at a time. Recurrent state and gate arithmetic stay
in float32 even under autocast: only the convolutions run in the low precision, which keeps long unrolls
stable.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from convgru_cli.errors import UserError
from convgru_cli.motion import advect, departure_points, motion_field, sample, trace_back, warp

CELLS = ("convgru", "convgru-textbook", "convlstm", "trajgru")
TRAJGRU_LINKS = 13  # L, the flow fields each TrajGRU state follows (Shi et al. 2017: 13 at the finer levels)
TRAJGRU_FLOW_FEATURES = 32  # channels of the small network that emits them
# "anchored": each output frame is the previous one carried along a motion field plus a correction, both
# predicted on top of a classical motion estimate; "shi": Shi et al.'s forecaster, which redraws every frame
# from hidden state. "auto" is for train to decide by the data (train.data_aware_model).
FORECASTERS = ("anchored", "shi")
FORECASTER_CHOICES = ("auto", *FORECASTERS)
# The cells' candidate activation: "tanh" bounds their states to [-1, 1]; "leaky" (LeakyReLU 0.2, Shi et al.'s)
# leaves them unbounded. "auto", like the forecaster's, is for train to decide by the data.
ACTIVATIONS = ("tanh", "leaky")
ACTIVATION_CHOICES = ("auto", *ACTIVATIONS)

log = logging.getLogger("convgru")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model; stored in every checkpoint as plain data.

    Level i has a downsampling convolution (kernel ``down_kernels[i]``, stride ``strides[i]``) feeding a
    recurrent cell with ``hidden[i]`` channels; the forecaster mirrors it with transposed convolutions.
    ``patch`` folds patch×patch pixel blocks into channels before level 0 (space-to-depth), which makes
    every recurrent convolution patch² times cheaper.
    """

    channels: int = 1
    cell: str = "convgru"
    patch: int = 1
    stem_channels: int = 16
    hidden: tuple[int, ...] = (64, 96, 96)
    strides: tuple[int, ...] = (1, 2, 2)
    down_kernels: tuple[int, ...] = (3, 3, 3)
    up_kernels: tuple[int, ...] = (3, 4, 4)
    input_kernel: int = 3
    hidden_kernel: int = 5
    activation: str = "leaky"
    forecaster: str = "anchored"

    def __post_init__(self) -> None:
        levels = len(self.hidden)
        if not (len(self.strides) == len(self.down_kernels) == len(self.up_kernels) == levels):
            raise UserError("model config: hidden, strides, down_kernels and up_kernels need one entry per level")
        if self.cell not in CELLS:
            raise UserError(f"model config: unknown cell {self.cell!r}; choose one of {', '.join(CELLS)}")
        if self.forecaster not in FORECASTER_CHOICES:
            raise UserError(
                f"model config: unknown forecaster {self.forecaster!r}; choose one of {', '.join(FORECASTER_CHOICES)}"
            )
        if self.activation not in ACTIVATION_CHOICES:
            raise UserError(
                f"model config: unknown activation {self.activation!r}; choose one of {', '.join(ACTIVATION_CHOICES)}"
            )

    @property
    def size_multiple(self) -> int:
        """Frame height and width must be multiples of this."""
        multiple = self.patch
        for stride in self.strides:
            multiple *= stride
        return multiple

    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        """The frame size the model runs at: height and width rounded up to multiples of ``size_multiple``
        (the model pads frames at the bottom and right edges as no data and crops its forecast back)."""
        m = self.size_multiple
        return -(-height // m) * m, -(-width // m) * m

    def check_frame_size(self, label: str, height: int, width: int) -> None:
        """Frames of any size are padded to fit, but not frames smaller than one cell of the coarsest level:
        those would be mostly padding."""
        m = self.size_multiple
        if height < m or width < m:
            raise UserError(
                f"{label}: frames of {height}x{width} are smaller than this model's {m}x{m} pixels (patch "
                f"{self.patch} x strides {'x'.join(map(str, self.strides))}); use larger frames or another --arch"
            )

    def log_padding(self, label: str, height: int, width: int) -> None:
        """One info line where frames are padded to fit."""
        padded = self.padded_size(height, width)
        if padded != (height, width):
            log.info(
                "%s: frames of %dx%d are padded to %dx%d (multiples of %d) as no data for the model, and its "
                "forecasts cropped back",
                label,
                height,
                width,
                *padded,
                self.size_multiple,
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def anchored(self) -> bool:
        return self.forecaster == "anchored"

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {f for f in cls.__dataclass_fields__}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
        values.setdefault("forecaster", "shi")  # checkpoints from before the anchored forecaster
        return cls(**values)


# Named architectures. "shi-mnist" is the HKO-7 repository's Moving MNIST ConvGRU; "fast" folds 4x4 pixel
# blocks into channels and uses 3x3 hidden kernels: a thirtieth of the FLOPs, which wins on a CPU budget.
ARCHITECTURES: dict[str, dict] = {
    "shi-mnist": {},
    "fast": dict(
        patch=4,
        stem_channels=64,
        hidden=(64, 96),
        strides=(1, 2),
        down_kernels=(3, 3),
        up_kernels=(3, 4),
        hidden_kernel=3,
    ),
    "hko7": dict(
        stem_channels=8,
        hidden=(64, 192, 192),
        strides=(5, 3, 2),
        down_kernels=(7, 5, 3),
        up_kernels=(7, 5, 4),
        hidden_kernel=5,
    ),
}


def make_config(
    arch: str, channels: int, cell: str = "convgru", forecaster: str = "anchored", activation: str = "leaky"
) -> ModelConfig:
    if arch not in ARCHITECTURES:
        raise UserError(f"--arch: unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    return ModelConfig(
        channels=channels, cell=cell, forecaster=forecaster, activation=activation, **ARCHITECTURES[arch]
    )


def _activation(name: str, x: Tensor) -> Tensor:
    return torch.tanh(x) if name == "tanh" else F.leaky_relu(x, 0.2)


def _same_padding(kernel: int, stride: int) -> tuple[int, int]:
    """Padding (and transposed-conv output padding) that scales a size by exactly ``stride``."""
    padding = (kernel - stride + 1) // 2
    return padding, 2 * padding - (kernel - stride)


class ConvRNNCell(nn.Module):
    """ConvGRU (nn.GRU form, the default), its textbook variant, ConvLSTM, or TrajGRU.

    The input convolution is separate from the step so that callers can run it over all time steps at once;
    ``step`` then does one hidden-state convolution per time step.
    ConvGRU:  r = σ(Wr*x + Rr*h), u = σ(Wu*x + Ru*h), n = f(Wn*x + r ⊙ (Rn*h)), h' = u ⊙ h + (1 − u) ⊙ n.
    Textbook: as above but n = f(Wn*x + Rn*(r ⊙ h)), with the same weights and a third convolution per step.
    ConvLSTM: i, f, g, o from Wx*x + Rh*h; c' = f ⊙ c + i ⊙ g, h' = o ⊙ tanh(c'); state is [h, c] on channels.
    TrajGRU (Shi et al. 2017): as ConvGRU, but the state's contribution is a 1x1 convolution of h warped along
    L flow fields, which a small network emits from x and h: the transition follows the motion.
    """

    def __init__(
        self, in_channels: int, hidden: int, cell: str, input_kernel: int, hidden_kernel: int, activation: str
    ):
        super().__init__()
        self.hidden = hidden
        self.cell = cell
        self.activation = activation
        gates = 4 if cell == "convlstm" else 3
        # TrajGRU's flow network reads x through the same input convolution, on channels of its own.
        flow_inputs = TRAJGRU_FLOW_FEATURES if cell == "trajgru" else 0
        self.input_conv = (
            nn.Conv2d(in_channels, gates * hidden + flow_inputs, input_kernel, padding=input_kernel // 2)
            if in_channels
            else None
        )
        if cell == "trajgru":
            self.flow_hidden = nn.Conv2d(hidden, TRAJGRU_FLOW_FEATURES, 5, padding=2)
            self.flow_out = nn.Conv2d(TRAJGRU_FLOW_FEATURES, 2 * TRAJGRU_LINKS, 5, padding=2)
            self.hidden_conv = nn.Conv2d(TRAJGRU_LINKS * hidden, gates * hidden, 1)
        else:
            self.hidden_conv = nn.Conv2d(hidden, gates * hidden, hidden_kernel, padding=hidden_kernel // 2)

    @property
    def state_channels(self) -> int:
        return 2 * self.hidden if self.cell == "convlstm" else self.hidden

    def input_gates(self, x: Tensor) -> Tensor:
        """Input contribution to the gates, for any number of frames stacked on the batch axis; kept in the
        convolution's precision (half the memory under autocast) and promoted to float32 in the step."""
        return self.input_conv(x)

    def output(self, state: Tensor) -> Tensor:
        return state[:, : self.hidden]

    def step(self, x_gates: Tensor | None, state: Tensor, state_is_zero: bool = False) -> Tensor:
        """One time step. ``state_is_zero`` says the state is known to be zero (the encoder's first step): its
        convolutions are then just their biases and are skipped, a twentieth of the hidden convolutions of a
        10 → 10 forecast."""
        if self.cell == "convlstm":
            return self._lstm_step(x_gates, state, state_is_zero)
        h = state
        split = [2 * self.hidden, self.hidden]
        if self.cell == "trajgru":
            flow_inputs = None
            if x_gates is not None:
                x_gates, flow_inputs = x_gates.split([3 * self.hidden, TRAJGRU_FLOW_FEATURES], dim=1)
            h_gates = self._trajectory_gates(h, flow_inputs, state_is_zero)
            h_ru, h_new = h_gates.split(split, dim=1)
            x_ru, x_new = (0.0, 0.0) if x_gates is None else x_gates.split(split, dim=1)
            r, u = torch.sigmoid(h_ru + x_ru).chunk(2, dim=1)
            candidate = r * h_new + x_new
        elif self.cell == "convgru":
            # Split rather than sliced, addcmul and lerp rather than separate products: fewer full-size
            # temporaries, and the backward pass joins the gate gradients with one concatenation instead of
            # adding up zero-filled slices.
            h_ru, h_new = self._hidden_gates(h, state_is_zero).split(split, dim=1)
            if x_gates is None:
                r, u = torch.sigmoid(h_ru).chunk(2, dim=1)
                candidate = r * h_new
            else:
                x_ru, x_new = x_gates.split(split, dim=1)
                r, u = torch.sigmoid(h_ru + x_ru).chunk(2, dim=1)
                candidate = torch.addcmul(x_new, r, h_new)
        else:
            # The reference form: both convolutions always run, even on a zero state.
            w_ru, w_new = self.hidden_conv.weight.split(split)
            b_ru, b_new = self.hidden_conv.bias.split(split)
            pad = self.hidden_conv.padding
            ru = F.conv2d(h, w_ru, b_ru, padding=pad).float()
            x_ru, x_new = (0.0, 0.0) if x_gates is None else x_gates.split(split, dim=1)
            r, u = torch.sigmoid(ru + x_ru).chunk(2, dim=1)
            candidate = F.conv2d(r * h, w_new, b_new, padding=pad).float() + x_new
        # u ⊙ h + (1 − u) ⊙ n in one operation.
        return torch.lerp(_activation(self.activation, candidate), h, u)

    def _hidden_gates(self, h: Tensor, state_is_zero: bool) -> Tensor:
        """The state's contribution to the gates, in float32; of a zero state, just the bias (broadcast)."""
        if state_is_zero:
            return self.hidden_conv.bias.float().view(1, -1, 1, 1)
        return self.hidden_conv(h).float()

    def _trajectory_gates(self, h: Tensor, flow_inputs: Tensor | None, state_is_zero: bool) -> Tensor:
        """TrajGRU's state contribution: h warped along the L emitted flow fields, joined by a 1x1 convolution."""
        if state_is_zero:
            return self.hidden_conv.bias.float().view(1, -1, 1, 1)
        features = self.flow_hidden(h)
        if flow_inputs is not None:
            features = features + flow_inputs
        flows = self.flow_out(F.leaky_relu(features, 0.2)).float()  # [B, 2L, H, W]
        batch, channels, height, width = h.shape
        links = flows.shape[1] // 2
        repeated = h.float().repeat_interleave(links, dim=0)  # [B*L, C, H, W], link-minor
        warped = warp(repeated, flows.reshape(batch * links, 2, height, width))
        return self.hidden_conv(warped.reshape(batch, links * channels, height, width).to(h.dtype)).float()

    def _lstm_step(self, x_gates: Tensor | None, state: Tensor, state_is_zero: bool) -> Tensor:
        h, c = state.chunk(2, dim=1)
        gates = self._hidden_gates(h, state_is_zero)
        if x_gates is not None:
            gates = gates + x_gates
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return torch.cat([h, c], dim=1)


# Frames of all time steps are stacked time-major on the batch axis, [T*B, C, H, W], channels-last (the layout
# oneDNN and cuDNN convolve fastest). Each step is then a contiguous slice, so splitting the steps and stacking
# the states again for the convolution between levels (and both in the backward pass) are views and plain
# copies; batch-major order made each a transposing copy.
def _frames(steps: Sequence[Tensor]) -> Tensor:
    return torch.cat(steps).contiguous(memory_format=torch.channels_last)


def _steps(frames: Tensor, batch: int) -> list[Tensor]:
    return list(frames.split(batch))


def _zero_state(x: Tensor, batch: int, channels: int) -> Tensor:
    zeros = x.new_zeros(batch, channels, *x.shape[-2:], dtype=torch.float32)
    return zeros.contiguous(memory_format=torch.channels_last)


def _convolve_steps(conv: nn.Module, *steps: Tensor) -> Tensor:
    return F.leaky_relu(conv(_frames(steps)), 0.2)


def _gated_step(cell: ConvRNNCell, x: Tensor | None, state: Tensor, state_is_zero: bool) -> Tensor:
    return cell.step(None if x is None else cell.input_gates(x), state, state_is_zero)


class EncoderForecaster(nn.Module):
    """Shi et al. 2017: the encoder reads the input frames level by level, finest first; the forecaster
    starts from the encoder's final states and, taking no frames, unrolls any number of future steps from
    the coarsest level down, upsampling into the next finer level's cell at every step."""

    def __init__(self, config: ModelConfig, recompute: bool = False):
        super().__init__()
        if config.forecaster not in FORECASTERS or config.activation not in ACTIVATIONS:
            raise ValueError(
                f"forecaster {config.forecaster!r}, activation {config.activation!r}: train decides 'auto' by the "
                "data before a model is built"
            )
        self.config = config
        # Keep only each step's input frame and state for the backward pass and recompute the rest: the unrolled
        # activations dominate training memory.
        self.recompute = recompute
        c = config
        levels = len(c.hidden)
        in_channels = c.channels * c.patch**2
        below = [c.stem_channels] + list(c.hidden[:-1])  # channels each level's cell receives
        self.down = nn.ModuleList()
        self.encoder_cells = nn.ModuleList()
        self.forecaster_cells = nn.ModuleList()
        self.up = nn.ModuleList()
        for i in range(levels):
            source = in_channels if i == 0 else c.hidden[i - 1]
            padding, _ = _same_padding(c.down_kernels[i], c.strides[i])
            self.down.append(nn.Conv2d(source, below[i], c.down_kernels[i], c.strides[i], padding))
            cell_args = (c.cell, c.input_kernel, c.hidden_kernel, c.activation)
            self.encoder_cells.append(ConvRNNCell(below[i], c.hidden[i], *cell_args))
            # Shi's coarsest forecaster cell takes no input: it is driven by its state alone. Anchored, the finest
            # cell also reads the extrapolated frames (through ``guide``), so it sees where the rain is carried.
            takes_input = i < levels - 1 or (i == 0 and c.anchored)
            self.forecaster_cells.append(ConvRNNCell(c.hidden[i] if takes_input else 0, c.hidden[i], *cell_args))
            padding, extra = _same_padding(c.up_kernels[i], c.strides[i])
            self.up.append(nn.ConvTranspose2d(c.hidden[i], below[i], c.up_kernels[i], c.strides[i], padding, extra))
        # Anchored, the head also emits the change of motion (dy, dx) per pixel beside the correction of each channel.
        outputs = c.channels + 2 if c.anchored else c.channels
        self.head = nn.Conv2d(c.stem_channels, outputs * c.patch**2, 1)
        # After un-folding the patches, one full-resolution convolution smooths the block edges.
        self.refine = nn.Conv2d(outputs, outputs, 3, padding=1) if c.patch > 1 else None
        self.guide = None
        if c.anchored:
            padding, _ = _same_padding(c.down_kernels[0], c.strides[0])
            self.guide = nn.Conv2d(in_channels, c.hidden[0], c.down_kernels[0], c.strides[0], padding)
            # A zero correction and a zero change of motion: untrained, the model extrapolates.
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
            if self.refine is not None:
                nn.init.zeros_(self.refine.bias)
        self.to(memory_format=torch.channels_last)

    # Training runs level by level: the convolutions between levels and into the gates run once over all steps,
    # and the backward pass keeps their activations anyway. Without gradients (forecasting, validation) nothing
    # of an earlier step is needed again, so the model runs one step at a time through all levels and holds one
    # step's activations, not every step's: 0.4 of the memory of a `fast` forecast, a third of a shi-mnist one
    # (benchmarks/README.md), the same forecast (tests/test_model.py).
    def encode(self, inputs: Tensor) -> list[Tensor]:
        batch, steps = inputs.shape[:2]
        if self.config.patch > 1:
            inputs = F.pixel_unshuffle(inputs, self.config.patch)
        if not torch.is_grad_enabled():
            return self._encode_stepwise(inputs)
        outputs = list(inputs.unbind(1))
        states = []
        for down, cell in zip(self.down, self.encoder_cells, strict=True):
            x = self._convolve(down, outputs)
            outputs, state = self._unroll(cell, x, _zero_state(x, batch, cell.state_channels), steps, zero_start=True)
            states.append(state)
        return states

    def forecast(self, states: list[Tensor], frames: int, guide: Tensor | None = None) -> Tensor:
        """Unrolls the forecaster from the encoder's ``states``; ``guide`` ([frames*batch, C, H, W], time-major),
        where given, is added to the finest cell's input."""
        if not torch.is_grad_enabled():
            return self._forecast_stepwise(states, frames, guide)
        batch = states[0].shape[0]
        x = None
        for level in reversed(range(len(states))):
            if level == 0 and guide is not None:
                guided = self._convolve(self.guide, list(guide.split(batch)))
                x = guided if x is None else x + guided
            outputs, _ = self._unroll(self.forecaster_cells[level], x, states[level], frames)
            x = self._convolve(self.up[level], outputs)
        # One copy: to float32, batch-major and contiguous (without copy=True a float32 y would come back as a view).
        return (
            self._frame(x)
            .unflatten(0, (-1, batch))
            .transpose(0, 1)
            .to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        )

    def _frame(self, x: Tensor) -> Tensor:
        """The finest level's upsampled output [N, stem, h, w] -> frames (and, anchored, the motion's change)."""
        y = self.head(x)
        if self.config.patch > 1:
            y = F.pixel_shuffle(y, self.config.patch)
            y = y + self.refine(y)
        return y

    def _encode_stepwise(self, inputs: Tensor) -> list[Tensor]:
        """``encode`` one step at a time through all levels, on inputs already folded into patches."""
        batch, steps = inputs.shape[:2]
        states: list[Tensor] = []
        for t in range(steps):
            x = inputs[:, t]
            for level, (down, cell) in enumerate(zip(self.down, self.encoder_cells, strict=True)):
                x = _convolve_steps(down, x)
                if t == 0:
                    states.append(_zero_state(x, batch, cell.state_channels))
                states[level] = _gated_step(cell, x, states[level], state_is_zero=t == 0)
                x = cell.output(states[level])
        return states

    def _forecast_stepwise(self, states: list[Tensor], frames: int, guide: Tensor | None) -> Tensor:
        """``forecast`` one step at a time through all levels, each frame written into the float32 result."""
        batch, states = states[0].shape[0], list(states)
        guides = guide.split(batch) if guide is not None else [None] * frames
        forecast = None
        for t in range(frames):
            x = None
            for level in reversed(range(len(states))):
                if level == 0 and guide is not None:
                    guided = _convolve_steps(self.guide, guides[t])
                    x = guided if x is None else x + guided
                cell = self.forecaster_cells[level]
                states[level] = _gated_step(cell, x, states[level], state_is_zero=False)
                x = _convolve_steps(self.up[level], cell.output(states[level]))
            frame = self._frame(x)
            if forecast is None:
                forecast = frame.new_empty(batch, frames, *frame.shape[1:], dtype=torch.float32)
            forecast[:, t] = frame
        return forecast

    def _recomputing(self) -> bool:
        return self.recompute and torch.is_grad_enabled()

    def _convolve(self, conv: nn.Module, outputs: list[Tensor]) -> Tensor:
        """The down- or upsampling between levels, over all steps at once. Recomputing, its input (a stacked
        copy of the states that the steps keep anyway) is rebuilt in the backward pass rather than kept."""
        if self._recomputing():
            return checkpoint(_convolve_steps, conv, *outputs, use_reentrant=False)
        return _convolve_steps(conv, *outputs)

    def _unroll(
        self, cell: ConvRNNCell, x: Tensor | None, state: Tensor, steps: int, zero_start: bool = False
    ) -> tuple[list[Tensor], Tensor]:
        """Runs ``steps`` steps of ``cell`` from ``state`` (all zeros if ``zero_start``) on the frames ``x``
        ([steps*batch, C, H, W]) or on none. Normally the input convolution runs once over all steps.
        Recomputing, it runs inside each step instead, so that only the thin input frames are kept, not the gates
        (three times the hidden width)."""
        batch = state.shape[0]
        recompute = self._recomputing()
        if x is None:
            inputs: list[Tensor | None] = [None] * steps
        else:
            inputs = _steps(x if recompute else cell.input_gates(x), batch)
        outputs = []
        for i, x_step in enumerate(inputs):
            state_is_zero = zero_start and i == 0
            if recompute:
                state = checkpoint(_gated_step, cell, x_step, state, state_is_zero, use_reentrant=False)
            else:
                state = cell.step(x_step, state, state_is_zero)
            outputs.append(cell.output(state))
        return outputs, state

    def forward(self, inputs: Tensor, frames: int) -> Tensor:
        """inputs: [B, T_in, C, H, W] normalised frames (0 where there is no data) of any size; returns
        [B, frames, C, H, W]. Frames whose sides are not multiples of the model's are padded with 0 (no data)
        at the bottom and right, and the forecast is cropped back. One frame of code, as before padding: a
        nested call would cut the compiled graphs differently."""
        height, width = inputs.shape[-2:]
        padded_height, padded_width = self.config.padded_size(height, width)
        if (padded_height, padded_width) != (height, width):
            inputs = F.pad(inputs, (0, padded_width - width, 0, padded_height - height))
        states = self.encode(inputs)
        if not self.config.anchored:
            return _cropped(self.forecast(states, frames), height, width)
        last = inputs[:, -1].float()
        with torch.no_grad():
            motion = _estimate_motion(inputs)
            extrapolated = advect(last, motion, frames).transpose(0, 1)  # time-major, as the forecaster runs
        if self.config.patch > 1:
            extrapolated = F.pixel_unshuffle(extrapolated, self.config.patch)
        guide = extrapolated.flatten(0, 1).to(inputs.dtype).contiguous(memory_format=torch.channels_last)
        bounds = inputs.float().amin(dim=(1, 3, 4)), inputs.float().amax(dim=(1, 3, 4))
        return _cropped(anchor(last, motion, self.forecast(states, frames, guide), bounds), height, width)


def _cropped(forecast: Tensor, height: int, width: int) -> Tensor:
    """A forecast of padded frames cut back to the frames' own size (unchanged where nothing was padded)."""
    if forecast.shape[-2:] == (height, width):
        return forecast
    return forecast[..., :height, :width].contiguous()


# The search over displacements is a long Python loop of small operations: compiling it buys nothing.
_estimate_motion = torch.compiler.disable(motion_field)


def anchor(last: Tensor, motion: Tensor, outputs: Tensor, bounds: tuple[Tensor, Tensor]) -> Tensor:
    """The forecast from the last observed frame ``last`` [B, C, H, W], the estimated ``motion`` [B, 2, H, W]
    and the forecaster's ``outputs`` [B, frames, 2 + C, H, W] (change of motion, correction): lead t is
    ``last`` carried along the motion so far (sampled once, as extrapolation is) plus the corrections so far,
    each carried along with the rain since it was made, and held within ``bounds`` (lowest, highest) [B, C],
    the range of the input frames. Above it, a model trained on one event painted cells it was never shown (on
    an unseen radar one pixel in 10^5 grew past 7x the observed maximum by lead 6); below it, a run's
    corrections ran away to a training loss of 10^8. Zero outputs give the extrapolation of ``last``, which
    never leaves that range."""
    with torch.autocast(last.device.type, enabled=False):
        outputs = outputs.float()
        low, high = (bound.float()[:, :, None, None] for bound in bounds)
        displacement = torch.zeros_like(motion)
        correction = torch.zeros_like(last)
        forecast = []
        for step in outputs.unbind(1):
            step_motion = motion + step[:, :2]
            displacement = trace_back(displacement, step_motion)
            correction = warp(correction, step_motion) + step[:, 2:]
            lead = sample(last, departure_points(displacement)) + correction
            forecast.append(_HeldWithin.apply(lead, low, high))
        return torch.stack(forecast, dim=1)


class _HeldWithin(torch.autograd.Function):
    """``lead.clamp(low, high)`` whose gradient still reaches a value held at a bound where it points back into
    the range, and only there. Behind a plain clamp, a run whose corrections had pushed every pixel past the top
    (raining everywhere) learned nothing more and stayed there; a gradient passed both ways would push on
    forever where the observation itself lies beyond the inputs' range (a cell growing past every input frame's
    maximum), raising the corrections under every held pixel."""

    @staticmethod
    def forward(ctx, lead: Tensor, low: Tensor, high: Tensor) -> Tensor:
        ctx.save_for_backward(lead > high, lead < low)
        return lead.clamp(low, high)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        above, below = ctx.saved_tensors
        # A step against the gradient lowers a value where the gradient is positive.
        outward = (above & (grad < 0)) | (below & (grad > 0))
        return grad.masked_fill(outward, 0.0), None, None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
