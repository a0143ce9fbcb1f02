"""The training loop both scripts share: the batches of a run, the optimizer steps and the non-finite guard."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from hlss_hf.data import stream_batches
from hlss_hf.errors import CheckpointError, ConfigError, NonFiniteLossError
from hlss_hf.files import naming_full_disk, write_text_atomically
from hlss_hf.training.checkpoints import (
    RunPlan,
    TrainState,
    describe_changes,
    last_good_checkpoint,
    load_checkpoint,
    record_next_step,
)
from hlss_hf.training.optim import Schedule, set_peak_lr
from hlss_hf.training.run_warnings import RunWarning, WarningLog

logger = logging.getLogger(__name__)


def all_finite(loss: torch.Tensor, accelerator) -> bool:
    """Whether the loss is finite on every process (each process learns the same answer, so all stop together:
    a process that stopped alone would leave the others waiting in the next collective)."""
    return _nowhere((~torch.isfinite(loss.detach().float())).any(), accelerator)


def weights_finite(model: torch.nn.Module, accelerator) -> bool:
    """Whether every trainable parameter of ``model`` is finite on every process (a sharded model holds a part of
    the weights on each); checked before a checkpoint is called good."""
    with torch.no_grad():
        finite = all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.requires_grad)
    return _nowhere(torch.tensor(not finite), accelerator)


def _nowhere(bad: torch.Tensor, accelerator) -> bool:
    """Whether the flag ``bad`` is false on every process."""
    bad = bad.float().reshape(1).to(accelerator.device)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="max")
    return bad.item() == 0


def optimizer_steps(
    accelerator,
    model,
    optimizer,
    scheduler,
    batches: Iterable,
    forward: Callable[[Any], tuple[torch.Tensor, Any]],
    measure: Callable[[torch.Tensor, Any], dict[str, float]],
    *,
    max_grad_norm: float | None,
    non_finite: Callable[[Any], Exception],
    parameters: Iterable[torch.nn.Parameter] | None = None,
) -> Iterator[list[dict[str, float]]]:
    """Train on ``batches`` and yield after each optimizer step the measures of its micro-batches.

    Each micro-batch runs ``forward(batch) -> (loss, outputs)`` under ``accelerator.accumulate``; a loss that is not
    finite on some process raises ``non_finite(outputs)`` on every process at the same micro-batch. Gradients are
    clipped to ``max_grad_norm`` (over ``parameters``, default the model's) on the micro-batch that syncs them.
    ``measure(loss, outputs) -> {name: float}`` of one micro-batch is taken after its backward.
    """
    clipped = list(parameters) if parameters is not None else None
    measures: list[dict[str, float]] = []
    for batch in batches:
        with accelerator.accumulate(model):
            loss, outputs = forward(batch)
            if not all_finite(loss, accelerator):  # every process stops together
                raise non_finite(outputs)
            accelerator.backward(loss)
            if accelerator.sync_gradients and max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters() if clipped is None else clipped, max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        measures.append(measure(loss, outputs))
        if accelerator.sync_gradients:
            yield measures
            measures = []


def end_epoch_if_done(state: TrainState, batches_per_epoch: int | None) -> None:
    """Move ``state`` to the next epoch's start when it stands after the last batch of its epoch."""
    if batches_per_epoch is not None and state.batch_in_epoch >= batches_per_epoch:
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0


def batches(loader, dataset, state: TrainState, accelerator, schedule: Schedule) -> Iterator[Any]:
    """The run's micro-batches from where ``state`` stands, counting them in ``state.epoch`` / ``batch_in_epoch``.

    Three ways through the data: a stream (no epochs; :func:`hlss_hf.data.stream_batches` skips what was trained
    on); one loader iteration across the epochs still to come, when an epoch is whole accumulation groups
    (``schedule.sampler``: the workers build the next epoch's first batches while the last ones train); else one
    iteration per epoch, resumed part-way with ``skip_first_batches``.
    """
    while True:  # the caller stops at its last step
        if schedule.streaming:
            source = stream_batches(loader, dataset, state.step * schedule.accumulation, accelerator.device)
        else:
            loader.set_epoch(state.epoch)
            dataset.set_epoch(state.epoch)
            if schedule.sampler is not None:  # every epoch the run still needs, in one iteration
                left = state.batch_in_epoch + (schedule.max_steps - state.step) * schedule.accumulation
                schedule.sampler.num_epochs = max(1, math.ceil(left / schedule.batches_per_epoch))
            source = loader
            if state.batch_in_epoch:
                source = accelerator.skip_first_batches(loader, state.batch_in_epoch)
        for batch in source:
            end_epoch_if_done(state, schedule.batches_per_epoch)  # the iteration ran into the next epoch
            state.batch_in_epoch += 1
            yield batch
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0


class RunLog:
    """A run's ``metrics.jsonl`` (one JSON object per line, written by the main process), its trackers (numbers
    only) and its named warnings (:mod:`hlss_hf.training.run_warnings`: printed once, logged, kept for the card)."""

    def __init__(self, accelerator) -> None:
        self.accelerator = accelerator
        self.file: JsonlWriter | None = None
        self.warnings = WarningLog(printer=lambda text: accelerator.print(text, flush=True))

    def open(self, path: Path) -> None:
        if self.accelerator.is_main_process:
            self.file = JsonlWriter(path)

    def log(self, step: int, record: dict[str, Any], tracker_prefix: str = "") -> None:
        if self.file is not None:
            self.file.write({"step": step, **record})
        numbers = {tracker_prefix + k: v for k, v in record.items() if isinstance(v, int | float)}
        self.accelerator.log(numbers, step=step)

    def warn(self, step: int, warnings: list[RunWarning]) -> None:
        for warning in self.warnings.add(warnings):
            self.log(step, {"warning": warning.name, "message": warning.message})

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class TextTowerGuard:
    """A forward pre-hook on the text tower that fails while it is active (a training step's forward, ``with
    guard:``): the attribute banks and caption embeddings are computed once, so a text forward in a step would
    re-encode the descriptions (slow, and wrong for a frozen bank)."""

    def __init__(self) -> None:
        self.active = False
        self.calls = 0

    def __call__(self, module: torch.nn.Module, args: Any) -> None:
        self.calls += 1
        if self.active:
            raise RuntimeError(
                "the text tower ran during a training step; the attribute banks must be precomputed"
            )

    def __enter__(self) -> TextTowerGuard:
        self.active = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.active = False


#: The losses of an HLSS / alignment forward that are logged, besides its per-level ``level_losses``.
LOSS_KEYS = ("loss", "hvc_loss", "alignment_loss", "image_text_loss")


def loss_parts(outputs, accelerator=None) -> dict[str, float]:
    """The loss and its parts as floats, averaged over processes when there are several: terms computed per
    process (e.g. a per-sample mean over the local batch) then read as the global-batch value, like the gradient
    that DDP averages."""
    parts = {key: getattr(outputs, key) for key in LOSS_KEYS if getattr(outputs, key, None) is not None}
    parts.update(getattr(outputs, "level_losses", None) or {})
    if accelerator is not None and accelerator.num_processes > 1 and parts:
        stacked = torch.stack(
            [torch.as_tensor(v, dtype=torch.float32).detach().reshape(()) for v in parts.values()]
        )
        stacked = accelerator.reduce(stacked.to(accelerator.device), reduction="mean")
        return dict(zip(parts, stacked.tolist(), strict=True))
    return {key: _to_float(value) for key, value in parts.items()}


def _to_float(value: Any) -> float:
    return float(value.detach().float().item()) if torch.is_tensor(value) else float(value)


def non_finite_error(outputs, state: TrainState, run_dir: Path, unchecked: Path | None, accelerator):
    """The error for a non-finite loss at the next step, naming the checkpoint to go back to. The checkpoint
    written right before this step is not good (its next step is this one), so it is marked; the good one is the
    newest with finite weights whose next step's loss was finite."""
    if unchecked is not None and accelerator.is_main_process:
        record_next_step(unchecked, finite=False)
    accelerator.wait_for_everyone()
    parts = ", ".join(f"{k}={v}" for k, v in loss_parts(outputs).items())
    good = last_good_checkpoint(run_dir)
    if good is None:
        advice = (
            "No checkpoint is known to be good: start again with a lower training.lr (or save more often)."
        )
    else:
        advice = (
            f"Last good checkpoint: {good} (finite weights, finite loss at the step after it). Continue with "
            f"--training.resume_from_checkpoint {good} --training.lr <lower> (lr may change on resume)."
        )
    return NonFiniteLossError(
        f"non-finite loss at step {state.step + 1} (epoch {state.epoch}): {parts}. {advice}"
    )


class JsonlWriter:
    """Append one JSON object per line to a metrics file (flushed per line, so a crash loses nothing logged)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics file. A torn last line (disk full, power loss) is dropped with a warning; a
    malformed line elsewhere is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):
                logger.warning("%s: dropping the torn last line %d (%s)", path, number, err.msg)
                continue
            raise CheckpointError(f"{path}, line {number}: not JSON ({err.msg})") from err
    return records


def truncate_jsonl(path: str | os.PathLike, max_step: int, *, evaluations_at_max_step: bool = True) -> None:
    """Keep the records with ``step <= max_step`` (a resumed run drops what was logged after its checkpoint).
    With ``evaluations_at_max_step=False`` the evaluations logged at ``max_step`` go too: at a run's last step the
    final evaluation follows the checkpoint, and a run resumed from that checkpoint evaluates again."""
    path = Path(path)
    if not path.is_file():
        return

    def kept_record(record: dict[str, Any]) -> bool:
        step = record.get("step", 0)
        if step == max_step and not evaluations_at_max_step:
            return not any(key.startswith("eval/") for key in record)
        return step <= max_step

    kept = [record for record in read_jsonl(path) if kept_record(record)]
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept)
    with naming_full_disk(path, len(text.encode("utf-8"))):  # a resume's one write
        write_text_atomically(path, text)


def resume(accelerator, plan: RunPlan, schedule: Schedule, optimizer, scheduler, lr: float) -> TrainState:
    """Weights, optimizer, scheduler and RNG from the checkpoint, and its counters, checked against ``schedule``;
    the settings that changed (already checked by :func:`hlss_hf.training.checkpoints.plan_run`) are applied, a
    changed peak learning rate ``lr`` included."""
    path, changed = plan.resume_path, plan.changes
    accelerator.print(f"Resuming from {path}")
    state, _ = load_checkpoint(accelerator, path)
    if state.step > schedule.max_steps:
        raise ConfigError(
            f"config key 'training.max_steps': the run ends at step {schedule.max_steps}, and checkpoint {path} is "
            f"at step {state.step}; raise training.max_steps / num_epochs to train further"
        )
    if schedule.batches_per_epoch is not None:
        # The counters must describe one position of this run's batches: an edited file would shift them.
        GA = schedule.accumulation
        expected = state.epoch * schedule.steps_per_epoch + math.ceil(state.batch_in_epoch / GA)
        if state.batch_in_epoch > schedule.batches_per_epoch or expected != state.step:
            raise CheckpointError(
                f"checkpoint {path}: train_state.json says step {state.step}, epoch {state.epoch}, batch_in_epoch "
                f"{state.batch_in_epoch}, which is no position of this run ({schedule.batches_per_epoch} batches "
                "per epoch); the file was edited or belongs to another run"
            )
    if state.step == schedule.max_steps:
        # Killed in its final evaluation or save: the run resumes into them, with nothing left to train.
        accelerator.print(f"Checkpoint {path} is at the run's last step: finishing (evaluation and save)")
    if "training.lr" in changed:
        set_peak_lr(optimizer, scheduler, lr)
    if changed:
        accelerator.print(
            f"Changed on resume (applied from step {state.step + 1}): {describe_changes(changed)}"
        )
    end_epoch_if_done(state, schedule.batches_per_epoch)
    return state
