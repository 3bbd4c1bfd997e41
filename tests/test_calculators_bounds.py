"""Calculator inputs are finite and bounded (422 otherwise) and the arithmetic cannot overflow: every
one of these answered 500 before."""

from __future__ import annotations

import pytest

from models.conv_matrix import ConvMatrixError, kernel_array

RF = "/v1/calculators/receptive-field"
CONV = "/v1/calculators/conv-layer"
MATRIX = "/v1/calculators/conv-matrix"


def post_raw(client, path: str, text: str):
    return client.post(path, content=text, headers={"content-type": "application/json"})


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_input_size_is_a_422(inprocess, value):
    response = post_raw(inprocess, RF, f'{{"input_size": {value}, "layers": [{{"kernel_size": 3}}]}}')
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body", "input_size"]


def test_a_kernel_integer_beyond_64_bits_is_taken_as_the_number_it_is(inprocess):
    # the schema allows any JSON number; one past int64 is a float, as it would be in JavaScript
    response = inprocess.post(MATRIX, json={"kernel": [[2 ** 63, 1], [1, 1]], "input_size": [3, 3]})
    assert response.status_code == 200, response.text
    assert response.json()["matrix"][0][:2] == [float(2 ** 63), 1.0]


def test_the_matrix_math_refuses_integers_beyond_64_bits():
    with pytest.raises(ConvMatrixError, match="64 bits"):
        kernel_array([[2 ** 63, 1], [1, 1]])


def test_a_kernel_of_large_but_valid_integers_still_works(inprocess):
    response = inprocess.post(MATRIX, json={"kernel": [[2 ** 62]], "input_size": [1, 1]})
    assert response.status_code == 200, response.text
    assert response.json()["matrix"] == [[2 ** 62]]


def test_a_conv_layer_output_larger_than_any_input_is_answered(inprocess):
    request = {"input_shape": {"height": 16384, "width": 16384, "channels": 1}, "filters": 1, "kernel_size": 1,
               "padding": 1024}
    response = inprocess.post(CONV, json=request)
    assert response.status_code == 200, response.text
    assert response.json()["output_shape"] == {"height": 18432, "width": 18432, "channels": 1}


def test_strides_multiplying_past_2_to_the_53_are_a_422_naming_the_layer(inprocess):
    layers = [{"kernel_size": 1, "stride": 1024}] * 104
    response = inprocess.post(RF, json={"input_size": 16384, "layers": layers})
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "layers", 5] and "2^53" in error["msg"]  # 1024^6 = 2^60


def test_strides_up_to_2_to_the_53_give_exact_integers(inprocess):
    layers = [{"kernel_size": 3, "stride": 2, "padding": 1}] * 53  # the output stays 1 wide from layer 14
    response = inprocess.post(RF, json={"input_size": 16384, "layers": layers})
    assert response.status_code == 200, response.text
    last = response.json()["layers"][-1]
    assert last["jump"] == 2 ** 53 and last["receptive_field"] == last["receptive_field_closed_form"]
    assert last["start"] == 0  # padding 1 recentres every layer on the first pixel


@pytest.mark.parametrize("field, value", [("bias", 0), ("bias", "true"), ("bias", 1)])
def test_booleans_are_json_booleans_as_the_schema_says(inprocess, field, value):
    request = {"input_shape": {"height": 8, "width": 8, "channels": 1}, "filters": 1, "kernel_size": 3, field: value}
    response = inprocess.post(CONV, json=request)
    assert response.status_code == 422, response.text
