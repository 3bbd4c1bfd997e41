"""The calculator routes through FastAPI (TestClient, the app in this process serving two small checkpoints)."""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient

from conftest import app_client
from models.architectures import build_model
from models.checkpoint import atomic_save, make_checkpoint
from models.classes import NUM_CLASSES
from models.conv_matrix import LATEX_MAX_ENTRIES
from models.preprocessing import Preprocessing

RF = "/v1/calculators/receptive-field"
CONV = "/v1/calculators/conv-layer"
MATRIX = "/v1/calculators/conv-matrix"


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> Iterator[TestClient]:
    directory = tmp_path_factory.mktemp("checkpoints")
    for architecture, size in (("cnn", 32), ("resnet18", 48)):
        checkpoint = make_checkpoint(build_model(architecture, input_size=size), architecture=architecture,
                                     class_names=[f"class {i}" for i in range(NUM_CLASSES)],
                                     preprocessing=Preprocessing(input_size=size), start_weights="random",
                                     metrics=[], train_args={}, data={}, half=True)
        atomic_save(checkpoint, directory / f"{architecture}.pt")
    with app_client(directory) as client:
        yield client


def _detail(response) -> str:
    assert response.status_code == 422, response.text
    return " ".join(str(item.get("msg")) + " " + str(item.get("loc")) for item in response.json()["detail"])


# --- receptive field ---------------------------------------------------------------------------------

def test_receptive_field_example(client):
    layer = {"kernel_size": 5, "stride": 1, "padding": 0, "dilation": 1}
    response = client.post(RF, json={"input_size": 32, "layers": [layer] * 4})
    assert response.status_code == 200
    rows = response.json()["layers"]
    assert [r["layer"] for r in rows] == [1, 2, 3, 4]
    assert [r["receptive_field"] for r in rows] == [5, 9, 13, 17]
    assert [r["receptive_field_closed_form"] for r in rows] == [5, 9, 13, 17]
    assert [r["output_size"] for r in rows] == [28, 24, 20, 16]
    assert [r["jump"] for r in rows] == [1, 1, 1, 1] and [r["start"] for r in rows] == [2.0, 4.0, 6.0, 8.0]


def test_receptive_field_defaults_and_pooling(client):
    layers = [{"kernel_size": 3, "padding": 1}, {"kernel_size": 2, "stride": 2, "name": "pool"},
              {"kernel_size": 3, "dilation": 2}]
    rows = client.post(RF, json={"input_size": 32, "layers": layers}).json()["layers"]
    assert [r["receptive_field"] for r in rows] == [3, 4, 12]
    assert [r["output_size"] for r in rows] == [32, 16, 12] and rows[1]["name"] == "pool"


def test_receptive_field_empty_output_names_the_layer(client):
    layers = [{"kernel_size": 5}, {"kernel_size": 2, "stride": 2}, {"kernel_size": 7}]
    response = client.post(RF, json={"input_size": 16, "layers": layers})
    detail = response.json()["detail"][0]
    assert response.status_code == 422 and detail["type"] == "empty_output"
    assert detail["loc"] == ["body", "layers", 2] and detail["msg"].startswith("layer 3:")


@pytest.mark.parametrize("body", [
    {"input_size": 32, "layers": [{"kernel_size": 0}]},
    {"input_size": 32, "layers": [{"kernel_size": -3}]},
    {"input_size": 32, "layers": [{"kernel_size": 3, "stride": 0}]},
    {"input_size": 32, "layers": [{"kernel_size": 3, "padding": -1}]},
    {"input_size": 32, "layers": [{"kernel_size": 3, "dilation": 0}]},
    {"input_size": 0, "layers": [{"kernel_size": 3}]},
    {"input_size": 10**9, "layers": [{"kernel_size": 3}]},
    {"input_size": 32, "layers": []},
    {"input_size": 32, "layers": [{"kernel_size": 3, "strides": 2}]},
])
def test_receptive_field_rejects_bad_fields(client, body):
    assert client.post(RF, json=body).status_code == 422


def test_model_receptive_field_cnn(client):
    answer = client.get("/v1/models/cnn/receptive-field").json()
    assert answer["model"] == "cnn" and answer["architecture"] == "cnn" and answer["input_size"] == 32
    rows = answer["layers"]
    assert [r["name"] for r in rows] == ["features.0", "features.3", "features.6", "features.7", "features.10",
                                         "features.13", "features.14", "features.17", "features.20"]
    assert [r["receptive_field"] for r in rows][-1] == 36 and rows[-1]["output_size"] == 4


def test_model_receptive_field_resnet18(client):
    answer = client.get("/v1/models/resnet18/receptive-field").json()
    rows = {r["name"]: r for r in answer["layers"]}
    assert answer["input_size"] == 48 and len(rows) == 18 and not any("downsample" in n for n in rows)
    assert [rows[f"layer{i}.1.conv2"]["receptive_field"] for i in (1, 2, 3, 4)] == [43, 99, 211, 435]
    assert rows["layer4.1.conv2"]["output_size"] == 2
    bigger = client.get("/v1/models/resnet18/receptive-field", params={"input_size": 224}).json()
    assert bigger["input_size"] == 224 and bigger["layers"][-1]["output_size"] == 7


def test_model_receptive_field_errors(client):
    assert client.get("/v1/models/nope/receptive-field").status_code == 404
    response = client.get("/v1/models/cnn/receptive-field", params={"input_size": 4})  # 4 -> 2 -> 1 -> pool
    assert "layer 9 (features.20)" in _detail(response) and "query" in _detail(response)
    assert client.get("/v1/models/cnn/receptive-field", params={"input_size": 0}).status_code == 422


# --- conv layer ----------------------------------------------------------------------------------------

def test_conv_layer_example(client):
    body = {"input_shape": {"height": 32, "width": 32, "channels": 3}, "filters": 10, "kernel_size": 5,
            "stride": 1, "padding": 0, "dilation": 1, "bias": True}
    response = client.post(CONV, json=body)
    assert response.status_code == 200
    assert response.json() == {"output_shape": {"height": 28, "width": 28, "channels": 10}, "parameters": 760,
                               "multiply_adds": 28 * 28 * 10 * 75}


def test_conv_layer_pairs(client):
    body = {"input_shape": {"height": 32, "width": 24, "channels": 3}, "filters": 8, "kernel_size": [3, 5],
            "stride": [1, 2], "padding": [1, 0], "bias": False}
    answer = client.post(CONV, json=body).json()
    assert answer["output_shape"] == {"height": 32, "width": 10, "channels": 8} and answer["parameters"] == 360


@pytest.mark.parametrize("change", [{"filters": 0}, {"kernel_size": 0}, {"kernel_size": [3, -1]}, {"stride": 0},
                                    {"padding": -2}, {"dilation": 0}, {"kernel_size": [1, 2, 3]},
                                    {"input_shape": {"height": 0, "width": 8, "channels": 3}}])
def test_conv_layer_rejects_bad_fields(client, change):
    body = {"input_shape": {"height": 8, "width": 8, "channels": 3}, "filters": 4, "kernel_size": 3} | change
    assert client.post(CONV, json=body).status_code == 422


def test_conv_layer_empty_output(client):
    body = {"input_shape": {"height": 4, "width": 4, "channels": 3}, "filters": 4, "kernel_size": 5}
    assert "empty" in _detail(client.post(CONV, json=body))


# --- conv as a matrix ----------------------------------------------------------------------------------

def test_conv_matrix_symbolic_example(client):
    response = client.post(MATRIX, json={"kernel": [["w1", "w2"], ["w3", "w4"]], "input_size": [3, 3],
                                         "stride": 1, "padding": 0, "dilation": 1})
    assert response.status_code == 200
    answer = response.json()
    assert answer["shape"] == [4, 9]
    assert answer["matrix"][0] == ["w1", "w2", "0", "w3", "w4", "0", "0", "0", "0"]
    assert answer["latex"].startswith("\\begin{bmatrix}") and answer["latex"].endswith("\\end{bmatrix}")


def test_conv_matrix_numeric_agrees_with_conv2d(client):
    rng, gen = random.Random(7), torch.Generator().manual_seed(7)
    for _ in range(12):
        c_in, c_out, kh, kw = rng.randint(1, 3), rng.randint(1, 3), rng.randint(1, 3), rng.randint(1, 3)
        h, w, stride, padding, dilation = rng.randint(3, 8), rng.randint(3, 8), rng.randint(1, 2), rng.randint(0, 1), 1
        flip = rng.random() < 0.5
        kernel = torch.randn(c_out, c_in, kh, kw, generator=gen, dtype=torch.float64)
        x = torch.randn(1, c_in, h, w, generator=gen, dtype=torch.float64)
        answer = client.post(MATRIX, json={"kernel": kernel.tolist(), "input_size": [c_in, h, w], "stride": stride,
                                           "padding": padding, "dilation": dilation, "flip": flip}).json()
        y = F.conv2d(x, kernel.flip(-2, -1) if flip else kernel, stride=stride, padding=padding)
        assert answer["output_shape"] == list(y.shape[1:])
        np.testing.assert_allclose(np.array(answer["matrix"]) @ x.flatten().numpy(), y.flatten().numpy(),
                                   rtol=1e-12, atol=1e-12)


def test_conv_matrix_mixed_kernel_is_symbolic(client):
    answer = client.post(MATRIX, json={"kernel": [["a", 2], [0, 1.5]], "input_size": [2, 2]}).json()
    assert answer["matrix"] == [["a", "2", "0", "1.5"]]


def test_conv_matrix_oversize_rejected_before_allocation(client, monkeypatch):
    def no_allocation(*args, **kwargs):
        raise AssertionError("the matrix was allocated")

    monkeypatch.setattr(np, "zeros", no_allocation)
    monkeypatch.setattr(np, "full", no_allocation)
    response = client.post(MATRIX, json={"kernel": [[1]], "input_size": [1, 4096, 4096]})
    assert response.status_code == 422 and response.json()["detail"][0]["type"] == "matrix_too_large"
    response = client.post(MATRIX, json={"kernel": [[1]], "input_size": [41, 50]})  # 2050^2 > 4 M
    assert "4,000,000" in _detail(response)


def test_conv_matrix_latex_omitted_when_huge(client):
    answer = client.post(MATRIX, json={"kernel": [[1]], "input_size": [1, 600]}).json()
    assert answer["shape"] == [600, 600] and 600 * 600 > LATEX_MAX_ENTRIES and answer["latex"] is None


@pytest.mark.parametrize("body, words", [
    ({"kernel": [[1, 2], [3]], "input_size": [3, 3]}, "ragged"),
    ({"kernel": [[[[1]]]], "input_size": [2, 3, 3]}, "channel"),
    ({"kernel": [[1, 1, 1]], "input_size": [3, 2]}, "empty"),
    ({"kernel": [[True]], "input_size": [3, 3]}, ""),
    ({"kernel": [[None]], "input_size": [3, 3]}, ""),
    ({"kernel": [[""]], "input_size": [3, 3]}, ""),
    ({"kernel": [[1]], "input_size": [3]}, ""),
    ({"kernel": [[1]], "input_size": [0, 3]}, ""),
    ({"kernel": [[1]], "input_size": [3, 3], "stride": 0}, ""),
    ({"kernel": [[1]], "input_size": [3, 3], "padding": -1}, ""),
    ({"kernel": [[1]], "input_size": [3, 3], "dilation": [1, 0]}, ""),
    ({"kernel": [[[[1] * 32] * 32] * 32] * 3, "input_size": [32, 40, 40]}, "entries"),
    ({"kernel": [[1]] * 33, "input_size": [40, 40]}, ""),
])
def test_conv_matrix_rejects_bad_requests(client, body, words):
    assert words in _detail(client.post(MATRIX, json=body))
