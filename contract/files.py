"""Writing a file whole or not at all: the one atomic write every part of cityfed uses.

Neutral (no server, client or privacy imports) so that the coordinator's artefacts, the node's
ledger-folder records (:mod:`privacy.ledger_partition`) and the reports share it.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync and rename (never a half-written file).

    Parameters
    ----------
    path : Path
        Destination; its folder must exist.
    data : bytes
        The whole file.

    Raises
    ------
    OSError
        The file could not be written; a file already at ``path`` is left as it was and the
        temporary file (``PATH.tmp``) is removed.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
