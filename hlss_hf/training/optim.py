"""The accelerator, the optimizer and the learning-rate schedule of a run (train.py and finetune.py)."""

from __future__ import annotations

import os

import torch

from hlss_hf.errors import CheckpointError


def make_accelerator(run, project_dir: str | os.PathLike | None = None):
    """The ``Accelerator`` of a run, from its training settings (:class:`hlss_hf.config.RunConfig`: gradient
    accumulation, mixed precision, trackers, ``cpu``).

    Several processes on a machine without CUDA (``accelerate launch --multi_gpu --num_processes N`` on CPU) run
    with gloo, which Accelerate does only when told ``cpu=True``; the launcher's own ``--cpu`` cannot be combined
    with ``--multi_gpu``, so the rule lives here.

    Args:
        run (`RunConfig`): the run's training section.
        project_dir (`str`, *optional*): where trackers write their logs (the run's folder).
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    world = int(os.environ.get("WORLD_SIZE", "1"))
    project = None
    if project_dir is not None:
        project = ProjectConfiguration(project_dir=str(project_dir), logging_dir=str(project_dir))
    return Accelerator(
        gradient_accumulation_steps=run.gradient_accumulation_steps,
        mixed_precision=run.mixed_precision,
        log_with=run.trackers(),
        project_config=project,
        cpu=run.cpu or (world > 1 and not torch.cuda.is_available()),
        # Batches are pinned on CUDA (build_train_loader, finetune): copy them without blocking the host.
        dataloader_config=DataLoaderConfiguration(non_blocking=True),
    )


def scheduler_steps(accelerator, steps: int) -> int:
    """Scheduler steps for ``steps`` optimizer steps: a prepared scheduler steps once per process per optimizer
    step (Accelerate's convention), so warm-up and length scale with the number of processes."""
    return steps * accelerator.num_processes


def set_peak_lr(optimizer, scheduler, lr: float) -> None:
    """Apply a new peak learning rate to a resumed run: the schedule keeps its shape and position.

    ``load_state`` restores the optimizer's and the scheduler's base learning rates from the checkpoint, so a
    changed ``training.lr`` must be set on both, then the current step's value recomputed from the schedule.
    """
    inner = getattr(scheduler, "scheduler", scheduler)
    inner.base_lrs = [lr for _ in inner.base_lrs]
    for group in optimizer.param_groups:
        group["initial_lr"] = lr
    lambdas = getattr(inner, "lr_lambdas", None)
    if lambdas is None:
        raise CheckpointError(
            f"training.lr: cannot re-scale a {type(inner).__name__} schedule on resume; keep the checkpoint's lr"
        )
    values = [lr * fn(inner.last_epoch) for fn in lambdas]
    for group, value in zip(optimizer.param_groups, values, strict=True):
        group["lr"] = value
    inner._last_lr = values
