"""Decoding is paid for in decoded pixels, counted from the headers before any pixel is decoded: a few
bytes declaring huge images are refused, a real phone photo still works (reduced while decoded), and
large decodes at once in the process are bounded."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from app.imaging import SceneDecoder, decode_image, decoded_pixels, open_image
from conftest import app_client
from helpers import encode, files



@pytest.fixture(scope="module")
def phone_photo() -> bytes:
    """A real street frame blown up to a 48 Mpx (8000x6000) JPEG, as a phone takes them."""
    from models.gtsrb import default_data_root

    frame = Path(default_data_root()) / "gtsdb" / "images" / "00001.jpg"
    if not frame.exists():
        pytest.skip(f"no GTSDB frame at {frame}")
    with Image.open(frame) as image:
        return encode(image.convert("RGB").resize((8000, 6000), Image.Resampling.BILINEAR), "JPEG", quality=85)


def budget(client):
    return client.app.state.service.decode_budget


def test_tiny_webps_declaring_huge_images_are_refused_before_decoding(inprocess):
    # 38 bytes each, 16000x2400 (38.4 Mpx) once decoded: sixteen of them are 614 Mpx for one request
    bomb = encode(Image.new("RGB", (16000, 2400), (90, 120, 30)), "WEBP", lossless=True, method=0)
    budget(inprocess).reset_peak()  # the app is shared with other tests: count from here
    response = inprocess.post("/v1/predict", files=files(*[(f"w{i}.webp", bomb) for i in range(16)]))
    assert response.status_code == 413, response.text
    detail = response.json()["detail"]
    assert "614,400,000 pixels" in detail and "per request" in detail, detail
    assert budget(inprocess).peak == 0  # not one of them was decoded


def test_a_48_megapixel_phone_photo_is_classified_from_a_reduced_decode(inprocess, phone_photo):
    budget(inprocess).reset_peak()
    response = inprocess.post("/v1/predict", params={"model": "resnet18"},
                              files=files(("phone.jpg", phone_photo)))
    assert response.status_code == 200, response.text
    assert len(response.json()["results"][0]["predictions"]) == 5
    # JPEG decoded at 1/8 scale (1000x750), still 8x the 80 px input: not 48 Mpx
    assert 0 < budget(inprocess).peak <= 1000 * 750


def test_decode_image_reduces_a_phone_photo_to_the_scene_size(phone_photo):
    image = open_image(phone_photo, "phone.jpg")
    SceneDecoder(1360).reduce(image)
    assert decoded_pixels(image) == 2000 * 1500  # JPEG DCT scaling to 1/4, the smallest keeping 1360 px
    decoded = decode_image(phone_photo, max_side=1360)
    assert decoded.image.mode == "RGB" and decoded.image.size == (1360, 1020)
    assert decoded.original_size == (8000, 6000)
    assert decoded.scale == pytest.approx((8000 / 1360, 6000 / 1020))
    assert decoded.to_original((0, 0, 1360, 1020)) == pytest.approx((0, 0, 8000, 6000))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_decode_image_applies_exif_orientation_and_maps_points_back(fmt):
    # stored 4000x3000 with a red square at x 3000-3400, y 500-900; EXIF 6: shown rotated 90 degrees clockwise
    stored = Image.new("RGB", (4000, 3000), (40, 40, 40))
    stored.paste((255, 0, 0), (3000, 500, 3400, 900))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(stored, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    decoded = decode_image(data, max_side=1000)
    assert decoded.original_size == (3000, 4000)  # upright
    assert decoded.image.size == (750, 1000)
    # upright, the square is at x 2100-2500, y 3000-3400: find it in the small image and map it back
    red = [(x, y) for y in range(decoded.image.height) for x in range(decoded.image.width)
           if decoded.image.getpixel((x, y))[0] > 200 and decoded.image.getpixel((x, y))[1] < 60]
    xs, ys = [p[0] for p in red], [p[1] for p in red]
    left, top, right, bottom = decoded.to_original((min(xs), min(ys), max(xs) + 1, max(ys) + 1))
    assert (left, top, right, bottom) == pytest.approx((2100, 3000, 2500, 3400), abs=2 * decoded.scale[0])


def test_decode_image_keeps_full_size_without_max_side(sign_png):
    decoded = decode_image(sign_png, max_side=None)
    with Image.open(io.BytesIO(sign_png)) as original:
        assert decoded.image.size == decoded.original_size == original.size
    assert decoded.scale == (1.0, 1.0)


def test_large_decodes_at_once_stay_within_the_process_budget(cnn_snapshot):
    # four requests of one 36 Mpx PNG each; the process may decode 40 Mpx at once: one at a time
    png = encode(Image.new("RGB", (6000, 6000), (200, 30, 30)), "PNG")
    with app_client(cnn_snapshot, max_request_pixels=40_000_000, max_decoding_pixels=40_000_000) as client:
        with ThreadPoolExecutor(4) as pool:
            statuses = list(pool.map(lambda i: client.post("/v1/predict", files=files((f"{i}.png", png)))
                                     .status_code, range(4)))
        assert statuses == [200] * 4
        assert budget(client).peak == 36_000_000
        assert budget(client).used == 0


def progressive_and_baseline(width: int, height: int) -> tuple[bytes, bytes]:
    """The same noisy photo as a progressive and as a baseline JPEG (noise: real coefficients to hold)."""
    import numpy as np

    pixels = np.random.default_rng(0).integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).resize((width, height), Image.Resampling.BILINEAR)
    return (encode(image, "JPEG", quality=80, progressive=True), encode(image, "JPEG", quality=80))


def test_a_progressive_jpeg_is_charged_its_full_size_coefficients():
    progressive, baseline = progressive_and_baseline(4000, 3000)
    costs = {}
    for name, data in (("progressive", progressive), ("baseline", baseline)):
        image = open_image(data, f"{name}.jpg")
        declared = image.size
        SceneDecoder(1360).reduce(image)
        assert image.size == (2000, 1500)  # both reduced while decoded (DCT scaling to 1/2)
        costs[name] = decoded_pixels(image, declared)
    assert costs["baseline"] == 2000 * 1500
    # plus its coefficients, 2 bytes each, in 3-byte RGB pixels: luma at 4000x3000 and two chroma planes
    # at 2000x1500 (Pillow's default 4:2:0 subsampling at this quality)
    assert costs["progressive"] == 2000 * 1500 + (4000 * 3000 + 2 * 2000 * 1500) * 2 // 3


def test_progressive_jpegs_cannot_slip_past_the_request_budget(cnn_snapshot):
    """Each decodes reduced (1/4 or 1/8 scale for the cnn's input); held as coefficients it costs
    5.8 Mpx more than that."""
    from app.imaging import InputDecoder
    from models.checkpoint import load_checkpoint

    progressive, baseline = progressive_and_baseline(2400, 2400)
    reduced = open_image(baseline, "baseline.jpg")
    InputDecoder(load_checkpoint(cnn_snapshot / "cnn.pt").preprocessing).reduce(reduced)
    with app_client(cnn_snapshot, max_request_pixels=20_000_000) as client:
        for data in (progressive, baseline):  # one of either fits
            assert client.post("/v1/predict", files=files(("one.jpg", data))).status_code == 200
        four = client.post("/v1/predict", files=files(*[(f"{i}.jpg", progressive) for i in range(4)]))
        assert four.status_code == 413 and "progressive" in four.json()["detail"], four.text
        budget(client).reset_peak()
        assert client.post("/v1/predict", files=files(*[(f"{i}.jpg", baseline) for i in range(4)])).status_code == 200
        # baseline JPEGs are charged their reduced decode only
        assert budget(client).peak <= 4 * decoded_pixels(reduced) <= 4 * 2400 * 2400 // 16
