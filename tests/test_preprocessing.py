"""Training and serving see an image through the same preprocessing, bit for bit."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from app.imaging import open_image, to_input
from models.paths import default_data_root
from models.preprocessing import Preprocessing, image_to_uint8, normalize
from training.data import _decode, list_samples


@pytest.fixture(scope="module")
def real_test_images():
    return list_samples(default_data_root(), "test")[:40:4]


@pytest.mark.parametrize("size", [32, 48])
def test_training_cache_and_serving_produce_identical_inputs(real_test_images, size):
    pre = Preprocessing(input_size=size)
    for path, _ in real_test_images:
        trained_on = torch.from_numpy(_decode((path, pre)))
        with open(path, "rb") as f:
            raw = f.read()
        served = to_input(open_image(raw, "x.ppm", max_pixels=10**8), "x.ppm", pre)
        assert served.dtype == torch.uint8 and served.shape == (3, size, size)
        assert torch.equal(trained_on, served), path


def test_normalize_uses_the_stored_statistics():
    pre = Preprocessing(input_size=2, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    assert torch.allclose(normalize(x, pre), torch.full((1, 3, 2, 2), 2.0))


def test_preprocessing_survives_the_checkpoint_dict():
    pre = Preprocessing(input_size=48)
    assert Preprocessing.from_dict(pre.to_dict()) == pre


def test_modes_and_exif_orientation_are_normalised():
    pre = Preprocessing(input_size=8)
    rgb = Image.new("RGB", (16, 8), (200, 10, 10))
    rgb.paste((10, 10, 200), (8, 0, 16, 8))  # left red, right blue
    for mode in ("RGBA", "L", "P", "RGB"):
        out = image_to_uint8(rgb.convert(mode), pre)
        assert out.shape == (3, 8, 8)
    # EXIF orientation 3 (rotated 180°): the upright image has blue on the left.
    exif = Image.Exif()
    exif[0x0112] = 3
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    upright = image_to_uint8(Image.open(io.BytesIO(buf.getvalue())), pre).numpy().astype(int)
    assert upright[2, :, :2].mean() > upright[0, :, :2].mean()  # blue dominates on the left
    assert upright[0, :, -2:].mean() > upright[2, :, -2:].mean()  # red on the right


def test_checkpoints_from_before_equalisation_keep_their_preprocessing():
    old = {"input_size": 48, "mean": [0.3, 0.3, 0.3], "std": [0.2, 0.2, 0.2], "interpolation": "bilinear"}
    assert Preprocessing.from_dict(old).equalize is False
    assert Preprocessing().equalize is False


def test_equalisation_stretches_a_dark_image():
    dark = Image.fromarray(np.random.default_rng(0).integers(0, 40, (32, 32, 3), dtype=np.uint8))
    plain = image_to_uint8(dark, Preprocessing(input_size=32, equalize=False))
    equalized = image_to_uint8(dark, Preprocessing(input_size=32, equalize=True))
    assert int(plain.max()) < 40 and int(equalized.max()) > 200


@pytest.mark.parametrize("split,count", [("train", 25087), ("test", 4001)])
def test_samples_are_listed_exactly_as_torchvision_lists_them(split, count):
    """training.data reads the layout itself (importing torchvision costs a process seconds); the files,
    their order and class ids must be the reader's the data set is documented for."""
    from torchvision.datasets import GTSRB

    ours = list_samples(default_data_root(), split)
    theirs = [(str(path), int(label)) for path, label in GTSRB(root=default_data_root(), split=split)._samples]
    assert len(ours) == count and ours == theirs


def test_a_missing_data_root_names_the_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match="GTSRB_ROOT"):
        list_samples(str(tmp_path), "train")
