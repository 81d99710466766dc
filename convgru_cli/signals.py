"""Ctrl-C and SIGTERM, in one place: what the command line does on them, and what training does instead.

Outside training, SIGTERM (kill, timeout, a batch scheduler) removes this process's temporary files and
exits 130 at once. Training turns SIGTERM into KeyboardInterrupt, like Ctrl-C, so that it can save last.pt
first, and holds both back while an optimizer step and its bookkeeping run.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator

from convgru_cli.atomic import remove_own_temporaries


def stop_on_signal(number: int, frame) -> None:
    """Remove this process's temporary files and exit 130 at once. Raising KeyboardInterrupt instead can land
    in a finalizer, where Python ignores it."""
    remove_own_temporaries()
    os.write(2, b"convgru: interrupted\n")
    os._exit(130)


def exit_on_sigterm() -> None:
    signal.signal(signal.SIGTERM, stop_on_signal)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside the block SIGTERM raises KeyboardInterrupt, as Ctrl-C does."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Ctrl-C or SIGTERM inside the block takes effect, as KeyboardInterrupt, when the block is done."""
    caught, previous = [], {}
    try:
        for number in (signal.SIGINT, signal.SIGTERM):
            previous[number] = signal.signal(number, lambda number, frame: caught.append(number))
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if caught:
        raise KeyboardInterrupt
