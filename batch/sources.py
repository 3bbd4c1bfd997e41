"""What to read: image and video files under the paths given, in a stable order, and a task's share."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")


def image_suffixes() -> frozenset[str]:
    Image.init()  # every format this Pillow reads
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


def list_inputs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files named directly (whatever their suffix: a bad one gets an error line), and the image and
    video files under folders, recursively; sorted within each folder, each file once."""
    readable = image_suffixes() | set(VIDEO_SUFFIXES)
    found: list[Path] = []
    for given in map(Path, paths):
        if given.is_dir():
            found += sorted(p for p in given.rglob("*") if p.is_file() and p.suffix.lower() in readable)
        else:
            found.append(given)  # missing or unreadable files are reported, not skipped silently
    seen: set[Path] = set()
    return [p for p in found if not (p in seen or seen.add(p))]


def shard_of(path: Path, shards: int) -> int:
    """A file's shard: a hash of its path, so a file stays in its shard when others come and go."""
    return int.from_bytes(hashlib.sha256(str(path).encode()).digest()[:8], "big") % shards


def shard(paths: list[Path], index: int, shards: int) -> list[Path]:
    if not 0 <= index < shards:
        raise ValueError(f"shard {index} of {shards} does not exist")
    return [p for p in paths if shard_of(p, shards) == index]
