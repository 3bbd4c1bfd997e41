"""The upload page in a real headless Chromium (Debian's), driven by Playwright: upload a real GTSRB
test image, read the top prediction off the page, keep a screenshot in artifacts/."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import ARTIFACTS
from helpers import encode, files

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).is_file():
        pytest.skip("Debian's chromium is not installed (.ci/system-packages.sh installs it)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


def test_upload_page_classifies_a_real_image(browser, server, client, gtsrb_test_samples, tmp_path):
    from PIL import Image

    from models.classes import CLASS_NAMES

    # a few real test images, as PNG so the page can show them too
    uploads = []
    for path, label in gtsrb_test_samples[10:13]:
        with Image.open(path) as image:
            target = tmp_path / f"{Path(path).stem}.png"
            target.write_bytes(encode(image.convert("RGB"), "PNG"))
            uploads.append((target, label))
    # the page sends every image to /v1/detect: a crop comes back as one sign, boxed, with its top 5
    expected = client.post("/v1/detect", params={"classifier": "cnn"},
                           files=files(*[(p.name, p.read_bytes()) for p, _ in uploads])).json()["results"]
    assert all(len(r["signs"]) == 1 for r in expected), expected

    page = browser.new_page(viewport={"width": 1200, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server.url + "/")
    page.wait_for_selector("#model:not([disabled])")
    page.select_option("#model", "cnn")
    page.set_input_files("#files", [str(p) for p, _ in uploads])
    page.wait_for_selector("#results .result >> nth=2")
    assert "searched for signs by detector, named by cnn" in page.inner_text("#status")

    cards = page.locator("#results .result")
    assert cards.count() == len(uploads)
    for i, ((path, _), want) in enumerate(zip(uploads, expected)):
        card = cards.nth(i)
        assert card.locator(".filename").inner_text() == path.name
        rows = card.locator(".prediction")
        assert rows.count() == 5
        top_label = rows.nth(0).locator(".label").inner_text()
        assert top_label == want["signs"][0]["top"][0]["label"]  # what the API says for the same file
        assert card.locator(".box").count() == 1
        assert top_label in CLASS_NAMES
        assert rows.nth(0).locator(".probability").inner_text().endswith("%")
        assert card.locator("img").evaluate("img => img.naturalWidth") > 0  # the preview rendered

    # the training curves are linked and load
    plot = page.locator("#plots img").first
    plot.scroll_into_view_if_needed()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=plot.element_handle())
    assert page.locator("#plots a[href$='metrics.csv']").count() >= 1

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "upload-page.png"), full_page=True)
    assert not errors, errors
    page.close()


def test_upload_page_shows_the_error_detail(browser, server, tmp_path):
    bad = tmp_path / "not-a-sign.png"
    bad.write_bytes(b"definitely not a PNG")
    page = browser.new_page()
    page.goto(server.url + "/")
    page.wait_for_selector("#model:not([disabled])")
    page.set_input_files("#files", str(bad))
    page.wait_for_selector("#status.error")
    assert "not-a-sign.png" in page.inner_text("#status")
    page.close()


def test_api_docs_render_offline_under_the_content_security_policy(browser, server):
    """/docs in Chromium with every request off this server refused: Swagger UI still lists the
    operations (its files are served by the service) and the page logs no CSP violation."""
    page = browser.new_page()
    outside, errors = [], []
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(server.url)
               else (outside.append(route.request.url), route.abort()))
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.goto(f"{server.url}/docs")
    page.wait_for_selector(".opblock", timeout=30_000)
    operations = page.locator(".opblock-summary-path").all_inner_texts()
    assert "/v1/predict" in " ".join(operations) and len(operations) >= 10, operations
    assert outside == [], outside
    assert not [e for e in errors if "Content Security Policy" in e], errors


def test_upload_page_boxes_the_signs_of_a_street_photo(browser, server, client, gtsrb_test_samples, tmp_path):
    from PIL import Image

    from models.gtsrb import default_data_root
    from models.gtsdb import read_ground_truth, split_frames

    crop_path, _ = gtsrb_test_samples[20]
    crop = tmp_path / "crop.png"
    with Image.open(crop_path) as image:
        crop.write_bytes(encode(image.convert("RGB"), "PNG"))
    # the first two validation frames in which the shipped detector finds signs (it finds most)
    photos, answers = [], []
    for frame in [f for f in split_frames(read_ground_truth(default_data_root()), "val") if f.signs][:10]:
        photo = tmp_path / frame.name
        photo.write_bytes((Path(default_data_root()) / "gtsdb" / "images" / frame.name).read_bytes())
        signs = client.post("/v1/detect", params={"classifier": "cnn"},
                            files=files((photo.name, photo.read_bytes()))).json()["results"][0]["signs"]
        if signs:
            photos.append(photo)
            answers.append(signs)
        if len(photos) == 2:
            break
    assert len(photos) == 2, "the shipped detector found signs in fewer than 2 of 10 validation frames"
    photo, expected = photos[0], answers[0]

    page = browser.new_page(viewport={"width": 1300, "height": 1100})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server.url + "/")
    page.wait_for_selector("#model:not([disabled])")
    assert page.locator("#model option[value='detector']").count() == 0  # photos use it on their own
    page.select_option("#model", "cnn")
    page.set_input_files("#files", [str(photo), str(crop), str(photos[1])])  # several photos dropped at once
    page.wait_for_selector("#results .result >> nth=2")
    assert "searched for signs" in page.inner_text("#status")

    scenes = page.locator("#results .result.scene")
    assert scenes.count() == 3
    for k, (each, signs) in zip((0, 2), zip(photos, answers)):  # each photo boxed and named on its own card
        card = scenes.nth(k)
        assert card.locator(".filename").inner_text() == each.name
        assert card.locator(".box").count() == len(signs)
        assert card.locator(".sign .label").all_inner_texts() == [s["label"] for s in signs]
    scene = scenes.first
    # each box sits over its sign: the drawn rectangle, scaled back to the image, is the answer's box
    stage = scene.locator(".stage img").bounding_box()
    first = scene.locator(".box").first.bounding_box()
    scale = stage["width"] / 1360
    x1, y1, x2, y2 = expected[0]["box"]
    assert abs(first["x"] - stage["x"] - x1 * scale) <= 3 and abs(first["width"] - (x2 - x1) * scale) <= 3
    crop_card = page.locator("#results .result").nth(1)  # a crop is a photo of one sign: boxed, with its top 5
    assert crop_card.locator(".box").count() == 1 and crop_card.locator(".prediction").count() == 5

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "scene-page.png"), full_page=True)
    assert not errors, errors


def test_upload_page_says_plainly_when_no_sign_is_recognised(browser, server, client, gtsrb_test_samples, tmp_path):
    from PIL import Image

    from training.calibration_data import VALIDATION_FRAMES, background_images, background_squares
    from models.gtsrb import default_data_root

    gtsdb = f"{default_data_root()}/gtsdb"
    # a patch of street scene away from every sign, and a real sign
    [square] = background_squares(gtsdb, VALIDATION_FRAMES[:1], per_frame=1, seed=3)
    background = tmp_path / "street.png"
    background.write_bytes(encode(background_images(gtsdb, [square])[0], "PNG"))
    sign = tmp_path / "sign.png"
    with Image.open(gtsrb_test_samples[20][0]) as image:
        sign.write_bytes(encode(image.convert("RGB"), "PNG"))
    results = client.post("/v1/detect", params={"classifier": "cnn"},
                          files=files((background.name, background.read_bytes()), (sign.name, sign.read_bytes()))
                          ).json()["results"]
    assert [len(r["signs"]) for r in results] == [0, 1]

    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(server.url + "/")
    page.wait_for_selector("#model:not([disabled])")
    page.select_option("#model", "cnn")
    page.set_input_files("#files", [str(background), str(sign)])
    page.wait_for_selector("#results .result >> nth=1")
    cards = page.locator("#results .result")
    assert cards.nth(0).locator(".no-signs").inner_text() == "No traffic sign found in this photo."
    assert cards.nth(0).locator(".box").count() == 0
    assert cards.nth(1).locator(".no-signs").count() == 0 and cards.nth(1).locator(".prediction").count() == 5
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "upload-page-no-sign.png"), full_page=True)
    page.close()
