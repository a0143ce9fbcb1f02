"""The dataset schema shared by the converters, the data pipeline and evaluation: one row per patch (the columns:
docs/data.md, "The schema").

Example:

```python
>>> from hlss_hf.data.schema import features_for, decode_image
>>> features = features_for("srh", ["hgg", "lgg"], patch_size=300)
>>> features["image"]
Array3D(shape=(300, 300, 2), dtype='uint16')
```
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import datasets
import imagecodecs
import numpy as np
from PIL import Image

IMAGE = "image"
PATIENT_ID = "patient_id"
SLIDE_ID = "slide_id"
PATCH_ID = "patch_id"
LABEL = "label"
CAPTION = "caption"

#: Every column of a converted dataset, in order.
COLUMNS: tuple[str, ...] = (
    IMAGE,
    PATIENT_ID,
    SLIDE_ID,
    PATCH_ID,
    LABEL,
    "x",
    "y",
    "level",
    "mpp",
    "magnification",
    "source",
)
#: The columns the hierarchical sampler and the evaluation need; the provenance columns are optional.
REQUIRED_COLUMNS: tuple[str, ...] = (IMAGE, PATIENT_ID, SLIDE_ID, PATCH_ID, LABEL)

#: Class names of the OpenSRH release, in the order used for its ClassLabel.
OPENSRH_CLASSES: tuple[str, ...] = ("hgg", "lgg", "mening", "metast", "normal", "pituita", "schwan")

MODALITIES: tuple[str, ...] = ("he", "srh")
#: How H&E patches are stored: ``"png"`` (:class:`datasets.Image`) or ``"raw"`` (uint8 :class:`datasets.Array3D`).
IMAGE_FORMATS: tuple[str, ...] = ("png", "raw")
SRH_CHANNELS = 2
HE_CHANNELS = 3


def _patch_shape(patch_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(patch_size, int | np.integer):
        height = width = int(patch_size)
    else:
        height, width = (int(v) for v in patch_size)
    if height <= 0 or width <= 0:
        raise ValueError(f"patch_size must be positive, got {patch_size!r}")
    return height, width


def features_for(
    modality: str,
    class_names: Sequence[str],
    patch_size: int | Sequence[int] | None = None,
    image_format: str | None = None,
    caption: bool = False,
) -> datasets.Features:
    """Build the :class:`datasets.Features` of a patch dataset.

    Args:
        modality (`str`): ``"he"`` (8-bit RGB) or ``"srh"`` (2-channel uint16 arrays).
        class_names (`Sequence[str]`): class names, in label-index order; must be unique and non-empty.
        patch_size (`int` or `(height, width)`, *optional*): patch size in pixels. Required for ``"srh"`` and
            raw H&E because :class:`datasets.Array3D` has a fixed shape; ignored for PNG (it keeps its own size).
        image_format (`str`, *optional*): H&E storage, one of :data:`IMAGE_FORMATS`: ``"png"`` (the default;
            :class:`datasets.Image`) or ``"raw"`` (``Array3D(shape=(H, W, 3), dtype="uint8")``: the same pixels,
            read without decoding, ~3.3x the bytes). SRH is always raw; ``"png"`` is refused for it.
        caption (`bool`, defaults to `False`): add a string column :data:`CAPTION` last (text describing the patch).
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    if image_format is not None and image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    if modality == "srh" and image_format == "png":
        raise ValueError("image_format 'png' only applies to H&E; SRH patches are always raw uint16 arrays")
    names = [str(name) for name in class_names]
    if not names:
        raise ValueError("class_names is empty")
    if len(set(names)) != len(names):
        duplicates = sorted({name for name in names if names.count(name) > 1})
        raise ValueError(f"class_names has duplicates: {duplicates}")
    if modality == "srh":
        if patch_size is None:
            raise ValueError("patch_size is required for modality 'srh' (Array3D needs a fixed shape)")
        height, width = _patch_shape(patch_size)
        image_feature = datasets.Array3D(shape=(height, width, SRH_CHANNELS), dtype="uint16")
    elif image_format == "raw":
        if patch_size is None:
            raise ValueError("patch_size is required for raw H&E (Array3D needs a fixed shape)")
        height, width = _patch_shape(patch_size)
        image_feature = datasets.Array3D(shape=(height, width, HE_CHANNELS), dtype="uint8")
    else:
        image_feature = datasets.Image()
    features = datasets.Features(
        {
            IMAGE: image_feature,
            PATIENT_ID: datasets.Value("string"),
            SLIDE_ID: datasets.Value("string"),
            PATCH_ID: datasets.Value("string"),
            LABEL: datasets.ClassLabel(names=names),
            "x": datasets.Value("int32"),
            "y": datasets.Value("int32"),
            "level": datasets.Value("int32"),
            "mpp": datasets.Value("float32"),
            "magnification": datasets.Value("float32"),
            "source": datasets.Value("string"),
        }
    )
    if caption:
        features[CAPTION] = datasets.Value("string")
    return features


def modality_of(features: Mapping[str, Any]) -> str:
    """The modality of a patch dataset's ``features``: ``"he"`` for a :class:`datasets.Image` or a 3-channel array
    ``image`` (raw H&E), ``"srh"`` for a 2-channel array."""
    if IMAGE not in features:
        raise ValueError(f"features have no {IMAGE!r} column: {list(features)}")
    feature = features[IMAGE]
    if isinstance(feature, datasets.Image):
        return "he"
    shape = getattr(feature, "shape", None)
    if shape is not None and len(shape) == 3 and shape[-1] == SRH_CHANNELS:
        return "srh"
    if shape is not None and len(shape) == 3 and shape[-1] == HE_CHANNELS:
        return "he"
    raise ValueError(f"cannot tell the modality of image feature {feature!r}")


def check_features(features: Mapping[str, Any]) -> None:
    """Raise a ``ValueError`` naming the missing columns when ``features`` lacks a required column."""
    missing = [name for name in REQUIRED_COLUMNS if name not in features]
    if missing:
        raise ValueError(f"dataset is missing required columns {missing}; it has {list(features)}")
    if not isinstance(features[LABEL], datasets.ClassLabel):
        raise ValueError(f"column {LABEL!r} must be a ClassLabel, got {features[LABEL]!r}")
    modality_of(features)


def _from_pil(image: Image.Image, strict: bool = False) -> np.ndarray:
    if strict and image.mode != "RGB":
        raise ValueError(f"image mode {image.mode}, expected RGB (8-bit)")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


def _to_channel_last(array: np.ndarray) -> np.ndarray:
    # SRH arrays may arrive channel-first (2, H, W), as tifffile reads some OpenSRH patches.
    if (
        array.ndim == 3
        and array.shape[0] in (SRH_CHANNELS, HE_CHANNELS)
        and array.shape[-1] not in (SRH_CHANNELS, HE_CHANNELS)
    ):
        array = np.moveaxis(array, 0, -1)
    return array


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _decode_rgb8(data: bytes) -> np.ndarray | None:
    """``(H, W, 3)`` uint8 pixels of an 8-bit RGB PNG or a 3-component JPEG by imagecodecs (libpng /
    libjpeg-turbo: the same pixels as PIL, about twice as fast, see benchmarks/README.md), or ``None`` for anything
    else (grey, palette, alpha, 16-bit, CMYK, other formats), which PIL's conversions then handle."""
    try:
        if data[:8] == _PNG_SIGNATURE:
            # IHDR: bit depth at byte 24, colour type at byte 25 (2 = RGB, no palette, no alpha).
            if len(data) < 26 or data[24] != 8 or data[25] != 2:
                return None
            image = imagecodecs.png_decode(data)
        elif data[:2] == b"\xff\xd8":
            image = imagecodecs.jpeg8_decode(data)
        else:
            return None
    except Exception:  # noqa: BLE001 - a codec error: PIL decodes it or raises its own clear error
        return None
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        return None
    return image


def decode_image(value: Any, strict: bool = False) -> np.ndarray:
    """Decode one stored ``image`` value to ``(H, W, 3)`` uint8 (H&E) or ``(H, W, 2)`` uint16 (SRH).

    ``value``: a PIL image, a numpy array (or anything with ``__array__``, e.g. a torch tensor), nested lists (an
    ``Array3D`` read without formatting), encoded bytes (:func:`_decode_rgb8`, else PIL), or a ``{"bytes": ...,
    "path": ...}`` dict as stored by :class:`datasets.Image`. With ``strict`` an encoded image that is not 8-bit
    RGB (grey, RGBA, 16-bit) is an error instead of being converted (what training reads must be what the
    converters write).
    """
    if isinstance(value, Mapping):
        data, path = value.get("bytes"), value.get("path")
        if data is not None:
            value = data
        elif path:
            if not os.path.exists(path):
                raise FileNotFoundError(f"image path {path!r} does not exist")
            with open(path, "rb") as file:
                value = file.read()
        else:
            raise ValueError("image dict has neither 'bytes' nor 'path'")
    if isinstance(value, bytes | bytearray | memoryview):
        value = bytes(value)
        fast = _decode_rgb8(value)
        if fast is not None:
            return fast
        with Image.open(io.BytesIO(value)) as image:
            return _from_pil(image, strict)
    if isinstance(value, Image.Image):
        return _from_pil(value, strict)
    if isinstance(value, list | tuple):
        array = np.asarray(value)
    elif hasattr(value, "__array__"):
        array = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value)
    else:
        raise TypeError(f"cannot decode an image from {type(value).__name__}")
    if array.ndim == 2:
        # A grey patch: replicate to RGB so callers always get three channels for H&E.
        array = np.repeat(array[..., None], HE_CHANNELS, axis=-1)
    if array.ndim != 3:
        raise ValueError(f"expected an image of shape (H, W, C), got {array.shape}")
    array = _to_channel_last(array)
    channels = array.shape[-1]
    if channels == SRH_CHANNELS:
        return array.astype(np.uint16, copy=False)
    if channels == HE_CHANNELS:
        return array.astype(np.uint8, copy=False)
    if channels == 4:
        return array[..., :HE_CHANNELS].astype(np.uint8, copy=False)
    raise ValueError(f"expected 2 (SRH) or 3 (H&E) channels, got shape {array.shape}")
