"""Files written whole or not at all: readers see the old file or the new one, never a part.

Checkpoints, exported runtimes and the runtime choice's records all go through here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch


def atomic_write(path: str | os.PathLike, mode: str, write: Callable[[IO], None]) -> None:
    """Write to a temp file beside `path`, fsync, rename: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file 0600; give it the permissions a plain open() would (a container's
        # non-root user must be able to read a mounted checkpoint).
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save, atomically."""
    atomic_write(path, "wb", lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    atomic_write(path, "w", lambda f: f.write(text))


def atomic_files(target: Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp_dir)` and move what it wrote beside `target`, so a killed export never leaves a
    half-written file where a later start would find it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.stem}.", dir=target.parent))
    try:
        write(tmp)
        # companions first (an IR's .bin), the named file last: once it exists, the export is whole
        for path in sorted(tmp.iterdir(), key=lambda p: p.name == target.name):
            os.replace(path, target.parent / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
