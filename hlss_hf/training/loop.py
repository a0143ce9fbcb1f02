"""The training loop both scripts share: the batches of a run, the optimizer steps and the non-finite guard."""

from __future__ import annotations

import torch


def all_finite(loss: torch.Tensor, accelerator) -> bool:
    """Whether the loss is finite on every process (each process learns the same answer, so all stop together:
    a process that stopped alone would leave the others waiting in the next collective)."""
    bad = (~torch.isfinite(loss.detach().float())).any().float().reshape(1).to(accelerator.device)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="max")
    return bad.item() == 0


def weights_finite(model: torch.nn.Module, accelerator) -> bool:
    """Whether every trainable parameter of ``model`` is finite on every process (a sharded model holds a part of
    the weights on each); checked before a checkpoint is called good."""
    with torch.no_grad():
        finite = all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.requires_grad)
    bad = torch.tensor([0.0 if finite else 1.0], device=accelerator.device)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="max")
    return bad.item() == 0
