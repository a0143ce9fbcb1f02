"""Processors for HLSS (stimulated Raman histology and H&E); the pixel conversion is in pixels_hlss.py.

No ``from __future__ import annotations`` here: transformers reads the kwargs TypedDicts' annotations at run time
(`HLSSProcessorKwargs.images_kwargs` must be the class, not a string).
"""

import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ImagesKwargs, ProcessingKwargs, ProcessorMixin

from .pixels_hlss import (
    _he_pixels,
    _he_to_float,
    _read_only_tensor,
    _srh_rescale_,
    _stack_raw,
    srh_to_float,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODALITIES = ("he", "srh")
RESAMPLES = ("bilinear", "bicubic")

__all__ = ["HLSSImageProcessor", "HLSSProcessor", "HLSSProcessorKwargs"]


class HLSSImageProcessorKwargs(ImagesKwargs, total=False):
    """`ImagesKwargs` plus HLSS's own settings, so that `from_pretrained` and `HLSSProcessor` route them."""

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
    if keys != {"height", "width"} and not (allow_shortest_edge and keys == {"shortest_edge"}):
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
    """A scalar (broadcast to 3 channels) or per-channel statistics as a list of floats. Any count is accepted
    (``do_convert_rgb=False`` may keep 4 channels); `normalize` checks it against the images."""
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


class HLSSImageProcessor(BaseImageProcessor):
    r"""Image processor for HLSS: SRH (2-channel uint16) or H&E (8-bit RGB) patches to ``pixel_values``.

    Pixels are first converted to float in ``[0, 1]`` (`srh_to_float` / `he_to_float`), then optionally resized,
    center-cropped and normalised. Resizing is off by default because it changes the microns per pixel the encoder
    was trained at. Every argument of `transformers.ImagesKwargs` is accepted at call time; see `preprocess`.

    Framings: the default keeps the native resolution and centre-crops `crop_size`; the HLSS reference resizes the
    whole patch instead (``do_resize=True, size={"height": 224, "width": 224}, resample="bicubic", antialias=False,
    do_center_crop=False``; docs/fidelity.md, evaluation input).

    Args:
        modality (`str`, *optional*, defaults to `"he"`): `"he"` for 8-bit RGB H&E, `"srh"` for 2-channel uint16
            stimulated Raman histology ``[CH2, CH3]``.
        do_resize (`bool`, *optional*, defaults to `False`): resize before cropping.
        size (`int` or `dict`, *optional*, defaults to `{"shortest_edge": 224}`): resize target; an int (or
            `{"shortest_edge": s}`) resizes the shorter side to `s` keeping the aspect ratio,
            `{"height": h, "width": w}` resizes to exactly that.
        resample (`str`, *optional*, defaults to `"bilinear"`): `"bilinear"` or `"bicubic"` (or PIL's
            `Resampling.BILINEAR` / `BICUBIC`), by `F.interpolate`; bicubic values may leave ``[0, 1]`` slightly
            and are not clamped, as in torchvision.
        antialias (`bool`, *optional*, defaults to `True`): antialias when downscaling (torchvision >= 0.17's
            default for tensors, close to PIL's filters).
        resize_uint8 (`bool`, *optional*, defaults to `False`): resize 8-bit H&E pixels (uint8 arrays, RGB PIL
            images) before the float conversion, with torch's uint8 kernels (several times faster). Approximate:
            rounded to 8 bits, within about 1.5/255 of the float resize, bicubic overshoot clipped. Ignored for SRH
            (resized as float, after its channel arithmetic) and other inputs.
        do_center_crop (`bool`, *optional*, defaults to `True`): center-crop to `crop_size`.
        crop_size (`int` or `dict`, *optional*, defaults to 224): crop size, an int or `{"height", "width"}`.
        do_normalize (`bool`, *optional*, defaults to `False`): subtract `image_mean` and divide by `image_std`.
        image_mean (`float` or `list[float]`, *optional*, defaults to the ImageNet mean): per-channel mean.
        image_std (`float` or `list[float]`, *optional*, defaults to the ImageNet std): per-channel std.
        do_rescale (`bool`, *optional*, defaults to `True`): scale integer pixels to ``[0, 1]`` by
            `rescale_factor`. False keeps pixel values as they are (0-255 for H&E, raw counts for SRH) and accepts
            float pixels outside ``[0, 1]``. Float pixels are taken as already scaled either way.
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
    >>> from hlss_hf import HLSSImageProcessor
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
        """A single image or a list of images -> list of images; a rank-4 array stays whole (a stacked batch)."""
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
        """Resize float images ``[N, 3, H, W]`` to `size` (``F.interpolate``, ``align_corners=False``)."""
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
        """Crop the center ``size["height"] x size["width"]`` (no larger than the images) of ``[N, 3, H, W]``."""
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
    return tuple(torch.tensor(values, dtype=pixels.dtype).view(1, channels, 1, 1) for values in (mean, std))


class HLSSProcessorKwargs(ProcessingKwargs, total=False):
    """`ProcessingKwargs` whose image part is `HLSSImageProcessorKwargs` (HLSS's settings passed flat reach it)."""

    images_kwargs: HLSSImageProcessorKwargs


class HLSSProcessor(ProcessorMixin):
    r"""Processor for HLSS: an `HLSSImageProcessor` for patches and any tokenizer for attribute / zero-shot text.

    Call arguments follow transformers' processor convention (`HLSSProcessorKwargs`, `ProcessorMixin._merge_kwargs`):
    flat keyword arguments go to the part that declares them, ``images_kwargs`` / ``text_kwargs`` address one part.

    Example:

    ```python
    >>> processor = HLSSProcessor(HLSSImageProcessor(modality="he"), AutoTokenizer.from_pretrained(text_path))
    >>> batch = processor(images=[patch], text=["an H&E image of glioblastoma"], crop_size=128)
    >>> sorted(batch.keys())
    ['attention_mask', 'input_ids', 'pixel_values', 'token_type_ids']
    ```
    """

    valid_processor_kwargs = HLSSProcessorKwargs
    # transformers' lowest-priority processor defaults (`ProcessorMixin._merge_kwargs`): texts of a batch padded to
    # one length, truncated to the tokenizer's limit, as torch tensors (as the image processor returns by default).
    text_kwargs = {"padding": True, "truncation": True, "return_tensors": "pt"}

    def __init__(self, image_processor, tokenizer, **kwargs):
        super().__init__(image_processor, tokenizer, **kwargs)

    def __call__(self, images=None, text: str | list[str] | None = None, **kwargs) -> BatchFeature:
        """Process images (what `HLSSImageProcessor` accepts) and / or text into one `BatchFeature`; `kwargs` as
        the class docstring says. Raises `ValueError` without images and text, or with a key given both flat and in
        its modality's dict."""
        return super().__call__(images=images, text=text, **kwargs)

    def prepare_inputs_layout(self, images=None, text=None, videos=None, audio=None, **kwargs):
        """The inputs as given: `HLSSImageProcessor` reads image files itself (H&E; an SRH path is refused with
        its reason) and takes every array, tensor and PIL form it documents. transformers' default would open
        paths as RGB PIL images here and refuse `pathlib.Path` ones."""
        return images, text, videos, audio
