"""Ctrl-C and SIGTERM, in one place: what the command line does on them, and what training does instead.

Outside training, SIGTERM (kill, timeout, a batch scheduler) removes this process's temporary files and
exits 130 at once. Training notes both SIGTERM and Ctrl-C and stops at the next step boundary, so that it can
save last.pt first, never between an optimizer step and its bookkeeping.
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


_pending: list[int] = []  # signals noted inside ``deferred()``, not yet acted on


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Inside the block Ctrl-C and SIGTERM are noted, and ``check()`` raises KeyboardInterrupt where training can
    stop cleanly (between optimizer steps, between validation batches). Raised from the handler itself, the
    exception could land in a finalizer, where Python ignores it, and training would go on. A second signal
    before a check raises at once, for a process stuck in one long call."""

    def note(number: int, frame) -> None:
        if _pending:
            raise KeyboardInterrupt
        _pending.append(number)

    previous = {}
    _pending.clear()
    try:
        for number in (signal.SIGINT, signal.SIGTERM):
            previous[number] = signal.signal(number, note)
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        _pending.clear()


def check() -> None:
    """KeyboardInterrupt if Ctrl-C or SIGTERM came inside ``deferred()``."""
    if _pending:
        _pending.clear()
        raise KeyboardInterrupt
