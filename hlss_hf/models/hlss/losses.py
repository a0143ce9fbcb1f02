"""HLSS losses: hierarchical visual contrastive (SupCon, unsupervised form), hierarchical alignment, and the
image-text contrastive loss of the alignment stage before HLSS (docs/method.md: HVC, HA, the losses as functions).
"""

from __future__ import annotations

import contextlib
import numbers
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .configuration_hlss import ALIGNMENT_REDUCTIONS, LEVELS

__all__ = [
    "ALIGNMENT_REDUCTIONS",
    "LEVELS",
    "gather_with_grad",
    "hierarchical_alignment_loss",
    "hierarchical_contrastive_loss",
    "image_text_contrastive_loss",
    "supcon_loss",
]

# Longest shape the cross-process shape check carries; a fixed length keeps that collective the same size on
# every rank even when ranks disagree.
_MAX_GATHER_DIMS = 15


def _compute_dtype(t: Tensor) -> torch.dtype:
    # Half precision logits at 1/0.07 scale lose ~3 significant digits; float64 stays float64 (tests).
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _autocast_off(device: torch.device):
    """Context that disables autocast on ``device`` so the upcast matmuls really run in float32."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except (RuntimeError, ValueError):  # device type without autocast support: nothing to disable
        return contextlib.nullcontext()


def _check_positive(value: float, name: str) -> None:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"`{name}` must be a positive number, got {value!r}")


def _check_embeddings(shape_hint: str = "", **tensors: Tensor) -> None:
    """Each of ``tensors`` a non-empty 2-D floating point tensor, named by its argument in the error."""
    for name, t in tensors.items():
        if not isinstance(t, Tensor) or t.dim() != 2:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"`{name}` must be a 2-D tensor{shape_hint}, got {shape}")
        if t.shape[0] < 1 or not t.is_floating_point():
            raise ValueError(
                f"`{name}` must be a non-empty floating point tensor, got {tuple(t.shape)} {t.dtype}"
            )


def gather_with_grad(t: Tensor) -> Tensor:
    """Concatenate ``t`` along dim 0 over all processes, in rank order, keeping the autograd graph.

    Identity when ``torch.distributed`` is unavailable, not initialised, or the world size is 1. The backward
    of the gather sums, over ranks, the gradients every rank's loss sends to this rank's shard; since every
    rank computes the same global loss ``L``, the local shard receives ``world_size * dL/dshard``, and DDP's
    gradient averaging over ranks then yields the single-process gradient ``dL/dtheta`` (up to float rounding).

    ``t`` is the local shard (dim 0 the per-process batch), of one shape on every process: a `ValueError` otherwise.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    world_size = dist.get_world_size()
    if t.dim() == 0 or t.dim() > _MAX_GATHER_DIMS:
        raise ValueError(
            f"`t` must have 1 to {_MAX_GATHER_DIMS} dims to be gathered, got shape {tuple(t.shape)}"
        )
    # all_gather allocates every rank's buffer like the local tensor, so unequal shards would silently corrupt
    # (or hang); check first with a fixed-size shape record.
    shape = torch.full((_MAX_GATHER_DIMS + 1,), -1, dtype=torch.int64, device=t.device)
    shape[0] = t.dim()
    shape[1 : t.dim() + 1] = torch.tensor(t.shape, dtype=torch.int64, device=t.device)
    shapes = [torch.empty_like(shape) for _ in range(world_size)]
    dist.all_gather(shapes, shape)
    if any(not torch.equal(s, shape) for s in shapes):
        got = [tuple(s[1 : int(s[0]) + 1].tolist()) for s in shapes]
        raise ValueError(f"`t` must have the same shape on every process to be gathered, got {got} by rank")
    # torch.distributed.nn.functional.all_gather warns it is deprecated in favour of a private module whose
    # backward needs reduce_scatter (not in gloo); it is still the public autograd-aware gather, so keep it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from torch.distributed.nn.functional import all_gather

        parts = all_gather(t)
    return torch.cat(parts, dim=0)


def supcon_loss(features: Tensor, temperature: float = 0.07, base_temperature: float = 0.07) -> Tensor:
    """SupCon loss in its unsupervised (SimCLR) form, contrast mode "all"; the formula is in docs/method.md (HVC).

    Features are used as given: L2-normalise them beforehand (the HLSS heads do).

    Args:
        features (`torch.Tensor` of shape `[n, m, D]`): ``n`` instances with ``m >= 2`` views each.
        temperature (`float`, defaults to 0.07): ``tau``.
        base_temperature (`float`, defaults to 0.07): ``tau_base``.

    Returns:
        `torch.Tensor`: scalar loss, float32 (float64 for float64 input).
    """
    if not isinstance(features, Tensor) or features.dim() != 3:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"`features` must be a 3-D tensor [n, m, D], got {shape}")
    n, m, d = features.shape
    if n < 1 or d < 1:
        raise ValueError(f"`features` needs at least one instance and one dimension, got shape {(n, m, d)}")
    if m < 2:
        raise ValueError(
            f"`features` must hold m >= 2 views per instance (dim 1) to have positives, got m={m}"
        )
    if not features.is_floating_point():
        raise ValueError(f"`features` must be a floating point tensor, got {features.dtype}")
    _check_positive(temperature, "temperature")
    _check_positive(base_temperature, "base_temperature")

    with _autocast_off(features.device):
        flat = features.reshape(n * m, d).to(_compute_dtype(features))  # [nm, D], row k*m + v = view v of k
        logits = flat @ flat.T / temperature  # [nm, nm]
        eye = torch.eye(n * m, dtype=torch.bool, device=flat.device)
        # -inf on the diagonal removes self from the denominator; logsumexp subtracts the row max, so nothing
        # overflows and the self term's exp underflows to exactly 0 (its gradient too).
        logits = logits.masked_fill(eye, float("-inf"))
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)  # [nm, nm]
        instance = torch.arange(n, device=flat.device).repeat_interleave(m)  # [nm]
        positive = (instance[:, None] == instance[None, :]) & ~eye  # [nm, nm], m - 1 per row
        # where (not multiply): the diagonal holds -inf, and 0 * -inf would be NaN.
        mean_log_prob_pos = torch.where(positive, log_prob, 0.0).sum(dim=1) / (m - 1)  # [nm]
        return -(temperature / base_temperature) * mean_log_prob_pos.mean()


def hierarchical_contrastive_loss(
    features: Tensor, level: str, temperature: float = 0.07, base_temperature: float = 0.07
) -> Tensor:
    """HVC loss at one level: `supcon_loss` of the features gathered over processes along ``B`` and grouped
    as docs/method.md (HVC) tabulates.

    Args:
        features (`torch.Tensor` of shape `[B, S, P, V, D]`): L2-normalised embeddings of ``B`` patients,
            ``S`` slides each, ``P`` patches per slide, ``V`` views per patch.
        level (`str`): one of ``"patch"``, ``"slide"``, ``"patient"``.
        temperature, base_temperature: as in `supcon_loss`.

    Returns:
        `torch.Tensor`: scalar loss (the global one when running distributed).
    """
    if level not in LEVELS:
        raise ValueError(f"`level` must be one of {list(LEVELS)}, got {level!r}")
    if not isinstance(features, Tensor) or features.dim() != 5:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"`features` must be a 5-D tensor [B, S, P, V, D], got {shape}")
    features = gather_with_grad(features)  # [W*B, S, P, V, D]
    b, s, p, v, d = features.shape
    # Row-major reshapes keep (B, S, P, V) order: merging leading dims names instances, trailing ones views.
    if level == "patch":
        grouped = features.reshape(b * s * p, v, d)
    elif level == "slide":
        grouped = features.reshape(b * s, p * v, d)
    else:
        grouped = features.reshape(b, s * p * v, d)
    return supcon_loss(grouped, temperature=temperature, base_temperature=base_temperature)


def hierarchical_alignment_loss(
    image_embeds: Tensor, attribute_embeds: Tensor, temperature: float = 1.0, reduction: str = "mean"
) -> Tensor:
    """HA loss at one level: symmetric KL between an embedding and its nearest attribute (docs/method.md, HA;
    how the reference differs: docs/fidelity.md). Differentiable in ``z``; the nearest-attribute choice is not.

    With ``reduction="sum"`` the gradient per image is ``N`` times the one of ``"mean"``, so the effective weight
    of HA grows with the batch.

    Not gathered across processes: the loss is a reduction of independent per-sample terms. With ``"mean"`` and
    equal shards, the DDP average of the per-rank means is the global mean (value and gradient). With ``"sum"``
    each rank returns its local sum; DDP's averaging then trains on ``global_sum / world_size``, and the
    reference's logged value is the sum of the per-rank values (not their mean).

    Args:
        image_embeds (`torch.Tensor` of shape `[N, D]`): image embeddings ``z``.
        attribute_embeds (`torch.Tensor` of shape `[K, D]`): the level's fixed attribute bank ``T_l``.
        temperature (`float`, defaults to 1.0): ``tau_a``, the softmax temperature.
        reduction (`str`, defaults to `"mean"`): `"mean"` over images, or `"sum"` (the reference's).

    Returns:
        `torch.Tensor`: scalar loss, float32 (float64 for float64 input), ``>= 0``.
    """
    _check_embeddings(image_embeds=image_embeds, attribute_embeds=attribute_embeds)
    if image_embeds.shape[1] != attribute_embeds.shape[1]:
        raise ValueError(
            f"`attribute_embeds` dim {attribute_embeds.shape[1]} must match `image_embeds` dim {image_embeds.shape[1]}"
        )
    _check_positive(temperature, "temperature")
    if reduction not in ALIGNMENT_REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {list(ALIGNMENT_REDUCTIONS)}, got {reduction!r}")

    dtype = torch.float64 if torch.float64 in (image_embeds.dtype, attribute_embeds.dtype) else torch.float32
    with _autocast_off(image_embeds.device):
        z = image_embeds.to(dtype)  # [N, D]
        bank = attribute_embeds.to(dtype)  # [K, D]
        with torch.no_grad():
            nearest = (F.normalize(z, dim=-1) @ F.normalize(bank, dim=-1).T).argmax(dim=1)  # [N]
        log_p = F.log_softmax(z / temperature, dim=-1)  # [N, D]
        log_q = F.log_softmax(bank[nearest] / temperature, dim=-1)  # [N, D]
        # KL(p||q) + KL(q||p) = sum (p - q)(log p - log q): one pass, and exactly 0 when p == q.
        sym_kl = ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(dim=-1)  # [N]
        return 0.5 * (sym_kl.sum() if reduction == "sum" else sym_kl.mean())


def image_text_contrastive_loss(
    image_embeds: Tensor, text_embeds: Tensor, temperature: float = 0.07
) -> Tensor:
    """CLIP's symmetric contrastive loss over (image, caption) pairs, gathered over processes with gradient
    (docs/method.md, the alignment stage). Image ``i`` and text ``i`` are a pair.

    Embeddings are used as given: L2-normalise them beforehand (the model does). A frozen text tower's embeddings
    may come without gradient; the loss then trains the image side only.

    Args:
        image_embeds (`torch.Tensor` of shape `[n, D]`): image embeddings ``z``.
        text_embeds (`torch.Tensor` of shape `[n, D]`): the embeddings of each image's caption ``t``.
        temperature (`float`, defaults to 0.07): ``tau`` (CLIP's initial ``1 / logit_scale``).

    Returns:
        `torch.Tensor`: scalar loss, float32 (float64 for float64 input).
    """
    _check_embeddings(" [n, D]", image_embeds=image_embeds, text_embeds=text_embeds)
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(
            f"`image_embeds` {tuple(image_embeds.shape)} and `text_embeds` {tuple(text_embeds.shape)} must have the "
            "same shape: one caption per image"
        )
    _check_positive(temperature, "temperature")
    z = gather_with_grad(image_embeds)  # [N, D], N = n * world size
    t = gather_with_grad(text_embeds)  # [N, D]
    dtype = torch.float64 if torch.float64 in (z.dtype, t.dtype) else torch.float32
    with _autocast_off(z.device):
        logits = z.to(dtype) @ t.to(dtype).T / temperature  # [N, N]: images x texts
        targets = torch.arange(logits.shape[0], device=logits.device)
        return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))
