"""Trainer checkpoints that a kill at any instant cannot break: complete or ignored, never half-used.

The Trainer writes a checkpoint as several files (adapter, optimizer, scheduler, RNG state, trainer state). A
checkpoint counts as **complete** only once its mark, ``trained_tokens.json``, exists. The mark is written last and
atomically (temporary name, fsync, rename). It holds the run's trained-token count at that step and the SHA-256 of
every other file in the checkpoint.

- **Rotation** (``train.save_total_limit``) happens here, after the mark, never in the Trainer (its own rotation
  runs before our mark is written). A kill between the two therefore always leaves the previous complete
  checkpoint on disk; the end of training rotates once more for a run killed just there.
- **Resume** takes the newest complete checkpoint whose files still match their hashes. It says why it skips any
  other, and removes incomplete ones, which were written by this run and are of no use.
- **The hashes** are how resume knows a checkpoint's files are the ones this run wrote. The Trainer's optimizer,
  scheduler and RNG files are pickles (``torch.save``). The Trainer loads them in torch's weights-only mode, and
  only after these hashes match. Every file this project writes itself is JSON or safetensors.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from transformers import TrainerCallback

from finetune.train import killpoints
from inference.files import write_json

MARK = "trained_tokens.json"
PREFIX = "checkpoint-"


def step_of(path: Path) -> int | None:
    name = path.name
    return int(name[len(PREFIX):]) if name.startswith(PREFIX) and name[len(PREFIX):].isdigit() else None


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _hashes(ckpt: Path) -> dict[str, str]:
    return {str(p.relative_to(ckpt)): _sha256(p) for p in sorted(ckpt.rglob("*"))
            if p.is_file() and not p.name.startswith(MARK)}


def mark_complete(ckpt: Path, trained_tokens: int) -> None:
    """Write the checkpoint's mark: its trained-token count and the hash of each of its files."""
    killpoints.reached("save:state")
    write_json(ckpt / MARK, {"trained_tokens": trained_tokens, "sha256": _hashes(ckpt)}, indent=1, durable=True)


def read_mark(ckpt: Path) -> dict | None:
    try:
        return json.loads((ckpt / MARK).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def why_unusable(ckpt: Path) -> str | None:
    """None for a complete checkpoint whose files are the ones this run wrote, else the reason."""
    mark = read_mark(ckpt)
    if mark is None:
        return "incomplete (the run stopped while saving it)"
    expected = mark.get("sha256")
    if expected is None:       # marked by a version of this project that did not hash: complete, not verifiable
        return None
    found = _hashes(ckpt)
    changed = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
    if changed:
        return f"its files differ from those this run wrote ({', '.join(changed[:3])})"
    return None


def latest(checkpoints: Path, echo=print) -> Path | None:
    """The newest usable checkpoint under ``checkpoints``; newer unusable ones are reported, and removed when they
    are merely incomplete (a changed file is left for the user to look at)."""
    found = sorted((s, p) for p in checkpoints.glob(PREFIX + "*") if p.is_dir() and (s := step_of(p)) is not None)
    for _, path in reversed(found):
        why = why_unusable(path)
        if why is None:
            return path
        if read_mark(path) is None:
            echo(f"skipping {path}: {why}; removed")
            shutil.rmtree(path, ignore_errors=True)
        else:
            echo(f"skipping {path}: {why}")
    return None


def rotate(checkpoints: Path, keep: int) -> None:
    """Keep the ``keep`` newest complete checkpoints; remove older ones, complete or not. Nothing newer than the
    newest complete one is touched (it may be the save in progress)."""
    found = [(s, p) for p in checkpoints.glob(PREFIX + "*") if p.is_dir() and (s := step_of(p)) is not None]
    complete = sorted(s for s, p in found if (p / MARK).is_file())
    if not complete:
        return
    oldest_kept = complete[-keep:][0]
    for s, p in found:
        if s < oldest_kept:
            shutil.rmtree(p, ignore_errors=True)


class CompleteCheckpoints(TrainerCallback):
    """Marks each checkpoint complete once the Trainer has written it, then rotates (see the module docstring).
    The Trainer itself is configured with no ``save_total_limit``."""

    def __init__(self, trainer, keep: int):
        self.trainer, self.keep = trainer, keep

    def on_step_end(self, args, state, control, **kwargs):
        killpoints.reached("step")

    def on_save(self, args, state, control, **kwargs):
        ckpt = Path(args.output_dir) / f"{PREFIX}{state.global_step}"
        if ckpt.is_dir():
            mark_complete(ckpt, self.trainer.trained_tokens)
            killpoints.reached("save:marked")
            rotate(Path(args.output_dir), self.keep)
