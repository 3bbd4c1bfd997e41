"""app/static/calculators.js: its parsers under Node, and the rendered section in headless Chromium.

The browser test needs no server: Playwright intercepts every request of the page and answers it from
the app in this process (create_app with one small checkpoint), the upload page itself included.
Skipped where Node, Playwright or Chromium is missing (in CI, where they are installed, a skip fails).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import app_client
from models.architectures import build_model
from models.checkpoint import atomic_save, make_checkpoint
from models.classes import NUM_CLASSES
from models.preprocessing import Preprocessing

SCRIPT = Path(__file__).resolve().parents[1] / "app" / "static" / "calculators.js"
ORIGIN = "http://calculators.test"


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_parsers_under_node():
    program = f"""
      const c = require({json.dumps(str(SCRIPT))});
      let error = null;
      try {{ c.parseLayers("5 1\\nfive"); }} catch (e) {{ error = e.message; }}
      console.log(JSON.stringify({{
        layers: c.parseLayers("5 1 0 1\\n\\n3x2  # pool\\n7"),
        error,
        pair: [c.parseIntOrPair("3"), c.parseIntOrPair("3 5"), c.parseIntOrPair("2x4")],
        size: [c.parseSize("3 3"), c.parseSize("2x3x3")],
        kernel: c.parseKernel("w1 w2\\n-1.5, 2e3"),
        json: c.parseKernel("[[[[1]]]]"),
        detail: c.describeError({{detail: [{{loc: ["body", "layers", 2], msg: "layer 3: empty"}}]}}, 422),
      }}));
    """
    done = subprocess.run(["node", "-e", program], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["layers"] == [{"kernel_size": 5, "stride": 1, "padding": 0, "dilation": 1},
                             {"kernel_size": 3, "stride": 2, "padding": 0, "dilation": 1},
                             {"kernel_size": 7, "stride": 1, "padding": 0, "dilation": 1}]
    assert out["error"].startswith("line 2:")
    assert out["pair"] == [3, [3, 5], [2, 4]] and out["size"] == [[3, 3], [2, 3, 3]]
    assert out["kernel"] == [["w1", "w2"], [-1.5, 2000]] and out["json"] == [[[[1]]]]
    assert out["detail"] == "body.layers.2: layer 3: empty"


def _checkpoints(tmp_path: Path) -> Path:
    checkpoint = make_checkpoint(build_model("cnn"), architecture="cnn",
                                 class_names=[f"class {i}" for i in range(NUM_CLASSES)], preprocessing=Preprocessing(),
                                 start_weights="random", metrics=[], train_args={}, data={})
    atomic_save(checkpoint, tmp_path / "cnn.pt")
    return tmp_path


@pytest.fixture
def page(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")

    def answer(route):
        request = route.request
        path = request.url.removeprefix(ORIGIN)
        response = client.request(request.method, path, content=request.post_data_buffer, headers=request.headers)
        route.fulfill(status=response.status_code, headers=dict(response.headers), body=response.content)

    with app_client(_checkpoints(tmp_path)) as client, sync_api.sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        except Exception as exc:  # no bundled browser and no system Chromium
            pytest.skip(f"no Chromium to run: {exc}")
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.route(f"{ORIGIN}/**", answer)
        page.goto(f"{ORIGIN}/")
        yield page
        browser.close()
        assert errors == []


def _column(page, card: int, column: int) -> list[str]:
    return page.locator(f".calc-card >> nth={card}").locator(f"tbody tr td:nth-child({column})").all_inner_texts()


@pytest.mark.slow
def test_section_in_a_browser(page):
    cards = page.locator(".calc-card")
    assert page.locator("#calculators h2").inner_text() == "Calculators" and cards.count() == 3

    # receptive field: the worked example, its table and a plot with the input plus four layers
    cards.nth(0).get_by_role("button", name="Compute").click()
    page.wait_for_selector(".calc-card >> nth=0 >> svg circle")
    assert _column(page, 0, 6) == ["5", "9", "13", "17"]
    assert _column(page, 0, 9) == ["28", "24", "20", "16"]
    assert cards.nth(0).locator("svg circle").count() == 5

    # a stack whose last layer does not fit: the API's message is shown
    cards.nth(0).locator("textarea").fill("5\n" * 8)
    cards.nth(0).get_by_role("button", name="Compute").click()
    assert "layer 8" in page.locator(".calc-card >> nth=0 >> .calc-error").inner_text()

    # the served model's own layers
    page.wait_for_selector(".calc-card >> nth=0 >> option[value=cnn]", state="attached")
    cards.nth(0).get_by_role("button", name="Use a served model").click()
    page.wait_for_selector(".calc-card >> nth=0 >> text=features.20")
    assert _column(page, 0, 7)[-1] == "36"
    assert "features.20" in cards.nth(0).locator("textarea").input_value()

    # conv layer
    cards.nth(1).get_by_role("button", name="Compute").click()
    page.wait_for_selector(".calc-card >> nth=1 >> tbody")
    assert _column(page, 1, 1) == ["28 x 28 x 10"] and _column(page, 1, 2) == ["760"]

    # conv as a matrix: the symbolic example, row 0 (its number is a <th>)
    cards.nth(2).get_by_role("button", name="Compute").click()
    page.wait_for_selector(".calc-card >> nth=2 >> tbody")
    first_row = cards.nth(2).locator("tbody tr").first
    assert first_row.locator("td").all_inner_texts() == ["w1", "w2", "0", "w3", "w4", "0", "0", "0", "0"]
    assert first_row.locator("td.zero").count() == 5
    assert "\\begin{bmatrix}" in cards.nth(2).locator("pre").text_content()  # inside a closed <details>
