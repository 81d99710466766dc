"""The one exception type that means "the user's input is wrong": the CLI prints it as one line, exit 2."""

import math


class UserError(Exception):
    """Bad input or usage. The message names the file, dataset or option and says what to do."""


def finite(value: float, option: str) -> float:
    """``value``, refused when NaN or infinite: every comparison with NaN is false, so range checks alone let it
    through. Every float option goes through here."""
    if not math.isfinite(value):
        raise UserError(f"{option} {value}: expected a finite number")
    return value
