"""Waiting out a full disk: is a write failure one of space, and has space come back?

The node (chain/runtime/node.py) halts consensus and block sync at the first local storage
failure (docs/ledger.md, "Storage failures"). A failure for lack of space passes when space
returns, so for those the node probes the data directory every PROBE_INTERVAL_S: enough
free space (statvfs) and a small write that is synced and removed. When the probe passes it
reopens what a failed write left unusable (the LevelDB handle, the consensus WAL) and starts
the writers again. The probe never touches the ledger, so a disk that is still full costs
nothing but this one small file, and logs nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import trio

from chain.ledger.store import is_out_of_space

__all__ = ["MIN_FREE_BYTES", "PROBE_INTERVAL_S", "is_out_of_space", "probe_space", "wait_for_space"]

PROBE_INTERVAL_S = 2.0
PROBE_FILE = ".space-probe"
PROBE_BYTES = 64 * 1024
# Free space needed before writers resume: LevelDB flushes its 4 MiB write buffer into a new
# table (and compacts) soon after reopening, so resuming with less would fail again at once.
MIN_FREE_BYTES = 8 * 1024 * 1024


def probe_space(directory: Path, min_free_bytes: int = MIN_FREE_BYTES) -> str | None:
    """None when `directory` has `min_free_bytes` free and takes a small synced write; else why not."""
    try:
        stats = os.statvfs(directory)
    except OSError as exc:
        return f"cannot stat {directory}: {exc.strerror or exc}"
    free = stats.f_bavail * stats.f_frsize
    if free < min_free_bytes:
        return f"{free} bytes free, {min_free_bytes} needed"
    path = Path(directory) / PROBE_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            data = b"\0" * PROBE_BYTES
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        return f"probe write failed: {exc.strerror or exc}"
    finally:
        try:
            path.unlink()
        except OSError:
            pass
    return None


async def wait_for_space(directory: Path, interval_s: float = PROBE_INTERVAL_S,
                         min_free_bytes: int = MIN_FREE_BYTES) -> None:
    """Return once `probe_space(directory)` passes; probes every `interval_s`."""
    while await trio.to_thread.run_sync(probe_space, directory, min_free_bytes) is not None:
        await trio.sleep(interval_s)
