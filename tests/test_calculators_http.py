"""The calculators in the real service (`python -m app` over loopback HTTP, conftest's `server`)."""

from __future__ import annotations

from models.architectures import build_model
from models.receptive_field import layers_of_module, receptive_field_table


def test_calculators_over_http(server, model_names):
    with server.client() as http:
        for name in model_names:
            answer = http.get(f"/v1/models/{name}/receptive-field").json()
            layers = layers_of_module(build_model(answer["architecture"]))
            expected = receptive_field_table(answer["input_size"], layers)
            assert [row["receptive_field"] for row in answer["layers"]] == [r.receptive_field for r in expected]
            assert answer["layers"][-1]["output_size"] == expected[-1].output_size

        rows = http.post("/v1/calculators/receptive-field",
                         json={"input_size": 32, "layers": [{"kernel_size": 5}] * 4}).json()["layers"]
        assert [r["receptive_field"] for r in rows] == [5, 9, 13, 17]
        layer = http.post("/v1/calculators/conv-layer", json={"input_shape": {"height": 32, "width": 32, "channels": 3},
                                                             "filters": 10, "kernel_size": 5}).json()
        assert layer["parameters"] == 760
        matrix = http.post("/v1/calculators/conv-matrix",
                           json={"kernel": [["w1", "w2"], ["w3", "w4"]], "input_size": [3, 3]}).json()
        assert matrix["matrix"][0] == ["w1", "w2", "0", "w3", "w4", "0", "0", "0", "0"]
        too_big = http.post("/v1/calculators/conv-matrix", json={"kernel": [[1]], "input_size": [4096, 4096]})
        assert too_big.status_code == 422

        page = http.get("/").text
        assert '<div id="calculators"></div>' in page and "/static/calculators.js" in page
        script = http.get("/static/calculators.js")
        assert script.status_code == 200 and "receptive-field" in script.text
        assert http.get("/static/calculators.css").status_code == 200
