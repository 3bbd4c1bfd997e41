"""Export a checkpoint for deployment elsewhere: ONNX, ONNX int8, or OpenVINO IR (.xml + .bin).

    python -m training.export --checkpoint models/checkpoints/cnn.pt --format onnx
    python -m training.export --checkpoint models/checkpoints/cnn.pt --format onnx-int8   # cnn-int8.onnx
    python -m training.export --checkpoint models/checkpoints/resnet18.pt --format openvino --out exports/

The graph takes the normalised float32 batch [N, 3, S, S] (N dynamic) and returns the logits [N, 43].
The file's metadata holds what turns an image into that input and the logits into a sign: the
checkpoint's `preprocessing` (input size, interpolation, mean and std, as JSON), `class_names`,
`architecture` and `checkpoint_sha256` (ONNX: metadata_props; OpenVINO: rt_info under `signserve`).
The last stdout line is JSON: {"path": str, "format": str, "max_abs_logit_diff": float}. For
`onnx-int8` (ONNX Runtime's static quantisation, calibrated on GTSRB training images from
`--data-root`) a random batch says little: the JSON gives the test-split accuracy of the int8 file
and of torch fp32 instead ("test_accuracy", "torch_test_accuracy").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from models.backends import BackendRecord, build_forward
from models.checkpoint import load_checkpoint
from models.export import InputSpec, checkpoint_metadata, export_onnx, export_openvino
from models.paths import default_data_root

FORMATS = {"onnx": ("onnxruntime", ".onnx"), "openvino": ("openvino", ".xml")}  # fp32; onnx-int8: export_int8


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
    record = BackendRecord.for_artifact(backend, "fp32", str(path))  # the file just written
    forward = build_forward(record, loaded.model, torch.device("cpu"), torch.get_num_threads())
    with torch.inference_mode():
        diff = float((forward(batch) - loaded.model(batch)).abs().max())
    return path, diff


def export_int8(checkpoint: str | Path, data_root: str, out: str | Path | None = None) -> tuple[Path, float, float]:
    """The fp32 ONNX export quantised to int8 (calibrated as the service calibrates its int8 candidate),
    and the test-split accuracy of the int8 file and of torch fp32."""
    import tempfile

    from models.export import QUANTIZATION_IMAGES, quantize_onnx
    from models.gtsrb import quantization_batches, forward_accuracy, load_split

    loaded = load_checkpoint(checkpoint)
    pre = loaded.preprocessing
    out = Path(out) if out else Path(checkpoint).parent
    path = out / f"{Path(checkpoint).stem}-int8.onnx" if not out.name.endswith(".onnx") else out
    with tempfile.TemporaryDirectory() as tmp:
        source = export_onnx(loaded.model, InputSpec((8, 3, pre.input_size, pre.input_size)), Path(tmp) / "fp32.onnx",
                             checkpoint_metadata(loaded))
        quantize_onnx(source, path, quantization_batches(data_root, pre, QUANTIZATION_IMAGES), checkpoint_metadata(loaded))
    test = load_split(data_root, "test", pre)
    record = BackendRecord.for_artifact("onnxruntime", "int8", str(path))
    int8 = build_forward(record, loaded.model, torch.device("cpu"), torch.get_num_threads())
    return path, forward_accuracy(int8, test, pre), forward_accuracy(loaded.model.eval(), test, pre)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--format", required=True, choices=sorted([*FORMATS, "onnx-int8"]))
    parser.add_argument("--out", help=f"a folder, or the file ({', '.join(s for _, s in FORMATS.values())}, "
                                      "-int8.onnx); "
                                      "default: beside the checkpoint")
    parser.add_argument("--data-root", default=default_data_root(),
                        help="folder holding gtsrb/ (env GTSRB_ROOT): onnx-int8 calibrates and is evaluated on it")
    args = parser.parse_args()
    if args.format == "onnx-int8":
        path, accuracy, reference = export_int8(args.checkpoint, args.data_root, args.out)
        print(f"wrote {path} (int8); test accuracy {accuracy:.4f}, torch fp32 {reference:.4f}")
        print(json.dumps({"path": str(path), "format": args.format, "test_accuracy": accuracy,
                          "torch_test_accuracy": reference}))
        return
    path, diff = export_checkpoint(args.checkpoint, args.format, args.out)
    print(f"wrote {path} ({args.format}); largest logit difference from torch fp32 on a random batch: {diff:.2e}")
    print(json.dumps({"path": str(path), "format": args.format, "max_abs_logit_diff": diff}))


if __name__ == "__main__":
    main()
