"""Export a checkpoint for deployment elsewhere: ONNX, or OpenVINO IR (.xml + .bin).

    python -m training.export --checkpoint models/checkpoints/cnn.pt --format onnx
    python -m training.export --checkpoint models/checkpoints/resnet18.pt --format openvino --out exports/

The graph takes the normalised float32 batch [N, 3, S, S] (N dynamic) and returns the logits [N, 43].
The file's metadata holds what turns an image into that input and the logits into a sign: the
checkpoint's `preprocessing` (input size, interpolation, mean and std, as JSON), `class_names`,
`architecture` and `checkpoint_sha256` (ONNX: metadata_props; OpenVINO: rt_info under `signserve`).
The last stdout line is JSON: {"path": str, "format": str, "max_abs_logit_diff": float}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from models.backends import BackendRecord, build_forward
from models.checkpoint import load_checkpoint
from models.export import InputSpec, checkpoint_metadata, export_onnx, export_openvino

FORMATS = {"onnx": ("onnxruntime", ".onnx"), "openvino": ("openvino", ".xml")}


def export_checkpoint(checkpoint: str | Path, fmt: str, out: str | Path | None = None) -> tuple[Path, float]:
    """Write the export and check it: the largest logit difference from torch fp32 on a random batch."""
    loaded = load_checkpoint(checkpoint)
    backend, suffix = FORMATS[fmt]
    out = Path(out) if out else Path(checkpoint).parent
    path = out / f"{Path(checkpoint).stem}{suffix}" if out.suffix != suffix else out
    size = loaded.preprocessing.input_size
    spec = InputSpec((8, 3, size, size))
    write = export_onnx if fmt == "onnx" else export_openvino
    write(loaded.model, spec, path, checkpoint_metadata(loaded))
    batch = spec.example()
    forward = build_forward(BackendRecord(backend, "fp32", str(path)), loaded.model, torch.device("cpu"),
                            torch.get_num_threads())
    with torch.inference_mode():
        diff = float((forward(batch) - loaded.model(batch)).abs().max())
    return path, diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--format", required=True, choices=sorted(FORMATS))
    parser.add_argument("--out", help=f"a folder, or the file ({', '.join(s for _, s in FORMATS.values())}); "
                                      "default: beside the checkpoint")
    args = parser.parse_args()
    path, diff = export_checkpoint(args.checkpoint, args.format, args.out)
    print(f"wrote {path} ({args.format}); largest logit difference from torch fp32 on a random batch: {diff:.2e}")
    print(json.dumps({"path": str(path), "format": args.format, "max_abs_logit_diff": diff}))


if __name__ == "__main__":
    main()
