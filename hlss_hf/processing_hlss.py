"""Pixel conversion and processors for HLSS (stimulated Raman histology and H&E).

This file is also shipped as transformers remote code, so it imports only torch, numpy, PIL and transformers.

SRH (DESIGN 1.7): OpenSRH patches are 2-channel uint16 ``[CH2, CH3]``. They are scaled by ``1/65536``, a third
channel ``CH3 - CH2 + 5000/65536`` is formed, and the image is stacked as ``[CH3 - CH2 + base, CH2, CH3]`` and
clamped to ``[0, 1]``. H&E patches are 8-bit RGB scaled by ``1/255``.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

SRH_SCALE = 65536.0
SRH_BASE = 5000.0 / 65536.0

__all__ = ["srh_to_float", "he_to_float"]


def srh_to_float(image) -> torch.Tensor:
    """Convert raw 2-channel uint16 SRH pixels to a 3-channel float image (DESIGN 1.7).

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
        raise ValueError(f"SRH image: expected rank 3 (H, W, 2) / (2, H, W) or rank 4 (N, ...), got shape {shape}")
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
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint16:
            raise ValueError(f"SRH image: expected dtype uint16, got {image.dtype}")
        tensor = torch.from_numpy(image.astype(np.int32))
    else:
        if image.dtype not in (torch.uint16, torch.int32, torch.int64):
            raise ValueError(f"SRH image: expected dtype uint16 (or int32/int64 holding uint16), got {image.dtype}")
        tensor = image.detach().cpu().to(torch.int64)
        if tensor.numel() and (tensor.min() < 0 or tensor.max() > 65535):
            raise ValueError(
                f"SRH image: integer values must lie in [0, 65535], found min {int(tensor.min())} "
                f"and max {int(tensor.max())}"
            )
    tensor = tensor.to(torch.float32) / SRH_SCALE
    ch2, ch3 = tensor.select(axis, 0), tensor.select(axis, 1)
    stacked = torch.stack([ch3 - ch2 + SRH_BASE, ch2, ch3], dim=first)
    return stacked.clamp_(0.0, 1.0).contiguous()


def _pil_to_array(image: Image.Image) -> np.ndarray:
    # Grayscale, palette and RGBA images become RGB so every H&E image has 3 channels.
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image)


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
        tensor = torch.from_numpy(np.ascontiguousarray(image))
    elif isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
    else:
        raise ValueError(f"H&E image: expected a PIL image, numpy array or torch tensor, got {type(image).__name__}")
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
