"""`python -m models.calc`: argument parsing, tables, --json, and exit status 2 on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from models.calc import kernel_arg, layer_arg, main
from models.receptive_field import LayerSpec

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_layer_tokens():
    assert layer_arg("5") == LayerSpec(5)
    assert layer_arg("5x2") == LayerSpec(5, 2)
    assert layer_arg("3x1x1x2") == LayerSpec(3, 1, 1, 2)


def test_kernel_tokens():
    assert kernel_arg("w1 w2; w3 w4") == [["w1", "w2"], ["w3", "w4"]]
    assert kernel_arg("1, -2\n0.5 x") == [[1, -2], [0.5, "x"]]
    assert kernel_arg("[[[[1]]]]") == [[[[1]]]]


def test_receptive_field_table(capsys):
    code, out, _ = run(capsys, "receptive-field", "5x1", "5x1", "5x1", "5x1", "--input", "32")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["layer", "name", "kind", "k", "s", "p", "d", "RF", "RF", "closed", "jump", "out",
                                "start"]
    assert [line.split()[7] for line in lines[2:]] == ["5", "9", "13", "17"]
    assert [line.split()[10] for line in lines[2:]] == ["28", "24", "20", "16"]


def test_receptive_field_json(capsys):
    code, out, _ = run(capsys, "receptive-field", "3x1x1", "2x2", "--input", "32", "--json")
    rows = json.loads(out)["layers"]
    assert code == 0 and [r["receptive_field"] for r in rows] == [3, 4] and rows[1]["jump"] == 2


def test_receptive_field_of_an_architecture(capsys):
    code, out, _ = run(capsys, "receptive-field", "--architecture", "cnn", "--json")
    rows = json.loads(out)["layers"]
    assert code == 0 and rows[-1]["name"] == "features.20" and rows[-1]["receptive_field"] == 36


def test_empty_output_names_the_layer(capsys):
    code, out, err = run(capsys, "receptive-field", "5", "5", "5", "--input", "8")
    assert code == 2 and out == "" and "layer 2" in err and "empty" in err


def test_bad_layer_token_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["receptive-field", "0x1"])
    assert info.value.code == 2 and "kernel_size" in capsys.readouterr().err


def test_conv_layer(capsys):
    code, out, _ = run(capsys, "conv-layer", "--input", "32x32x3", "--filters", "10", "--kernel", "5", "--json")
    assert code == 0
    assert json.loads(out) == {"output_shape": {"height": 28, "width": 28, "channels": 10}, "parameters": 760,
                               "multiply_adds": 588_000}
    code, out, _ = run(capsys, "conv-layer", "--input", "32x32x3", "--filters", "10", "--kernel", "3x5", "--no-bias")
    assert code == 0 and "30 x 28 x 10" in out and "parameters     450" in out


def test_conv_matrix(capsys):
    code, out, _ = run(capsys, "conv-matrix", "--kernel", "w1 w2; w3 w4", "--input", "3x3")
    assert code == 0 and out.splitlines()[0].split() == ["w1", "w2", "0", "w3", "w4", "0", "0", "0", "0"]
    code, out, _ = run(capsys, "conv-matrix", "--kernel", "1 2; 3 4", "--input", "3x3", "--json", "--flip")
    answer = json.loads(out)
    assert code == 0 and answer["shape"] == [4, 9] and answer["matrix"][0] == [4, 3, 0, 2, 1, 0, 0, 0, 0]
    code, out, _ = run(capsys, "conv-matrix", "--kernel", "a b", "--input", "1x3", "--latex")
    assert out.strip() == "\\begin{bmatrix}\na & b & 0 \\\\\n0 & a & b\n\\end{bmatrix}"


def test_conv_matrix_too_large(capsys):
    code, _, err = run(capsys, "conv-matrix", "--kernel", "1", "--input", "100x100", "--max-entries", "1000")
    assert code == 2 and "limit" in err


def test_module_entry_point():
    # The pure math must not need torch, so the command answers at once.
    done = subprocess.run([sys.executable, "-c", "import sys, models.calc; sys.exit('torch' in sys.modules)"],
                          capture_output=True, cwd=ROOT)
    assert done.returncode == 0
    done = subprocess.run([sys.executable, "-m", "models.calc", "conv-layer", "--input", "32x32x3", "--filters",
                           "10", "--kernel", "5"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and "760" in done.stdout
