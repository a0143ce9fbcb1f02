"""The run folder, checkpoints and resume that ``train.py`` and ``finetune.py`` share: outputs are never lost,
resume runs no code from the checkpoint folder and does what its settings say (docs/training.md#resume-and-failures)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import load
from safetensors import SafetensorError, safe_open

from hlss_hf.errors import CheckpointError, ConfigError
from hlss_hf.files import naming_full_disk, output_lock, recover_swap, swap_in, write_text_atomically

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step_"
STATE_FILE = "train_state.json"
CONFIG_FILE = "train_config.json"
HEALTH_FILE = "health.json"
FROZEN_FILE = "frozen_weights.json"
# The frozen text tower is left out of checkpoints (MiniLM's 93 MB would be most of a small run's checkpoint, once
# per checkpoint): it never changes, a resumed run rebuilds it from its settings, and the checkpoint's fingerprint
# of it makes sure the rebuilt tower is the one the run trained with. Keys as the prepared model names them (DDP's
# `module.`, torch.compile's `_orig_mod.`). FSDP and DeepSpeed save through their own code and keep it.
_FROZEN_KEY = re.compile(r"^(?:module\.|_orig_mod\.)*text_model\.")
STAGING_SUFFIX = ".incoming"
_TMP_SUFFIX = ".tmp"
# What marks a folder as holding a run that a new run must not silently replace: a checkpoint or a saved model (a
# metrics.jsonl alone is the log of a run that failed before its first checkpoint: nothing to resume or keep).
RUN_MARKERS = ("checkpoints", "model.safetensors", "adapter", "merged", "finetune_report.json")

# Settings a resumed run may change: they touch neither the weights' past nor the batches still to come.
# `training.lr` is applied exactly (the schedule keeps its shape, scaled to the new peak); `training.max_steps` /
# `num_epochs` change the run's length (the LR schedule follows the new length unless training.schedule_steps or
# schedule_epochs fix it).
RESUMABLE_KEYS = frozenset(
    {
        "training.output_dir",
        "training.overwrite_output_dir",
        "training.resume_from_checkpoint",
        "training.max_steps",
        "training.num_epochs",
        "training.max_steps_this_run",
        "training.lr",
        "training.max_grad_norm",
        "training.cpu",
        "training.logging_steps",
        "training.save_steps",
        "training.save_total_limit",
        "training.eval_steps",
        "training.eval_at_end",
        "training.eval_before_training",
        "training.eval_batch_size",
        "training.knn_k",
        "training.knn_temperature",
        "training.knn_aggregation",
        "training.report_to",
        "training.project_name",
        "training.push_to_hub",
        "training.hub_private",
        "training.model_license",
        "training.project_url",
        "data.num_workers",
        "data.validation_split",
        "data.eval_resize",
        "data.eval_framing",
        "data.eval_antialias",
    }
)


# Keys that say how one invocation runs, not what the run is: never reported as changed.
INVOCATION_KEYS = frozenset(
    {"training.resume_from_checkpoint", "training.max_steps_this_run", "training.overwrite_output_dir"}
)


# ---------------------------------------------------------------------------------------------------------------
# Output folders: build beside, swap at the end


def staging_dir(output_dir: str | os.PathLike) -> Path:
    """Where a run that replaces an earlier run in ``output_dir`` works until it finishes."""
    out = Path(os.path.abspath(output_dir))  # `.` has no name to put a suffix on
    return out.with_name(out.name + STAGING_SUFFIX)


def earlier_run(output_dir: str | os.PathLike) -> list[str]:
    """Names in ``output_dir`` that show it holds an earlier run (empty: nothing to protect)."""
    out = Path(output_dir)
    found = []
    for name in RUN_MARKERS:
        present = bool(list_checkpoints(out)) if name == "checkpoints" else (out / name).exists()
        if present:
            found.append(name)
    return found


def plan_output(
    output_dir: str | os.PathLike,
    *,
    overwrite: bool,
    resume: str | os.PathLike | None,
    always_stage: bool = False,
) -> Path:
    """The folder this run writes to; changes nothing on disk.

    - A new run in a folder without an earlier run writes there (with ``always_stage``, as finetune.py has no
      resume: to the staging folder, and the folder must then be new or empty, since it is replaced whole).
    - A new run in a folder with an earlier run needs ``overwrite``; it then writes to :func:`staging_dir` and
      :func:`publish_output` swaps that in when the run has finished.
    - A resumed run continues in the folder that holds its checkpoint (the staging folder of an unfinished
      replacing run, or ``output_dir``); resumed from a checkpoint elsewhere, it is a new run for ``output_dir``.

    Anything else is a ``ConfigError`` naming what is there.
    """
    out, key = Path(output_dir), "training.output_dir"
    staging = staging_dir(out)
    if resume is not None:
        parents = Path(resume).absolute().parents
        if staging in parents:
            return staging
        if out.absolute() in parents:
            return out
    found = earlier_run(out)
    if not found:
        if not always_stage:
            return out
        others = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
        if others:
            listed = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
            raise ConfigError(
                f"config key '{key}': {out} is not empty ({listed}) and holds no earlier run; the run replaces its "
                "output folder whole when it finishes: choose a new or empty folder"
            )
        return staging
    if not overwrite:
        raise ConfigError(
            f"config key '{key}': {out} already holds a run ({', '.join(found)}); pass "
            "--training.resume_from_checkpoint latest to continue it, --training.overwrite_output_dir true to "
            "replace it once the new run has finished, or another output_dir"
        )
    return staging


def start_output(run_dir: str | os.PathLike, output_dir: str | os.PathLike, *, resume: bool) -> None:
    """Create the run folder (main process, after the config and data were validated). A new run in the
    staging folder starts from an empty one: what an earlier unfinished replacing run left there is this run's
    to discard (the user asked to overwrite). A new run in ``output_dir`` keeps the log of a run that failed
    there before its first checkpoint as ``metrics.failed.jsonl``."""
    run_dir = Path(run_dir)
    if not resume and run_dir == staging_dir(output_dir) and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    clean_temporary_checkpoints(run_dir)
    if not resume and (run_dir / "metrics.jsonl").exists():
        os.replace(run_dir / "metrics.jsonl", run_dir / "metrics.failed.jsonl")


def holds_output_dir(read_output_dir, key: str = "training.output_dir"):
    """Decorate a script's ``main(argv)`` to hold the lock on its output folder for the whole run.

    A second run into the same folder is refused at its start naming the first (:func:`hlss_hf.data.writer.
    output_lock`), and swaps a killed run left half done there are finished first (:func:`recover_output`).
    Only the main process (``RANK`` 0) writes the folder, so only it takes the lock. ``read_output_dir(argv)``:
    the output folder of a command line; ``key``: the setting that names it, for the error.
    """

    def decorate(main):
        @functools.wraps(main)
        def locked(argv: list[str] | None = None):
            argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
            if int(os.environ.get("RANK", "0")) != 0:
                return main(argv)
            output_dir = read_output_dir(argv)
            with output_lock(output_dir, key):
                recover_output(output_dir)
                return main(argv)

        return locked

    return decorate


def recover_output(output_dir: str | os.PathLike) -> None:
    """Finish the swaps a killed run left half done in ``output_dir`` (the folder itself, and the checkpoints of it
    and of its staging folder); call it holding the folder's lock."""
    out = Path(output_dir)
    recover_swap(out)
    for run_dir in (out, staging_dir(out)):
        root = checkpoint_dir(run_dir)
        if root.is_dir():
            for journal in sorted(root.glob(f".{CHECKPOINT_PREFIX}*.swap")):
                recover_swap(root / journal.name[1 : -len(".swap")])


def set_aside_later_checkpoints(run_dir: str | os.PathLike, step: int) -> list[Path]:
    """Rename the checkpoints after ``step`` to ``superseded_step_N`` (main process, when a run resumes from an
    earlier checkpoint, e.g. before a blow-up): ``latest`` and rotation then see only this run's line, and nothing
    is deleted."""
    moved = []
    for path in list_checkpoints(run_dir):
        if int(path.name[len(CHECKPOINT_PREFIX) :]) > step:
            target = path.with_name(f"superseded_{path.name}")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(path, target)
            moved.append(target)
    return moved


def publish_output(run_dir: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """Swap a finished staging folder into ``output_dir``; the earlier run is deleted only once the new one is in
    place (:func:`hlss_hf.files.swap_in`)."""
    run_dir, out = Path(run_dir), Path(output_dir)
    if run_dir != out:
        swap_in(run_dir, out)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: <run>/checkpoints/step_N, written as step_N.tmp and renamed when complete


@dataclasses.dataclass
class TrainState:
    """Counters saved with every checkpoint (as JSON)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of the current epoch already consumed (per process)
    num_processes: int = 1  # the global batch depends on it


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    """The folder that holds a run's checkpoints."""
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (``step_N`` folders, never ``.tmp``), oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def checkpoint_health(path: str | os.PathLike) -> dict[str, bool]:
    """``{"weights_finite": ..., "next_step_finite": ...}`` of a checkpoint (keys absent while unknown)."""
    file = Path(path) / HEALTH_FILE
    if not file.is_file():
        return {}
    try:
        health = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        health = err
    if not isinstance(health, dict) or not all(isinstance(v, bool) for v in health.values()):
        # Only advice on which checkpoint to go back to: unknown health, never a reason to stop a run.
        logger.warning("%s: unreadable (%s); the checkpoint's health counts as unknown", file, health)
        return {}
    return health


def _write_json(path: Path, value: Any) -> None:
    write_text_atomically(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def record_next_step(path: str | os.PathLike, finite: bool) -> None:
    """Record whether the step after checkpoint ``path`` had a finite loss (main process)."""
    health = checkpoint_health(path)
    health["next_step_finite"] = finite
    _write_json(Path(path) / HEALTH_FILE, health)


def is_good(path: str | os.PathLike) -> bool:
    """A checkpoint is good when its weights are finite and the loss of the step after it was finite."""
    health = checkpoint_health(path)
    return bool(health.get("weights_finite")) and bool(health.get("next_step_finite"))


def last_good_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint known to be good (:func:`is_good`), or None."""
    return next((path for path in reversed(list_checkpoints(run_dir)) if is_good(path)), None)


def resolve_resume_path(spec: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """Turn ``latest`` or a folder into the checkpoint to load. ``latest`` is the newest checkpoint of an
    unfinished replacing run (``<output_dir>.incoming``) if there is one, else of ``output_dir``; a checkpoint
    whose next step had a non-finite loss is skipped."""
    if str(spec) != "latest":
        path = Path(spec)
        if not path.is_dir():
            raise CheckpointError(
                f"config key 'training.resume_from_checkpoint': {spec} is not a checkpoint folder"
            )
        return path
    for run_dir in (staging_dir(output_dir), Path(output_dir)):
        candidates = list_checkpoints(run_dir)
        for path in reversed(candidates):
            if checkpoint_health(path).get("next_step_finite") is False:
                logger.warning("skipping %s: the step after it had a non-finite loss", path)
                continue
            return path
    raise CheckpointError(
        f"config key 'training.resume_from_checkpoint': latest: no usable checkpoint in {checkpoint_dir(output_dir)}"
    )


def clean_temporary_checkpoints(run_dir: str | os.PathLike) -> None:
    """Remove leftovers of interrupted checkpoint writes (``*.tmp``)."""
    root = checkpoint_dir(run_dir)
    if root.is_dir():
        for path in root.glob(f"{CHECKPOINT_PREFIX}*{_TMP_SUFFIX}"):
            shutil.rmtree(path, ignore_errors=True)


def _rotate(run_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints, and the newest good one even when it is older (a run that turns
    non-finite then still has a checkpoint to go back to)."""
    checkpoints = list_checkpoints(run_dir)
    good = last_good_checkpoint(run_dir)
    for stale in checkpoints[:-keep]:
        if stale != good:
            shutil.rmtree(stale, ignore_errors=True)


def save_checkpoint(
    accelerator,
    run_dir: str | os.PathLike,
    state: TrainState,
    config: dict[str, Any],
    *,
    keep: int,
    finite_weights: bool,
) -> Path:
    """Write ``step_N``: Accelerate's ``save_state`` (safetensors weights, optimizer, scheduler, RNG) plus the
    counters, the settings and the weights' health as JSON; written as ``step_N.tmp`` and renamed when every
    process has finished. All processes call it.
    """
    root = checkpoint_dir(run_dir)
    final = root / f"{CHECKPOINT_PREFIX}{state.step}"
    tmp = final.with_name(final.name + _TMP_SUFFIX)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    frozen = {}
    hook = accelerator.register_save_state_pre_hook(functools.partial(_leave_out_frozen, accelerator, frozen))
    try:
        with naming_full_disk(tmp, lambda: _state_bytes(accelerator)):
            accelerator.save_state(str(tmp), safe_serialization=True)
    finally:
        hook.remove()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with naming_full_disk(tmp):
            _write_json(tmp / STATE_FILE, dataclasses.asdict(state))
            _write_json(tmp / CONFIG_FILE, config)
            _write_json(tmp / HEALTH_FILE, {"weights_finite": finite_weights})
            if frozen:
                _write_json(tmp / FROZEN_FILE, frozen)
        # Re-saving a step after a resume keeps the old copy until the new one is in place.
        swap_in(tmp, final)
        _rotate(Path(run_dir), keep)
    accelerator.wait_for_everyone()
    return final


def _leave_out_frozen(
    accelerator, frozen: dict[str, str], models: list, weights: list[dict], _folder: str
) -> None:
    """``save_state``'s pre-hook: drop the frozen text tower from the weights it writes and record its
    fingerprint in ``frozen`` (FSDP / DeepSpeed hand it no weights: their checkpoints keep the tower)."""
    for model, state_dict in zip(models, weights, strict=False):  # FSDP / DeepSpeed: no weights
        dropped = [key for key in state_dict if _FROZEN_KEY.match(key)]
        for key in dropped:
            del state_dict[key]
        if dropped and accelerator.is_main_process:  # the one process that writes the fingerprint
            frozen["text_model"] = frozen_fingerprint(accelerator.unwrap_model(model))


def frozen_fingerprint(model) -> str:
    """SHA-256 of the text tower's tensors (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.text_model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _check_frozen(accelerator, path: Path) -> None:
    """A checkpoint without the text tower resumes only into a model whose rebuilt tower is the one it trained
    with, and holds every other tensor of it (``load_state`` then loads non-strictly, for the tower alone)."""
    recorded = json.loads((path / FROZEN_FILE).read_text(encoding="utf-8")).get("text_model")
    for model in accelerator._models:
        if recorded != frozen_fingerprint(accelerator.unwrap_model(model)):
            raise CheckpointError(
                f"checkpoint {path} was trained with another text tower than this run builds (its weights "
                "differ); resume with the model.text / model.init_from the run started with"
            )
    weights = path / "model.safetensors"
    if weights.is_file() and len(accelerator._models) == 1:
        with safe_open(str(weights), framework="pt") as saved:
            stored = set(saved.keys())
        wanted = {key for key in accelerator._models[0].state_dict() if not _FROZEN_KEY.match(key)}
        if stored != wanted:
            differ = sorted(wanted - stored)[:3] + sorted(stored - wanted)[:3]
            raise CheckpointError(
                f"checkpoint {path}: its weights do not match this model (missing or extra: {', '.join(differ)})"
            )


def _state_bytes(accelerator) -> int:
    """About the bytes of this process's checkpoint: the prepared models' tensors (less the frozen text tower,
    which checkpoints leave out) and the optimizers'."""
    total = 0
    for model in getattr(accelerator, "_models", []):
        total += sum(
            t.numel() * t.element_size()
            for key, t in model.state_dict().items()
            if torch.is_tensor(t) and not _FROZEN_KEY.match(key)
        )
    for optimizer in getattr(accelerator, "_optimizers", []):
        for values in optimizer.state_dict().get("state", {}).values():
            total += sum(t.numel() * t.element_size() for t in values.values() if torch.is_tensor(t))
    return total


def check_checkpoint(path: str | os.PathLike) -> tuple[TrainState, dict[str, Any]]:
    """Read a checkpoint's counters and settings (JSON) and refuse anything that would have to be unpickled.

    Accelerate reads the weights from safetensors and the optimizer, scheduler and RNG states with
    ``torch.load(weights_only=True)``, which builds tensors and plain containers only; pickled custom state
    (``custom_checkpoint_*.pkl``) it would load with ``weights_only=False``, so such a folder is refused here
    (``CheckpointError`` naming the file).
    """
    path = Path(path)
    pickled = sorted(p.name for p in path.glob("custom_checkpoint_*.pkl"))
    if pickled:
        raise CheckpointError(
            f"checkpoint {path} holds pickled state ({', '.join(pickled)}) that could run code when loaded; "
            "hlss_hf checkpoints keep their state as JSON, so this folder was written by something else "
            "(or an older hlss_hf) and is not loaded"
        )
    missing = [name for name in (STATE_FILE, CONFIG_FILE) if not (path / name).is_file()]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} has no {' or '.join(missing)}: not a complete hlss_hf checkpoint"
        )
    try:
        values = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path}: unreadable {STATE_FILE} / {CONFIG_FILE} ({err})") from err
    state = _check_counters(path, values)
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint {path}: {CONFIG_FILE} holds no settings mapping")
    _check_rng_states(path)
    return state, config


#: The smallest value of each counter of a checkpoint (a checkpoint is written after an optimizer step).
_COUNTER_MINIMA = {"step": 1, "epoch": 0, "batch_in_epoch": 0, "num_processes": 1}


def _check_counters(path: Path, values: Any) -> TrainState:
    """The counters of ``train_state.json``, each an integer in range and the step the folder's name says: an
    edited or damaged file would otherwise restart the counter or shift the batches silently."""
    if not isinstance(values, dict):
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} holds no mapping of counters")
    counters = {}
    for name, minimum in _COUNTER_MINIMA.items():
        value = values.get(name)
        # bool is an int to Python, 3.0 / "3" are not counters: each would pass int() and change the run.
        if type(value) is not int or value < minimum:
            raise CheckpointError(
                f"checkpoint {path}: {STATE_FILE} '{name}' is {value!r}; it must be an integer >= {minimum}"
            )
        counters[name] = value
    match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", path.name)
    if match and int(match.group(1)) != counters["step"]:
        raise CheckpointError(
            f"checkpoint {path}: {STATE_FILE} 'step' is {counters['step']}, but the folder is step "
            f"{match.group(1)}; the file was edited or belongs to another checkpoint"
        )
    return TrainState(**counters)


def _check_rng_states(path: Path) -> None:
    """Accelerate ignores RNG states it cannot read (a resumed run would then silently differ): read them here
    the same safe way first, so a bad file stops the resume instead."""
    for file in sorted(path.glob("random_states_*.pkl")):
        try:
            load(file)
        except Exception as err:  # noqa: BLE001 - any failure to read safely means: do not resume from this
            raise CheckpointError(
                f"checkpoint {path}: {file.name} is not a plain RNG state ({type(err).__name__}); not loaded"
            ) from err


def load_checkpoint(accelerator, path: str | os.PathLike) -> tuple[TrainState, dict[str, Any]]:
    """:func:`check_checkpoint`, then Accelerate's ``load_state`` (weights, optimizer, scheduler, RNG); returns the
    counters and the nested settings the checkpoint was written with."""
    state, config = check_checkpoint(path)
    if state.num_processes != accelerator.num_processes:
        raise CheckpointError(
            f"checkpoint {path} was written by {state.num_processes} process(es) and this run has "
            f"{accelerator.num_processes}: the global batch would change; resume with "
            f"`accelerate launch --num_processes {state.num_processes}`"
        )
    strict = not (path / FROZEN_FILE).is_file()
    try:
        if not strict:
            _check_frozen(accelerator, path)
        accelerator.load_state(str(path), strict=strict)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as err:  # weights_only refused a global: something other than plain state
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(
            f"checkpoint {path}: a state file holds more than tensors ({first}); not loaded"
        ) from err
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError) as err:
        # A truncated or overwritten file ("invalid header", "unexpected EOF"), or weights of another shape.
        if isinstance(err, OSError) and err.errno is not None:
            raise  # a file-system error (permission, disk): its own one line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(
            f"checkpoint {path}: a state file cannot be loaded ({type(err).__name__}: {first}); resume from "
            "another checkpoint"
        ) from err
    return state, config


def flatten(config: dict[str, Any]) -> dict[str, Any]:
    """``{"section.key": value}`` of a nested settings dict."""
    flat = {}
    for section, values in config.items():
        if isinstance(values, dict):
            for key, value in values.items():
                flat[f"{section}.{key}"] = value
        else:
            flat[section] = values
    return flat


def resume_changes(saved: dict[str, Any], current: dict[str, Any]) -> tuple[dict, dict]:
    """Split the settings that differ between a checkpoint and this run into those a resume applies
    (:data:`RESUMABLE_KEYS`) and those it cannot (anything that shaped the weights or the batches still to come):
    ``{"section.key": (old, new)}`` applied, and the same for refused.
    """
    # Compared as JSON holds them (the checkpoint's side was read from JSON: tuples are lists there).
    old, new = flatten(saved), flatten(json.loads(json.dumps(current)))
    applied, refused = {}, {}
    for key in sorted(set(old) | set(new)):
        if key not in INVOCATION_KEYS and old.get(key) != new.get(key):
            (applied if key in RESUMABLE_KEYS else refused)[key] = (old.get(key), new.get(key))
    return applied, refused


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    """``training.lr 0.001 -> 0.5, ...``"""
    return ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items())


# ---------------------------------------------------------------------------------------------------------------
# The run's plan


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """Where a run writes and what it resumes, decided before anything heavy happens."""

    run_dir: Path  # output_dir, or its staging folder
    output_dir: Path  # where the finished run ends up
    resume_path: Path | None = None
    changes: dict = dataclasses.field(default_factory=dict)  # {"section.key": (old, new)}, all resumable

    @property
    def continuing(self) -> bool:
        """Whether the run continues in its checkpoint's own folder (not a new run started from a checkpoint kept
        elsewhere)."""
        return (
            self.resume_path is not None
            and self.run_dir.absolute() in Path(self.resume_path).absolute().parents
        )


def plan_run(t, settings: dict[str, Any]) -> RunPlan:
    """The :class:`RunPlan` of a run's training settings ``t`` (``settings``: all of them, nested); nothing on disk
    yet. A resumed run's checkpoint is checked here: unsafe content or a changed setting that cannot apply exactly
    stop the run, naming each."""
    resume_path, applied = None, {}
    if t.resume_from_checkpoint is not None:
        resume_path = resolve_resume_path(t.resume_from_checkpoint, t.output_dir)
        _, saved = check_checkpoint(resume_path)
        applied, refused = resume_changes(saved, settings)
        if refused:
            raise CheckpointError(
                f"resuming from {resume_path} with changed settings that would not apply exactly: "
                f"{describe_changes(refused)}. Resume with the checkpoint's values, or start a new run; these may "
                f"change on resume: {', '.join(sorted(RESUMABLE_KEYS))}"
            )
    run_dir = plan_output(t.output_dir, overwrite=t.overwrite_output_dir, resume=resume_path)
    return RunPlan(run_dir, Path(t.output_dir), resume_path, applied)
