"""Test oracles of hlss_hf.data.augmentation, kept out of the package (training uses only its fast path).

- :func:`per_image_reference`: the per-image reference path of :class:`~hlss_hf.data.augmentation.HLSSAugmentation`.
  It makes the same draws as ``augment(image, generator)`` (``augment._draw``) and applies them with
  torchvision-style functional ops (``torch.where`` masks, kornia's HSV hue), as the HiDisc / HLSS research code
  applies them per view. It defines the semantics and is the benchmark baseline; the fast path matches it to
  float rounding (~1e-6) on the same draws.
- :func:`torchvision_reference_transform`: the reference's training chain in real torchvision transforms.

Imported by the tests (``tests/`` is on ``sys.path``, see conftest.py) and by ``benchmarks/data_throughput.py``.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

from hlss_hf.data.augmentation import (
    GREY,
    HLSSAugmentation,
    _default_generator,
    affine_grid,
    blur_taps,
    resize,
)


def per_image_reference(
    augment: HLSSAugmentation, image: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The per-image reference path: the draws of ``augment(image, generator)``, torchvision-style operations.

    Args:
        augment (`HLSSAugmentation`): the chain whose draws and parameters are applied.
        image (`torch.Tensor`): float image ``[C, H, W]`` in [0, 1].
        generator (`torch.Generator`, *optional*): as in ``HLSSAugmentation.__call__``.
    """
    if not torch.is_floating_point(image) or image.dim() != 3:
        raise ValueError(
            f"per_image_reference() takes a float image [C, H, W], got {image.dtype} {tuple(image.shape)}"
        )
    generator = _default_generator(generator)
    plan = augment._draw(image.shape[-2], image.shape[-1], image.shape[0], image.dtype, generator)
    image = augment._crop(image, plan)
    for name, args in plan.ops:
        image = OPERATIONS[name](augment, image, **args)
    return image


def _grayscale(image: torch.Tensor) -> torch.Tensor:
    if image.shape[0] == 3:
        weights = torch.tensor(GREY, dtype=image.dtype, device=image.device)
        return (image * weights[:, None, None]).sum(0, keepdim=True)
    return image.mean(0, keepdim=True)


def _blend(image: torch.Tensor, other: torch.Tensor, factor: float) -> torch.Tensor:
    return (factor * image + (1.0 - factor) * other).clamp_(0.0, 1.0)


def _separable_blur(image: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Gaussian blur of ``[C, H, W]`` with reflect padding, as a separable sum of shifted slices."""
    height, width = image.shape[-2:]
    taps = blur_taps(kernel_size, sigma, height, width)
    if taps is None:
        return image
    radius = kernel_size // 2
    padded = F.pad(image[None], (radius, radius, radius, radius), mode="reflect")[0]
    rows = sum(tap * padded[..., i : i + height, :] for i, tap in enumerate(taps))
    return sum(tap * rows[..., j : j + width] for j, tap in enumerate(taps))


# The per-image operations (OPERATIONS): each takes the chain and a [C, H, W] image and returns a new tensor.


def _horizontal_flip(augment, image):
    return image.flip(-1)


def _vertical_flip(augment, image):
    return image.flip(-2)


def _affine(augment, image, theta, mode):
    grid = affine_grid(theta, image.shape[-2], image.shape[-1])
    return F.grid_sample(image[None], grid, mode=mode, padding_mode="zeros", align_corners=False)[0]


def _random_resized_crop(augment, image, box):
    top, left, crop_h, crop_w = box
    size = (augment.crop_size, augment.crop_size)
    return resize(image[..., top : top + crop_h, left : left + crop_w], size)


def _color_jitter(augment, image, factors, order):
    for name in order:
        factor = factors[name]
        if name == "brightness":
            image = (image * factor).clamp(0.0, 1.0)
        elif name == "contrast":
            image = _blend(image, _grayscale(image).mean().expand_as(image), factor)
        elif name == "saturation" and image.shape[0] == 3:
            image = _blend(image, _grayscale(image).expand_as(image), factor)
        elif name == "hue" and image.shape[0] == 3 and factor != 0.0:
            from kornia.enhance import adjust_hue

            # kornia's hue shift is in radians; torchvision's factor is a fraction of the hue circle.
            image = adjust_hue(image[None], factor * 2.0 * math.pi)[0].clamp(0.0, 1.0)
    return image


def _autocontrast(augment, image):
    low = image.amin(dim=(-2, -1), keepdim=True)
    high = image.amax(dim=(-2, -1), keepdim=True)
    span = high - low
    # Flat channels stay as they are (torchvision does the same).
    flat = span <= 0
    return torch.where(flat, image, (image - low) / torch.where(flat, torch.ones_like(span), span))


def _sharpness(augment, image, factor):
    # torchvision's definition: blend with a 3x3 smoothed copy ([[1,1,1],[1,5,1],[1,1,1]] / 13) whose border
    # pixels are the original ones.
    height, width = image.shape[-2:]
    if height < 3 or width < 3:
        return image
    box = sum(image[..., i : height - 2 + i, j : width - 2 + j] for i in range(3) for j in range(3))
    smooth = image.clone()
    smooth[..., 1:-1, 1:-1] = (box + 4.0 * image[..., 1:-1, 1:-1]) / 13.0
    return _blend(image, smooth, float(factor))


def _solarize(augment, image, threshold):
    return torch.where(image >= threshold, 1.0 - image, image)


def _gaussian_blur(augment, image, kernel_size, sigma):
    return _separable_blur(image, kernel_size, sigma)


def _gaussian_noise(augment, image, sigma, noise):
    return (image + sigma * noise).clamp(0.0, 1.0)


def _random_erasing(augment, image, box, value):
    if box is None:
        return image
    top, left, erase_h, erase_w = box
    image = image.clone()
    image[..., top : top + erase_h, left : left + erase_w] = value
    return image


OPERATIONS = {
    "horizontal_flip": _horizontal_flip,
    "vertical_flip": _vertical_flip,
    "affine": _affine,
    "random_resized_crop": _random_resized_crop,
    "color_jitter": _color_jitter,
    "autocontrast": _autocontrast,
    "sharpness": _sharpness,
    "solarize": _solarize,
    "gaussian_blur": _gaussian_blur,
    "gaussian_noise": _gaussian_noise,
    "random_erasing": _random_erasing,
}


def torchvision_reference_transform(crop_size: int = 224):
    """The reference's training chain built from torchvision transforms, as its code composes them (for checks).

    The same transforms, parameters, probabilities and order as ``get_srh_aug_list`` applies to OpenSRH patches
    after their conversion to float (the no-op ``ColorJitter()`` included), drawing from torch's and Python's
    global RNGs as the reference does. It takes the 3-channel float image ``build_augmentation("hlss_reference")``
    takes, and is what that preset must equal in distribution; tests and ``benchmarks/data_throughput.py`` use
    it. Needs torchvision.

    Args:
        crop_size (`int`, defaults to 224): side of the square output.
    """
    from torchvision import transforms as T

    class GaussianNoise(torch.nn.Module):
        # The reference's noise: std ~ U(0.01, 0.1) from Python's RNG, torch's global RNG for the noise, clamped.
        def forward(self, image):
            std = random.uniform(0.01, 0.1)
            return (image + torch.randn(image.size()) * std).clamp(0.0, 1.0)

    def maybe(transform):
        return T.RandomApply(torch.nn.ModuleList([transform]), p=0.5)

    size = (crop_size, crop_size)
    return T.Compose(
        [
            # torchvision 0.16.2 (the reference's pin) resizes tensors without antialiasing.
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC, antialias=False),
            T.RandomHorizontalFlip(p=0.5),
            T.RandomVerticalFlip(p=0.5),
            maybe(GaussianNoise()),
            maybe(T.ColorJitter()),
            T.RandomAutocontrast(p=0.5),
            T.RandomSolarize(threshold=0.2, p=0.5),
            T.RandomAdjustSharpness(sharpness_factor=2, p=0.5),
            maybe(T.GaussianBlur(kernel_size=5, sigma=1)),
            maybe(T.RandomAffine(degrees=10, translate=(0.1, 0.3))),
            maybe(T.RandomResizedCrop(crop_size)),
            T.RandomErasing(p=0.5),
        ]
    )
