"""Moving-digits sequences in the manner of Moving MNIST (Srivastava et al. 2015).

Digits bounce around a square canvas and overlap by maximum. Glyphs come from real MNIST images when an
idx file is given, else from a built-in 5x7 pixel font, so that sample data can be made with no download.
"""

from __future__ import annotations

import gzip
import struct

import h5py
import numpy as np

from convgru_cli.atomic import atomic_path
from convgru_cli.errors import UserError

FONT = {
    "0": ".###. #...# #..## #.#.# ##..# #...# .###.",
    "1": "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.",
    "2": ".###. #...# ....# ...#. ..#.. .#... #####",
    "3": "##### ...#. ..#.. ...#. ....# #...# .###.",
    "4": "...#. ..##. .#.#. #..#. ##### ...#. ...#.",
    "5": "##### #.... ####. ....# ....# #...# .###.",
    "6": "..##. .#... #.... ####. #...# #...# .###.",
    "7": "##### ....# ...#. ..#.. .#... .#... .#...",
    "8": ".###. #...# #...# .###. #...# #...# .###.",
    "9": ".###. #...# #...# .#### ....# ...#. .##..",
}
GLYPH = 28


def font_glyphs() -> np.ndarray:
    """Ten 28x28 uint8 digit images drawn from the 5x7 font, scaled 4x and softened."""
    glyphs = []
    for digit in "0123456789":
        bits = np.array([[c == "#" for c in row] for row in FONT[digit].split()], dtype=np.float32)
        big = np.kron(bits, np.ones((3, 3), dtype=np.float32))  # 21 x 15
        canvas = np.zeros((GLYPH, GLYPH), dtype=np.float32)
        canvas[3:24, 6:21] = big
        padded = np.pad(canvas, 1)
        soft = sum(padded[i : i + GLYPH, j : j + GLYPH] for i in range(3) for j in range(3)) / 9
        glyphs.append(np.clip(np.maximum(canvas, soft) * 255, 0, 255).astype(np.uint8))
    return np.stack(glyphs)


def read_mnist_images(path: str) -> np.ndarray:
    """MNIST images from an idx3 file, gzipped or not: [count, 28, 28] uint8."""
    try:
        with open(path, "rb") as raw:
            head = raw.read(2)
        opener = gzip.open if head == b"\x1f\x8b" else open
        with opener(path, "rb") as file:
            magic, count, rows, cols = struct.unpack(">IIII", file.read(16))
            if magic != 2051:
                raise UserError(f"{path}: not an MNIST idx3 image file (magic {magic}, expected 2051)")
            images = np.frombuffer(file.read(count * rows * cols), dtype=np.uint8)
    except (OSError, struct.error, EOFError) as error:
        raise UserError(f"{path}: cannot read MNIST images ({error})") from None
    if images.size != count * rows * cols:
        raise UserError(f"{path}: truncated: header says {count} images of {rows}x{cols}")
    return images.reshape(count, rows, cols)


def moving_digits(
    sequences: int, frames: int, glyphs: np.ndarray, size: int = 64, digits: int = 2, seed: int = 0
) -> np.ndarray:
    """[sequences, frames, size, size] uint8 of ``digits`` glyphs moving in straight lines, bouncing off walls."""
    if sequences < 1 or frames < 1 or digits < 1:
        raise UserError("--sequences, --frames and --digits must be at least 1")
    if size < glyphs.shape[-1]:
        raise UserError(f"--size {size}: must be at least the glyph size {glyphs.shape[-1]}")
    rng = np.random.default_rng(seed)
    glyph = glyphs.shape[-1]
    room = size - glyph
    out = np.zeros((sequences, frames, size, size), dtype=np.uint8)
    for n in range(sequences):
        for _ in range(digits):
            image = glyphs[rng.integers(len(glyphs))]
            position = rng.uniform(0, room, size=2)
            angle = rng.uniform(0, 2 * np.pi)
            velocity = 3.0 * np.array([np.sin(angle), np.cos(angle)])
            for t in range(frames):
                y, x = np.round(position).astype(int)
                patch = out[n, t, y : y + glyph, x : x + glyph]
                np.maximum(patch, image, out=patch)
                position = position + velocity
                for axis in range(2):
                    if position[axis] < 0:
                        position[axis], velocity[axis] = -position[axis], -velocity[axis]
                    elif position[axis] > room:
                        position[axis], velocity[axis] = 2 * room - position[axis], -velocity[axis]
                position = np.clip(position, 0, room)  # a step longer than the room bounces past the far wall
    return out


def write_sequences(path: str, sequences: np.ndarray, force: bool = False, **attributes: str) -> None:
    """Write [N, T, H, W] frames to dataset ``frames``, one compressed chunk per sequence."""
    with atomic_path(path, force) as temporary, h5py.File(temporary, "w") as h5:
        dataset = h5.create_dataset(
            "frames", data=sequences, chunks=(1, *sequences.shape[1:]), compression="gzip", shuffle=True
        )
        dataset.attrs["layout"] = "NTHW"
        for key, value in attributes.items():
            h5.attrs[key] = value
