"""Writing files so that nothing is lost: a temporary file beside the target, flushed, then renamed."""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import BinaryIO

import h5py

from convgru_cli.errors import UserError

_writing: dict[str, int] = {}  # temporary file -> the process writing it (a forked worker must not remove it)


def remove_own_temporaries() -> None:
    """Remove the temporary files this process is writing (a forked worker leaves its parent's alone)."""
    for path, pid in list(_writing.items()):
        if pid == os.getpid():
            with contextlib.suppress(OSError):
                os.unlink(path)


def refuse_existing(paths: list[str | None], force: bool) -> None:
    """Fail before any work is done when an output exists and --force was not given."""
    for path in paths:
        if path is not None and not force and os.path.exists(path):
            raise UserError(f"{path}: already exists; use --force to overwrite it")


@contextlib.contextmanager
def atomic_path(path: str, force: bool = True) -> Iterator[str]:
    """A temporary path beside ``path`` to write to; on success it is flushed to disk and renamed into place.

    A crash or a full disk at any moment leaves the previous file (or no file) intact, and no temporary file."""
    directory = os.path.dirname(os.path.abspath(path))
    refuse_existing([path], force)
    if not os.path.isdir(directory):
        raise UserError(f"{path}: directory {directory} does not exist")
    try:
        handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=directory)
    except OSError as error:
        raise UserError(f"{path}: cannot write in {directory} ({error.strerror})") from None
    os.close(handle)
    _writing[temporary] = os.getpid()
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
        yield temporary
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(temporary, path)
        directory_handle = os.open(directory, os.O_RDONLY)  # the rename itself survives a power cut
        try:
            os.fsync(directory_handle)
        finally:
            os.close(directory_handle)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        if isinstance(error, OSError):
            raise UserError(f"{path}: writing failed ({error.strerror or error}); nothing was written") from None
        raise
    finally:
        _writing.pop(temporary, None)


def write_atomically(path: str, write: Callable[[BinaryIO], None], force: bool = True) -> None:
    """Call ``write(file)`` on a binary file that becomes ``path`` only once it is complete."""
    with atomic_path(path, force) as temporary, open(temporary, "wb") as file:
        write(file)


def hdf5_bytes(fill: Callable[[h5py.File], None]) -> bytes:
    """An HDF5 file built in memory by ``fill``, for standard output."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as file:
        fill(file)
    return buffer.getvalue()
