"""The accelerator, the optimizer and the learning-rate schedule of a run (train.py and finetune.py)."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration
from transformers import get_scheduler

from hlss_hf.errors import CheckpointError, ConfigError


def make_accelerator(run, project_dir: str | os.PathLike | None = None):
    """The ``Accelerator`` of a run, from its training settings (:class:`hlss_hf.training.config.RunConfig`: gradient
    accumulation, mixed precision, trackers, ``cpu``).

    Several processes on a machine without CUDA (``accelerate launch --multi_gpu --num_processes N`` on CPU) run
    with gloo, which Accelerate does only when told ``cpu=True``; the launcher's own ``--cpu`` cannot be combined
    with ``--multi_gpu``, so the rule lives here. Trackers write their logs to ``project_dir`` (the run's folder).
    """
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


def set_peak_lr(optimizer, scheduler, lr: float) -> None:
    """Apply a new peak learning rate to a resumed run: the schedule keeps its shape and position.
    ``load_state`` restores the optimizer's and the scheduler's base learning rates from the checkpoint, so a
    changed ``training.lr`` must be set on both, then the current step's value recomputed from the
    schedule."""
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


def optimizer_groups(model, t) -> list[dict]:
    """AdamW parameter groups: biases and norm weights exempt from decay unless ``training.weight_decay_all``."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            exempt = not t.weight_decay_all and (param.ndim < 2 or "norm" in name.lower())
            (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def reference_steps_per_epoch(num_patients: int, batch_size: int, num_processes: int) -> int:
    """Optimizer steps per epoch that the HLSS reference's LR schedule counts: ``floor(ceil(N / B) / W)``.

    The reference sizes its scheduler from the single-process loader's length (``ceil(N / B)`` batches of ``B``
    patients, the last one short), floor-divided by the number of GPUs ``W``, while each of its DDP processes runs
    ``ceil(N / (B W))`` steps per epoch; on several processes its LR therefore moves faster than its epochs
    (``training.schedule_length: reference``). ``N``: training patients per epoch (after class balancing).
    Raises ``ConfigError`` when the formula gives 0 (``N <= B (W - 1)``).
    """
    steps = math.ceil(num_patients / batch_size) // num_processes
    if steps == 0:
        # The reference runs such a schedule with max(1, 0) as its length: the LR alternates between the peak
        # and 0 from one step to the next. Nothing worth reproducing.
        raise ConfigError(
            f"config key 'training.schedule_length': reference counts floor(ceil({num_patients} / {batch_size}) / "
            f"{num_processes}) = 0 steps per epoch ({num_patients} training patients, {batch_size} per device, "
            f"{num_processes} processes), a schedule of length 0; it needs more than "
            f"{batch_size * (num_processes - 1)} patients, fewer processes, or training.schedule_length run"
        )
    return steps


def schedule_length(
    t, max_steps: int, steps_per_epoch: int | None, reference_steps: int | None = None
) -> int:
    """Optimizer steps the LR schedule spans: ``training.schedule_steps`` / ``schedule_epochs``, else the run.
    A schedule longer than the run stops part-way along its curve, as the reference's 40,000-epoch cosine
    stopped at epoch 11,199. With ``reference_steps`` (``training.schedule_length: reference``,
    :func:`reference_steps_per_epoch`) the schedule spans ``schedule_epochs`` (else ``num_epochs``) epochs of
    that many steps, whatever the run takes per epoch."""
    if reference_steps is not None:
        epochs = t.schedule_epochs if t.schedule_epochs is not None else t.num_epochs
        length = math.ceil(epochs * reference_steps)
        if length < max_steps:
            raise ConfigError(
                f"config key 'training.schedule_length': reference counts {reference_steps} steps per epoch, "
                f"so the schedule ({length} steps over {epochs:g} epochs) ends before the run ({max_steps} "
                "steps); set training.schedule_epochs longer"
            )
        return length
    if t.schedule_steps is not None:
        length = t.schedule_steps
    elif t.schedule_epochs is not None:
        if steps_per_epoch is None:
            raise ConfigError(
                "config key 'training.schedule_epochs': a streamed dataset has no epochs; "
                "use training.schedule_steps"
            )
        length = math.ceil(t.schedule_epochs * steps_per_epoch)
    else:
        return max_steps
    if length < max_steps:
        key = "schedule_steps" if t.schedule_steps is not None else "schedule_epochs"
        raise ConfigError(
            f"config key 'training.{key}': the schedule ({length} steps) ends before the run ({max_steps} steps)"
        )
    return length


def warmup_length(t, schedule_steps: int, reference_steps: int | None = None) -> int:
    """Warm-up steps: ``training.warmup_ratio`` of the schedule, rounded; with ``reference_steps`` the reference's
    ``int(warmup_ratio * epochs * steps_per_epoch)`` (truncated, multiplied in that order)."""
    if reference_steps is not None:
        epochs = t.schedule_epochs if t.schedule_epochs is not None else t.num_epochs
        return int(t.warmup_ratio * epochs * reference_steps)
    return int(round(t.warmup_ratio * schedule_steps))


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How long a pretraining run is and how its learning rate moves, in optimizer steps."""

    max_steps: int
    accumulation: int  # micro-batches per optimizer step
    batches_per_epoch: int | None  # micro-batches per process per epoch; None for a stream
    steps: int  # steps the LR schedule spans (schedule_length)
    warmup: int
    reference_steps: int | None = None  # steps per epoch counted with training.schedule_length: reference
    streaming: bool = False
    sampler: Any = None  # the loader's batch sampler when one loader iteration may run across epochs

    @property
    def steps_per_epoch(self) -> int | None:
        if self.batches_per_epoch is None:
            return None
        return math.ceil(self.batches_per_epoch / self.accumulation)


def plan_schedule(t, loader, num_patients: int | None, num_processes: int, streaming: bool) -> Schedule:
    """The :class:`Schedule` of a run from its training settings and its (not yet prepared) loader."""
    GA = t.gradient_accumulation_steps
    batches_per_epoch = steps_per_epoch = sampler = None
    if streaming:
        max_steps = t.max_steps
    else:
        # Per-process batches per epoch after sharding (the batch sampler deals every process as many).
        batches_per_epoch = len(loader) // num_processes
        steps_per_epoch = math.ceil(batches_per_epoch / GA)
        if batches_per_epoch % GA == 0:
            # Epochs of whole accumulation groups: one loader iteration can run across epochs with the batches,
            # shards and gradient syncs of per-epoch iterations (EpochBatchSampler), and the workers then build
            # the next epoch's first batches while the last ones train (benchmarks/README.md, "Training input end
            # to end"). Otherwise an epoch's last, short group syncs at the end of its iteration: per-epoch loops.
            sampler = loader.batch_sampler
        max_steps = t.max_steps if t.max_steps is not None else math.ceil(t.num_epochs * steps_per_epoch)
    reference = None
    if t.schedule_length == "reference":
        reference = reference_steps_per_epoch(num_patients, t.per_device_batch_size, num_processes)
    steps = schedule_length(t, max_steps, steps_per_epoch, reference)
    return Schedule(
        max_steps=max_steps,
        accumulation=GA,
        batches_per_epoch=batches_per_epoch,
        steps=steps,
        warmup=warmup_length(t, steps, reference),
        reference_steps=reference,
        streaming=streaming,
        sampler=sampler,
    )


def lr_scheduler(t, optimizer, accelerator, steps: int, warmup: int):
    """``training.lr_scheduler`` over ``steps`` optimizer steps after ``warmup`` of them. A prepared scheduler steps
    once per process per optimizer step (Accelerate's convention), so both scale with the number of processes."""
    W = accelerator.num_processes
    return get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=warmup * W, num_training_steps=steps * W)
