"""Files -> frames ready for the scene pipeline: a photo is one frame, a video one per sampled frame.

Photos decode exactly as `/v1/detect` decodes an upload (app.imaging: EXIF orientation, RGB, reduced
to the detector's input on decode). Videos decode with PyAV (FFmpeg's libraries, no binary needed).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from app.errors import Rejected
from app.imaging import DEFAULT_MAX_IMAGE_PIXELS, decode_image
from batch.sources import is_video
from models.scene import Scene, scene_of


@dataclass(frozen=True)
class Frame:
    path: Path
    scene: Scene | None  # None when the file could not be read
    index: int | None = None  # a video frame's index in the stream
    time_s: float | None = None  # and its time
    error: str | None = None

    @property
    def key(self) -> tuple[str, int | None]:
        return str(self.path), self.index


def photo_frame(path: Path, max_side: int) -> Frame:
    try:
        return Frame(path, decode_image(path.read_bytes(), max_side=max_side, name=path.name,
                                        max_pixels=DEFAULT_MAX_IMAGE_PIXELS))
    except Rejected as exc:
        return Frame(path, None, error=exc.detail)
    except OSError as exc:
        return Frame(path, None, error=f"{path.name}: {exc.strerror or exc}")


def video_frames(path: Path, max_side: int, fps: float | None) -> Iterator[Frame]:
    """Every frame, or about `fps` per second of video (the first frame at or after each 1/fps step);
    an unreadable video yields one error frame, one that breaks midway an error frame where it broke."""
    import av

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as exc:
        yield Frame(path, None, error=f"{path.name}: not a readable video ({exc})")
        return
    index, next_time = -1, 0.0
    with container:
        try:
            stream = container.streams.video[0]
        except IndexError:
            yield Frame(path, None, error=f"{path.name}: no video stream")
            return
        stream.thread_type = "AUTO"  # FFmpeg's own decoding threads
        try:
            for decoded in container.decode(stream):
                index += 1
                time_s = float(decoded.time) if decoded.time is not None else index / float(stream.average_rate or 1)
                if fps and time_s + 1e-6 < next_time:
                    continue
                next_time = time_s + 1 / fps if fps else 0.0
                yield Frame(path, scene_of(decoded.to_image(), max_side), index, round(time_s, 3))
        except av.error.FFmpegError as exc:
            yield Frame(path, None, index=max(index, 0), error=f"{path.name}: decoding stopped at frame {index}: {exc}")


def frames_of(path: Path, max_side: int, fps: float | None) -> Iterator[Frame]:
    if is_video(path):
        yield from video_frames(path, max_side, fps)
    else:
        yield photo_frame(path, max_side)
