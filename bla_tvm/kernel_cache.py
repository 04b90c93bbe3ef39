"""Compiled kernel modules on disk, and the proof that one is whole. Imports neither tvm nor torch.

A module ``<name>.so`` is written with its SHA-256 beside it, ``<name>.so.sha256``, and loaded only where the two
agree (``intact``): mapping a truncated module kills the process (SIGBUS in ``tvm_ffi.load_module``), and an
emptied or overwritten one fails every call. ``write_module`` exports to a staging file in the same folder and
renames the module, then its digest, into place, so a reader never sees half a module; ``locked`` serialises the
writers of one path across processes and threads, and removes its lock file when it is done, failed or not.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

DIGEST_SUFFIX = ".sha256"


def file_digest(path: Path) -> str:
    """SHA-256 of the file's bytes, in hex."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def digest_path(path: Path) -> Path:
    """Where the digest of module ``path`` is kept."""
    path = Path(path)
    return path.with_name(path.name + DIGEST_SUFFIX)


def intact(path: Path, digest: str | None = None) -> bool:
    """Whether module ``path`` exists and its bytes match ``digest`` (default: the digest recorded beside it)."""
    try:
        expected = digest_path(path).read_text().strip() if digest is None else digest
        return file_digest(path) == expected
    except (OSError, UnicodeDecodeError):
        return False


def _replace_with(path: Path, write: Callable[[str], None], suffix: str) -> None:
    """Write ``path`` through a staging file in its folder (``write(staging)``), renamed into place."""
    fd, staging = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(staging)
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)


def write_module(path: Path, export: Callable[[str], None]) -> None:
    """``export(file)`` writes a module; it lands at ``path`` with its digest beside it."""
    path = Path(path)
    _replace_with(path, export, ".so")
    digest = file_digest(path)
    _replace_with(digest_path(path), lambda staging: Path(staging).write_text(digest + "\n"), DIGEST_SUFFIX)


@contextlib.contextmanager
def locked(path: Path):
    """Hold the exclusive lock of ``path`` (the file ``<path>.lock``) for the block; the lock file is removed
    on the way out. A waiter that wakes up on a lock file already removed takes the lock again on a new one."""
    lock_path = Path(path).with_suffix(".lock")
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.path.samestat(os.fstat(fd), os.stat(lock_path)):
                break
        except FileNotFoundError:  # removed by the holder we waited for
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        os.unlink(lock_path)
        os.close(fd)
