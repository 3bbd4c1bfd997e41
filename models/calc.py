"""The calculators at a terminal.

    python -m models.calc receptive-field 5 5 5 5 --input 32          # kernel[xstride[xpadding[xdilation]]]
    python -m models.calc receptive-field 3x1x1 2x2 3x1x1 2x2 --input 32
    python -m models.calc receptive-field --architecture resnet18 --input 48
    python -m models.calc receptive-field --checkpoint models/checkpoints/cnn.pt
    python -m models.calc conv-layer --input 32x32x3 --filters 10 --kernel 5
    python -m models.calc conv-matrix --kernel "w1 w2; w3 w4" --input 3x3 --latex

Every subcommand takes --json for the same JSON the HTTP API answers: both build it with the
`*_answer` functions below. Exit status 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from typing import Sequence

from models.conv_matrix import LATEX_MAX_ENTRIES, ConvMatrix, conv_matrix, to_latex
from models.conv_shapes import ConvLayerResult, conv_layer
from models.input_sizes import DEFAULT_INPUT_SIZE
from models.receptive_field import LayerSpec, ReceptiveFieldRow, layers_of_module, receptive_field_table

# --- the answers, as the HTTP routes (app.routers.calculators) and --json give them -------------------


def receptive_field_answer(rows: list[ReceptiveFieldRow]) -> dict:
    return {"layers": [asdict(row) for row in rows]}


def conv_layer_answer(result: ConvLayerResult) -> dict:
    return {"output_shape": {"height": result.output_height, "width": result.output_width,
                             "channels": result.output_channels},
            "parameters": result.parameters, "multiply_adds": result.multiply_adds}


def conv_matrix_answer(result: ConvMatrix) -> dict:
    """The matrix, its shapes, and a LaTeX bmatrix up to LATEX_MAX_ENTRIES entries (null beyond)."""
    rows, cols = result.shape
    return {"matrix": result.tolist(), "shape": [rows, cols], "input_shape": list(result.input_shape),
            "output_shape": list(result.output_shape),
            "latex": result.latex() if rows * cols <= LATEX_MAX_ENTRIES else None}


# --- the command line ----------------------------------------------------------------------------------


def _ints(text: str, lengths: Sequence[int], what: str) -> list[int]:
    """'5x1x0' -> [5, 1, 0]; the number of parts must be one of `lengths`."""
    try:
        values = [int(part) for part in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} {text!r}: expected integers separated by 'x'") from None
    if len(values) not in lengths:
        raise argparse.ArgumentTypeError(f"{what} {text!r}: expected {' or '.join(map(str, lengths))} parts")
    return values


def layer_arg(text: str) -> LayerSpec:
    """'k', 'kxs', 'kxsxp' or 'kxsxpxd' -> LayerSpec."""
    try:
        return LayerSpec(*_ints(text, (1, 2, 3, 4), "layer"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"layer {text!r}: {exc}") from None


def int_or_pair_arg(text: str) -> int | tuple[int, int]:
    """'3' -> 3, '3x5' -> (3, 5)."""
    values = _ints(text, (1, 2), "value")
    return values[0] if len(values) == 1 else (values[0], values[1])


def _entry(token: str) -> int | float | str:
    for kind in (int, float):
        try:
            value = kind(token)
        except ValueError:
            continue
        if kind is int or math.isfinite(value):
            return value
    return token


def kernel_arg(text: str) -> list:
    """JSON ('[[1, 0], [0, -1]]', also 4-D), or rows split by ';' or newlines with entries split by spaces
    or commas ('w1 w2; w3 w4'). Tokens that read as numbers are numbers, others are symbols."""
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"kernel: invalid JSON ({exc})") from None
    rows = [line.replace(",", " ").split() for line in text.replace(";", "\n").splitlines()]
    return [[_entry(token) for token in row] for row in rows if row]


def _format_table(header: Sequence[str], rows: list[Sequence]) -> str:
    cells = [list(map(str, header))] + [[("-" if v is None else str(v)) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _receptive_field(args: argparse.Namespace) -> str:
    layers, input_size = list(args.layers), args.input
    if layers and (args.checkpoint or args.architecture):
        raise ValueError("give either layers or --architecture/--checkpoint, not both")
    if args.checkpoint:
        from models.checkpoint import load_checkpoint

        loaded = load_checkpoint(args.checkpoint)
        layers, input_size = layers_of_module(loaded.model), input_size or loaded.preprocessing.input_size
    elif args.architecture:
        from models.architectures import build_model

        layers = layers_of_module(build_model(args.architecture))
        input_size = input_size or DEFAULT_INPUT_SIZE[args.architecture]
    if not layers:
        raise ValueError("give layers (e.g. 5x1 5x1), --architecture or --checkpoint")
    rows = receptive_field_table(input_size or DEFAULT_INPUT_SIZE["cnn"], layers)
    if args.json:
        return json.dumps(receptive_field_answer(rows), indent=2)
    header = ("layer", "name", "kind", "k", "s", "p", "d", "RF", "RF closed", "jump", "out", "start")
    return _format_table(header, [(r.layer, r.name, r.kind, r.kernel_size, r.stride, r.padding, r.dilation,
                                   r.receptive_field, r.receptive_field_closed_form, r.jump, r.output_size,
                                   f"{r.start:g}") for r in rows])


def _conv_layer(args: argparse.Namespace) -> str:
    height, width, *channels = args.input
    result = conv_layer(height, width, channels[0] if channels else 1, args.filters, args.kernel, args.stride,
                        args.padding, args.dilation, not args.no_bias)
    if args.json:
        return json.dumps(conv_layer_answer(result), indent=2)
    return (f"output         {result.output_height} x {result.output_width} x {result.output_channels}\n"
            f"parameters     {result.parameters:,}\n"
            f"multiply-adds  {result.multiply_adds:,}")


def _conv_matrix(args: argparse.Namespace) -> str:
    result = conv_matrix(args.kernel, args.input, args.stride, args.padding, args.dilation, flip=args.flip,
                         max_entries=args.max_entries)
    if args.json:
        return json.dumps(conv_matrix_answer(result), indent=2)
    rows = result.tolist()
    if args.latex:
        return to_latex(rows)
    cells = [[format(v, "g") if isinstance(v, float) else str(v) for v in row] for row in rows]
    width = max(len(cell) for row in cells for cell in row)
    return "\n".join(" ".join(cell.rjust(width) for cell in row) for row in cells) + \
        f"\n({result.shape[0]} x {result.shape[1]})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m models.calc", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    rf = commands.add_parser("receptive-field", help="receptive field per layer of a conv/pool stack")
    rf.add_argument("layers", nargs="*", type=layer_arg, metavar="KxSxPxD",
                    help="kernel[xstride[xpadding[xdilation]]], defaults 1, 0, 1; pooling layers too")
    rf.add_argument("--input", type=int, help="side of the square input (default: the checkpoint's or the "
                                             "architecture's, else the cnn's)")
    source = rf.add_mutually_exclusive_group()
    source.add_argument("--architecture", choices=("cnn", "resnet18"), help="read the layers off a fresh model")
    source.add_argument("--checkpoint", help="read the layers off a trained checkpoint")
    rf.add_argument("--json", action="store_true")
    rf.set_defaults(run=_receptive_field)

    cl = commands.add_parser("conv-layer", help="output shape, parameters and multiply-adds of a Conv2d")
    cl.add_argument("--input", required=True, type=lambda t: _ints(t, (2, 3), "input"), metavar="HxWxC")
    cl.add_argument("--filters", required=True, type=int)
    cl.add_argument("--kernel", required=True, type=int_or_pair_arg, metavar="K|KHxKW")
    cl.add_argument("--stride", type=int_or_pair_arg, default=1)
    cl.add_argument("--padding", type=int_or_pair_arg, default=0)
    cl.add_argument("--dilation", type=int_or_pair_arg, default=1)
    cl.add_argument("--no-bias", action="store_true")
    cl.add_argument("--json", action="store_true")
    cl.set_defaults(run=_conv_layer)

    cm = commands.add_parser("conv-matrix", help="a convolution written out as a matrix")
    cm.add_argument("--kernel", required=True, type=kernel_arg, help="'w1 w2; w3 w4' or JSON (2-D or 4-D)")
    cm.add_argument("--input", required=True, type=lambda t: _ints(t, (2, 3), "input"), metavar="HxW|CxHxW")
    cm.add_argument("--stride", type=int_or_pair_arg, default=1)
    cm.add_argument("--padding", type=int_or_pair_arg, default=0)
    cm.add_argument("--dilation", type=int_or_pair_arg, default=1)
    cm.add_argument("--flip", action="store_true", help="true convolution instead of cross-correlation")
    cm.add_argument("--latex", action="store_true", help="print a LaTeX bmatrix")
    cm.add_argument("--max-entries", type=int, default=4_000_000)
    cm.add_argument("--json", action="store_true")
    cm.set_defaults(run=_conv_matrix)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        print(args.run(args))
    except ValueError as exc:  # EmptyOutputError, ConvMatrixError and bad LayerSpecs are ValueErrors
        print(f"{parser.prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
