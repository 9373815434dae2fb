"""Writing a file whole or not at all: the atomic write cityfed's records, artefacts and reports use.

Neutral (no server, client or privacy imports) so that the coordinator's artefacts, the node's
records (pinning, key-ledger binding, personalised models, :mod:`privacy.ledger_partition`) and
the reports share it. (The audit log and the ledger append in place: they have their own rules.)
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """fsync the folder ``path``, so that a file created or renamed in it survives a power loss (best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, mode: int = 0o666, durable_dir: bool = False) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync and rename (never a half-written file).

    Parameters
    ----------
    path : Path
        Destination; its folder must exist.
    data : bytes
        The whole file.
    mode : int
        Permission bits of a new file, before the umask (``0o600``: this user only).
    durable_dir : bool
        Also fsync the folder after the rename, so that the new file (not the earlier one) is
        there after a power loss (:func:`fsync_dir`).

    Raises
    ------
    OSError
        The file could not be written; a file already at ``path`` is left as it was and the
        temporary file (``PATH.tmp``) is removed.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.unlink(missing_ok=True)  # a leftover's permission bits would be kept by open()
        with open(tmp, "wb", opener=lambda name, flags: os.open(name, flags, mode)) as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable_dir:
        fsync_dir(path.parent)
