"""Patch augmentations for HLSS pretraining, deterministic given a :class:`torch.Generator`.

Two named sets (:data:`AUGMENTATION_PRESETS`, ``build_augmentation(name, crop_size)``):

- ``"hlss_hf"`` (:data:`DEFAULT_AUGMENTATION`, also ``build_augmentation(None)``): this project's strong set in the
  style of the HiDisc / HLSS research code: a random resized crop of the patch first, then flips, affine,
  colour jitter, autocontrast, sharpness, solarize, blur, Gaussian noise and random erasing, each applied with
  its own probability.
- ``"hlss_reference"`` (:data:`HLSS_REFERENCE_AUGMENTATION`): the reference's training chain as its code runs
  (hlss/datasets/improc.py ``get_srh_aug_list`` over the ``train_augmentation`` list of
  hlss/config/train_hlss_attr3levels.yaml, the config hlss/train_hlss_KL.py is run with): the whole patch
  resized to ``crop_size`` (bicubic, not antialiased), then every operation at p = 0.5, the random resized crop
  late in the chain.

Every random draw comes from the generator passed to the call (never
from torch's global RNG, which is why no library's random transforms are used), so the same generator state
gives the same views in any DataLoader worker or process.

Images are float tensors in ``[0, 1]`` of shape ``[C, H, W]`` or ``[N, C, H, W]`` (each image of a batch gets
its own draws). Output crops are ``crop_size x crop_size``.

Example:

```python
>>> import torch
>>> from hlss_hf.augmentation import build_augmentation
>>> augment = build_augmentation({"horizontal_flip": {"p": 0.5}, "solarize": {"p": 0.2, "threshold": 0.3}}, 224)
>>> view = augment(torch.rand(3, 300, 300), generator=torch.Generator().manual_seed(0))
>>> tuple(view.shape)
(3, 224, 224)
>>> reference = build_augmentation("hlss_reference", 224)  # the reference's training chain
>>> tuple(reference(torch.rand(3, 300, 300), generator=torch.Generator().manual_seed(0)).shape)
(3, 224, 224)
```

A YAML config sets the same dict, e.g. ``augmentation: {random_resized_crop: {scale: [0.3, 1.0]}, ...}``, or a
preset name, ``augmentation: hlss_reference``.
"""

from __future__ import annotations

import copy
import functools
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

#: The paper-style strong augmentation set used for training, in application order. Each entry maps an
#: operation name to its parameters; ``p`` is the probability that the operation is applied to a view.
DEFAULT_AUGMENTATION: dict[str, dict[str, Any]] = {
    "random_resized_crop": {"p": 1.0, "scale": (0.2, 1.0), "ratio": (3 / 4, 4 / 3)},
    "horizontal_flip": {"p": 0.5},
    "vertical_flip": {"p": 0.5},
    "affine": {"p": 0.3, "degrees": 10.0, "translate": (0.1, 0.1), "scale": (0.9, 1.1), "shear": 5.0},
    "color_jitter": {"p": 0.3, "brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.05},
    "autocontrast": {"p": 0.3},
    "sharpness": {"p": 0.3, "factor": 2.0},
    "solarize": {"p": 0.3, "threshold": 0.2},
    "gaussian_blur": {"p": 0.3, "kernel_size": 5, "sigma": (0.1, 1.0)},
    "gaussian_noise": {"p": 0.3, "std": (0.01, 0.05)},
    "random_erasing": {"p": 0.3, "scale": (0.02, 0.2), "ratio": (0.3, 3.3), "value": 0.0},
}

#: Every operation with its default parameters; a config entry overrides these key by key.
OPERATION_DEFAULTS: dict[str, dict[str, Any]] = {
    # Not random: resize the whole image to crop_size. When a config has it (first), the chain runs in the
    # config's order and random_resized_crop becomes an operation of the chain (crop and resize back).
    "resize": {"p": 1.0, "interpolation": "bicubic", "antialias": True},
    "random_resized_crop": {"p": 1.0, "scale": (0.08, 1.0), "ratio": (3 / 4, 4 / 3)},
    "horizontal_flip": {"p": 0.5},
    "vertical_flip": {"p": 0.5},
    # interpolation "nearest" and whole-pixel translations (round_translate) are torchvision's RandomAffine.
    "affine": {
        "p": 0.5,
        "degrees": 10.0,
        "translate": (0.0, 0.0),
        "scale": (1.0, 1.0),
        "shear": 0.0,
        "interpolation": "bilinear",
        "round_translate": False,
    },
    "color_jitter": {"p": 0.5, "brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1},
    "autocontrast": {"p": 0.5},
    "sharpness": {"p": 0.5, "factor": 2.0},
    "solarize": {"p": 0.5, "threshold": 0.5},
    "gaussian_blur": {"p": 0.5, "kernel_size": 5, "sigma": (0.1, 2.0)},
    "gaussian_noise": {"p": 0.5, "std": (0.01, 0.1)},
    "random_erasing": {"p": 0.5, "scale": (0.02, 0.33), "ratio": (0.3, 3.3), "value": 0.0},
}

#: The order in which operations run when a config has no ``resize``, whatever the order of its keys: the crop
#: first, so that the pixel operations work on the (smaller) crop.
ORDER: tuple[str, ...] = tuple(OPERATION_DEFAULTS)

#: The reference's training augmentation as its code runs, in application order. Read from the HLSS code
#: (GitHub Hasindri/HLSS: hlss/datasets/improc.py ``get_srh_base_aug`` + ``get_strong_aug``, hlss/common.py
#: ``get_dataloaders``, hlss/config/train_hlss_attr3levels.yaml ``data.train_augmentation``, the config that
#: hlss/wandb_scripts/train_hlss_KL.sh runs hlss/train_hlss_KL.py with); where it differs
#: from what the paper or config suggest, this follows the code:
#:
#: - Every operation runs at p = 0.5: ``get_dataloaders`` calls ``get_srh_aug_list(augs)`` without the config's
#:   ``rand_aug_prob: 0.3``, so the default ``rand_prob=0.5`` applies (reference bug: the config value is dead).
#: - ``color_jitter`` is left out: the config builds ``ColorJitter()`` with no arguments, whose brightness,
#:   contrast, saturation and hue are all None, so it never changes a pixel (reference bug: a no-op).
#: - The 300 px patch is resized to 224 first (``Resize((224, 224), bicubic)`` on the float tensor, not clamped),
#:   so every operation, the crop included, works on 224 px images. Not antialiased: the reference's
#:   requirements.txt pins torchvision 0.16.2, whose ``Resize`` leaves tensors unantialiased (``antialias``
#:   defaults to True on tensors only from 0.17 on). The late random resized crop only enlarges (a crop of the
#:   224 px image back to 224), where antialiasing changes nothing.
#: - ``GaussianNoise`` names its bounds ``min_var`` / ``max_var`` but uses the draw as the standard deviation.
#: - ``GaussianBlur(5, sigma=1)``: a fixed sigma. ``RandomAffine(10, translate=(0.1, 0.3))``: no scale or shear,
#:   nearest interpolation, translations rounded to whole pixels. ``RandomResizedCrop(224)`` inside
#:   ``RandomApply``: scale (0.08, 1), bilinear, itself at p = 0.5 and after the affine.
#: - ``RandomErasing()``: its defaults, scale (0.02, 0.33), ratio (0.3, 3.3), value 0.
HLSS_REFERENCE_AUGMENTATION: dict[str, dict[str, Any]] = {
    "resize": {"p": 1.0, "interpolation": "bicubic", "antialias": False},
    "horizontal_flip": {"p": 0.5},
    "vertical_flip": {"p": 0.5},
    "gaussian_noise": {"p": 0.5, "std": (0.01, 0.1)},
    "autocontrast": {"p": 0.5},
    "solarize": {"p": 0.5, "threshold": 0.2},
    "sharpness": {"p": 0.5, "factor": 2.0},
    "gaussian_blur": {"p": 0.5, "kernel_size": 5, "sigma": (1.0, 1.0)},
    "affine": {
        "p": 0.5,
        "degrees": 10.0,
        "translate": (0.1, 0.3),
        "scale": (1.0, 1.0),
        "shear": 0.0,
        "interpolation": "nearest",
        "round_translate": True,
    },
    "random_resized_crop": {"p": 0.5, "scale": (0.08, 1.0), "ratio": (3 / 4, 4 / 3)},
    "random_erasing": {"p": 0.5, "scale": (0.02, 0.33), "ratio": (0.3, 3.3), "value": 0.0},
}

#: Named augmentation sets: ``build_augmentation(name, crop_size)``.
AUGMENTATION_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "hlss_hf": DEFAULT_AUGMENTATION,
    "hlss_reference": HLSS_REFERENCE_AUGMENTATION,
}


def _uniform(rng: random.Random, low: float, high: float) -> float:
    return low + (high - low) * rng.random()


def _coin(rng: random.Random, p: float) -> bool:
    # Always draw, even for p in {0, 1}, so that changing one probability does not shift the other draws.
    return rng.random() < p


def _range(value: Any, key: str, centre: float | None = None) -> tuple[float, float]:
    """Accept a number (symmetric around ``centre``, or ``(0, value)`` when ``centre`` is None) or a pair."""
    if isinstance(value, int | float):
        if centre is None:
            return 0.0, float(value)
        return centre - float(value), centre + float(value)
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(
            f"augmentation parameter {key!r} must be a number or a [low, high] pair, got {value!r}"
        ) from None
    if low > high:
        raise ValueError(f"augmentation parameter {key!r} has low > high: {value!r}")
    return low, high


def _resize(
    image: torch.Tensor, size: tuple[int, int], mode: str = "bilinear", antialias: bool = True
) -> torch.Tensor:
    if tuple(image.shape[-2:]) == size:
        return image
    # antialias only matters when shrinking; it keeps downscaled crops from aliasing like torchvision's default
    # (from 0.17 on; the reference's 0.16.2 did not antialias tensors). Bicubic outputs are not clamped (they
    # overshoot [0, 1] slightly at edges), as torchvision's Resize on a float tensor.
    return F.interpolate(image[None], size=size, mode=mode, align_corners=False, antialias=antialias)[0]


def center_crop_resize(image: torch.Tensor, crop_size: int) -> torch.Tensor:
    """Center-crop ``image`` ``[C, H, W]`` to a square of ``crop_size``, resizing first when it is smaller.

    Args:
        image (`torch.Tensor`): float image ``[C, H, W]``.
        crop_size (`int`): side of the output square.
    """
    height, width = image.shape[-2:]
    if min(height, width) < crop_size:
        scale = crop_size / min(height, width)
        height, width = max(crop_size, round(height * scale)), max(crop_size, round(width * scale))
        image = _resize(image, (height, width))
    top, left = (height - crop_size) // 2, (width - crop_size) // 2
    return image[..., top : top + crop_size, left : left + crop_size]


#: ITU-R 601 luma weights of R, G, B, as torchvision's rgb_to_grayscale.
_GREY = (0.299, 0.587, 0.114)


def _blur_taps(kernel_size: int, sigma: float, height: int, width: int) -> list[float] | None:
    """Normalised Gaussian taps of a blur kernel (None for a 1-pixel kernel), checked against the image size."""
    radius = kernel_size // 2
    if radius == 0:
        return None
    if radius >= min(height, width):
        raise ValueError(
            f"gaussian_blur.kernel_size {kernel_size} is too large for an image of {height}x{width}"
        )
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float64) / sigma) ** 2)
    return (taps / taps.sum()).tolist()


@dataclass
class _Plan:
    """The random draws of one image: the box resized to the output first (``None``: centre crop; the whole image
    when the chain starts with ``resize``) and the applied operations in order."""

    crop: tuple[int, int, int, int] | None
    ops: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


# Multiplying a difference of two [0, 1] float32 values by 2**100 sends every non-zero difference far outside
# [-1, 1] (the smallest is ~1e-45 only for subnormal inputs), so ``clamp(d * 2**100 + 1, 0, 1)`` is an exact
# step function: 1 where d >= 0, 0 where d < 0. torch.where and comparisons cost ~20 multiplies on CPU.
_STEP = 2.0**100


def _step(difference: torch.Tensor) -> torch.Tensor:
    """1.0 where ``difference >= 0`` and 0.0 where it is negative, in place on ``difference``."""
    return difference.mul_(_STEP).add_(1.0).clamp_(0.0, 1.0)


def _affine_matrix(
    angle: float, translate: tuple[float, float], scale: float, shear: float, dtype: torch.dtype
) -> torch.Tensor:
    """torchvision's affine convention: the inverse (output -> input) map ``[2, 3]`` in pixel units about the centre.

    The forward map rotates by ``angle`` degrees, shears along x by ``shear`` degrees, zooms by ``scale`` and
    moves by ``translate`` pixels (x, y), as ``torchvision.transforms.functional.affine``.
    """
    rot, shear_x = math.radians(angle), math.radians(shear)
    cos, sin, tan = math.cos(rot), math.sin(rot), math.tan(shear_x)
    # Forward map [[a, b], [c, d]] (determinant 1 before the zoom); its inverse is [[d, -b], [-c, a]] / scale.
    a, b, c, d = cos, -cos * tan - sin, sin, -sin * tan + cos
    inverse = [[d / scale, -b / scale], [-c / scale, a / scale]]
    tx, ty = translate
    rows = [[m0, m1, -(m0 * tx + m1 * ty)] for m0, m1 in inverse]
    return torch.tensor(rows, dtype=dtype)


def _affine_grid(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """grid_sample's grid ``[1, H, W, 2]`` for the inverse map ``theta`` (pixel units about the centre).

    torchvision builds the same grid as a product of all pixel centres ``(x, y, 1)`` with a ``[3, 2]`` matrix;
    each grid coordinate is affine in x plus affine in y, so it is built here as the sum of a row and a column
    vector (~15x cheaper on CPU; equal to torchvision's grid to float rounding).
    """
    dtype = theta.dtype
    (m00, m01, m02), (m10, m11, m12) = theta.tolist()
    xs = torch.linspace(-width * 0.5 + 0.5, width * 0.5 - 0.5, steps=width, dtype=dtype)
    ys = torch.linspace(-height * 0.5 + 0.5, height * 0.5 - 0.5, steps=height, dtype=dtype)
    grid = torch.empty(1, height, width, 2, dtype=dtype)
    # Normalised to [-1, 1] by the half sizes, as grid_sample (align_corners=False) expects.
    for out, (mx, my, mc), half in (
        (grid[0, ..., 0], (m00, m01, m02), 0.5 * width),
        (grid[0, ..., 1], (m10, m11, m12), 0.5 * height),
    ):
        torch.add((xs * (mx / half))[None, :], (ys * (my / half) + mc / half)[:, None], out=out)
    return grid


def _hue_shift(images: torch.Tensor, shift: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate the HSV hue of RGB ``images`` ``[N, 3, H, W]`` by ``shift`` ``[N]`` (fractions of the circle).

    The same map as kornia's ``adjust_hue`` (RGB -> HSV, hue + shift mod 2pi, HSV -> RGB, maximal channel
    chosen r, then g, then b on ties) in closed form with arithmetic only: with chroma ``d = max - min``, each
    output channel is ``min + d * w``, ``w`` a clamped triangle wave of the rotated hue.
    Outputs agree with kornia's to float rounding (~1e-6). ``out`` may be ``images`` itself.
    """
    r, g, b = images.unbind(1)
    # One scratch allocation; every step below writes into it in place (fresh temporaries cost ~2x per pass).
    value, low, chroma, hue, mask_r, mask_g, term = torch.empty((7, *r.shape), dtype=images.dtype).unbind(0)
    torch.maximum(torch.maximum(r, g, out=value), b, out=value)
    torch.minimum(torch.minimum(r, g, out=low), b, out=low)
    torch.sub(value, low, out=chroma)
    _step(torch.sub(r, value, out=mask_r))  # 1 where r is maximal
    _step(torch.sub(g, value, out=mask_g))
    mask_g.addcmul_(mask_g, mask_r, value=-1.0)  # g maximal and r not
    # Hue in sextants times d, [-d, 5d]: (g - b) when r is maximal, 2d + (b - r) for g, 4d + (r - g) for b,
    # written as the b case plus the masked differences to the other two.
    torch.sub(r, g, out=hue).add_(chroma, alpha=4.0)
    torch.add(g, g, out=term).sub_(r).sub_(b).sub_(chroma, alpha=4.0)  # (g - b) - (r - g + 4d)
    hue.addcmul_(term, mask_r)
    torch.add(g, b, out=term).sub_(r, alpha=2.0).sub_(chroma, alpha=2.0)  # (b - r + 2d) - (r - g + 4d)
    hue.addcmul_(term, mask_g)
    # Divide by d, or by 1 where d == 0 (grey: hue 0, as kornia; the numerator is 0 there).
    torch.mul(chroma, -_STEP, out=term).add_(1.0).clamp_(0.0, 1.0).add_(chroma)
    hue.div_(term).add_((6.0 * shift.to(images.dtype))[:, None, None])
    hue.sub_(torch.mul(hue, 1.0 / 6.0, out=term).floor_().mul_(6.0))  # into [0, 6]
    if out is None:
        out = torch.empty_like(images)
    # Channel n is min + d * clamp(dist_n - 1, 0, 1), dist_n the circular distance (period 6) from hue + n - 2
    # to 0, n = 5, 3, 1 for R, G, B; with hue in [0, 6]: |hue - 3|, min(hue + 1, |hue - 5|), min(|hue - 1|,
    # 7 - hue). The inputs are no longer read, so ``out`` may alias ``images``.
    red, green, blue = out.unbind(1)
    torch.sub(hue, 3.0, out=term).abs_()
    torch.addcmul(low, term.sub_(1.0).clamp_(0.0, 1.0), chroma, out=red)
    torch.minimum(torch.sub(hue, 5.0, out=term).abs_(), torch.add(hue, 1.0, out=mask_r), out=term)
    torch.addcmul(low, term.sub_(1.0).clamp_(0.0, 1.0), chroma, out=green)
    torch.minimum(torch.sub(hue, 1.0, out=term).abs_(), hue.mul_(-1.0).add_(7.0), out=term)
    torch.addcmul(low, term.sub_(1.0).clamp_(0.0, 1.0), chroma, out=blue)
    return out


class HLSSAugmentation:
    """A chain of randomly applied patch augmentations with explicit-generator determinism.

    Build it with :func:`build_augmentation` (or :func:`build_eval_transform`) rather than directly.

    ``augment(image)`` / ``augment(images)`` / :meth:`batch`: each image's draws (:meth:`_draw`, in a fixed
    order), then its crop resized straight into the output (float32 on CPU: products with banded weight
    matrices, flips folded in, ~2x faster than ``F.interpolate``) and every drawn operation applied in place with
    arithmetic-only kernels (no ``torch.where`` or comparison masks, which cost ~20 multiplies each on CPU; a
    closed-form hue rotation instead of RGB -> HSV -> RGB). Images are processed one at a time on purpose: a
    ``3 x 224 x 224`` float image stays in the L2 cache across the chain, while running each operation over all
    views at once streams several MB per operation and measured slower. The tests' per-image reference path
    (tests/augmentation_reference.py: torchvision-style functional ops on the same draws, as the HiDisc / HLSS
    research code applies them per view) defines the semantics; this path matches it to float rounding (~1e-6).

    Args:
        operations (`dict[str, dict]`): operation name -> validated parameters (see :data:`OPERATION_DEFAULTS`).
            With ``resize`` (first), the chain runs in the given order after resizing the whole image; without
            it, in :data:`ORDER` (the random resized crop, or a centre crop, first).
        crop_size (`int`): side of the square output.
    """

    def __init__(self, operations: Mapping[str, Mapping[str, Any]], crop_size: int):
        self.resize_first = "resize" in operations
        order = tuple(operations) if self.resize_first else ORDER
        self.operations = {name: dict(operations[name]) for name in order if name in operations}
        self.crop_size = int(crop_size)
        # The interpolation of the first resize: the reference's bicubic Resize, or bilinear for a crop (as
        # torchvision's RandomResizedCrop).
        self._mode = self.operations["resize"]["interpolation"] if self.resize_first else "bilinear"
        self._antialias = self.operations["resize"]["antialias"] if self.resize_first else True
        # Flips that run right after the first resize commute with it: they are folded into its weights.
        self._folded: set[str] = set()
        for name in self.operations:
            if name == "resize" or (name == "random_resized_crop" and not self.resize_first):
                continue
            if name not in _FLIP_NAMES:
                break
            self._folded.add(name)

    def __repr__(self) -> str:
        ops = ", ".join(f"{name}(p={params['p']})" for name, params in self.operations.items())
        return f"{type(self).__name__}(crop_size={self.crop_size}, [{ops}])"

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment ``image`` (``[C, H, W]`` or ``[N, C, H, W]``, float in [0, 1]).

        Args:
            image (`torch.Tensor`): one image or a batch (see :meth:`batch`); each image of a batch gets its own
                random draws, the same as sequential calls on its images would.
            generator (`torch.Generator`, *optional*): source of every random draw. When omitted, one is seeded
                from torch's global RNG (convenient, but then only as reproducible as the global seed).

        Returns:
            `torch.Tensor` of shape ``[C, crop, crop]`` or ``[N, C, crop, crop]``.
        """
        if not torch.is_floating_point(image):
            raise TypeError(f"augmentations expect a float image in [0, 1], got dtype {image.dtype}")
        if image.dim() == 4:
            return self.batch(image, generator)
        if image.dim() != 3:
            raise ValueError(
                f"expected an image [C, H, W] or a batch [N, C, H, W], got shape {tuple(image.shape)}"
            )
        return self.batch([image], generator)[0]

    def batch(
        self,
        images: torch.Tensor | Sequence[torch.Tensor],
        generator: torch.Generator | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Augment several images at once; image ``i`` gets the draws of the ``i``-th of sequential calls.

        Args:
            images (`torch.Tensor` ``[N, C, H, W]`` or a sequence of ``[C, H_i, W_i]``): float images in [0, 1]
                (sizes may differ; the channel count may not). The inputs are never modified.
            generator (`torch.Generator`, *optional*): as in :meth:`__call__`.
            out (`torch.Tensor`, *optional*): ``[N, C, crop, crop]`` tensor to write the views into.

        Returns:
            `torch.Tensor` ``[N, C, crop, crop]`` (``out`` when given).
        """
        if len(images) == 0:
            raise ValueError("batch() needs at least one image")
        channels, dtype = images[0].shape[0], images[0].dtype
        for i, image in enumerate(images):
            if not torch.is_floating_point(image) or image.dim() != 3 or image.shape[0] != channels:
                raise ValueError(
                    f"batch(): image {i} must be a float [C, H, W] tensor with C={channels}, got "
                    f"{image.dtype} {tuple(image.shape)}"
                )
        generator = _default_generator(generator)
        size = self.crop_size
        shape = (len(images), channels, size, size)
        if out is None:
            out = torch.empty(shape, dtype=dtype)
        elif tuple(out.shape) != shape:
            raise ValueError(f"batch(): out has shape {tuple(out.shape)}, expected {shape}")
        shared = None  # (image, its resize) while consecutive views share an image, for a resize-first chain
        for i, image in enumerate(images):
            # Draw, crop and augment one image at a time: its draws (noise included) and pixels stay in cache.
            plan = self._draw(image.shape[-2], image.shape[-1], channels, dtype, generator)
            view = out[i]
            # The flips right after the crop (or resize) folded into its way into the output.
            drawn = {op for op, _ in plan.ops}
            flips = [dim for name, dim in _FLIPS if name in self._folded and name in drawn]
            fast_resize = (
                plan.crop is not None
                and image.dtype == view.dtype == torch.float32
                and image.device == view.device
            )
            if (
                fast_resize
                and self.resize_first
                and (
                    (shared is not None and shared[0] is image)
                    or (i + 1 < len(images) and images[i + 1] is image)
                )
            ):
                # The views of one patch (the same tensor repeated, as HierarchicalPatchDataset passes them) share
                # the deterministic whole-image resize: computed once, copied (flipped) into each view.
                if shared is None or shared[0] is not image:
                    shared = (image, torch.empty_like(view))
                    _resize_into(image, [], shared[1], self._mode, self._antialias)
                _copy_flipped(shared[1], flips, view)
            elif fast_resize:
                top, left, crop_h, crop_w = plan.crop
                crop = image[:, top : top + crop_h, left : left + crop_w]
                _resize_into(crop, flips, view, self._mode, self._antialias)
            else:
                _copy_flipped(self._crop(image, plan), flips, view)
            for name, args in plan.ops:
                if name not in self._folded:
                    getattr(self, f"_fast_{name}")(view, **args)
        return out

    # -- draws -------------------------------------------------------------------------------------------------

    def _draw(self, height: int, width: int, channels: int, dtype: torch.dtype, generator) -> _Plan:
        """Every random number of one image, in the order of the chain (this order defines the outputs).

        The scalar draws come from a Python RNG seeded by one draw of ``generator`` (~0.1 us each instead of
        ~2.5 us for a torch scalar); the Gaussian noise comes from ``generator`` itself.
        """
        rng = random.Random(int(torch.randint(0, 2**63 - 1, (), generator=generator)))
        plan = _Plan(crop=None)
        if self.resize_first:
            plan.crop = (0, 0, height, width)
        elif "random_resized_crop" in self.operations:
            plan.crop = self._draw_crop(height, width, rng, **self.operations["random_resized_crop"])
        for name, params in self.operations.items():
            if name == "resize" or (name == "random_resized_crop" and not self.resize_first):
                continue
            params = dict(params)
            if _coin(rng, params.pop("p")):
                draw = getattr(self, f"_draw_{name}", None)
                args = draw(rng, generator, channels, dtype, **params) if draw is not None else params
                plan.ops.append((name, args))
        return plan

    def _draw_crop(self, height, width, rng, p, scale, ratio):
        if not _coin(rng, p):
            return None
        return self._crop_box(height, width, rng, scale, ratio)

    def _draw_random_resized_crop(self, rng, generator, channels, dtype, scale, ratio):
        # Within the chain (after ``resize``): a box of the crop_size image, resized back to crop_size.
        return {"box": self._crop_box(self.crop_size, self.crop_size, rng, scale, ratio)}

    def _crop_box(self, height, width, rng, scale, ratio):
        area = height * width
        log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        # torchvision's rejection sampling: 10 tries, then fall back to the whole (centre) image.
        for _ in range(10):
            target_area = area * _uniform(rng, *scale)
            aspect = math.exp(_uniform(rng, *log_ratio))
            crop_w = round(math.sqrt(target_area * aspect))
            crop_h = round(math.sqrt(target_area / aspect))
            if 0 < crop_w <= width and 0 < crop_h <= height:
                top = rng.randrange(height - crop_h + 1)
                left = rng.randrange(width - crop_w + 1)
                return top, left, crop_h, crop_w
        side = min(height, width)
        return (height - side) // 2, (width - side) // 2, side, side

    def _draw_affine(
        self,
        rng,
        generator,
        channels,
        dtype,
        degrees,
        translate,
        scale,
        shear,
        interpolation,
        round_translate,
    ):
        size = self.crop_size
        angle = _uniform(rng, *degrees)
        tx = _uniform(rng, -translate[0], translate[0]) * size
        ty = _uniform(rng, -translate[1], translate[1]) * size
        if round_translate:  # torchvision's RandomAffine moves by whole pixels
            tx, ty = float(round(tx)), float(round(ty))
        zoom = _uniform(rng, *scale)
        shear_x = _uniform(rng, *shear)
        return {"theta": _affine_matrix(angle, (tx, ty), zoom, shear_x, dtype), "mode": interpolation}

    def _draw_color_jitter(self, rng, generator, channels, dtype, brightness, contrast, saturation, hue):
        # Ranges were normalised to (low, high) pairs by build_augmentation.
        factors = {
            "brightness": _uniform(rng, *brightness),
            "contrast": _uniform(rng, *contrast),
            "saturation": _uniform(rng, *saturation),
            "hue": _uniform(rng, *hue),
        }
        # Random order of the four adjustments, as torchvision's ColorJitter does.
        order = rng.sample(("brightness", "contrast", "saturation", "hue"), 4)
        return {"factors": factors, "order": order}

    def _draw_gaussian_blur(self, rng, generator, channels, dtype, kernel_size, sigma):
        return {"kernel_size": kernel_size, "sigma": max(_uniform(rng, *sigma), 1e-3)}

    def _draw_gaussian_noise(self, rng, generator, channels, dtype, std):
        sigma = _uniform(rng, *std)
        shape = (channels, self.crop_size, self.crop_size)
        return {"sigma": sigma, "noise": torch.randn(shape, generator=generator, dtype=dtype)}

    def _draw_random_erasing(self, rng, generator, channels, dtype, scale, ratio, value):
        height = width = self.crop_size
        log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        for _ in range(10):
            target_area = height * width * _uniform(rng, *scale)
            aspect = math.exp(_uniform(rng, *log_ratio))
            erase_h = round(math.sqrt(target_area * aspect))
            erase_w = round(math.sqrt(target_area / aspect))
            if 0 < erase_h < height and 0 < erase_w < width:
                top = rng.randrange(height - erase_h + 1)
                left = rng.randrange(width - erase_w + 1)
                return {"box": (top, left, erase_h, erase_w), "value": value}
        return {"box": None, "value": value}

    # -- the crop of the fallback path: a [C, H, W] image to a new [C, crop, crop] tensor -------------------

    def _crop(self, image: torch.Tensor, plan: _Plan) -> torch.Tensor:
        if plan.crop is None:
            return center_crop_resize(image, self.crop_size)
        top, left, crop_h, crop_w = plan.crop
        crop = image[..., top : top + crop_h, left : left + crop_w]
        return _resize(crop, (self.crop_size, self.crop_size), self._mode, self._antialias)

    # -- fast path: each operation updates ``image`` [C, h, w] (a view into the output) in place ---------------

    def _fast_horizontal_flip(self, image):  # only when not folded into the first resize
        image.copy_(image.flip(-1))

    def _fast_vertical_flip(self, image):
        image.copy_(image.flip(-2))

    def _fast_affine(self, image, theta, mode):
        grid = _affine_grid(theta, image.shape[-2], image.shape[-1])
        image.copy_(F.grid_sample(image[None], grid, mode=mode, padding_mode="zeros", align_corners=False)[0])

    def _fast_random_resized_crop(self, image, box):
        top, left, crop_h, crop_w = box
        if (crop_h, crop_w) == tuple(image.shape[-2:]):
            return  # the whole image resized to its own size
        crop = image[:, top : top + crop_h, left : left + crop_w]
        if image.dtype == torch.float32:
            resized = torch.empty_like(image)
            _resize_into(crop, [], resized)
        else:
            resized = _resize(crop, tuple(image.shape[-2:]))
        image.copy_(resized)

    def _fast_color_jitter(self, image, factors, order):
        rgb = image.shape[0] == 3
        for name in order:
            factor = factors[name]
            if name == "brightness":
                image.mul_(factor).clamp_(0.0, 1.0)
            elif name == "contrast":
                # The mean of the grey image is the weighted sum of the channel means.
                mean = (
                    float(torch.tensor(_GREY, dtype=image.dtype).mul_(image.mean(dim=(1, 2))).sum())
                    if rgb
                    else float(image.mean())
                )
                image.mul_(factor).add_(mean * (1.0 - factor)).clamp_(0.0, 1.0)
            elif name == "saturation" and rgb:
                grey = (
                    torch.mul(image[0], _GREY[0])
                    .add_(image[1], alpha=_GREY[1])
                    .add_(image[2], alpha=_GREY[2])
                )
                image.mul_(factor).add_(grey.mul_(1.0 - factor)).clamp_(0.0, 1.0)
            elif name == "hue" and rgb and factor != 0.0:
                _hue_shift(image[None], torch.tensor([factor]), out=image[None]).clamp_(0.0, 1.0)

    def _fast_autocontrast(self, image):
        low = image.amin(dim=(-2, -1), keepdim=True)
        span = image.amax(dim=(-2, -1), keepdim=True) - low
        # Flat channels stay as they are: subtract 0 and divide by 1 there (selected on the [C] statistics).
        flat = span <= 0
        image.sub_(torch.where(flat, torch.zeros_like(low), low)).div_(
            torch.where(flat, torch.ones_like(span), span)
        )

    def _fast_sharpness(self, image, factor):
        height, width = image.shape[-2:]
        if height < 3 or width < 3:
            return
        factor = float(factor)
        # The 3x3 box sum as two separable 3-tap sums (4 additions instead of 8).
        rows = image[..., :, :-2] + image[..., :, 1:-1]
        rows += image[..., :, 2:]
        box = rows[..., :-2, :] + rows[..., 1:-1, :]
        box += rows[..., 2:, :]
        centre = image[..., 1:-1, 1:-1]
        # factor * x + (1 - factor) * (box + 4x) / 13, written over the centre (each output reads only its own
        # input pixel there). Border pixels blend with themselves: only the blend's clamp changes them (values
        # outside [0, 1] reach here from the bicubic resize and the noise).
        box.mul_((1.0 - factor) / 13.0)
        torch.add(box, centre, alpha=factor + 4.0 * (1.0 - factor) / 13.0, out=centre).clamp_(0.0, 1.0)
        for border in (image[..., 0, :], image[..., -1, :], image[..., 1:-1, 0], image[..., 1:-1, -1]):
            border.clamp_(0.0, 1.0)

    def _fast_solarize(self, image, threshold):
        above = _step(image - float(threshold))
        # x + [x >= t] * (1 - 2x): 1 - x at and above the threshold, x below.
        image.addcmul_(above, image * -2.0 + 1.0)

    def _fast_gaussian_blur(self, image, kernel_size, sigma):
        height, width = image.shape[-2:]
        taps = _blur_taps(kernel_size, sigma, height, width)
        if taps is None:
            return
        radius = kernel_size // 2
        padded = F.pad(image[None], (radius, radius, radius, radius), mode="reflect")[0]
        # Symmetric taps: mirrored rows (columns) share a weight; accumulate in place, no temporaries.
        rows = torch.mul(padded[..., radius : radius + height, :], taps[radius])
        for d in range(1, radius + 1):
            rows.add_(padded[..., radius - d : radius - d + height, :], alpha=taps[radius + d])
            rows.add_(padded[..., radius + d : radius + d + height, :], alpha=taps[radius + d])
        torch.mul(rows[..., radius : radius + width], taps[radius], out=image)
        for d in range(1, radius + 1):
            image.add_(rows[..., radius - d : radius - d + width], alpha=taps[radius + d])
            image.add_(rows[..., radius + d : radius + d + width], alpha=taps[radius + d])

    def _fast_gaussian_noise(self, image, sigma, noise):
        image.add_(noise, alpha=sigma).clamp_(0.0, 1.0)

    def _fast_random_erasing(self, image, box, value):
        if box is not None:
            top, left, erase_h, erase_w = box
            image[:, top : top + erase_h, left : left + erase_w] = value


_FLIPS = (("horizontal_flip", -1), ("vertical_flip", -2))
_FLIP_NAMES = {name for name, _ in _FLIPS}


#: Outputs per dense block of the banded resize matrices. A block of 32 outputs spans ~32 * scale + 3 inputs, so
#: most of its weights are zeros; one BLAS product per block still beats gathering the 2-4 taps of each output
#: (and 7 products per 224 px axis amortise their calls). Measured: 16 and 64 are no faster.
_RESIZE_BLOCK = 32


def _filter(mode: str, x: np.ndarray) -> np.ndarray:
    """ATen's antialiasing filters in float32: the triangle (bilinear) and Keys' cubic with a = -0.5 (bicubic)."""
    f32 = np.float32
    x = np.abs(x)
    if mode == "bilinear":
        return np.maximum(f32(1) - x, f32(0))
    a = f32(-0.5)
    near = ((a + f32(2)) * x - (a + f32(3))) * x * x + f32(1)
    far = ((a * x - f32(5) * a) * x + f32(8) * a) * x - f32(4) * a
    return np.where(x < 1, near, np.where(x < 2, far, f32(0))).astype(f32)


# Sized for every crop height and width of a 300 px patch, with and without a flip, plus the chain's later crops.
@functools.lru_cache(maxsize=1024)
def _resize_blocks(
    in_size: int, out_size: int, reverse: bool, mode: str = "bilinear", antialias: bool = True
) -> tuple[tuple[int, int, int, int, torch.Tensor], ...]:
    """Resampling of one axis (``align_corners=False``) as dense blocks of its banded matrix.

    Antialiased, the weights follow ATen's ``_upsample_bilinear2d_aa`` / ``_upsample_bicubic2d_aa`` in float32
    arithmetic (the filter widened by the scale when shrinking, each output's taps normalised), so
    ``F.interpolate(..., antialias=True)`` and this agree to float rounding. Without antialiasing they are ATen's
    own (see :func:`_plain_weights`). ``mode`` is ``"bilinear"`` or ``"bicubic"``. ``reverse`` lists the outputs
    last to first: a flip folded into the resampling.

    Returns:
        ``(out_start, out_stop, in_start, in_stop, weights [out_stop - out_start, in_stop - in_start])`` per block.
    """
    dense = (
        _antialiased_weights(in_size, out_size, mode)
        if antialias
        else _plain_weights(in_size, out_size, mode)
    )
    if reverse:
        dense = dense[::-1]
    blocks = []
    for start in range(0, out_size, _RESIZE_BLOCK):
        block = dense[start : start + _RESIZE_BLOCK]
        used = np.flatnonzero((block != 0).any(axis=0))
        low, high = int(used[0]), int(used[-1]) + 1
        blocks.append((start, start + len(block), low, high, torch.from_numpy(block[:, low:high].copy())))
    return tuple(blocks)


def _plain_weights(in_size: int, out_size: int, mode: str) -> np.ndarray:
    """``[out_size, in_size]`` weights of ATen's resampling without antialiasing: 2 (bilinear) or 4 (bicubic, Keys'
    a = -0.75) taps around each output's source position, indices clamped at the borders, whatever the scale.

    Read off ATen itself by resampling an identity image along one axis (the other keeps its size, where both
    kernels reduce to the identity), so they are exactly the weights ``F.interpolate(..., antialias=False)`` uses.
    """
    eye = torch.eye(in_size, dtype=torch.float32)[None, None]
    resampled = F.interpolate(eye, size=(out_size, in_size), mode=mode, align_corners=False, antialias=False)
    return resampled[0, 0].numpy()


def _antialiased_weights(in_size: int, out_size: int, mode: str) -> np.ndarray:
    """``[out_size, in_size]`` weights of ATen's antialiased resampling, in its float32 arithmetic."""
    f32 = np.float32
    half = f32(1) if mode == "bilinear" else f32(2)  # half the filter's support at scale 1
    scale = f32(in_size) / f32(out_size)
    support, invscale = (half * scale, f32(1) / scale) if scale >= 1 else (half, f32(1))
    centre = scale * (np.arange(out_size, dtype=f32) + f32(0.5))
    first = np.maximum((centre - support + f32(0.5)).astype(np.int64), 0)
    stop = np.minimum((centre + support + f32(0.5)).astype(np.int64), in_size)
    taps = first[:, None] + np.arange(int((stop - first).max()))[None, :]
    weights = _filter(mode, (taps.astype(f32) - centre[:, None] + f32(0.5)) * invscale)
    weights[taps >= stop[:, None]] = 0
    weights /= np.cumsum(weights, axis=1, dtype=f32)[:, -1:]  # ATen sums the taps in order
    dense = np.zeros((out_size, in_size), dtype=f32)
    rows = np.arange(out_size)[:, None]
    np.add.at(dense, (np.broadcast_to(rows, taps.shape), np.minimum(taps, in_size - 1)), weights)
    return dense


def _resize_into(
    image: torch.Tensor, flips: list[int], out: torch.Tensor, mode: str = "bilinear", antialias: bool = True
) -> None:
    """``out = resize(image).flip(flips)`` for float32 CPU ``image`` ``[C, h, w]`` and contiguous ``out`` ``[C, H, W]``.

    The same result as the reference path's ``F.interpolate`` (to ~2e-7) at about half its cost on CPU:
    each axis is a product with a banded weight matrix, done block by block so that a block only reads the input
    rows its band covers; a flip reverses the matrix rows, so it costs nothing. ``out`` must not overlap ``image``.
    """
    channels, height, width = image.shape
    out_h, out_w = out.shape[-2:]
    rows = torch.empty((channels, out_h, width), dtype=image.dtype)
    for start, stop, low, high, weights in _resize_blocks(height, out_h, -2 in flips, mode, antialias):
        torch.bmm(weights.expand(channels, *weights.shape), image[:, low:high], out=rows[:, start:stop])
    rows, target = rows.view(channels * out_h, width), out.view(channels * out_h, out_w)
    for start, stop, low, high, weights in _resize_blocks(width, out_w, -1 in flips, mode, antialias):
        torch.mm(rows[:, low:high], weights.T, out=target[:, start:stop])


def _copy_flipped(source: torch.Tensor, dims: list[int], out: torch.Tensor) -> None:
    """``out.copy_(source.flip(dims))`` in one pass: numpy copies through negative strides, torch's flip makes a
    flipped copy first (measured ~3x slower for a 224 px view)."""
    if not dims:
        out.copy_(source)
    elif source.device.type == out.device.type == "cpu" and source.dtype == out.dtype in _NUMPY_FLOATS:
        reverse = slice(None, None, -1)
        index = tuple(reverse if d - source.dim() in dims else slice(None) for d in range(source.dim()))
        np.copyto(out.numpy(), source.detach().numpy()[index])
    else:
        out.copy_(source.flip(dims))


_NUMPY_FLOATS = (torch.float32, torch.float64)


def _default_generator(generator: torch.Generator | None) -> torch.Generator:
    if generator is None:
        return torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))
    return generator


def _validate(name: str, params: Any) -> dict[str, Any]:
    if name not in OPERATION_DEFAULTS:
        raise ValueError(f"unknown augmentation {name!r}; known: {sorted(OPERATION_DEFAULTS)}")
    if params is None or params is True:
        params = {}
    if not isinstance(params, Mapping):
        raise ValueError(f"augmentation {name!r} needs a dict of parameters, got {params!r}")
    merged = copy.deepcopy(OPERATION_DEFAULTS[name])
    for key, value in params.items():
        if key not in merged:
            raise ValueError(f"unknown parameter {name}.{key}; known: {sorted(merged)}")
        merged[key] = value
    p = merged["p"]
    if not isinstance(p, int | float) or not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"probability {name}.p must be in [0, 1], got {p!r}")
    merged["p"] = float(p)
    if name == "resize":
        if merged["p"] != 1.0:
            raise ValueError(f"resize is not random: resize.p must be 1, got {p!r}")
        if merged["interpolation"] not in ("bilinear", "bicubic"):
            raise ValueError(
                f"resize.interpolation must be 'bilinear' or 'bicubic', got {merged['interpolation']!r}"
            )
        if not isinstance(merged["antialias"], bool):
            raise ValueError(f"resize.antialias must be true or false, got {merged['antialias']!r}")
    # Normalise ranges now so a bad value fails at build time, not in the middle of an epoch.
    if name in ("random_resized_crop", "random_erasing"):
        merged["scale"] = _range(merged["scale"], f"{name}.scale")
        merged["ratio"] = _range(merged["ratio"], f"{name}.ratio")
        if merged["scale"][0] <= 0 or merged["scale"][1] > 1 or merged["ratio"][0] <= 0:
            raise ValueError(f"{name}.scale must lie in (0, 1] and {name}.ratio be positive, got {merged}")
    if name == "affine":
        merged["degrees"] = _range(merged["degrees"], "affine.degrees", 0.0)
        merged["shear"] = _range(merged["shear"], "affine.shear", 0.0)
        # translate is (max fraction along x, along y); scale is a [low, high] zoom range (a number: fixed zoom).
        translate, zoom = merged["translate"], merged["scale"]
        merged["translate"] = (
            (float(translate),) * 2
            if isinstance(translate, int | float)
            else _range(translate, "affine.translate")
        )
        merged["scale"] = (
            (float(zoom),) * 2 if isinstance(zoom, int | float) else _range(zoom, "affine.scale")
        )
        if min(merged["translate"]) < 0 or merged["scale"][0] <= 0:
            raise ValueError(f"affine.translate must be >= 0 and affine.scale > 0, got {params!r}")
        if merged["interpolation"] not in ("bilinear", "nearest"):
            raise ValueError(
                f"affine.interpolation must be 'bilinear' or 'nearest', got {merged['interpolation']!r}"
            )
        if not isinstance(merged["round_translate"], bool):
            raise ValueError(
                f"affine.round_translate must be true or false, got {merged['round_translate']!r}"
            )
    if name == "gaussian_blur":
        kernel = merged["kernel_size"]
        if not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"gaussian_blur.kernel_size must be a positive odd integer, got {kernel!r}")
        merged["sigma"] = _range(merged["sigma"], "gaussian_blur.sigma")
    if name == "gaussian_noise":
        merged["std"] = _range(merged["std"], "gaussian_noise.std")
    if name == "color_jitter":
        for key in ("brightness", "contrast", "saturation", "hue"):
            centre = 0.0 if key == "hue" else 1.0
            low, high = _range(merged[key], f"color_jitter.{key}", centre)
            if key != "hue" and low < 0:
                raise ValueError(f"color_jitter.{key} must not go below 0, got {merged[key]!r}")
            merged[key] = (low, high)
    if name == "solarize" and not 0.0 <= float(merged["threshold"]) <= 1.0:
        raise ValueError(f"solarize.threshold must be in [0, 1], got {merged['threshold']!r}")
    if name == "sharpness" and float(merged["factor"]) < 0:
        raise ValueError(f"sharpness.factor must be >= 0, got {merged['factor']!r}")
    return merged


def build_augmentation(config: str | Mapping[str, Any] | None, crop_size: int = 224) -> HLSSAugmentation:
    """Build the training augmentation chain from a preset name or a config dict (e.g. a YAML section).

    Args:
        config (`str`, `dict` or `None`): the name of a set in :data:`AUGMENTATION_PRESETS` (``"hlss_hf"``, the
            default set; ``"hlss_reference"``, the reference's chain as its code runs), or operation name ->
            parameters (missing parameters take the operation's defaults from :data:`OPERATION_DEFAULTS`).
            ``None`` gives :data:`DEFAULT_AUGMENTATION`. The dict lists the operations to use; ``false`` (or
            ``p: 0``) as a value leaves one out. Without ``resize``, the operations run in :data:`ORDER`, and
            without ``random_resized_crop`` the image is centre-cropped (resized first if smaller) to
            ``crop_size``. With ``resize`` (as the first key) the whole image is resized to ``crop_size`` and the
            operations run in the dict's order.
        crop_size (`int`, defaults to 224): side of the square output.

    Returns:
        `HLSSAugmentation`, called as ``augment(image, generator=torch.Generator)``.

    Raises:
        ValueError: for an unknown preset, operation or parameter, or a probability outside [0, 1] (naming it).
    """
    if not isinstance(crop_size, int) or crop_size <= 0:
        raise ValueError(f"crop_size must be a positive integer, got {crop_size!r}")
    if isinstance(config, str):
        if config not in AUGMENTATION_PRESETS:
            raise ValueError(f"unknown augmentation preset {config!r}; known: {sorted(AUGMENTATION_PRESETS)}")
        config = AUGMENTATION_PRESETS[config]
    config = DEFAULT_AUGMENTATION if config is None else config
    if not isinstance(config, Mapping):
        raise ValueError(
            "augmentation config must be a preset name or a dict of operation -> parameters, got "
            f"{type(config).__name__}"
        )
    if "resize" in config and next(iter(config)) != "resize":
        raise ValueError(f"augmentation 'resize' must come first (it sets the order), got {list(config)}")
    operations = {}
    for name, params in config.items():
        if params is False:
            _validate(name, None)  # still reject unknown names
            continue
        operations[name] = _validate(name, params)
    return HLSSAugmentation(operations, crop_size)


def build_eval_transform(crop_size: int = 224) -> HLSSAugmentation:
    """The evaluation transform: centre crop to ``crop_size`` (resizing first when the image is smaller).

    Args:
        crop_size (`int`, defaults to 224): side of the square output.
    """
    return build_augmentation({}, crop_size)
