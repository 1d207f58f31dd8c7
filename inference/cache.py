"""Where built artefacts are cached: ``$GPT_OSS_WORKBENCH_CACHE``, else ``$XDG_CACHE_HOME/gpt-oss-workbench``, else
``~/.cache/gpt-oss-workbench``. Holds the decompressed o200k vocabulary and the built tiny models, and the locks
that keep two processes from building the same one at once (:func:`locked`)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def cache_root() -> Path:
    explicit = os.environ.get("GPT_OSS_WORKBENCH_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gpt-oss-workbench"


@contextlib.contextmanager
def locked(path: Path):
    """Hold an exclusive lock on the file ``path`` (created if missing) while the block runs. Two processes that
    build the same artefact on a fresh machine (a sweep's children, tests in parallel, a notebook beside the CLI) take
    turns: the second finds it built. The kernel releases the lock if its holder dies."""
    import fcntl
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
