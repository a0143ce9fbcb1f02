"""The run harness under faults: outputs never lost, resume that runs no code and does what its settings say,
non-finite losses that name a checkpoint that is really good, torn metrics lines.

Each measured defect of the harness issue has a test here that failed before the harness existed.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json
import math
import pickle
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from test_train import read_metrics, small_demo_folder, tiny_args, train_records  # noqa: E402

import train  # noqa: E402
from hlss_hf.errors import CheckpointError, ConfigError  # noqa: E402
from hlss_hf.training.checkpoints import (  # noqa: E402
    checkpoint_health,
    list_checkpoints,
    plan_output,
    resume_changes,
    staging_dir,
    start_output,
)
from hlss_hf.training.loop import read_jsonl  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cut_run(out, attributes_file, *extra, stop=2):
    """A run of 4 steps stopped after ``stop`` with a checkpoint (resumable)."""
    result = train.main(tiny_args(out, attributes_file, "--training.max_steps_this_run", str(stop), *extra))
    assert result["stopped_early"]
    reset_accelerate()
    return list_checkpoints(out)[-1]


def break_loss_at(monkeypatch, call: int, factor: float = float("nan")):
    """Make the model's ``call``-th forward return a non-finite loss; returns the function that undoes it."""
    from hlss_hf.models.hlss.modeling_hlss import HLSSModel

    forward = HLSSModel.forward
    calls = {"n": 0}

    def patched(self, pixel_values, **kwargs):
        output = forward(self, pixel_values, **kwargs)
        calls["n"] += 1
        if calls["n"] == call:
            output.loss = output.loss * factor
        return output

    monkeypatch.setattr(HLSSModel, "forward", patched)
    return lambda: monkeypatch.setattr(HLSSModel, "forward", forward)


class Planted:
    """Unpickling this creates ``marker``: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ---------------------------------------------------------------------------------------------------------------
# Outputs never lost


def test_failed_run_keeps_the_previous_run_and_a_finished_one_replaces_it(
    tmp_path, attributes_file, monkeypatch
):
    out = tmp_path / "run"
    train.main(tiny_args(out, attributes_file, "--training.save_steps", "2"))
    before = snapshot(out)
    assert {"model.safetensors", "metrics.jsonl", "checkpoints/step_4/model.safetensors"} <= set(before)

    # The case: a split that does not exist, with overwrite on. It fails before touching anything.
    reset_accelerate()
    with pytest.raises(ConfigError, match="data.validation_split"):
        train.main(tiny_args(out, attributes_file, "--data.validation_split", "test"))
    assert snapshot(out) == before

    # A run that fails mid-training (non-finite loss) leaves the earlier run as it was, too.
    reset_accelerate()
    undo = break_loss_at(monkeypatch, 3)
    with pytest.raises(train.NonFiniteLossError):
        train.main(tiny_args(out, attributes_file, "--training.save_steps", "1", "--training.lr", "2e-3"))
    undo()
    assert snapshot(out) == before
    assert list_checkpoints(staging_dir(out))  # the failed run's own work is kept beside, for a resume

    # A replacing run that finishes swaps in whole: nothing of the earlier run, no staging folder left.
    reset_accelerate()
    train.main(tiny_args(out, attributes_file, "--training.lr", "2e-3"))
    assert not staging_dir(out).exists()
    after = snapshot(out)
    assert after["model.safetensors"] != before["model.safetensors"]
    assert not (
        out / "checkpoints"
    ).exists()  # this run saved no checkpoint; the earlier run's are gone with it
    assert yaml.safe_load(after["train_config.yaml"])["training"]["lr"] == 2e-3


def test_new_run_without_overwrite_names_what_the_folder_holds(tmp_path, attributes_file):
    train.main(tiny_args(tmp_path, attributes_file))
    reset_accelerate()
    with pytest.raises(ConfigError, match=r"training\.output_dir.*\(model\.safetensors\)"):
        train.main(tiny_args(tmp_path, attributes_file, "--training.overwrite_output_dir", "false"))


# ---------------------------------------------------------------------------------------------------------------
# Safe resume


@pytest.mark.parametrize("target", ["custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl"])
def test_planted_pickle_in_a_checkpoint_never_runs(tmp_path, attributes_file, target):
    out = tmp_path / "run"
    checkpoint = cut_run(out, attributes_file, "--training.save_steps", "0")
    marker = tmp_path / "code-ran"
    if target.endswith(".bin"):
        torch.save(Planted(str(marker)), checkpoint / target)
    else:
        (checkpoint / target).write_bytes(pickle.dumps(Planted(str(marker))))
    with pytest.raises(CheckpointError, match=str(checkpoint)) as caught:
        train.main(tiny_args(out, attributes_file, "--resume_from_checkpoint", "latest"))
    assert not marker.exists(), "unpickling the planted file ran code"
    assert target in str(caught.value) or "not loaded" in str(caught.value)


def test_changed_lr_on_resume_is_applied_and_recorded(tmp_path, attributes_file):
    same = tmp_path / "same"
    cut_run(same, attributes_file)
    train.main(tiny_args(same, attributes_file, "--resume_from_checkpoint", "latest"))
    reset_accelerate()
    changed = tmp_path / "changed"
    cut_run(changed, attributes_file)
    train.main(
        tiny_args(changed, attributes_file, "--resume_from_checkpoint", "latest", "--training.lr", "0.5")
    )

    lr_same = {r["step"]: r["lr"] for r in train_records(same)}
    lr_changed = {r["step"]: r["lr"] for r in train_records(changed)}
    assert lr_changed[1] == lr_same[1] and lr_changed[2] == lr_same[2]  # before the resume: the old peak
    assert lr_changed[3] == pytest.approx(
        lr_same[3] * 0.5 / 1e-3, rel=1e-9
    )  # after it: the same curve, new peak
    a, b = load_file(same / "model.safetensors"), load_file(changed / "model.safetensors")
    assert any(not torch.equal(a[key], b[key]) for key in a)
    assert {"step": 2, "resumed_with": {"training.lr": [0.001, 0.5]}} in read_metrics(changed)
    assert yaml.safe_load((changed / "train_config.yaml").read_text())["training"]["lr"] == 0.5


def test_changed_batch_on_resume_stops_naming_the_key_and_writes_nothing(tmp_path, attributes_file):
    out = tmp_path / "run"
    cut_run(out, attributes_file)
    before = snapshot(out)
    with pytest.raises(CheckpointError, match=r"training\.per_device_batch_size 2 -> 4") as caught:
        train.main(
            tiny_args(
                out, attributes_file, "--resume_from_checkpoint", "latest", "--per_device_batch_size", "4"
            )
        )
    assert "training.lr" in str(caught.value)  # the message lists what may change
    assert snapshot(out) == before


def test_resume_past_the_end_is_an_error(tmp_path, attributes_file):
    # A checkpoint at the run's last step resumes into the final evaluation and save (test_reliability); one
    # beyond it cannot.
    out = tmp_path / "run"
    cut_run(out, attributes_file, stop=3)
    with pytest.raises(ConfigError, match=r"training\.max_steps.*step 3"):
        train.main(tiny_args(out, attributes_file, "--resume_from_checkpoint", "latest", "--max_steps", "2"))


def test_resume_changes_splits_safe_and_unsafe_keys():
    saved = {"training": {"lr": 1e-3, "seed": 0, "logging_steps": 1}, "data": {"num_workers": 0}}
    current = {"training": {"lr": 1e-4, "seed": 1, "logging_steps": 5}, "data": {"num_workers": 4}}
    applied, refused = resume_changes(saved, current)
    assert applied == {
        "training.lr": (1e-3, 1e-4),
        "training.logging_steps": (1, 5),
        "data.num_workers": (0, 4),
    }
    assert refused == {"training.seed": (0, 1)}


def test_torn_last_metrics_line_is_dropped_on_resume(tmp_path, attributes_file, caplog):
    out = tmp_path / "run"
    cut_run(out, attributes_file)
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"loss": 3.2, "st')  # a write cut short by a full disk or a power loss
    train.main(tiny_args(out, attributes_file, "--resume_from_checkpoint", "latest"))
    assert [r["step"] for r in train_records(out)] == [1, 2, 3, 4]
    assert "torn last line" in caplog.text


def test_malformed_metrics_line_inside_the_file_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n', encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"metrics\.jsonl, line 2"):
        read_jsonl(path)


def test_checkpoints_leave_out_the_frozen_text_tower_and_resume_exactly(tmp_path, attributes_file):
    from safetensors import safe_open

    from hlss_hf.training.checkpoints import FROZEN_FILE

    cut = tmp_path / "cut"
    checkpoint = cut_run(cut, attributes_file)
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as saved:
        kept = set(saved.keys())
    assert json.loads((checkpoint / FROZEN_FILE).read_text())["text_model"]  # its fingerprint instead
    train.main(tiny_args(cut, attributes_file, "--resume_from_checkpoint", "latest"))
    final = load_file(cut / "model.safetensors")  # the final model keeps the tower: it is the run's one copy
    assert any(key.startswith("text_model.") for key in final)
    # Every other tensor, the banks too.
    assert kept == {key for key in final if not key.startswith("text_model.")}

    reset_accelerate()
    whole = tmp_path / "whole"
    train.main(tiny_args(whole, attributes_file))
    uninterrupted = load_file(whole / "model.safetensors")
    assert all(torch.equal(final[key], uninterrupted[key]) for key in uninterrupted)


def test_a_checkpoint_of_another_text_tower_or_other_weights_is_refused(tmp_path, attributes_file):
    from safetensors.torch import save_file

    from hlss_hf.training.checkpoints import FROZEN_FILE

    out = tmp_path / "run"
    checkpoint = cut_run(out, attributes_file)
    frozen = checkpoint / FROZEN_FILE
    frozen.write_text(json.dumps({"text_model": "0" * 64}))
    with pytest.raises(CheckpointError, match="another text tower"):
        train.main(tiny_args(out, attributes_file, "--resume_from_checkpoint", "latest"))
    reset_accelerate()

    checkpoint = cut_run(tmp_path / "other", attributes_file)
    weights = load_file(checkpoint / "model.safetensors")
    dropped = sorted(weights)[0]
    del weights[dropped]
    save_file(weights, checkpoint / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"missing or extra: {dropped}"):
        train.main(tiny_args(tmp_path / "other", attributes_file, "--resume_from_checkpoint", "latest"))


def test_a_checkpoint_holding_the_text_tower_still_resumes(tmp_path, attributes_file, monkeypatch):
    # Checkpoints written before the tower was left out hold it and no fingerprint: loaded strictly, as before.
    import re

    from hlss_hf.training import checkpoints
    from hlss_hf.training.checkpoints import FROZEN_FILE

    monkeypatch.setattr(checkpoints, "_FROZEN_KEY", re.compile(r"^$never"))
    out = tmp_path / "run"
    checkpoint = cut_run(out, attributes_file)
    monkeypatch.undo()
    assert not (checkpoint / FROZEN_FILE).exists()
    assert any(key.startswith("text_model.") for key in load_file(checkpoint / "model.safetensors"))
    train.main(tiny_args(out, attributes_file, "--resume_from_checkpoint", "latest"))
    assert (out / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------------------------
# Non-finite loss


def test_non_finite_loss_names_a_checkpoint_whose_next_step_was_finite_and_it_resumes(
    tmp_path, attributes_file, monkeypatch
):
    undo = break_loss_at(monkeypatch, 4, float("inf"))
    out = tmp_path / "run"
    with pytest.raises(
        train.NonFiniteLossError, match=r"step 4 .*Last good checkpoint: .*step_2 .*training\.lr"
    ):
        train.main(
            tiny_args(out, attributes_file, "--training.save_steps", "1", "--training.save_total_limit", "1")
        )
    # step_3's next step is the bad one: marked, and kept apart from the good step_2 (rotation keeps a good one).
    assert [p.name for p in list_checkpoints(out)] == ["step_2", "step_3"]
    assert checkpoint_health(out / "checkpoints" / "step_3") == {
        "weights_finite": True,
        "next_step_finite": False,
    }
    assert checkpoint_health(out / "checkpoints" / "step_2") == {
        "weights_finite": True,
        "next_step_finite": True,
    }

    undo()
    reset_accelerate()
    # `latest` skips step_3, which is set aside (not deleted) when the run continues from step_2; a lower LR may be set on resume.
    result = train.main(tiny_args(out, attributes_file, "--resume_from_checkpoint", "latest", "--lr", "5e-4"))
    assert result["step"] == 4
    losses = [r["loss"] for r in train_records(out)]
    assert [r["step"] for r in train_records(out)] == [1, 2, 3, 4] and all(map(math.isfinite, losses))
    assert (out / "checkpoints" / "superseded_step_3" / "health.json").is_file()
    assert [p.name for p in list_checkpoints(out)] == ["step_2"]


def test_non_finite_loss_right_after_the_only_checkpoint_names_none(tmp_path, attributes_file, monkeypatch):
    break_loss_at(monkeypatch, 3)
    # step_2 is the last checkpoint, but its next step is the bad one: it is not called good.
    with pytest.raises(
        train.NonFiniteLossError, match=r"step 3.*loss=nan.*No checkpoint is known to be good"
    ):
        train.main(tiny_args(tmp_path, attributes_file, "--training.save_steps", "2"))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_2"]
    assert not (tmp_path / "model.safetensors").exists()
    assert [r["step"] for r in train_records(tmp_path)] == [1, 2]


def test_checkpoint_state_is_json(tmp_path, attributes_file):
    checkpoint = cut_run(tmp_path / "run", attributes_file)
    assert not list(checkpoint.glob("custom_checkpoint_*"))
    state = json.loads((checkpoint / "train_state.json").read_text())
    assert state == {"step": 2, "epoch": 0, "batch_in_epoch": 2, "num_processes": 1}
    assert json.loads((checkpoint / "train_config.json").read_text())["training"]["max_steps"] == 4


# ---------------------------------------------------------------------------------------------------------------
# Streaming


def test_streaming_run_evaluates_at_the_end_and_saves(tmp_path, attributes_file):
    data = tmp_path / "data"
    small_demo_folder(data)
    out = tmp_path / "run"
    result = train.main(
        tiny_args(
            out, attributes_file, "--data.dataset", str(data), "--data.demo", "{}", "--data.streaming", "true"
        )
        + ["--training.eval_at_end", "true"]
    )
    assert (out / "model.safetensors").is_file()
    assert 0.0 <= result["metrics"]["eval/patient/acc"] <= 1.0
    assert any("eval/patch/acc" in r for r in read_metrics(out))


def test_resume_changes_compares_values_as_json_holds_them():
    saved = {"data": {"augmentation": {"random_resized_crop": {"scale": [0.3, 1.0]}}}}
    current = {"data": {"augmentation": {"random_resized_crop": {"scale": (0.3, 1.0)}}}}
    assert resume_changes(saved, current) == ({}, {})


# ---------------------------------------------------------------------------------------------------------------
# Where a run writes (no training)


def test_output_plan_protects_earlier_runs_and_other_files(tmp_path):
    used = tmp_path / "used"
    (used / "checkpoints" / "step_3").mkdir(parents=True)
    (used / "model.safetensors").write_bytes(b"")
    elsewhere = tmp_path / "other" / "checkpoints" / "step_3"
    elsewhere.mkdir(parents=True)
    # Resumed from a checkpoint kept elsewhere, the run is a new run for a used output_dir.
    with pytest.raises(ConfigError, match="already holds a run"):
        plan_output(used, overwrite=False, resume=elsewhere)
    assert plan_output(used, overwrite=True, resume=elsewhere) == staging_dir(used)
    assert plan_output(used, overwrite=False, resume=used / "checkpoints" / "step_3") == used
    # finetune.py replaces its folder whole: a folder of other things is refused, a new one is staged.
    (tmp_path / "outputs" / "hlss-demo").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"not empty \(hlss-demo\)"):
        plan_output(tmp_path / "outputs", overwrite=True, resume=None, always_stage=True)
    assert plan_output(tmp_path / "new", overwrite=False, resume=None, always_stage=True) == staging_dir(
        tmp_path / "new"
    )
    # A log without a checkpoint or model is a failed run's: not protected, kept aside by the next run.
    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / "metrics.jsonl").write_text('{"step": 1}\n')
    assert plan_output(failed, overwrite=False, resume=None) == failed
    start_output(failed, failed, resume=False)
    assert (failed / "metrics.failed.jsonl").read_text() == '{"step": 1}\n'
    assert staging_dir(".") == Path.cwd().with_name(Path.cwd().name + ".incoming")


def test_full_disk_while_a_resume_rewrites_its_metrics_names_the_file_and_the_bytes(tmp_path, monkeypatch):
    import errno

    from hlss_hf import files
    from hlss_hf.errors import DiskFullError
    from hlss_hf.training import loop

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}\n', encoding="utf-8")

    def full_disk(target, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(loop, "write_text_atomically", full_disk)
    with pytest.raises(DiskFullError) as caught:
        loop.truncate_jsonl(path, 1)
    line = files.describe_os_error(caught.value)
    assert f"no space left writing {path}" in line and "it needs about" in line and "\n" not in line
    assert read_jsonl(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}]  # nothing lost
