"""What the project may delete: directories it created, and in them only the entries it writes.

A run (or sweep) directory is claimed when it is created: a marker file, :data:`MARKER`, names its kind and lists
the top-level entries that kind of directory may hold (``recipe.yaml``, ``run.json``, ``adapter/``, ...; a sweep
also lists its child runs). ``output.overwrite=true`` removes exactly the listed entries that exist, then the
marker; anything else in the directory (a data file, notes) stays where it is. A directory without the marker is
never emptied, whatever it holds: a file named ``recipe.yaml`` does not make a folder ours.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from inference.errors import UserError
from inference.files import write_json

MARKER = ".gpt-oss-workbench.json"

# Every top-level name a run writes (temporary names included: a killed write can leave them behind).
RUN_ENTRIES = ("recipe.yaml", "run.json", "run.json.tmp", "coverage.json", "coverage.json.tmp", "metrics.jsonl",
               "metrics.jsonl.tmp", "checkpoints", "adapter", "adapter.tmp", "eval_before.json", "eval_before.json.tmp",
               "eval_report.json", "eval_report.json.tmp", "exports")
SWEEP_ENTRIES = ("recipe.yaml", "sweep.json", "sweep.json.tmp", "comparison.txt", "loss-curves.png")


def claim(directory: Path, kind: str, entries: tuple[str, ...] | list[str]) -> None:
    """Create ``directory`` (or take an empty one) as a ``kind`` directory of this project that writes ``entries``."""
    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / MARKER, {"kind": kind, "entries": sorted(set(entries))}, indent=1)


def marker(directory: Path) -> dict | None:
    """The directory's marker (``{"kind", "entries"}``), or None when the project did not create it."""
    path = directory / MARKER
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
        return None
    return data


def clear(directory: Path, kind: str) -> list[str]:
    """Remove what this project wrote into a ``kind`` directory (child directories it lists that are themselves
    marked are cleared the same way); returns the names left there, which it did not write. A UserError, with
    nothing removed, when the directory is not a ``kind`` directory of this project."""
    mark = marker(directory)
    if mark is None or mark.get("kind") != kind:
        raise UserError(f"output.dir: {directory} is not empty and is not a {kind} directory this tool created (no "
                        f"{MARKER} naming it a {kind}); refusing to delete anything in it. Choose another "
                        "output.dir, or empty it yourself")
    for name in mark["entries"]:
        path = directory / name
        if not _inside(directory, path) or not (path.exists() or path.is_symlink()):
            continue
        child = marker(path) if path.is_dir() and not path.is_symlink() else None
        if child is not None:           # a child run of a sweep: only what it wrote
            if not clear(path, child.get("kind", "")):
                path.rmdir()
        elif path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    (directory / MARKER).unlink()
    return sorted(p.name for p in directory.iterdir())


def _inside(directory: Path, path: Path) -> bool:
    """A listed name stays a direct child of the directory (a marker edited to say ``../x`` removes nothing)."""
    return path.parent == directory and path.name not in ("", ".", "..")
