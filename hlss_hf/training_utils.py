"""Checkpoint and metrics-file helpers for ``train.py`` (HLSS pretraining with Accelerate).

The configuration lives in :mod:`hlss_hf.config`; its public names are re-exported here so that
``from hlss_hf.training_utils import parse_config`` keeps working.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from hlss_hf.config import (  # noqa: F401  (re-exported)
    ConfigError,
    DataConfig,
    FinetuneConfig,
    FinetuneDataConfig,
    FinetuneModelConfig,
    FinetuneTrainingConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    TrainingConfig,
    flatten_config,
    format_help,
    parse_config,
)
from hlss_hf.config import format_help as config_help  # noqa: F401  (the former name)

CHECKPOINT_PREFIX = "step_"
_TMP_SUFFIX = ".tmp"


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: output_dir/checkpoints/step_N, written as step_N.tmp and renamed when complete.


def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    """The folder that holds a run's checkpoints."""
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (``step_N`` folders, never ``.tmp``), oldest first."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint, or None."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def resolve_resume_path(spec: str, output_dir: str | os.PathLike) -> Path:
    """Turn ``latest`` or a folder into the checkpoint folder to load; raise if there is none.

    Args:
        spec (`str`): `latest` or a checkpoint folder.
        output_dir (`str`): The run's output folder (searched for `latest`).
    """
    if spec == "latest":
        path = latest_checkpoint(output_dir)
        if path is None:
            raise FileNotFoundError(
                f"training.resume_from_checkpoint=latest: no checkpoint in {checkpoint_dir(output_dir)}"
            )
        return path
    path = Path(spec)
    if not path.is_dir():
        raise FileNotFoundError(f"training.resume_from_checkpoint: {spec} is not a checkpoint folder")
    return path


def temporary_checkpoint_path(output_dir: str | os.PathLike, step: int) -> Path:
    """Where checkpoint ``step`` is written before it is renamed into place."""
    return checkpoint_dir(output_dir) / f"{CHECKPOINT_PREFIX}{step}{_TMP_SUFFIX}"


def final_checkpoint_path(output_dir: str | os.PathLike, step: int) -> Path:
    """The complete checkpoint folder of ``step``."""
    return checkpoint_dir(output_dir) / f"{CHECKPOINT_PREFIX}{step}"


def commit_checkpoint(output_dir: str | os.PathLike, step: int, keep: int) -> Path:
    """Rename ``step_N.tmp`` to ``step_N`` and delete all but the newest ``keep`` checkpoints.

    Call on the main process once every process has finished writing.

    Args:
        output_dir (`str`): The run's output folder.
        step (`int`): The step the checkpoint belongs to.
        keep (`int`): How many complete checkpoints to keep.

    Returns:
        `Path`: the complete checkpoint folder.
    """
    tmp, final = temporary_checkpoint_path(output_dir, step), final_checkpoint_path(output_dir, step)
    if final.exists():
        # Re-saving a step (e.g. after a resume): move the old copy aside first so a failure keeps one.
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    for stale in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def clean_temporary_checkpoints(output_dir: str | os.PathLike) -> None:
    """Remove leftovers of interrupted checkpoint writes (``*.tmp``)."""
    root = checkpoint_dir(output_dir)
    if root.is_dir():
        for path in root.glob(f"{CHECKPOINT_PREFIX}*{_TMP_SUFFIX}"):
            shutil.rmtree(path, ignore_errors=True)


class TrainState:
    """Step / epoch / position counters saved with every checkpoint (``accelerator.register_for_checkpointing``).

    Attributes:
        step (`int`): Optimizer steps done.
        epoch (`int`): Current epoch.
        batch_in_epoch (`int`): Micro-batches of the current epoch already consumed (per process).
    """

    def __init__(self) -> None:
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])


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


def truncate_jsonl(path: str | os.PathLike, max_step: int) -> None:
    """Drop records with ``step > max_step`` (logged after the checkpoint a run resumes from)."""
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if record.get("step", 0) <= max_step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)
