"""Pixel conversion for HLSS: raw SRH (2-channel uint16 ``[CH2, CH3]``) and H&E (8-bit RGB) patches to float
images (docs/method.md, preprocessing)."""

import warnings

import numpy as np
import torch
from PIL import Image

SRH_SCALE = 65536.0
SRH_OFFSET = 5000.0  # in raw counts: the base 5000/65536 after scaling (docs/method.md, preprocessing)


def srh_to_float(image) -> torch.Tensor:
    """Raw 2-channel uint16 SRH pixels to a float32 ``[3, H, W]`` (or ``[N, 3, H, W]``) image in ``[0, 1]``, the
    channels ``[CH3 - CH2 + 5000, CH2, CH3] / 65536`` (docs/method.md, preprocessing).

    Args:
        image (`np.ndarray` or `torch.Tensor`): uint16 pixels with channels ``[CH2, CH3]``, shaped ``(H, W, 2)``
            or ``(2, H, W)``, or a batch ``(N, H, W, 2)`` / ``(N, 2, H, W)``. A torch tensor may also be
            int32/int64 holding uint16 values (torch has no full uint16 support).
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


def _as_tensor(image) -> torch.Tensor:
    """A numpy array or tensor as a CPU tensor, sharing memory where it can."""
    if isinstance(image, np.ndarray):
        # Read-only arrays (e.g. sharing a decoded image's buffer) are copied: torch needs writable memory.
        return torch.from_numpy(np.ascontiguousarray(image) if image.flags.writeable else np.array(image))
    if isinstance(image, torch.Tensor):
        return image.detach().cpu()
    raise ValueError(
        f"H&E image: expected a PIL image, numpy array or torch tensor, got {type(image).__name__}"
    )


def he_to_float(image) -> torch.Tensor:
    """An 8-bit RGB H&E image to a float32 ``[3, H, W]`` (or ``[N, 3, H, W]``) image in ``[0, 1]``.

    Args:
        image (`PIL.Image.Image`, `np.ndarray` or `torch.Tensor`): a PIL image (any mode; converted to RGB),
            or an array / tensor shaped ``(H, W, 3)`` / ``(3, H, W)`` or a batch ``(N, H, W, 3)`` /
            ``(N, 3, H, W)``. uint8 values are divided by 255; float values must already lie in ``[0, 1]``.
    """
    if isinstance(image, Image.Image):
        # Any mode becomes RGB; np.array copies (torch warns on the read-only buffer np.asarray shares with PIL).
        image = np.array(image if image.mode == "RGB" else image.convert("RGB"))
    tensor = _as_tensor(image)
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
    return _he_to_float(tensor, do_rescale=True, rescale_factor=None)


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
    """An H&E image as an unscaled tensor ``[C, H, W]`` (or ``[N, C, H, W]``), dtype as given; `do_convert_rgb` as
    `HLSSImageProcessor` documents it (without it, PIL images keep their mode's bands)."""
    if isinstance(image, Image.Image):
        if do_convert_rgb and image.mode != "RGB":
            image = image.convert("RGB")
        image = np.array(image)  # copies: torch warns on the read-only buffer np.asarray shares with PIL
        input_data_format = "channels_last"
    tensor = _as_tensor(image)
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
                    "pass uint8 pixels or scale to [0, 1] first (HLSSImageProcessor: or do_rescale=False)"
                )
        return pixels.contiguous()
    raise ValueError(f"H&E image: expected dtype uint8 or float in [0, 1], got {tensor.dtype}")


def _srh_rescale_(pixels: torch.Tensor, do_rescale: bool, rescale_factor: float | None) -> torch.Tensor:
    """Re-scale `srh_to_float`'s pixels in place: ``do_rescale=False`` gives raw counts (the first channel clamped
    to [0, 65536]), a `rescale_factor` counts times it; both exact multiples of the default's values."""
    if not do_rescale:
        return pixels.mul_(SRH_SCALE)
    if rescale_factor is not None and rescale_factor != 1.0 / SRH_SCALE:
        pixels.mul_(SRH_SCALE * rescale_factor)
    return pixels


def _read_only_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing ``array``'s memory, which may be read-only (memory-mapped): the batch path only reads it,
    so torch's warning about non-writable arrays does not apply."""
    if array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def _stack_raw(images: list, modality: str) -> np.ndarray | None:
    """Same-shape raw images of one batch (channel-last uint8 RGB / PIL RGB for H&E, uint16 ``[CH2, CH3]`` for
    SRH, or one stacked ``(N, H, W, C)`` array) as one channel-last array, or `None` for the per-image path."""
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
