"""Training and serving see an image through the same preprocessing, bit for bit."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.imaging import open_image, to_input
from models.paths import default_data_root
from models.preprocessing import Preprocessing, image_to_uint8, normalize
from models.gtsrb import _decode, list_samples


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


def test_samples_are_listed_exactly_as_torchvision_lists_them(tmp_path):
    """models.gtsrb reads the layout itself (importing torchvision costs a process seconds); on the
    official release's .ppm files its files, order and class ids must be torchvision's."""
    from torchvision.datasets import GTSRB

    train = tmp_path / "gtsrb" / "GTSRB" / "Training"
    for class_id, files in ((0, ["00000_00001", "00000_00000", "00001_00000"]), (1, ["00000_00000"]), (10, ["00002_00029"])):
        (train / f"{class_id:05d}").mkdir(parents=True)
        for name in files:
            (train / f"{class_id:05d}" / f"{name}.ppm").write_bytes(b"P6 1 1 255 \0\0\0")
    (tmp_path / "gtsrb" / "GTSRB" / "Final_Test" / "Images").mkdir(parents=True)
    (tmp_path / "gtsrb" / "GT-final_test.csv").write_text("Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"
                                                         "00001.ppm;1;1;0;0;0;0;7\n00000.ppm;1;1;0;0;0;0;3\n")
    for split in ("train", "test"):
        theirs = [(str(path), int(label)) for path, label in GTSRB(root=str(tmp_path), split=split)._samples]
        assert list_samples(str(tmp_path), split) == theirs and theirs


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_image_of_the_real_data_is_listed_with_its_csv_class(split):
    """JPEG, PNG and PPM alike: each image the CSV files name is listed once, with the CSV's class id."""
    import csv

    base = Path(default_data_root()) / "gtsrb"
    tables = sorted((base / "GTSRB" / "Training").glob("*/GT-*.csv")) if split == "train" else [base / "GT-final_test.csv"]
    expected = {}
    for table in tables:
        folder = table.parent if split == "train" else base / "GTSRB" / "Final_Test" / "Images"
        with open(table, newline="") as f:
            expected.update({str(folder / r["Filename"]): int(r["ClassId"])
                             for r in csv.DictReader(f, delimiter=";", skipinitialspace=True)})
    ours = list_samples(default_data_root(), split)
    assert len(ours) == len(expected) > 0 and dict(ours) == expected


def test_a_missing_data_root_names_the_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match="GTSRB_ROOT"):
        list_samples(str(tmp_path), "train")
