"""Finding and safely reading a run's checkpoints.

A run directory (``trainer.default_root_dir``) holds ``checkpoints/last.ckpt``, the best
checkpoint by the task's monitored metric (``best-*.ckpt``) and, after an interruption,
``interrupted.ckpt``. Checkpoints are read with ``weights_only=True``: one that carries a pickled
object is refused with a clear message instead of running its code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class CheckpointError(Exception):
    """A checkpoint is missing, unreadable or unsafe."""


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # the unpickler raises several types; all mean the same here
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{path}: refused to load (only tensors and plain values are allowed, weights_only=True): {first_line}"
        ) from None


def find_resume_checkpoint(run_dir: str | Path) -> Path | None:
    """What ``--ckpt_path last`` restores: the newest of ``last*.ckpt`` and ``interrupted.ckpt``
    (the rule Lightning applies), or ``None`` when the run has neither."""
    folder = Path(run_dir) / "checkpoints"
    candidates = [*folder.glob("last*.ckpt"), *folder.glob("interrupted.ckpt")] if folder.is_dir() else []
    return max(candidates, key=lambda p: p.stat().st_mtime_ns, default=None)


def find_best_checkpoint(run_dir: str | Path) -> Path:
    """The best checkpoint of a run directory, falling back to the last one.

    The best path recorded by ``ModelCheckpoint`` in ``last.ckpt`` wins; otherwise the newest
    ``best-*.ckpt``; otherwise ``last.ckpt``.
    """
    folder = Path(run_dir) / "checkpoints"
    last = folder / "last.ckpt"
    if last.is_file():
        for key, state in load_checkpoint(last).get("callbacks", {}).items():
            monitored = key.startswith("ModelCheckpoint") and state.get("monitor") is not None
            best = state.get("best_model_path") if monitored else None
            if best:
                for candidate in (Path(best), folder / Path(best).name):
                    if candidate.is_file():
                        return candidate
    bests = sorted(folder.glob("best-*.ckpt"), key=lambda p: p.stat().st_mtime)
    if bests:
        return bests[-1]
    if last.is_file():
        return last
    raise CheckpointError(f"{folder}: no checkpoint found (train first, or pass a .ckpt file)")
