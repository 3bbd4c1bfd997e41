"""JSON bodies have a size limit (413 while they stream in), and 422 answers quote at most an excerpt
of the input: no request can make the service hold or send back megabytes it did not need."""

from __future__ import annotations

import json

from app.settings import Settings

RF = "/v1/calculators/receptive-field"
LIMIT = Settings.model_fields["max_body_bytes"].default


def test_a_json_body_over_the_limit_is_refused_from_its_declared_length(inprocess):
    body = json.dumps({"input_size": 32, "layers": [{"kernel_size": 3}], "name": "x" * (LIMIT + 10)})
    response = inprocess.post(RF, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 413, response.text[:300]
    assert f"{LIMIT:,} bytes" in response.json()["detail"]


def test_a_chunked_json_body_over_the_limit_is_refused_while_it_streams(inprocess):
    chunk = b" " * (256 * 1024)
    sent = 0

    def body():
        nonlocal sent
        yield b'{"input_size": 32, "layers": [{"kernel_size": 3}]'
        while sent < 4 * LIMIT:
            sent += len(chunk)
            yield chunk
        yield b"}"

    response = inprocess.post(RF, content=body(), headers={"content-type": "application/json"})
    assert response.status_code == 413, response.text[:300]
    assert "larger than the limit" in response.json()["detail"]


def test_a_422_answer_quotes_only_an_excerpt_of_a_large_input(inprocess):
    huge = "A" * (3 * 1024 * 1024)  # under the body limit, far over any sane label
    response = inprocess.post(RF, json={"input_size": 32, "layers": [{"kernel_size": 3, "name": huge}]})
    assert response.status_code == 422
    assert len(response.content) < 2000, len(response.content)
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "layers", 0, "name"]
    assert error["input"].startswith("AAAA") and "3,145,728 characters" in error["input"]


def test_an_unknown_field_named_by_a_huge_key_is_quoted_short(inprocess):
    key = "k" * (1024 * 1024)
    response = inprocess.post(RF, json={"input_size": 32, "layers": [{"kernel_size": 3}], key: 1})
    assert response.status_code == 422
    assert len(response.content) < 2000, len(response.content)


def test_query_errors_keep_fastapis_format(inprocess):
    response = inprocess.get("/v1/models/cnn/receptive-field", params={"input_size": "x" * 50_000})
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["query", "input_size"] and error["type"] == "int_parsing"
    assert len(response.content) < 1000
