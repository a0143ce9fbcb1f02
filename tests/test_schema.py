import io
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from hlss_hf.data.schema import (
    COLUMNS,
    OPENSRH_CLASSES,
    REQUIRED_COLUMNS,
    check_features,
    decode_image,
    features_for,
    modality_of,
)


def test_features_for_srh_has_fixed_uint16_two_channel_image_and_all_columns():
    features = features_for("srh", OPENSRH_CLASSES, patch_size=300)
    assert list(features) == list(COLUMNS)
    assert isinstance(features["image"], datasets.Array3D)
    assert features["image"].shape == (300, 300, 2)
    assert features["image"].dtype == "uint16"
    assert features["label"].names == list(OPENSRH_CLASSES)
    assert features["x"].dtype == "int32" and features["mpp"].dtype == "float32"
    assert modality_of(features) == "srh"


def test_features_for_he_uses_png_image_feature():
    features = features_for("he", ["a", "b"], patch_size=(224, 256))
    assert isinstance(features["image"], datasets.Image)
    assert modality_of(features) == "he"
    check_features(features)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"modality": "ct", "class_names": ["a"]}, "modality"),
        ({"modality": "srh", "class_names": ["a"]}, "patch_size"),
        ({"modality": "he", "class_names": []}, "empty"),
        ({"modality": "he", "class_names": ["a", "a"]}, "duplicates"),
        ({"modality": "srh", "class_names": ["a"], "patch_size": 0}, "positive"),
    ],
)
def test_features_for_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        features_for(**kwargs)


def test_check_features_names_missing_columns():
    features = features_for("he", ["a"])
    del features["slide_id"]
    with pytest.raises(ValueError, match="slide_id"):
        check_features(features)
    assert "slide_id" in REQUIRED_COLUMNS


def test_modality_of_rejects_unknown_image_feature():
    with pytest.raises(ValueError, match="modality"):
        modality_of({"image": datasets.Value("string")})


def test_decode_image_srh_inputs_give_identical_uint16_channel_last():
    rng = np.random.default_rng(0)
    source = rng.integers(0, 65536, size=(5, 7, 2), dtype=np.uint16)
    for value in (
        source,
        source.tolist(),
        np.moveaxis(source, -1, 0),
        torch.from_numpy(source.astype(np.int32)),
    ):
        decoded = decode_image(value)
        assert decoded.dtype == np.uint16 and decoded.shape == (5, 7, 2)
        np.testing.assert_array_equal(decoded, source)


def test_decode_image_he_from_pil_bytes_dict_path_and_grey(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(6, 4, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    path = tmp_path / "patch.png"
    path.write_bytes(buffer.getvalue())
    for value in (
        Image.fromarray(rgb),
        Image.fromarray(rgb).convert("RGBA"),
        {"bytes": buffer.getvalue(), "path": None},
        {"bytes": None, "path": str(path)},
        buffer.getvalue(),
        rgb.tolist(),
    ):
        decoded = decode_image(value)
        assert decoded.dtype == np.uint8 and decoded.shape == (6, 4, 3)
        np.testing.assert_array_equal(decoded, rgb)
    grey = decode_image(rgb[..., 0])
    assert grey.shape == (6, 4, 3)
    np.testing.assert_array_equal(grey[..., 2], rgb[..., 0])


def test_decode_image_round_trips_through_a_dataset_with_each_modality():
    rng = np.random.default_rng(2)
    srh = rng.integers(0, 65536, size=(8, 8, 2), dtype=np.uint16)
    he = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    for modality, image in (("srh", srh), ("he", he)):
        features = features_for(modality, ["a"], patch_size=8)
        row = {
            "image": image,
            "patient_id": "p",
            "slide_id": "s",
            "patch_id": "x",
            "label": 0,
            "x": -1,
            "y": -1,
            "level": -1,
            "mpp": float("nan"),
            "magnification": float("nan"),
            "source": "t",
        }
        ds = datasets.Dataset.from_list([row], features=features)
        np.testing.assert_array_equal(decode_image(ds[0]["image"]), image)
        np.testing.assert_array_equal(decode_image(ds.with_format("numpy")[0]["image"]), image)


@pytest.mark.parametrize(
    "value, error",
    [
        ({"bytes": None, "path": None}, ValueError),
        ({"bytes": None, "path": "/nonexistent/patch.png"}, FileNotFoundError),
        (np.zeros((4, 4, 5), np.uint8), ValueError),
        (np.zeros((4,), np.uint8), ValueError),
        (3.5, TypeError),
    ],
)
def test_decode_image_rejects_undecodable_values(value, error):
    with pytest.raises(error):
        decode_image(value)
