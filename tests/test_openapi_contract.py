"""The OpenAPI schema matches the service: schemathesis generates requests from /openapi.json (valid
and invalid ones) for every operation, sends them to the app in process, and checks each answer
against the schema (no 5xx, declared status codes, response bodies and headers as documented,
schema-valid input accepted, invalid input refused). Bounded: a few dozen cases per operation."""

from __future__ import annotations

import json
import time

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

EXAMPLES_PER_OPERATION = 10
# Schema-valid is not always valid: an uploaded file can be any bytes but must be an image, a conv
# layer must fit its input. Those answers are 4xx by design, so this check is left out; the rest
# (no 5xx, schema-invalid input refused, status codes, bodies and headers as documented) apply.
EXCLUDED = [positive_data_acceptance]


def _text(value):
    return value if isinstance(value, (str, bytes)) else json.dumps(value)


def send(client, case):
    kwargs = case.as_transport_kwargs(base_url="http://testserver")
    request = {"method": kwargs["method"], "url": kwargs["url"], "params": kwargs.get("params"),
               "headers": kwargs.get("headers"), "cookies": kwargs.get("cookies")}
    if kwargs.get("files") is not None:  # requests-style multipart; httpx wants every value as text or bytes
        request["files"] = [(name, (part[0], _text(part[1]), *part[2:])) for name, part in kwargs["files"]]
        if kwargs.get("data"):
            request["data"] = {key: _text(value) for key, value in kwargs["data"].items()}
    elif kwargs.get("json") is not None:
        request["json"] = kwargs["json"]
    elif kwargs.get("data") is not None:
        request["content"] = kwargs["data"] if isinstance(kwargs["data"], (bytes, str)) else None
    prepared = client.build_request(**request)
    prepared.read()  # a multipart body is a stream until read; the checks look at what was sent
    return client.send(prepared)


def test_every_operation_answers_as_its_schema_says(inprocess):
    schema = schemathesis.openapi.from_dict(inprocess.get("/openapi.json").json())
    failures = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def check(case):
            response = send(inprocess, case)
            case.validate_response(response, excluded_checks=EXCLUDED)

        started = time.monotonic()
        try:
            check()
        except BaseException as exc:  # every operation's first failure (an exception group), reported together
            if isinstance(exc, KeyboardInterrupt):
                raise
            failures.append(f"{operation.method.upper()} {operation.path}: {str(exc)[:1500]}")
        print(f"{operation.method.upper()} {operation.path}: {time.monotonic() - started:.1f} s")
    assert not failures, "\n\n".join(failures)
