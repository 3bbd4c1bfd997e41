"""/docs is served from installed files (no CDN), and every answer carries the security headers."""

from __future__ import annotations

import re

from helpers import files


def test_docs_page_loads_nothing_from_outside(inprocess):
    page = inprocess.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert not re.search(r"""(src|href)=["']https?://""", page.text), page.text
    assert "<script>" not in page.text  # no inline script: the CSP allows this origin's files only
    for asset in re.findall(r"""(?:src|href)=["'](/[^"']+)["']""", page.text):
        response = inprocess.get(asset)
        assert response.status_code == 200 and response.content, asset
    assert "SwaggerUIBundle" in inprocess.get("/docs/assets/swagger-ui-bundle.js").text


def test_every_answer_carries_the_security_headers(inprocess, sign_png):
    answers = [inprocess.get("/docs"), inprocess.get("/"), inprocess.get("/openapi.json"), inprocess.get("/nowhere"),
               inprocess.post("/v1/predict", files=files(("a.png", sign_png))),
               inprocess.post("/v1/calculators/conv-layer", json={})]
    for response in answers:
        headers = response.headers
        assert headers["x-content-type-options"] == "nosniff", response.url
        assert headers["x-frame-options"] == "DENY", response.url
        policy = headers["content-security-policy"]
        assert "default-src 'self'" in policy and "script-src 'self'" in policy and "frame-ancestors 'none'" in policy


def test_the_schema_documents_the_answers_the_service_gives(inprocess):
    paths = inprocess.get("/openapi.json").json()["paths"]
    assert {"404", "503"} <= set(paths["/v1/models/{name}/receptive-field"]["get"]["responses"])
    assert {"400", "404", "413", "415", "422", "503", "504"} <= set(paths["/v1/predict"]["post"]["responses"])
    upload = paths["/v1/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert upload["properties"]["file"]["minItems"] == 1
    assert "/redoc" not in paths and inprocess.get("/redoc").status_code == 404
