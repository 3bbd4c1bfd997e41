"""A torch module as an ONNX file or an OpenVINO IR, with what a deployer needs in the file's metadata.

The exported graph is the network alone: it takes the normalised float32 batch [N, 3, H, W] that
`models.preprocessing.normalize` makes and returns what the module returns (one tensor, or several
for a network with several heads). The metadata (string keys and values, JSON where structured)
carries the rest, e.g. the checkpoint's `preprocessing`, its `class_names` and its `sha256`.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from models.atomic import atomic_files

METADATA_SECTION = "signserve"  # OpenVINO rt_info section that holds the metadata
ONNX_OPSET = 17
# Training images that set an int8 model's activation ranges (spread over all 43 classes): with 256 the
# cnn's int8 lost 0.1 point of test accuracy, with 512 0.025
QUANTIZATION_IMAGES = 512
# Part of a cached int8 file's name, so that a changed recipe quantises again (2: fp32 after the last
# convolution)
QUANTIZATION_VERSION = 2


@dataclass(frozen=True)
class InputSpec:
    """The module's input: an example shape and the axes that may change from call to call (the batch,
    and for a fully convolutional network on whole frames, height and width too)."""

    shape: tuple[int, ...]  # e.g. (64, 3, 32, 32), or (1, 3, 800, 1360) for whole frames
    dynamic_axes: tuple[int, ...] = (0,)
    name: str = "images"

    def example(self) -> torch.Tensor:
        return torch.randn(self.shape, generator=torch.Generator().manual_seed(0))

    def key(self) -> str:
        """A short file-name-safe id: two specs with the same key export to the same graph."""
        dims = "x".join("d" if i in self.dynamic_axes else str(n) for i, n in enumerate(self.shape))
        return f"{self.name}-{dims}"

    def to_dict(self) -> dict:
        return {"shape": list(self.shape), "dynamic_axes": list(self.dynamic_axes), "name": self.name}

    @classmethod
    def from_dict(cls, d: dict) -> "InputSpec":
        return cls(tuple(d["shape"]), tuple(d["dynamic_axes"]), d["name"])


def output_names(module: nn.Module, spec: InputSpec) -> list[str]:
    """`output` for a module that returns one tensor, `output0`, `output1`, ... for a tuple."""
    with torch.inference_mode():
        out = module(spec.example())
    return ["output"] if isinstance(out, torch.Tensor) else [f"output{i}" for i in range(len(out))]


def export_onnx(module: nn.Module, spec: InputSpec, path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    """torch.onnx.export (TorchScript tracing, opset 17) with dynamic axes, then metadata_props."""
    import onnx

    path = Path(path)
    module = module.eval()
    names = output_names(module, spec)
    axes = {spec.name: {i: f"{spec.name}_dim{i}" for i in spec.dynamic_axes}}
    axes.update({n: {0: f"{spec.name}_dim0"} for n in names} if 0 in spec.dynamic_axes else {})

    def write(tmp: Path) -> None:
        file = tmp / path.name
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
            torch.onnx.export(module, (spec.example(),), str(file), input_names=[spec.name], output_names=names,
                              dynamic_axes=axes, opset_version=ONNX_OPSET, dynamo=False)
        model = onnx.load(str(file))
        for key, value in metadata.items():
            model.metadata_props.add(key=key, value=value)
        onnx.save(model, str(file))

    return atomic_files(path, write)


def export_openvino(module: nn.Module, spec: InputSpec, path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    """openvino.convert_model from the torch module, weights kept in fp32 (the IR's default would
    store them in fp16), metadata in the IR's rt_info under `signserve`."""
    import openvino as ov

    path = Path(path)
    module = module.eval()
    names = output_names(module, spec)
    shape = ov.PartialShape([-1 if i in spec.dynamic_axes else n for i, n in enumerate(spec.shape)])

    def write(tmp: Path) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            model = ov.convert_model(module, example_input=spec.example(), input=[shape])
        model.inputs[0].get_tensor().set_names({spec.name})
        for output, name in zip(model.outputs, names):  # the converter leaves some outputs unnamed
            output.get_tensor().set_names({name})
        for key, value in metadata.items():
            model.set_rt_info(value, [METADATA_SECTION, key])
        ov.save_model(model, str(tmp / path.name), compress_to_fp16=False)

    return atomic_files(path, write)


def quantize_onnx(source: str | os.PathLike, path: str | os.PathLike, quantization_batches: list[torch.Tensor],
                  metadata: dict[str, str]) -> Path:
    """ONNX Runtime's static int8 quantisation of an exported fp32 graph: weights int8 per output
    channel, activations uint8 with ranges from `quantization_batches` (real inputs, normalised), as
    QuantizeLinear/DequantizeLinear pairs, up to the last convolution. `reduce_range` keeps 7-bit
    weights, so the u8 x s8 multiply-adds of AVX2 CPUs without VNNI do not saturate.

    Everything after the last convolution stays fp32: the pooled features, the class head and the
    sign gate (a sharp linear probe on those features). With 8-bit features resnet18's sign
    probability moved by more than 0.1 on 21 of the 4,001 test images, with fp32 ones on 3, at 94 %
    of the speed."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    path = Path(path)
    name = onnx.load(str(source), load_external_data=False).graph.input[0].name

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(quantization_batches)

        def get_next(self) -> dict | None:
            batch = next(self.batches, None)
            return None if batch is None else {name: batch.detach().float().contiguous().numpy()}

    def write(tmp: Path) -> None:
        prepared = tmp / "prepared.onnx"
        quant_pre_process(str(source), str(prepared))  # shape inference and graph folding first
        nodes = onnx.load(str(prepared)).graph.node  # in topological order
        last_conv = max((i for i, node in enumerate(nodes) if node.op_type == "Conv"), default=len(nodes) - 1)
        file = tmp / path.name
        quantize_static(str(prepared), str(file), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=[node.name for node in nodes[last_conv + 1:]])
        prepared.unlink()
        model = onnx.load(str(file))
        del model.metadata_props[:]
        for key, value in {**metadata, "precision": "int8 (ONNX Runtime static quantisation)"}.items():
            model.metadata_props.add(key=key, value=value)
        onnx.save(model, str(file))

    return atomic_files(path, write)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of an exported .onnx or .xml file."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx

        return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    import openvino as ov

    model = ov.Core().read_model(str(path))
    info = model.get_rt_info()
    if METADATA_SECTION not in info.keys():
        return {}
    return {key: value.astype(str) for key, value in info[METADATA_SECTION].items()}


def checkpoint_metadata(loaded) -> dict[str, str]:
    """What a deployer needs beside a classifier's graph: its preprocessing and class names."""
    return {
        "signserve_format": "1",
        "architecture": loaded.architecture,
        "checkpoint_sha256": loaded.sha256,
        "preprocessing": json.dumps(loaded.preprocessing.to_dict()),
        "class_names": json.dumps(loaded.class_names),
        "input": "float32 [N, 3, S, S]: RGB pixels resized to S x S (preprocessing.input_size, "
                 "preprocessing.interpolation), then (pixel - 255 * mean) / (255 * std) per channel",
        "output": "float32 [N, classes]: logits; softmax gives the class probabilities",
    }
