"""Files replaced whole: a temporary file beside the target, then a rename, so a reader (or a process killed
mid-write) sees the old file or the new one, never half of one. The one home of that pattern for both packages.

The temporary file is ``<name>.tmp`` beside the target (the names the run and sweep directories list as theirs,
``finetune.owned``), or ``<name>.tmp<pid>`` with ``unique`` where several processes may write the same file at once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_atomic(path: Path, data: str | bytes, *, durable: bool = False, unique: bool = False) -> None:
    """Replace ``path`` with ``data`` (text is written as UTF-8). ``durable``: the bytes reach the disk (fsync)
    before the rename, and the rename before return (fsync of the directory): for what a power cut must not undo."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid() if unique else ''}")
    with open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json(path: Path, data, *, indent: int = 2, durable: bool = False) -> None:
    """``data`` as JSON (anything JSON does not know written as ``str``), replaced whole (:func:`write_atomic`)."""
    write_atomic(path, json.dumps(data, indent=indent, default=str) + "\n", durable=durable)
