"""The per-view kernels of :class:`~hlss_hf.data.augmentation.HLSSAugmentation`: banded-matrix resizes with flips
folded in, the affine grid, the closed-form hue rotation and the blur taps, arithmetic only (docs/data.md)."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F


def resize(
    image: torch.Tensor, size: tuple[int, int], mode: str = "bilinear", antialias: bool = True
) -> torch.Tensor:
    if tuple(image.shape[-2:]) == size:
        return image
    # antialias only matters when shrinking; it keeps downscaled crops from aliasing like torchvision's default
    # (from 0.17 on; the reference's 0.16.2 did not antialias tensors). Bicubic outputs are not clamped (they
    # overshoot [0, 1] slightly at edges), as torchvision's Resize on a float tensor.
    return F.interpolate(image[None], size=size, mode=mode, align_corners=False, antialias=antialias)[0]


#: ITU-R 601 luma weights of R, G, B, as torchvision's rgb_to_grayscale.
GREY = (0.299, 0.587, 0.114)


def blur_taps(kernel_size: int, sigma: float, height: int, width: int) -> list[float] | None:
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


# Multiplying a difference of two [0, 1] float32 values by 2**100 sends every non-zero difference far outside
# [-1, 1] (the smallest is ~1e-45 only for subnormal inputs), so ``clamp(d * 2**100 + 1, 0, 1)`` is an exact
# step function: 1 where d >= 0, 0 where d < 0. torch.where and comparisons cost ~20 multiplies on CPU.
_STEP = 2.0**100


def step(difference: torch.Tensor) -> torch.Tensor:
    """1.0 where ``difference >= 0`` and 0.0 where it is negative, in place on ``difference``."""
    return difference.mul_(_STEP).add_(1.0).clamp_(0.0, 1.0)


def affine_matrix(
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


def affine_grid(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
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


def hue_shift(images: torch.Tensor, shift: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
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
    step(torch.sub(r, value, out=mask_r))  # 1 where r is maximal
    step(torch.sub(g, value, out=mask_g))
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


def resize_into(
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


def copy_flipped(source: torch.Tensor, dims: list[int], out: torch.Tensor) -> None:
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
