"""The sign detector: a whole photo in, every sign's box, score and shape group out."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from PIL import Image

from app.imaging import SceneDecoder
from app.kinds.base import Batching, Handler, ModelKind, SelectionJob, ServedModel, served_forward
from models.backends import BackendRecord, Job, output_parity
from models.checkpoint import LoadedModel
from models.detector import DETECTION_FLOOR, detect, frame_batch, pad_stack
from models.export import InputSpec, checkpoint_metadata
from models.gtsdb import FRAME_SIZE, read_ground_truth, split_frames
from models.paths import default_data_root
from models.preprocessing import image_to_uint8
from models.scene import Found

log = logging.getLogger("signserve")

# A frame is ~1 Mpx: a few per forward already fill the cores, and a larger batch only holds the
# first frame's answer back.
MAX_FRAMES_PER_BATCH = 4


class DetectorPredictor:
    """uint8 frames [N, 3, H, W] -> per frame, (box, score, group) of every sign down to
    DETECTION_FLOOR by falling score, boxes in the frames' pixels. Its forward runs on the backend
    its record names (torch NHWC, fp16 on CUDA, or an exported runtime with dynamic frame sizes)."""

    def __init__(self, loaded: LoadedModel, *, half: bool = True, channels_last: bool = True,
                 backend: BackendRecord | None = None, threads: int | None = None) -> None:
        self.loaded = loaded
        self.device = loaded.device
        self.forward, self.backend = served_forward(loaded.model, loaded, half=half, channels_last=channels_last,
                                                    backend=backend, threads=threads)

    def run(self, images: torch.Tensor) -> list[list[Found]]:
        # on CUDA the uint8 frames travel and are normalised there (a quarter of the float32 bytes)
        images = images.to(self.device) if self.device.type == "cuda" else images
        found = detect(self.forward, images, self.loaded.preprocessing, min_score=DETECTION_FLOOR)
        return [[(d.box, d.score, d.group) for d in frame] for frame in found]

    def warmup(self, max_batch_size: int) -> None:
        """One frame of GTSDB's shape: the first request then finds the kernels ready."""
        side = self.loaded.preprocessing.input_size
        self.run(torch.zeros(1, 3, side * FRAME_SIZE[1] // FRAME_SIZE[0], side, dtype=torch.uint8))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class DetectorKind(ModelKind):
    finds_boxes = True
    trainer = "python -m training.train --model detector"

    def handler(self, loaded: LoadedModel, *, half: bool = True, channels_last: bool = True,
                backend: BackendRecord | None = None, threads: int | None = None) -> Handler:
        return DetectorPredictor(loaded, half=half, channels_last=channels_last, backend=backend, threads=threads)

    def batching(self, loaded: LoadedModel, max_batch_size: int, instances: int) -> Batching:
        """Frames of unequal sizes are padded into one batch, and the forwards (a second or more for a
        few frames) may hold all instances but one: the last is left to the classifiers, whose
        batches take milliseconds and would otherwise queue behind frames."""
        return Batching(min(max_batch_size, MAX_FRAMES_PER_BATCH), max(1, instances - 1),
                        lambda frames: pad_stack(frames, loaded.preprocessing))

    def decoder(self, loaded: LoadedModel) -> SceneDecoder:
        return SceneDecoder(loaded.preprocessing.input_size)

    def selection(self, loaded: LoadedModel, cache_dir: Path, batch_size: int, parity_images: int,
                  parity_frames: int = 2) -> SelectionJob:
        """The first `parity_frames` GTSDB validation frames holding signs, whole, as the service sizes
        them (height and width stay dynamic in the export: any photo's shape runs). Without the data
        set the job has no frames, and `select` keeps torch."""
        pre = loaded.preprocessing
        batches: list[torch.Tensor] = []
        try:
            root = default_data_root()
            frames = [f for f in split_frames(read_ground_truth(root), "val") if f.signs][:parity_frames]
            for frame in frames:
                with Image.open(Path(root) / "gtsdb" / "images" / frame.name) as image:
                    batches.append(frame_batch(image_to_uint8(image, pre).unsqueeze(0), pre))
        except FileNotFoundError as exc:
            log.warning("%s: no real frames to check a backend on (%s)", loaded.name, exc)
        measure = batches[0] if batches else \
            frame_batch(torch.zeros(1, 3, FRAME_SIZE[1], pre.input_size, dtype=torch.uint8), pre)
        spec = InputSpec(tuple(measure.shape), dynamic_axes=(0, 2, 3))
        # a whole frame takes ~0.1-1 s: time long enough for a few forwards of each candidate per round
        job = Job(loaded.sha256, spec, batches, measure, Path(cache_dir), parity=output_parity,
                  metadata=checkpoint_metadata(loaded), measure_seconds=6.0, name=loaded.name)
        return SelectionJob(loaded.model, job)

    def describe(self, served: ServedModel) -> dict:
        loaded = served.loaded
        return {"validation": {k: v for k, v in loaded.metrics[-1].items() if k.startswith("val_")}
                if loaded.metrics else None, "score_threshold": loaded.inference.get("score_threshold"),
                "min_probability": loaded.inference.get("min_probability")}
