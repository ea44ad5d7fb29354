"""Write a file whole or not at all: into a temporary sibling, then rename over the target.

A run killed midway (or a failed check before the rename) leaves the old file, or none, never a
half-written one. The rename is atomic on one filesystem, which a sibling guarantees; the
temporary file gets the permissions a plain ``open`` would give (``mkstemp`` makes it 0600).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")

# Read once: reading the umask means setting it, and a process-wide umask of 0, even for an
# instant, would let another thread create world-writable files.
_UMASK = os.umask(0)
os.umask(_UMASK)


def write_atomically(path: Path, write: Callable[[Path], T]) -> T:
    """Call ``write(tmp)`` on a temporary sibling of ``path``; if it returns, rename ``tmp`` to
    ``path`` and return what ``write`` returned. If it raises, ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        result = write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
        return result
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomically(path: Path, text: str) -> None:
    """``write_atomically`` for text (written as given: no newline translation)."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            handle.write(text)

    write_atomically(path, write)
