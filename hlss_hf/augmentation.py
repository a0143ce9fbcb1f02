"""Patch augmentations for HLSS pretraining, deterministic given a :class:`torch.Generator`.

The strong set follows the HiDisc / HLSS research code: random resized crop, horizontal and vertical flips,
Gaussian noise, colour jitter, autocontrast, solarize, sharpness, Gaussian blur, affine and random erasing,
each applied with its own probability. Every random draw comes from the generator passed to the call (never
from torch's global RNG, which is why kornia's random modules are not used: only its functional ops are), so
the same generator state gives the same views in any DataLoader worker or process.

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
```

A YAML config sets the same dict, e.g. ``augmentation: {random_resized_crop: {scale: [0.3, 1.0]}, ...}``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

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
    "random_resized_crop": {"p": 1.0, "scale": (0.08, 1.0), "ratio": (3 / 4, 4 / 3)},
    "horizontal_flip": {"p": 0.5},
    "vertical_flip": {"p": 0.5},
    "affine": {"p": 0.5, "degrees": 10.0, "translate": (0.0, 0.0), "scale": (1.0, 1.0), "shear": 0.0},
    "color_jitter": {"p": 0.5, "brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1},
    "autocontrast": {"p": 0.5},
    "sharpness": {"p": 0.5, "factor": 2.0},
    "solarize": {"p": 0.5, "threshold": 0.5},
    "gaussian_blur": {"p": 0.5, "kernel_size": 5, "sigma": (0.1, 2.0)},
    "gaussian_noise": {"p": 0.5, "std": (0.01, 0.1)},
    "random_erasing": {"p": 0.5, "scale": (0.02, 0.33), "ratio": (0.3, 3.3), "value": 0.0},
}

#: The order in which operations run, whatever the order of the config's keys: the crop first, so that the
#: pixel operations work on the (smaller) crop.
ORDER: tuple[str, ...] = tuple(OPERATION_DEFAULTS)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _coin(generator: torch.Generator, p: float) -> bool:
    # Always draw, even for p in {0, 1}, so that changing one probability does not shift the other draws.
    return torch.rand((), generator=generator).item() < p


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


def _resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(image.shape[-2:]) == size:
        return image
    # antialias only matters when shrinking; it keeps downscaled crops from aliasing like torchvision's default.
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]


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


def _grayscale(image: torch.Tensor) -> torch.Tensor:
    if image.shape[0] == 3:
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=image.dtype, device=image.device)
        return (image * weights[:, None, None]).sum(0, keepdim=True)
    return image.mean(0, keepdim=True)


def _blend(image: torch.Tensor, other: torch.Tensor, factor: float) -> torch.Tensor:
    return (factor * image + (1.0 - factor) * other).clamp_(0.0, 1.0)


def _separable_blur(image: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Gaussian blur of ``[C, H, W]`` with reflect padding, as a separable sum of shifted slices."""
    radius = kernel_size // 2
    height, width = image.shape[-2:]
    if radius == 0:
        return image
    if radius >= min(height, width):
        raise ValueError(
            f"gaussian_blur.kernel_size {kernel_size} is too large for an image of {height}x{width}"
        )
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float64) / sigma) ** 2)
    taps = (taps / taps.sum()).tolist()
    padded = F.pad(image[None], (radius, radius, radius, radius), mode="reflect")[0]
    rows = sum(tap * padded[..., i : i + height, :] for i, tap in enumerate(taps))
    return sum(tap * rows[..., j : j + width] for j, tap in enumerate(taps))


class HLSSAugmentation:
    """A chain of randomly applied patch augmentations with explicit-generator determinism.

    Build it with :func:`build_augmentation` (or :func:`build_eval_transform`) rather than directly.

    Args:
        operations (`dict[str, dict]`): operation name -> validated parameters (see :data:`OPERATION_DEFAULTS`).
        crop_size (`int`): side of the square output.
    """

    def __init__(self, operations: Mapping[str, Mapping[str, Any]], crop_size: int):
        self.operations = {name: dict(operations[name]) for name in ORDER if name in operations}
        self.crop_size = int(crop_size)

    def __repr__(self) -> str:
        ops = ", ".join(f"{name}(p={params['p']})" for name, params in self.operations.items())
        return f"{type(self).__name__}(crop_size={self.crop_size}, [{ops}])"

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment ``image`` (``[C, H, W]`` or ``[N, C, H, W]``, float in [0, 1]).

        Args:
            image (`torch.Tensor`): one image or a batch; each image of a batch gets its own random draws.
            generator (`torch.Generator`, *optional*): source of every random draw. When omitted, one is seeded
                from torch's global RNG (convenient, but then only as reproducible as the global seed).

        Returns:
            `torch.Tensor` of shape ``[C, crop, crop]`` or ``[N, C, crop, crop]``.
        """
        if not torch.is_floating_point(image):
            raise TypeError(f"augmentations expect a float image in [0, 1], got dtype {image.dtype}")
        if generator is None:
            generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))
        if image.dim() == 4:
            return torch.stack([self._one(img, generator) for img in image])
        if image.dim() != 3:
            raise ValueError(
                f"expected an image [C, H, W] or a batch [N, C, H, W], got shape {tuple(image.shape)}"
            )
        return self._one(image, generator)

    def _one(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if "random_resized_crop" in self.operations:
            image = self._random_resized_crop(image, generator, **self.operations["random_resized_crop"])
        else:
            image = center_crop_resize(image, self.crop_size)
        for name, params in self.operations.items():
            if name == "random_resized_crop":
                continue
            params = dict(params)
            if _coin(generator, params.pop("p")):
                image = getattr(self, f"_{name}")(image, generator, **params)
        return image

    # Each operation below takes a [C, H, W] image and returns a new tensor (never modifying its input).

    def _random_resized_crop(self, image, generator, p, scale, ratio):
        height, width = image.shape[-2:]
        if not _coin(generator, p):
            return center_crop_resize(image, self.crop_size)
        area = height * width
        log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        # torchvision's rejection sampling: 10 tries, then fall back to the whole (centre) image.
        for _ in range(10):
            target_area = area * _uniform(generator, *scale)
            aspect = math.exp(_uniform(generator, *log_ratio))
            crop_w = round(math.sqrt(target_area * aspect))
            crop_h = round(math.sqrt(target_area / aspect))
            if 0 < crop_w <= width and 0 < crop_h <= height:
                top = int(torch.randint(0, height - crop_h + 1, (), generator=generator))
                left = int(torch.randint(0, width - crop_w + 1, (), generator=generator))
                break
        else:
            crop_h = crop_w = min(height, width)
            top, left = (height - crop_h) // 2, (width - crop_w) // 2
        crop = image[..., top : top + crop_h, left : left + crop_w]
        return _resize(crop, (self.crop_size, self.crop_size))

    def _horizontal_flip(self, image, generator):
        return image.flip(-1)

    def _vertical_flip(self, image, generator):
        return image.flip(-2)

    def _affine(self, image, generator, degrees, translate, scale, shear):
        height, width = image.shape[-2:]
        angle = math.radians(_uniform(generator, *degrees))
        tx = _uniform(generator, -translate[0], translate[0]) * width
        ty = _uniform(generator, -translate[1], translate[1]) * height
        zoom = _uniform(generator, *scale)
        shear_x = math.radians(_uniform(generator, *shear))
        # Forward map in pixel coordinates about the centre: translate . rotate . shear . scale.
        cos, sin = math.cos(angle), math.sin(angle)
        forward = torch.tensor(
            [[cos, -sin, tx], [sin, cos, ty], [0.0, 0.0, 1.0]], dtype=torch.float64
        ) @ torch.tensor(
            [[zoom, zoom * math.tan(shear_x), 0.0], [0.0, zoom, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64
        )
        # affine_grid wants output -> input in normalised [-1, 1] coordinates.
        to_norm = torch.diag(torch.tensor([2.0 / width, 2.0 / height, 1.0], dtype=torch.float64))
        theta = (to_norm @ torch.linalg.inv(forward) @ torch.linalg.inv(to_norm))[:2].to(image.dtype)
        grid = F.affine_grid(theta[None], [1, *image.shape], align_corners=False)
        return F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]

    def _color_jitter(self, image, generator, brightness, contrast, saturation, hue):
        # Ranges were normalised to (low, high) pairs by build_augmentation.
        factors = {
            "brightness": _uniform(generator, *brightness),
            "contrast": _uniform(generator, *contrast),
            "saturation": _uniform(generator, *saturation),
            "hue": _uniform(generator, *hue),
        }
        # Random order of the four adjustments, as torchvision's ColorJitter does.
        for index in torch.randperm(4, generator=generator).tolist():
            name = ("brightness", "contrast", "saturation", "hue")[index]
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

    def _autocontrast(self, image, generator):
        low = image.amin(dim=(-2, -1), keepdim=True)
        high = image.amax(dim=(-2, -1), keepdim=True)
        span = high - low
        # Flat channels stay as they are (torchvision does the same).
        flat = span <= 0
        return torch.where(flat, image, (image - low) / torch.where(flat, torch.ones_like(span), span))

    def _sharpness(self, image, generator, factor):
        # torchvision's definition: blend with a 3x3 smoothed copy ([[1,1,1],[1,5,1],[1,1,1]] / 13) whose border
        # pixels are the original ones. Shifted sums are several times faster than a depthwise conv on CPU.
        height, width = image.shape[-2:]
        if height < 3 or width < 3:
            return image
        box = sum(image[..., i : height - 2 + i, j : width - 2 + j] for i in range(3) for j in range(3))
        smooth = image.clone()
        smooth[..., 1:-1, 1:-1] = (box + 4.0 * image[..., 1:-1, 1:-1]) / 13.0
        return _blend(image, smooth, float(factor))

    def _solarize(self, image, generator, threshold):
        return torch.where(image >= threshold, 1.0 - image, image)

    def _gaussian_blur(self, image, generator, kernel_size, sigma):
        std = max(_uniform(generator, *sigma), 1e-3)
        return _separable_blur(image, kernel_size, std)

    def _gaussian_noise(self, image, generator, std):
        sigma = _uniform(generator, *std)
        noise = torch.randn(image.shape, generator=generator, dtype=image.dtype)
        return (image + sigma * noise).clamp(0.0, 1.0)

    def _random_erasing(self, image, generator, scale, ratio, value):
        height, width = image.shape[-2:]
        log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        for _ in range(10):
            target_area = height * width * _uniform(generator, *scale)
            aspect = math.exp(_uniform(generator, *log_ratio))
            erase_h = round(math.sqrt(target_area * aspect))
            erase_w = round(math.sqrt(target_area / aspect))
            if 0 < erase_h < height and 0 < erase_w < width:
                top = int(torch.randint(0, height - erase_h + 1, (), generator=generator))
                left = int(torch.randint(0, width - erase_w + 1, (), generator=generator))
                image = image.clone()
                image[..., top : top + erase_h, left : left + erase_w] = value
                return image
        return image


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


def build_augmentation(config: Mapping[str, Any] | None, crop_size: int = 224) -> HLSSAugmentation:
    """Build the training augmentation chain from a config dict (e.g. a YAML section).

    Args:
        config (`dict` or `None`): operation name -> parameters (missing parameters take the operation's
            defaults from :data:`OPERATION_DEFAULTS`). ``None`` gives :data:`DEFAULT_AUGMENTATION`. The dict
            lists the operations to use; ``false`` (or ``p: 0``) as a value leaves one out. Without
            ``random_resized_crop`` the image is centre-cropped (resized first if smaller) to ``crop_size``.
        crop_size (`int`, defaults to 224): side of the square output.

    Returns:
        `HLSSAugmentation`, called as ``augment(image, generator=torch.Generator)``.

    Raises:
        ValueError: for an unknown operation or parameter, or a probability outside [0, 1] (naming the key).
    """
    if not isinstance(crop_size, int) or crop_size <= 0:
        raise ValueError(f"crop_size must be a positive integer, got {crop_size!r}")
    config = DEFAULT_AUGMENTATION if config is None else config
    if not isinstance(config, Mapping):
        raise ValueError(
            f"augmentation config must be a dict of operation -> parameters, got {type(config).__name__}"
        )
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
