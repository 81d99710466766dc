"""Motion estimation and semi-Lagrangian advection: what the optical-flow baseline and the anchored forecaster
share.

The motion is block matching, the simplest estimator that copes with motion of several pixels per step: for
every displacement up to ``max_speed`` pixels, the squared difference between consecutive input frames is
averaged over a local window (summed over the last few frame pairs, which steadies it), and each pixel takes
the displacement of least difference. Advection is semi-Lagrangian: each step moves the departure point back
along the motion field found there (Germann and Zawadzki 2002 in spirit; pysteps' Lucas–Kanade +
semi-Lagrangian is the field's full-strength version).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def motion_field(inputs: torch.Tensor, max_speed: int = 6, window: int = 9, pairs: int = 3) -> torch.Tensor:
    """Per-pixel displacement per step, [B, 2, H, W] as (dy, dx) in pixels, from the last ``pairs`` frame pairs."""
    fields = inputs.float().nan_to_num().mean(dim=2)  # [B, T, H, W]: channels averaged
    pairs = min(pairs, fields.shape[1] - 1)
    if pairs < 1:
        return fields.new_zeros(fields.shape[0], 2, *fields.shape[-2:])
    shifts = [(dy, dx) for dy in range(-max_speed, max_speed + 1) for dx in range(-max_speed, max_speed + 1)]
    # Smallest displacement first: where the field is flat every shift costs the same, and the first
    # (strictly) least cost wins, so flat regions stay still instead of taking the first shift tried.
    shifts.sort(key=lambda shift: shift[0] ** 2 + shift[1] ** 2)
    best_cost = torch.full_like(fields[:, :1], torch.inf)  # a running minimum: one cost map in memory, not 169
    best = torch.zeros(best_cost.shape, dtype=torch.long, device=inputs.device)
    pad = max_speed
    for index, (dy, dx) in enumerate(shifts):
        cost = 0.0
        for k in range(1, pairs + 1):
            before, after = fields[:, -k - 1], fields[:, -k]
            padded = F.pad(before[:, None], (pad, pad, pad, pad), mode="replicate")[:, 0]
            h, w = before.shape[-2:]
            # content at (y, x) after one step came from (y - dy, x - dx)
            moved = padded[:, pad - dy : pad - dy + h, pad - dx : pad - dx + w]
            cost = cost + (after - moved) ** 2
        cost = F.avg_pool2d(cost[:, None], window, stride=1, padding=window // 2, count_include_pad=False)
        better = cost < best_cost
        best_cost = torch.where(better, cost, best_cost)
        best = torch.where(better, index, best)
    table = torch.tensor(shifts, dtype=torch.float32, device=inputs.device)  # [S, 2]
    motion = table[best[:, 0]].permute(0, 3, 1, 2)  # [B, 2, H, W]
    return F.avg_pool2d(motion, window, stride=1, padding=window // 2, count_include_pad=False)


def advect(last: torch.Tensor, motion: torch.Tensor, frames: int) -> torch.Tensor:
    """Semi-Lagrangian extrapolation of ``last`` [B, C, H, W] along ``motion`` [B, 2, H, W]: [B, frames, C, H, W]."""
    batch, _, height, width = last.shape
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float32, device=last.device),
        torch.arange(width, dtype=torch.float32, device=last.device),
        indexing="ij",
    )
    grid = torch.stack([ys, xs])[None].expand(batch, -1, -1, -1)

    def sample(image: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        normalised = torch.stack(
            [2 * points[:, 1] / max(width - 1, 1) - 1, 2 * points[:, 0] / max(height - 1, 1) - 1], dim=-1
        )
        return F.grid_sample(image, normalised, mode="bilinear", padding_mode="border", align_corners=True)

    displacement = torch.zeros_like(grid)
    outputs = []
    for _ in range(frames):
        displacement = displacement + sample(motion, grid - displacement)
        outputs.append(sample(last.float(), grid - displacement))
    return torch.stack(outputs, dim=1)
