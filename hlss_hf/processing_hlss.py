"""Pixel conversion and processors for HLSS (stimulated Raman histology and H&E).

This file is also shipped as transformers remote code, so it imports only torch, numpy, PIL and transformers.

SRH (docs/method.md, preprocessing): OpenSRH patches are 2-channel uint16 ``[CH2, CH3]``. They are scaled by
``1/65536``, a third
channel ``CH3 - CH2 + 5000/65536`` is formed, and the image is stacked as ``[CH3 - CH2 + base, CH2, CH3]`` and
clamped to ``[0, 1]``. H&E patches are 8-bit RGB scaled by ``1/255``.

No ``from __future__ import annotations`` here: transformers reads the kwargs TypedDicts' annotations at run time
(`HLSSProcessorKwargs.images_kwargs` must be the class, not a string).
"""

import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ImagesKwargs, ProcessingKwargs, ProcessorMixin

SRH_SCALE = 65536.0
SRH_OFFSET = 5000.0  # in raw counts: the base 5000/65536 after scaling (docs/method.md, preprocessing)
SRH_BASE = SRH_OFFSET / SRH_SCALE
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODALITIES = ("he", "srh")
RESAMPLES = ("bilinear", "bicubic")

__all__ = ["srh_to_float", "he_to_float", "HLSSImageProcessor", "HLSSProcessor", "HLSSProcessorKwargs"]


def srh_to_float(image) -> torch.Tensor:
    """Convert raw 2-channel uint16 SRH pixels to a 3-channel float image (docs/method.md, preprocessing).

    Args:
        image (`np.ndarray` or `torch.Tensor`): uint16 pixels with channels ``[CH2, CH3]``, shaped ``(H, W, 2)``
            or ``(2, H, W)``, or a batch ``(N, H, W, 2)`` / ``(N, 2, H, W)``. A torch tensor may also be
            int32/int64 holding uint16 values (torch has no full uint16 support).

    Returns:
        `torch.FloatTensor`: ``[3, H, W]`` (or ``[N, 3, H, W]``) float32 in ``[0, 1]``, channels
        ``[CH3 - CH2 + 5000/65536, CH2, CH3]`` after scaling by ``1/65536``.

    Raises:
        ValueError: for a non-uint16 dtype, a rank other than 3 or 4, or a channel count other than 2.
    """
    if isinstance(image, Image.Image):
        raise ValueError("SRH image: got a PIL image; SRH needs a 2-channel uint16 array [CH2, CH3]")
    if not isinstance(image, (np.ndarray, torch.Tensor)):
        raise ValueError(f"SRH image: expected a numpy array or torch tensor, got {type(image).__name__}")
    shape = tuple(image.shape)
    if len(shape) not in (3, 4):
        raise ValueError(
            f"SRH image: expected rank 3 (H, W, 2) / (2, H, W) or rank 4 (N, ...), got shape {shape}"
        )
    first, last = (0, 2) if len(shape) == 3 else (1, 3)
    # Channels-last (the dataset layout) wins when both ends have size 2.
    if shape[last] == 2:
        axis = last
    elif shape[first] == 2:
        axis = first
    elif 3 in (shape[first], shape[last]):
        raise ValueError(f"SRH image: got 3 channels; SRH needs 2: [CH2, CH3] (shape {shape})")
    else:
        raise ValueError(f"SRH image: expected 2 channels [CH2, CH3] first or last, got shape {shape}")
    # One pass per output channel, written straight into the result (no float copy of the input, no stack):
    # channels 1, 2 = CH2, CH3 cast to float32 (exact for uint16), channel 0 = CH3 - CH2 + 5000 from those.
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint16:
            raise ValueError(f"SRH image: expected dtype uint16, got {image.dtype}")
        source = np.moveaxis(image, axis, first)  # a view; numpy casts read-only (memory-mapped) input too
        out = np.empty(source.shape[:first] + (3,) + source.shape[first + 1 :], dtype=np.float32)
        np.copyto(out[(slice(None),) * first + (slice(1, 3),)], source, casting="unsafe")
        result = torch.from_numpy(out)
    else:
        if image.dtype not in (torch.uint16, torch.int32, torch.int64):
            raise ValueError(
                f"SRH image: expected dtype uint16 (or int32/int64 holding uint16), got {image.dtype}"
            )
        tensor = image.detach().cpu().to(torch.int64)
        if tensor.numel() and (tensor.min() < 0 or tensor.max() > 65535):
            raise ValueError(
                f"SRH image: integer values must lie in [0, 65535], found min {int(tensor.min())} "
                f"and max {int(tensor.max())}"
            )
        source = tensor.movedim(axis, first)
        shape = source.shape[:first] + (3,) + source.shape[first + 1 :]
        result = torch.empty(shape, dtype=torch.float32)
        result.narrow(first, 1, 2).copy_(source)
    ch0, ch2, ch3 = (result.select(first, c) for c in range(3))
    # (CH3 - CH2 + 5000) / 65536 == CH3/65536 - CH2/65536 + 5000/65536, computed on integers held exactly in
    # float32 and scaled by a power of two, so every output value is exact.
    torch.sub(ch3, ch2, out=ch0).add_(SRH_OFFSET)
    result.mul_(1.0 / SRH_SCALE)
    # CH2 and CH3 lie in [0, 65535/65536] already; only the difference channel can leave [0, 1].
    ch0.clamp_(0.0, 1.0)
    return result


def _pil_to_array(image: Image.Image) -> np.ndarray:
    # Grayscale, palette and RGBA images become RGB so every H&E image has 3 channels.
    if image.mode != "RGB":
        image = image.convert("RGB")
    # np.array copies: torch.from_numpy warns on the read-only buffer np.asarray shares with PIL.
    return np.array(image)


def he_to_float(image) -> torch.Tensor:
    """Convert an 8-bit RGB H&E image to a float image in ``[0, 1]`` (scaled by ``1/255``).

    Args:
        image (`PIL.Image.Image`, `np.ndarray` or `torch.Tensor`): a PIL image (any mode; converted to RGB),
            or an array / tensor shaped ``(H, W, 3)`` / ``(3, H, W)`` or a batch ``(N, H, W, 3)`` /
            ``(N, 3, H, W)``. uint8 values are divided by 255; float values must already lie in ``[0, 1]``.

    Returns:
        `torch.FloatTensor`: ``[3, H, W]`` (or ``[N, 3, H, W]``) float32 in ``[0, 1]``.

    Raises:
        ValueError: for a wrong rank, a channel count other than 3, an unsupported dtype, or float values
            outside ``[0, 1]``.
    """
    if isinstance(image, Image.Image):
        image = _pil_to_array(image)
    if isinstance(image, np.ndarray):
        # Read-only arrays (e.g. sharing a decoded image's buffer) are copied: torch needs writable memory.
        tensor = torch.from_numpy(np.ascontiguousarray(image) if image.flags.writeable else np.array(image))
    elif isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
    else:
        raise ValueError(
            f"H&E image: expected a PIL image, numpy array or torch tensor, got {type(image).__name__}"
        )
    if tensor.ndim not in (3, 4):
        raise ValueError(
            f"H&E image: expected rank 3 (H, W, 3) / (3, H, W) or rank 4 (N, ...), got shape {tuple(tensor.shape)}"
        )
    shape = tuple(tensor.shape)
    first, last = (0, 2) if tensor.ndim == 3 else (1, 3)
    if shape[last] == 3:
        tensor = tensor.movedim(last, first)
    elif shape[first] != 3:
        raise ValueError(f"H&E image: expected 3 RGB channels first or last, got shape {shape}")
    if tensor.dtype == torch.uint8:
        return (tensor.to(torch.float32) / 255.0).contiguous()
    if tensor.is_floating_point():
        tensor = tensor.to(torch.float32)
        if tensor.numel():
            low, high = float(tensor.min()), float(tensor.max())
            if not (0.0 <= low and high <= 1.0):
                raise ValueError(
                    f"H&E image: float pixels must lie in [0, 1], found min {low:.6g} and max {high:.6g}; "
                    "pass uint8 pixels or scale to [0, 1] first"
                )
        return tensor.contiguous()
    raise ValueError(f"H&E image: expected dtype uint8 or float in [0, 1], got {tensor.dtype}")


class HLSSImageProcessorKwargs(ImagesKwargs, total=False):
    """`ImagesKwargs` plus HLSS's own settings, so `from_pretrained(..., modality=...)` overrides them and
    `HLSSProcessor` routes them to the image processor."""

    modality: str | None
    antialias: bool | None
    resize_uint8: bool | None


def _size_dict(size, name: str, allow_shortest_edge: bool) -> dict[str, int]:
    """Normalise an int / (h, w) / dict size into ``{"shortest_edge": s}`` or ``{"height": h, "width": w}``."""
    if isinstance(size, bool):
        raise ValueError(f"{name}: expected an int, (height, width) or a dict, got {size!r}")
    if isinstance(size, int):
        size = {"shortest_edge": size} if allow_shortest_edge else {"height": size, "width": size}
    elif isinstance(size, Sequence) and not isinstance(size, str) and len(size) == 2:
        size = {"height": size[0], "width": size[1]}
    if not isinstance(size, dict):
        raise ValueError(f"{name}: expected an int, (height, width) or a dict, got {size!r}")
    size = dict(size)
    keys = set(size)
    if allow_shortest_edge and keys == {"shortest_edge"}:
        pass
    elif keys != {"height", "width"}:
        allowed = '{"shortest_edge"} or {"height", "width"}' if allow_shortest_edge else '{"height", "width"}'
        raise ValueError(f"{name}: keys must be {allowed}, got {sorted(keys)}")
    for key, value in size.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}[{key!r}] must be a positive int, got {value!r}")
    return size


def _resize_size(size, default_to_square: bool) -> dict[str, int]:
    """The resize target: an int is the shortest edge, or with `default_to_square` a square (transformers' rule)."""
    if default_to_square and isinstance(size, int) and not isinstance(size, bool):
        size = {"height": size, "width": size}
    return _size_dict(size, "size", allow_shortest_edge=True)


def _resample_name(value) -> str:
    """``"bilinear"`` / ``"bicubic"`` from that name or a PIL resampling filter (transformers' `resample` type)."""
    if isinstance(value, str):
        return value.lower()
    pil = {int(Image.Resampling.BILINEAR): "bilinear", int(Image.Resampling.BICUBIC): "bicubic"}
    try:
        return pil[int(value)]
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            f"resample must be one of {RESAMPLES} (or PIL's BILINEAR / BICUBIC), got {value!r}"
        ) from None


def _channel_stats(values, name: str) -> list[float]:
    """A scalar (broadcast to 3 channels) or a list of per-channel statistics as a list of floats.

    Any number of channels is accepted here (an image kept with 4 channels by ``do_convert_rgb=False`` needs 4);
    `normalize` checks the count against the images.
    """
    if isinstance(values, (int, float)):
        values = [float(values)] * 3
    values = [float(v) for v in values]
    if not values:
        raise ValueError(f"{name}: expected one value per channel, got none")
    return values


def _rescale_factor(value, name: str = "rescale_factor") -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value == 0:
        raise ValueError(
            f"{name} must be a finite non-zero number (or None for the modality's scale), got {value!r}"
        )
    return float(value)


def _format_name(value, name: str) -> str | None:
    """``"channels_first"`` / ``"channels_last"`` from that string or transformers' `ChannelDimension`."""
    if value is None:
        return None
    value = str(getattr(value, "value", value))
    if value not in ("channels_first", "channels_last"):
        raise ValueError(f"{name} must be 'channels_first' or 'channels_last', got {value!r}")
    return value


# H&E channel counts an image may arrive with: grey, RGB, RGBA (RGB first when an axis of size 3 is present).
_HE_CHANNELS = (3, 1, 4)


def _he_channel_axis(shape: tuple, input_data_format: str | None) -> int:
    """The channel axis of an H&E image ``(H, W, C)`` / ``(C, H, W)`` (or a batch with a leading N)."""
    first, last = len(shape) - 3, len(shape) - 1
    if input_data_format == "channels_last":
        return last
    if input_data_format == "channels_first":
        return first
    for channels in _HE_CHANNELS:
        if shape[last] == channels:
            return last
        if shape[first] == channels:
            return first
    raise ValueError(f"H&E image: expected 1, 3 or 4 channels first or last, got shape {shape}")


def _he_pixels(image, do_convert_rgb: bool, input_data_format: str | None) -> torch.Tensor:
    """An H&E image as an unscaled tensor ``[C, H, W]`` (or ``[N, C, H, W]``), dtype as given.

    With `do_convert_rgb` every image becomes RGB as PIL converts it (grey repeated, alpha dropped); without it the
    channels are kept as they are (PIL images keep their mode's bands).
    """
    if isinstance(image, Image.Image):
        if do_convert_rgb and image.mode != "RGB":
            image = image.convert("RGB")
        image = np.array(image)  # copies: torch warns on the read-only buffer np.asarray shares with PIL
        input_data_format = "channels_last"
    if isinstance(image, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(image) if image.flags.writeable else np.array(image))
    elif isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
    else:
        raise ValueError(
            f"H&E image: expected a PIL image, numpy array or torch tensor, got {type(image).__name__}"
        )
    if tensor.ndim == 2:  # one grey image (H, W)
        tensor, input_data_format = tensor.unsqueeze(-1), "channels_last"
    if tensor.ndim not in (3, 4):
        raise ValueError(
            f"H&E image: expected rank 2 (H, W), 3 (H, W, C) / (C, H, W) or 4 (N, ...), got shape {tuple(tensor.shape)}"
        )
    tensor = tensor.movedim(_he_channel_axis(tuple(tensor.shape), input_data_format), tensor.ndim - 3)
    channels = tensor.shape[-3]
    if do_convert_rgb:
        if channels == 1:
            tensor = tensor.expand(*tensor.shape[:-3], 3, *tensor.shape[-2:])
        elif channels == 4:
            tensor = tensor.narrow(-3, 0, 3)
        elif channels != 3:
            raise ValueError(
                f"H&E image: cannot convert {channels} channels to RGB (shape {tuple(image.shape)})"
            )
    return tensor


def _he_to_float(tensor: torch.Tensor, do_rescale: bool, rescale_factor: float | None) -> torch.Tensor:
    """Scale unscaled H&E pixels to float32: uint8 by `rescale_factor` (1/255 by default); floats are taken as
    already scaled (and must lie in [0, 1]) unless `do_rescale` is False, which keeps every value as it is."""
    if tensor.dtype == torch.uint8:
        pixels = tensor.to(torch.float32)
        if do_rescale:
            # Division by 255 (not a multiplication by its rounded inverse): `he_to_float`'s values, bit for bit.
            pixels = pixels / 255.0 if rescale_factor in (None, 1 / 255) else pixels * rescale_factor
        return pixels.contiguous()
    if tensor.is_floating_point():
        pixels = tensor.to(torch.float32)
        if do_rescale and pixels.numel():
            low, high = float(pixels.min()), float(pixels.max())
            if not (0.0 <= low and high <= 1.0):
                raise ValueError(
                    f"H&E image: float pixels must lie in [0, 1], found min {low:.6g} and max {high:.6g}; "
                    "pass uint8 pixels, scale to [0, 1] first, or set do_rescale=False"
                )
        return pixels.contiguous()
    raise ValueError(f"H&E image: expected dtype uint8 or float in [0, 1], got {tensor.dtype}")


def _srh_rescale_(pixels: torch.Tensor, do_rescale: bool, rescale_factor: float | None) -> torch.Tensor:
    """Re-scale `srh_to_float`'s pixels (scaled by ``1/65536``: docs/method.md, preprocessing) to another
    scale, in place.

    ``do_rescale=False`` gives raw counts ``[CH3 - CH2 + 5000, CH2, CH3]`` (the first clamped to [0, 65536]); a
    `rescale_factor` gives counts times it. Both are exact multiples of the default's values.
    """
    if not do_rescale:
        return pixels.mul_(SRH_SCALE)
    if rescale_factor is not None and rescale_factor != 1.0 / SRH_SCALE:
        pixels.mul_(SRH_SCALE * rescale_factor)
    return pixels


class HLSSImageProcessor(BaseImageProcessor):
    r"""Image processor for HLSS: SRH (2-channel uint16) or H&E (8-bit RGB) patches to ``pixel_values``.

    Pixels are first converted to float in ``[0, 1]`` (`srh_to_float` / `he_to_float`), then optionally resized
    (on the float tensor, bilinear or bicubic, antialiased by default), center-cropped and normalised. Resizing is
    off by default because resizing changes the microns per pixel the encoder was trained at.

    Every argument `transformers.ImagesKwargs` declares is accepted at call time (and through `HLSSProcessor`):
    besides the settings below, `input_data_format` names the channel axis of ambiguous arrays, `data_format`
    ``"channels_last"`` returns ``[N, h, w, C]``, `device` moves the result, and `default_to_square` makes an int
    `size` a square. HLSS batches need no padding or grouping: `do_pad=True` is refused, `pad_size`,
    `disable_grouping` and `image_seq_length` (an image-token count) have nothing to act on.

    Framings: the default keeps the native resolution and centre-crops `crop_size` (a 300 px patch loses 44 % of
    its area at 224). The HLSS reference instead resizes the whole patch to 224 x 224, bicubic, no crop
    (``do_resize=True, size={"height": 224, "width": 224}, resample="bicubic", antialias=False,
    do_center_crop=False``: its `torchvision.transforms.Resize` on float tensors, not clamped, and not antialiased
    in the torchvision 0.16.2 it pins; antialiasing became the default for tensors in 0.17).

    Args:
        modality (`str`, *optional*, defaults to `"he"`): `"he"` for 8-bit RGB H&E, `"srh"` for 2-channel uint16
            stimulated Raman histology ``[CH2, CH3]``.
        do_resize (`bool`, *optional*, defaults to `False`): resize before cropping.
        size (`int` or `dict`, *optional*, defaults to `{"shortest_edge": 224}`): resize target; an int (or
            `{"shortest_edge": s}`) resizes the shorter side to `s` keeping the aspect ratio,
            `{"height": h, "width": w}` resizes to exactly that.
        resample (`str`, *optional*, defaults to `"bilinear"`): `"bilinear"` or `"bicubic"` resizing (PIL's
            `Resampling.BILINEAR` / `BICUBIC` are accepted too)
            (`torch.nn.functional.interpolate`; bicubic values may leave ``[0, 1]`` slightly and are not clamped,
            as in torchvision).
        antialias (`bool`, *optional*, defaults to `True`): antialias when downscaling (torchvision >= 0.17's
            default for tensors, close to PIL's filters; torchvision < 0.17 resized tensors without it).
        resize_uint8 (`bool`, *optional*, defaults to `False`): resize 8-bit H&E pixels (uint8 arrays, RGB PIL
            images) before the float conversion, with torch's uint8 kernels (several times faster than the float
            resize). Approximate: the result is rounded to 8 bits, within about 1.5/255 of the float resize, and
            bicubic overshoot beyond ``[0, 1]`` is clipped. Ignored for SRH (resized as float, after its channel
            arithmetic) and other inputs.
        do_center_crop (`bool`, *optional*, defaults to `True`): center-crop to `crop_size`.
        crop_size (`int` or `dict`, *optional*, defaults to 224): crop size, an int or `{"height", "width"}`.
        do_normalize (`bool`, *optional*, defaults to `False`): subtract `image_mean` and divide by `image_std`.
        image_mean (`float` or `list[float]`, *optional*, defaults to the ImageNet mean): per-channel mean.
        image_std (`float` or `list[float]`, *optional*, defaults to the ImageNet std): per-channel std.
        do_rescale (`bool`, *optional*, defaults to `True`): scale integer pixels to ``[0, 1]``: H&E uint8 by
            `rescale_factor`, SRH by ``1/65536`` (docs/method.md, preprocessing; or `rescale_factor`). False
            keeps pixel values as
            they are (0-255 for H&E, raw counts for SRH) and accepts float pixels outside ``[0, 1]``. Float pixels
            are taken as already scaled either way.
        rescale_factor (`float`, *optional*): the scale of integer pixels; defaults to the modality's (``1/255`` for
            8-bit H&E, ``1/65536`` for SRH).
        do_convert_rgb (`bool`, *optional*, defaults to `True`): convert H&E images to RGB as PIL does (grey
            repeated, alpha dropped), so 1- and 4-channel images are accepted; False keeps their channels (then
            `image_mean` / `image_std` need one value per channel). SRH always gives its 3 channels.
        default_to_square (`bool`, *optional*, defaults to `False`): an int `size` means a square
            ``{"height": s, "width": s}`` rather than the shortest edge.

    Example:

    ```python
    >>> import numpy as np
    >>> from hlss_hf.processing_hlss import HLSSImageProcessor
    >>> processor = HLSSImageProcessor(modality="srh", crop_size=224)
    >>> patch = np.random.randint(0, 65535, (300, 300, 2), dtype=np.uint16)
    >>> processor(patch, return_tensors="pt")["pixel_values"].shape
    torch.Size([1, 3, 224, 224])
    ```
    """

    valid_kwargs = HLSSImageProcessorKwargs
    model_input_names = ["pixel_values"]
    # Class-level defaults of the settings `BaseImageProcessor` also declares (transformers reads them on the class).
    do_rescale = True
    rescale_factor = None
    do_convert_rgb = True
    default_to_square = False

    def __init__(
        self,
        modality: str = "he",
        do_resize: bool = False,
        size: int | dict[str, int] | None = None,
        do_center_crop: bool = True,
        crop_size: int | dict[str, int] | None = 224,
        do_normalize: bool = False,
        image_mean: float | list[float] | None = None,
        image_std: float | list[float] | None = None,
        resample: str = "bilinear",
        antialias: bool = True,
        resize_uint8: bool = False,
        do_rescale: bool = True,
        rescale_factor: float | None = None,
        do_convert_rgb: bool = True,
        default_to_square: bool = False,
        **kwargs,
    ):
        # Keys written by transformers (image_processor_type, auto_map, ...) go to the mixin, which stores them.
        kwargs.pop("image_processor_type", None)
        super().__init__(**kwargs)
        self.modality = modality
        self.do_resize = bool(do_resize)
        self.default_to_square = bool(default_to_square)
        self.size = _resize_size(224 if size is None else size, self.default_to_square)
        self.do_center_crop = bool(do_center_crop)
        self.crop_size = _size_dict(
            224 if crop_size is None else crop_size, "crop_size", allow_shortest_edge=False
        )
        self.do_normalize = bool(do_normalize)
        self.image_mean = _channel_stats(IMAGENET_MEAN if image_mean is None else image_mean, "image_mean")
        self.image_std = _channel_stats(IMAGENET_STD if image_std is None else image_std, "image_std")
        self.resample = _resample_name(resample)
        self.antialias = bool(antialias)
        self.resize_uint8 = bool(resize_uint8)
        self.do_rescale = bool(do_rescale)
        self.rescale_factor = _rescale_factor(rescale_factor)
        self.do_convert_rgb = bool(do_convert_rgb)
        self._validate(self.modality, self.image_std, self.resample)

    @staticmethod
    def _validate(modality, image_std, resample="bilinear") -> None:
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        if any(s <= 0 for s in image_std):
            raise ValueError(f"image_std must be positive, got {image_std}")
        if resample not in RESAMPLES:
            raise ValueError(f"resample must be one of {RESAMPLES}, got {resample!r}")

    # -- input handling ---------------------------------------------------------------------------------------
    def _to_float(
        self,
        image,
        modality: str,
        index: int,
        do_rescale: bool = True,
        rescale_factor: float | None = None,
        do_convert_rgb: bool = True,
        input_data_format: str | None = None,
    ) -> torch.Tensor:
        """Convert one image (or one stacked batch) to float ``[C, H, W]`` / ``[N, C, H, W]``."""
        if isinstance(image, (str, os.PathLike)):
            if modality == "srh":
                raise ValueError(
                    f"image {index}: SRH images must be given as uint16 arrays [CH2, CH3], not a path ({image})"
                )
            with Image.open(image) as opened:
                image = opened.convert("RGB") if do_convert_rgb else opened.copy()
        try:
            if modality == "srh":
                if input_data_format == "channels_first" and getattr(image, "ndim", 0) in (3, 4):
                    # srh_to_float prefers a channels-last reading where both ends have size 2.
                    image = (
                        np.moveaxis(image, -3, -1) if isinstance(image, np.ndarray) else image.movedim(-3, -1)
                    )
                return _srh_rescale_(srh_to_float(image), do_rescale, rescale_factor)
            return _he_to_float(
                _he_pixels(image, do_convert_rgb, input_data_format), do_rescale, rescale_factor
            )
        except ValueError as err:
            hint = ""
            shape = getattr(image, "shape", None)
            if modality == "he" and shape is not None and 2 in (shape[0], shape[-1]):
                hint = " (a 2-channel image looks like SRH: use modality='srh')"
            raise ValueError(f"image {index}: {err}{hint}") from err

    def _flatten(self, images) -> list:
        """A single image or a list of images -> list of images; rank-4 arrays stay whole (a stacked batch)."""
        if isinstance(images, (list, tuple)):
            if len(images) == 0:
                raise ValueError("images: got an empty list")
            if any(isinstance(image, (list, tuple)) for image in images):
                raise ValueError(
                    "images: nested lists are not supported; pass arrays (e.g. np.asarray(row['image'])) "
                    "or PIL images"
                )
            return list(images)
        return [images]

    # -- transforms on float tensors [N, 3, H, W] ---------------------------------------------------------------
    @staticmethod
    def resize(
        pixels: torch.Tensor, size: dict[str, int], resample: str = "bilinear", antialias: bool = True
    ) -> torch.Tensor:
        """Resize float images ``[N, 3, H, W]`` (``F.interpolate``, ``align_corners=False``).

        Args:
            pixels (`torch.Tensor`): float images ``[N, 3, H, W]``.
            size (`dict`): `{"shortest_edge": s}` or `{"height": h, "width": w}`.
            resample (`str`, defaults to `"bilinear"`): `"bilinear"` or `"bicubic"`.
            antialias (`bool`, defaults to `True`): antialias when downscaling.
        """
        height, width = pixels.shape[-2:]
        if "shortest_edge" in size:
            short, long = (height, width) if height <= width else (width, height)
            new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
            target = (new_short, new_long) if height <= width else (new_long, new_short)
        else:
            target = (size["height"], size["width"])
        if tuple(target) == (height, width):
            return pixels
        return F.interpolate(pixels, size=target, mode=resample, antialias=antialias, align_corners=False)

    @staticmethod
    def center_crop(pixels: torch.Tensor, size: dict[str, int]) -> torch.Tensor:
        """Crop the center ``size["height"] x size["width"]`` of ``[N, 3, H, W]`` images.

        Args:
            pixels (`torch.Tensor`): float images ``[N, 3, H, W]``.
            size (`dict`): `{"height": h, "width": w}`, no larger than the images.
        """
        height, width = pixels.shape[-2:]
        crop_h, crop_w = size["height"], size["width"]
        if crop_h > height or crop_w > width:
            raise ValueError(
                f"crop_size {crop_h}x{crop_w} is larger than the image {height}x{width}; "
                "set do_resize=True with a larger size, or a smaller crop_size"
            )
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        return pixels[..., top : top + crop_h, left : left + crop_w]

    @staticmethod
    def normalize(pixels: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
        """Per-channel ``(x - mean) / std`` of ``[N, C, H, W]`` images (one mean and std per channel)."""
        mean_t, std_t = _stats_tensors(mean, std, pixels)
        return (pixels - mean_t) / std_t

    def __call__(self, images, return_tensors="pt", **kwargs) -> BatchFeature:
        """Preprocess an image or a batch of images; see `preprocess`."""
        return self.preprocess(images, return_tensors=return_tensors, **kwargs)

    def preprocess(
        self,
        images,
        return_tensors="pt",
        modality: str | None = None,
        do_resize: bool | None = None,
        size: int | dict[str, int] | None = None,
        do_center_crop: bool | None = None,
        crop_size: int | dict[str, int] | None = None,
        do_normalize: bool | None = None,
        image_mean: float | list[float] | None = None,
        image_std: float | list[float] | None = None,
        resample: str | None = None,
        antialias: bool | None = None,
        resize_uint8: bool | None = None,
        do_rescale: bool | None = None,
        rescale_factor: float | None = None,
        do_convert_rgb: bool | None = None,
        default_to_square: bool | None = None,
        input_data_format: str | None = None,
        data_format: str | None = None,
        device: str | torch.device | None = None,
        do_pad: bool | None = None,
        pad_size=None,
        disable_grouping: bool | None = None,
        image_seq_length: int | None = None,
        **kwargs,
    ) -> BatchFeature:
        """Preprocess an image or a batch of images into ``pixel_values``.

        Args:
            images: one image or a list of images: PIL images or file paths (H&E), numpy arrays / torch tensors
                ``(H, W, C)`` or ``(C, H, W)`` (uint8 RGB, grey or RGBA for H&E, uint16 ``[CH2, CH3]`` for SRH), or
                a stacked batch ``(N, ...)``. All images must have the same size after resizing and cropping.
            return_tensors (`str`, *optional*, defaults to `"pt"`): `"pt"` or `"np"` (`None` keeps torch).
            modality, do_resize, size, do_center_crop, crop_size, do_normalize, image_mean, image_std, resample,
                antialias, resize_uint8, do_rescale, rescale_factor, do_convert_rgb, default_to_square: override the
                processor's settings for this call.
            input_data_format (`str`, *optional*): `"channels_first"` or `"channels_last"`, the channel axis of
                array inputs; inferred when not given (an axis of size 3 first, then 1 or 4).
            data_format (`str`, *optional*): `"channels_first"` (default, ``[N, C, h, w]``) or `"channels_last"`.
            device (`str` or `torch.device`, *optional*): where the returned torch tensor lives.
            do_pad, pad_size, disable_grouping, image_seq_length: `ImagesKwargs` HLSS has no use for; only
                `do_pad=True` is refused (the images of a batch share one size).

        Returns:
            `BatchFeature`: ``{"pixel_values": [N, C, h, w]}`` float32 (C = 3 unless ``do_convert_rgb=False``).
        """
        if kwargs:
            raise ValueError(f"HLSSImageProcessor got unexpected arguments: {sorted(kwargs)}")
        if do_pad:
            raise ValueError(
                "do_pad=True: HLSSImageProcessor does not pad; the images of a batch share one size after "
                "do_resize / do_center_crop"
            )
        modality = self.modality if modality is None else modality
        do_resize = self.do_resize if do_resize is None else do_resize
        default_to_square = self.default_to_square if default_to_square is None else bool(default_to_square)
        size = self.size if size is None else _resize_size(size, default_to_square)
        do_center_crop = self.do_center_crop if do_center_crop is None else do_center_crop
        crop_size = self.crop_size if crop_size is None else _size_dict(crop_size, "crop_size", False)
        do_normalize = self.do_normalize if do_normalize is None else do_normalize
        image_mean = self.image_mean if image_mean is None else _channel_stats(image_mean, "image_mean")
        image_std = self.image_std if image_std is None else _channel_stats(image_std, "image_std")
        resample = self.resample if resample is None else _resample_name(resample)
        antialias = self.antialias if antialias is None else bool(antialias)
        resize_uint8 = self.resize_uint8 if resize_uint8 is None else bool(resize_uint8)
        do_rescale = self.do_rescale if do_rescale is None else bool(do_rescale)
        rescale_factor = self.rescale_factor if rescale_factor is None else _rescale_factor(rescale_factor)
        do_convert_rgb = self.do_convert_rgb if do_convert_rgb is None else bool(do_convert_rgb)
        input_data_format = _format_name(input_data_format, "input_data_format")
        data_format = _format_name(data_format, "data_format")
        self._validate(modality, image_std, resample)

        images = self._flatten(images)
        # The batch path reads raw channels-last arrays; an explicit channels-first layout goes image by image.
        stacked = _stack_raw(images, modality) if input_data_format != "channels_first" else None
        if stacked is not None:
            pixel_values = self._preprocess_stacked(
                stacked,
                modality,
                do_resize,
                size,
                resample,
                antialias,
                do_center_crop,
                crop_size,
                resize_uint8,
                do_rescale,
                rescale_factor,
            )
            if do_normalize:
                mean_t, std_t = _stats_tensors(image_mean, image_std, pixel_values)
                pixel_values.sub_(mean_t).div_(std_t)  # in place, the same arithmetic as `normalize`
            return self._wrap(pixel_values, return_tensors, data_format, device)

        outputs = []
        for index, image in enumerate(images):
            pixels = self._to_float(
                image, modality, index, do_rescale, rescale_factor, do_convert_rgb, input_data_format
            )
            pixels = pixels.unsqueeze(0) if pixels.ndim == 3 else pixels
            if do_resize:
                pixels = self.resize(pixels, size, resample, antialias)
            if do_center_crop:
                pixels = self._crop(pixels, crop_size, index)
            if outputs and pixels.shape[-2:] != outputs[0].shape[-2:]:
                raise ValueError(
                    f"image {index}: processed size {tuple(pixels.shape[-2:])} differs from image 0's "
                    f"{tuple(outputs[0].shape[-2:])}; enable do_resize / do_center_crop to batch them"
                )
            if outputs and pixels.shape[1] != outputs[0].shape[1]:
                raise ValueError(
                    f"image {index}: {pixels.shape[1]} channels where image 0 has {outputs[0].shape[1]}; "
                    "do_convert_rgb=True makes every H&E image RGB"
                )
            outputs.append(pixels)
        pixel_values = torch.cat(outputs).to(torch.float32)
        if do_normalize:
            pixel_values = self.normalize(pixel_values, image_mean, image_std)
        return self._wrap(pixel_values.contiguous(), return_tensors, data_format, device)

    def _crop(self, pixels, crop_size: dict[str, int], index: int):
        """:meth:`center_crop`, its error naming the image (the batch path names the first: all share a shape)."""
        try:
            return self.center_crop(pixels, crop_size)
        except ValueError as err:
            raise ValueError(f"image {index}: {err}") from err

    @staticmethod
    def _wrap(pixel_values: torch.Tensor, return_tensors, data_format=None, device=None) -> BatchFeature:
        if data_format == "channels_last":
            pixel_values = pixel_values.permute(0, 2, 3, 1).contiguous()
        if return_tensors == "np":
            pixel_values = pixel_values.numpy()
        elif return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        elif device is not None:
            pixel_values = pixel_values.to(device)
        return BatchFeature(data={"pixel_values": pixel_values})

    def _preprocess_stacked(
        self,
        stacked: np.ndarray,
        modality,
        do_resize,
        size,
        resample,
        antialias,
        do_center_crop,
        crop_size,
        resize_uint8=False,
        do_rescale=True,
        rescale_factor=None,
    ) -> torch.Tensor:
        """The batch path: one ``[N, H, W, C]`` raw array converted, resized and cropped as a whole.

        Gives the same values, bit for bit, as converting each image, resizing and cropping it: the conversion
        is per pixel (so a crop taken first on the raw pixels is exact and converts only what is kept), and
        ``F.interpolate`` treats every image of a batch alone.
        """
        if do_center_crop and not do_resize:
            stacked = self._crop(stacked.transpose(0, 3, 1, 2), crop_size, 0).transpose(0, 2, 3, 1)
        resized = False
        if modality == "srh":
            pixels = _srh_rescale_(srh_to_float(stacked), do_rescale, rescale_factor)
        else:
            source = _read_only_tensor(stacked).permute(0, 3, 1, 2)  # NCHW view of channels-last memory
            if do_resize and resize_uint8:
                # torch's fast uint8 kernels want exactly this channels-last layout.
                source, resized = self.resize(source, size, resample, antialias), True
            # One pass from uint8 to contiguous float NCHW, then one in-place scale: he_to_float's values.
            pixels = torch.empty(source.shape, dtype=torch.float32)
            pixels.copy_(source)
            if do_rescale and rescale_factor in (None, 1 / 255):
                pixels.div_(255.0)
            elif do_rescale:
                pixels.mul_(rescale_factor)
        if do_resize:
            if not resized:
                pixels = self.resize(pixels, size, resample, antialias)
            if do_center_crop:
                pixels = self._crop(pixels, crop_size, 0)
            pixels = pixels.contiguous()
        return pixels


def _stats_tensors(mean: list[float], std: list[float], pixels: torch.Tensor):
    """`mean` / `std` as ``[1, C, 1, 1]`` tensors for ``[N, C, H, W]`` pixels, one value per channel."""
    channels = pixels.shape[1]
    for name, values in (("image_mean", mean), ("image_std", std)):
        if len(values) != channels:
            raise ValueError(f"{name} has {len(values)} values but the images have {channels} channels")
    shape = (1, channels, 1, 1)
    return torch.tensor(mean, dtype=pixels.dtype).view(shape), torch.tensor(std, dtype=pixels.dtype).view(
        shape
    )


def _read_only_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing ``array``'s memory, which may be read-only (a view of memory-mapped data): the batch path
    only reads it, so torch's warning about non-writable arrays does not apply."""
    if array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def _stack_raw(images: list, modality: str) -> np.ndarray | None:
    """Same-shape raw images of one batch as one channel-last array, or `None` where the per-image path applies.

    Raw means what the datasets hold: uint8 RGB (H&E; PIL RGB images too) or uint16 ``[CH2, CH3]`` (SRH),
    channel-last ``(H, W, C)``, or one stacked ``(N, H, W, C)`` array.
    """
    dtype, channels = (np.uint16, 2) if modality == "srh" else (np.uint8, 3)
    if len(images) == 1 and isinstance(images[0], np.ndarray) and images[0].ndim == 4:
        batch = images[0]
        ok = batch.dtype == dtype and batch.shape[-1] == channels and batch.shape[0] > 0
        return np.ascontiguousarray(batch) if ok else None
    arrays = []
    for image in images:
        if isinstance(image, Image.Image) and modality == "he" and image.mode == "RGB":
            image = np.asarray(image)
        if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.dtype == dtype):
            return None
        if image.shape[-1] != channels or (arrays and image.shape != arrays[0].shape):
            return None
        arrays.append(image)
    return np.stack(arrays)


class HLSSProcessorKwargs(ProcessingKwargs, total=False):
    """`ProcessingKwargs` whose image part is `HLSSImageProcessorKwargs`, so HLSS's own image settings
    (`modality`, `antialias`, `resize_uint8`) passed flat reach the image processor."""

    images_kwargs: HLSSImageProcessorKwargs


class HLSSProcessor(ProcessorMixin):
    r"""Processor for HLSS: an `HLSSImageProcessor` for patches and any tokenizer for attribute / zero-shot text.

    Call arguments follow transformers' processor convention (`HLSSProcessorKwargs`): flat keyword arguments go to
    the part that declares them (``crop_size=`` to the image processor, ``max_length=`` to the tokenizer; those
    both declare, such as ``return_tensors``, to both), ``images_kwargs={...}`` / ``text_kwargs={...}`` address one
    part and are merged with its defaults, and a key given both ways raises. Defaults, from lowest priority: this
    class's `text_kwargs` (pad and truncate texts to a batch, torch tensors), the tokenizer's own init settings,
    the call's arguments.

    Args:
        image_processor (`HLSSImageProcessor`): the image processor.
        tokenizer (`PreTrainedTokenizerBase`): the text tower's tokenizer.

    Example:

    ```python
    >>> processor = HLSSProcessor(HLSSImageProcessor(modality="he"), AutoTokenizer.from_pretrained(text_path))
    >>> batch = processor(images=[patch], text=["an H&E image of glioblastoma"], crop_size=128)
    >>> sorted(batch.keys())
    ['attention_mask', 'input_ids', 'pixel_values', 'token_type_ids']
    ```
    """

    valid_processor_kwargs = HLSSProcessorKwargs
    # transformers' lowest-priority processor defaults (see `ProcessorMixin._merge_kwargs`): texts of a batch are
    # padded to one length and truncated to the tokenizer's limit, and the batch holds torch tensors (the image
    # processor returns them by default already).
    text_kwargs = {"padding": True, "truncation": True, "return_tensors": "pt"}

    def __init__(self, image_processor, tokenizer, **kwargs):
        super().__init__(image_processor, tokenizer, **kwargs)

    def __call__(self, images=None, text: str | list[str] | None = None, **kwargs) -> BatchFeature:
        """Process images and / or text and merge the outputs into one `BatchFeature`.

        Args:
            images (*optional*): what `HLSSImageProcessor` accepts.
            text (`str` or `list[str]`, *optional*): texts to tokenize.
            kwargs: `HLSSProcessorKwargs`: flat tokenizer or image-processor arguments (``padding``, ``max_length``,
                ``crop_size``, ``modality``, ``return_tensors``, ...), or ``text_kwargs`` / ``images_kwargs`` dicts.

        Returns:
            `BatchFeature`: ``pixel_values`` when images are given, the tokenizer's keys when text is given.

        Raises:
            ValueError: without images and text, or with a key given both flat and in its modality's dict.
        """
        return super().__call__(images=images, text=text, **kwargs)

    def prepare_inputs_layout(self, images=None, text=None, videos=None, audio=None, **kwargs):
        """The inputs as given: `HLSSImageProcessor` reads image files itself (H&E; an SRH path is refused with
        its reason) and takes every array, tensor and PIL form it documents. transformers' default would open
        paths as RGB PIL images here and refuse `pathlib.Path` ones."""
        return images, text, videos, audio
