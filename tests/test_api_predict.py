"""POST /v1/predict against the real server: single images, batches, formats, and accuracy."""

from __future__ import annotations

import io
import random

import httpx
import pytest
import torch
from PIL import Image

from helpers import encode, files
from models.classes import CLASS_NAMES, NUM_CLASSES


def predict(client: httpx.Client, *items: tuple[str, bytes], **params) -> dict:
    response = client.post("/v1/predict", params=params, files=files(*items))
    assert response.status_code == 200, response.text
    return response.json()


def top(result: dict) -> dict:
    return result["predictions"][0]


def probabilities(result: dict) -> dict[int, float]:
    return {p["class_id"]: p["probability"] for p in result["predictions"]}


def test_single_image_response_shape(client, sign_png, sign_image):
    body = predict(client, ("sign.png", sign_png))
    default = client.get("/v1/models").json()["default"]
    assert body["model"] == default
    [result] = body["results"]
    assert result["filename"] == "sign.png"
    predictions = result["predictions"]
    assert len(predictions) == 5
    probs = [p["probability"] for p in predictions]
    assert probs == sorted(probs, reverse=True)
    assert all(0 <= p <= 1 for p in probs) and sum(probs) <= 1 + 1e-5
    for p in predictions:
        assert p["label"] == CLASS_NAMES[p["class_id"]]
    assert top(result)["class_id"] == sign_image[1]


@pytest.mark.parametrize("top_k", [1, 3, NUM_CLASSES])
def test_top_k(client, sign_png, top_k):
    [result] = predict(client, ("sign.png", sign_png), top_k=top_k)["results"]
    assert len(result["predictions"]) == top_k
    assert len({p["class_id"] for p in result["predictions"]}) == top_k
    if top_k == NUM_CLASSES:
        assert sum(p["probability"] for p in result["predictions"]) == pytest.approx(1, abs=1e-4)


def test_every_model_by_name(client, sign_png, classifier_names):
    for name in classifier_names:
        body = predict(client, ("sign.png", sign_png), model=name)
        assert body["model"] == name
        assert len(body["results"][0]["predictions"]) == 5


def test_batch_keeps_upload_order_and_matches_single_requests(client, gtsrb_test_samples):
    chosen = gtsrb_test_samples[1:9]
    items = []
    for i, (path, _) in enumerate(chosen):
        with Image.open(path) as image:
            items.append((f"{i:02d}-{path.rsplit('/', 1)[-1]}.png", encode(image.convert("RGB"), "PNG")))
    body = predict(client, *items, model="cnn")
    assert [r["filename"] for r in body["results"]] == [name for name, _ in items]
    for item, result in zip(items, body["results"]):
        [single] = predict(client, item, model="cnn")["results"]
        assert top(single)["class_id"] == top(result)["class_id"]
        assert top(single)["probability"] == pytest.approx(top(result)["probability"], abs=1e-4)


def test_lossless_formats_and_modes_give_identical_probabilities(client, sign_image):
    image = sign_image[0]
    rgba = image.copy()
    rgba.putalpha(255)
    variants = {
        "sign.png": encode(image, "PNG"),
        "sign.ppm": encode(image, "PPM"),
        "sign.bmp": encode(image, "BMP"),
        "sign.tiff": encode(image, "TIFF"),
        "sign.webp": encode(image, "WEBP", lossless=True),
        "sign-rgba.png": encode(rgba, "PNG"),
    }
    body = predict(client, *variants.items(), model="cnn", top_k=NUM_CLASSES)
    reference = probabilities(body["results"][0])
    for result in body["results"][1:]:
        got = probabilities(result)
        assert got.keys() == reference.keys()
        assert max(abs(got[c] - reference[c]) for c in got) < 1e-5, result["filename"]


def test_lossy_formats_and_other_modes_are_accepted(client, sign_image):
    image, label = sign_image
    variants = {
        "sign.jpg": encode(image, "JPEG", quality=95),
        "sign.gif": encode(image, "GIF"),
        "sign-gray.png": encode(image.convert("L"), "PNG"),
        "sign-palette.png": encode(image.convert("P"), "PNG"),
        "sign-cmyk.jpg": encode(image.convert("CMYK"), "JPEG", quality=95),
    }
    body = predict(client, *variants.items(), model="cnn")
    assert [r["filename"] for r in body["results"]] == list(variants)
    for result in body["results"]:
        assert len(result["predictions"]) == 5
    for result in body["results"][:2]:  # colour survives JPEG and GIF well enough to keep the answer
        assert top(result)["class_id"] == label, result


def test_exif_orientation_is_applied(client, sign_image):
    image = sign_image[0]
    stored = image.transpose(Image.Transpose.ROTATE_90)  # what a camera writes when held sideways...
    exif = Image.Exif()
    exif[0x0112] = 6  # ...with the Orientation tag that says "rotate 90° clockwise to display"
    body = predict(client, ("upright.png", encode(image, "PNG")), ("exif.png", encode(stored, "PNG", exif=exif)),
                   ("rotated.png", encode(stored, "PNG")), model="cnn", top_k=NUM_CLASSES)
    upright, with_exif, without_exif = (probabilities(r) for r in body["results"])
    assert max(abs(upright[c] - with_exif[c]) for c in upright) < 1e-5
    assert max(abs(upright[c] - without_exif[c]) for c in upright) > 1e-3  # the tag really mattered


def test_animated_gif_uses_first_frame(client, sign_image):
    image = sign_image[0]
    frames = [Image.new("RGB", image.size, colour) for colour in ("black", "white")]
    animated = encode(image, "GIF", save_all=True, append_images=frames, duration=100, loop=0)
    assert Image.open(io.BytesIO(animated)).n_frames == 3
    body = predict(client, ("still.gif", encode(image, "GIF")), ("animated.gif", animated), model="cnn",
                   top_k=NUM_CLASSES)
    still, first = (probabilities(r) for r in body["results"])
    assert max(abs(still[c] - first[c]) for c in still) < 1e-5


def test_large_photos_are_decoded_off_the_event_loop_and_classified(client, sign_image):
    """Phone-sized uploads take the thread-pool path (and JPEG's reduced-size decoding)."""
    image, _ = sign_image
    big = image.resize((2400, 2400), Image.Resampling.BICUBIC)
    body = predict(client, ("small.png", encode(image, "PNG")), ("big.jpg", encode(big, "JPEG", quality=90)),
                   ("big.png", encode(big, "PNG", compress_level=1)), model="cnn")
    small, big_jpeg, big_png = (top(r)["class_id"] for r in body["results"])
    assert small == big_jpeg == big_png


@pytest.mark.slow
def test_accuracy_over_http_matches_training_evaluate(server, client, gtsrb_test_samples):
    """Real GTSRB test images, uploaded as PNG and as JPEG, are classified as accurately as
    training.evaluate classifies the same images (within 0.5 points)."""
    from models.checkpoint import load_checkpoint
    from models.preprocessing import image_to_uint8, normalize
    from models.gtsrb import TensorSplit
    from training.evaluate import evaluate

    if not (server.checkpoint_dir / "cnn.pt").is_file():
        pytest.skip("no cnn checkpoint")
    loaded = load_checkpoint(server.checkpoint_dir / "cnn.pt")
    chosen = random.Random(0).sample(gtsrb_test_samples, 800)
    tensors, uploads = [], {"PNG": [], "JPEG": []}
    for path, _ in chosen:
        with Image.open(path) as image:
            tensors.append(image_to_uint8(image, loaded.preprocessing))
            rgb = image.convert("RGB")
        uploads["PNG"].append(encode(rgb, "PNG"))
        uploads["JPEG"].append(encode(rgb, "JPEG", quality=95))
    labels = torch.tensor([label for _, label in chosen])
    split = TensorSplit(torch.stack(tensors), labels)
    reference = evaluate(loaded.model, split, loaded.preprocessing, torch.device("cpu"))["accuracy"]
    with torch.inference_mode():
        reference_ids = loaded.model(normalize(split.images, loaded.preprocessing)).argmax(1)

    accuracy = {}
    for fmt, blobs in uploads.items():
        predicted = []
        for start in range(0, len(blobs), 64):
            batch = [(f"{start + i}.{fmt.lower()}", b) for i, b in enumerate(blobs[start:start + 64])]
            predicted += [top(r)["class_id"] for r in predict(client, *batch, model="cnn", top_k=1)["results"]]
        predicted = torch.tensor(predicted)
        accuracy[fmt] = (predicted == labels).float().mean().item()
        if fmt == "PNG":  # lossless: the same pixels, so the same answers, image by image
            assert (predicted == reference_ids).float().mean().item() >= 0.995
    print(f"evaluate {reference:.4f}, HTTP PNG {accuracy['PNG']:.4f}, HTTP JPEG {accuracy['JPEG']:.4f} "
          f"on {len(chosen)} GTSRB test images")
    for fmt, value in accuracy.items():
        assert abs(value - reference) <= 0.005, (fmt, value, reference)
