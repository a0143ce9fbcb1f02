"""Patch augmentations for HLSS pretraining, deterministic given a :class:`torch.Generator` (docs/data.md,
"Augmentations").

Example:

```python
>>> import torch
>>> from hlss_hf.data.augmentation import build_augmentation
>>> augment = build_augmentation({"horizontal_flip": {"p": 0.5}, "solarize": {"p": 0.2, "threshold": 0.3}}, 224)
>>> view = augment(torch.rand(3, 300, 300), generator=torch.Generator().manual_seed(0))
>>> tuple(view.shape)
(3, 224, 224)
```
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from hlss_hf.data.augmentation_kernels import (
    GREY,
    affine_grid,
    affine_matrix,
    blur_taps,
    copy_flipped,
    hue_shift,
    resize,
    resize_into,
    step,
)

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

#: The reference's training augmentation as its code runs, in application order (GitHub Hasindri/HLSS:
#: hlss/datasets/improc.py ``get_srh_aug_list`` over hlss/config/train_hlss_attr3levels.yaml
#: ``data.train_augmentation``). Where that departs from the paper and the config (docs/fidelity.md): every operation
#: at p = 0.5 (the config's ``rand_aug_prob: 0.3`` is never passed); no colour jitter (``ColorJitter()`` without
#: arguments is a no-op); the patch resized to 224 first, bicubic and not antialiased (torchvision 0.16.2 on tensors;
#: the late random resized crop only enlarges, where antialiasing changes nothing); ``GaussianNoise`` uses its
#: ``min_var`` / ``max_var`` draw as the standard deviation; a fixed blur sigma; whole-pixel nearest affine moves.
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


def center_crop_resize(image: torch.Tensor, crop_size: int) -> torch.Tensor:
    """Center-crop a float ``image`` ``[C, H, W]`` to a square of ``crop_size``, resizing first when it is
    smaller."""
    height, width = image.shape[-2:]
    if min(height, width) < crop_size:
        scale = crop_size / min(height, width)
        height, width = max(crop_size, round(height * scale)), max(crop_size, round(width * scale))
        image = resize(image, (height, width))
    top, left = (height - crop_size) // 2, (width - crop_size) // 2
    return image[..., top : top + crop_size, left : left + crop_size]


@dataclass
class _Plan:
    """The random draws of one image: the box resized to the output first (``None``: centre crop; the whole image
    when the chain starts with ``resize``) and the applied operations in order."""

    crop: tuple[int, int, int, int] | None
    ops: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


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
        """Augment ``image`` (``[C, H, W]``, or a batch ``[N, C, H, W]``: :meth:`batch`), float in [0, 1], to
        ``[C, crop, crop]`` (``[N, C, crop, crop]``).

        ``generator`` is the source of every random draw; when omitted, one is seeded from torch's global RNG
        (convenient, but then only as reproducible as the global seed).
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
        """Augment several images at once into ``[N, C, crop, crop]`` (``out`` when given); image ``i`` gets the
        draws of the ``i``-th of sequential calls.

        ``images``: ``[N, C, H, W]`` or a sequence of ``[C, H_i, W_i]``, float in [0, 1] (sizes may differ; the
        channel count may not); they are never modified. ``generator``: as in :meth:`__call__`.
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
                    resize_into(image, [], shared[1], self._mode, self._antialias)
                copy_flipped(shared[1], flips, view)
            elif fast_resize:
                top, left, crop_h, crop_w = plan.crop
                crop = image[:, top : top + crop_h, left : left + crop_w]
                resize_into(crop, flips, view, self._mode, self._antialias)
            else:
                copy_flipped(self._crop(image, plan), flips, view)
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
        return {"theta": affine_matrix(angle, (tx, ty), zoom, shear_x, dtype), "mode": interpolation}

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
        return resize(crop, (self.crop_size, self.crop_size), self._mode, self._antialias)

    # -- fast path: each operation updates ``image`` [C, h, w] (a view into the output) in place ---------------

    def _fast_horizontal_flip(self, image):  # only when not folded into the first resize
        image.copy_(image.flip(-1))

    def _fast_vertical_flip(self, image):
        image.copy_(image.flip(-2))

    def _fast_affine(self, image, theta, mode):
        grid = affine_grid(theta, image.shape[-2], image.shape[-1])
        image.copy_(F.grid_sample(image[None], grid, mode=mode, padding_mode="zeros", align_corners=False)[0])

    def _fast_random_resized_crop(self, image, box):
        top, left, crop_h, crop_w = box
        if (crop_h, crop_w) == tuple(image.shape[-2:]):
            return  # the whole image resized to its own size
        crop = image[:, top : top + crop_h, left : left + crop_w]
        if image.dtype == torch.float32:
            resized = torch.empty_like(image)
            resize_into(crop, [], resized)
        else:
            resized = resize(crop, tuple(image.shape[-2:]))
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
                    float(torch.tensor(GREY, dtype=image.dtype).mul_(image.mean(dim=(1, 2))).sum())
                    if rgb
                    else float(image.mean())
                )
                image.mul_(factor).add_(mean * (1.0 - factor)).clamp_(0.0, 1.0)
            elif name == "saturation" and rgb:
                grey = (
                    torch.mul(image[0], GREY[0]).add_(image[1], alpha=GREY[1]).add_(image[2], alpha=GREY[2])
                )
                image.mul_(factor).add_(grey.mul_(1.0 - factor)).clamp_(0.0, 1.0)
            elif name == "hue" and rgb and factor != 0.0:
                hue_shift(image[None], torch.tensor([factor]), out=image[None]).clamp_(0.0, 1.0)

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
        above = step(image - float(threshold))
        # x + [x >= t] * (1 - 2x): 1 - x at and above the threshold, x below.
        image.addcmul_(above, image * -2.0 + 1.0)

    def _fast_gaussian_blur(self, image, kernel_size, sigma):
        height, width = image.shape[-2:]
        taps = blur_taps(kernel_size, sigma, height, width)
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
    """The evaluation transform: centre crop to ``crop_size`` (resizing first when the image is smaller)."""
    return build_augmentation({}, crop_size)
