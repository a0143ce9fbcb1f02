"""Reliability, round two: every run can be finished, a swap is never half done, one folder holds one run.

Each test injects its fault at a marked point (a patched function or rename, a lock held by a live process), never
by timing, and fails on the code before these guarantees existed.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from test_harness import reset_accelerate  # noqa: E402
from test_train import read_metrics, tiny_args, train_records  # noqa: E402

import train  # noqa: E402
from hlss_hf import publishing  # noqa: E402
from hlss_hf.harness import list_checkpoints, staging_dir  # noqa: E402
from hlss_hf.publishing import OutputInUseError, describe_error, output_lock, swap_in  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


class Killed(Exception):
    """Stands for the process being killed at the patched point."""


def kill_on_rename(monkeypatch, when):
    """Make ``os.replace`` die when ``when(src, dst)`` is true, and every rename after it (a killed process does
    nothing more: no rollback runs)."""
    replace = os.replace
    dead = {"now": False}

    def patched(src, dst, *args, **kwargs):
        if dead["now"] or when(Path(src), Path(dst)):
            dead["now"] = True
            raise Killed(f"killed renaming {src} -> {dst}")
        return replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", patched)
    return lambda: monkeypatch.setattr(os, "replace", replace)


def hidden_leftovers(parent: Path) -> list[str]:
    return sorted(
        p.name for p in parent.iterdir() if ".old-" in p.name or ".tmp-" in p.name or p.name.endswith(".swap")
    )


# ---------------------------------------------------------------------------------------------------------------
# Every run can be finished


def test_run_killed_in_its_final_evaluation_then_its_final_save_resumes_into_them_as_an_uninterrupted_run(
    tmp_path, attributes_file, monkeypatch
):
    # save_steps divides max_steps (the demo's case): the last checkpoint is at the last step.
    common = [
        "--training.save_steps",
        "2",
        "--training.eval_at_end",
        "true",
        "--training.eval_before_training",
        "false",
    ]
    full = tmp_path / "full"
    train.main(tiny_args(full, attributes_file, *common))

    out = tmp_path / "cut"
    evaluate = train.evaluate

    def killed_in_evaluation(run, quiet=False):
        raise Killed("killed in the final evaluation")

    monkeypatch.setattr(train, "evaluate", killed_in_evaluation)
    with pytest.raises(Killed):
        train.main(tiny_args(out, attributes_file, *common))
    monkeypatch.setattr(train, "evaluate", evaluate)
    assert [p.name for p in list_checkpoints(out)] == ["step_2", "step_4"]
    assert not (out / "model.safetensors").exists()

    # Resumed, it is killed again while moving the saved model into place: part of the files are in.
    reset_accelerate()
    revive = kill_on_rename(
        monkeypatch, lambda src, dst: src.parent.name == ".write.tmp" and dst.name == "model.safetensors"
    )
    with pytest.raises(Killed):
        train.main(tiny_args(out, attributes_file, *common, "--resume_from_checkpoint", "latest"))
    revive()
    assert not (out / "model.safetensors").exists() and (out / "config.json").exists()

    # Resumed with the same settings, it finishes: the weights and the log of a run that was never killed.
    reset_accelerate()
    result = train.main(tiny_args(out, attributes_file, *common, "--resume_from_checkpoint", "latest"))
    assert result["step"] == 4 and not result["stopped_early"]
    a, b = load_file(full / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=0, rtol=0, msg=key)
    assert [r["step"] for r in train_records(out)] == [1, 2, 3, 4]
    evaluations = [r for r in read_metrics(out) if "eval/patch/acc" in r]
    assert [r["step"] for r in evaluations] == [4]  # the killed evaluation's record is not doubled
    assert evaluations[0]["eval/patch/acc"] == pytest.approx(result["metrics"]["eval/patch/acc"])
    full_eval = [r for r in read_metrics(full) if "eval/patch/acc" in r][0]
    assert evaluations[0]["eval/patch/acc"] == pytest.approx(full_eval["eval/patch/acc"])


# ---------------------------------------------------------------------------------------------------------------
# A swap that is never half done


def folder(path: Path, **files: str) -> Path:
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def contents(path: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(path.iterdir())}


def test_swap_killed_between_its_renames_is_completed_on_the_next_start(tmp_path, monkeypatch):
    target = folder(tmp_path / "out", **{"model.txt": "old"})
    new = folder(tmp_path / "out.incoming", **{"model.txt": "new"})
    revive = kill_on_rename(
        monkeypatch, lambda src, dst: dst == target
    )  # the old one is aside, the new not in
    with pytest.raises(Killed):
        swap_in(new, target)
    revive()
    assert not target.exists()  # the state the fault leaves: no output folder, the old copy hidden beside
    assert any(".old-" in name for name in hidden_leftovers(tmp_path))

    with output_lock(target):  # what every run, finetune and converter does first
        pass
    assert contents(target) == {"model.txt": "new"}
    assert hidden_leftovers(tmp_path) == [] and not new.exists()


def test_swap_killed_before_the_new_folder_was_complete_rolls_back(tmp_path):
    # A swap of an earlier version left no journal: the set-aside copy is put back rather than deleted as stale.
    target = tmp_path / "out"
    folder(tmp_path / ".out.old-999999999-0123abcd", **{"model.txt": "old"})
    assert publishing.remove_stale_temporaries(target) == []  # without the lock nothing is judged
    with output_lock(target):
        assert publishing.remove_stale_temporaries(target) == []
    assert contents(target) == {"model.txt": "old"}
    assert hidden_leftovers(tmp_path) == []


def test_train_run_killed_while_swapping_in_leaves_a_whole_folder_for_the_next_start(
    tmp_path, attributes_file, monkeypatch
):
    out = tmp_path / "run"
    train.main(tiny_args(out, attributes_file, "--training.max_steps", "1", "--training.seed", "0"))
    reset_accelerate()
    revive = kill_on_rename(monkeypatch, lambda src, dst: src == staging_dir(out))
    with pytest.raises(Killed):
        train.main(tiny_args(out, attributes_file, "--training.max_steps", "1", "--training.seed", "1"))
    revive()
    assert not out.exists()

    # The next start into the folder (here one that stops at once: the folder holds a run) finds it whole first.
    reset_accelerate()
    from hlss_hf.config import ConfigError

    with pytest.raises(ConfigError, match="already holds a run"):
        train.main(tiny_args(out, attributes_file, "--training.overwrite_output_dir", "false"))
    assert (
        yaml.safe_load((out / "train_config.yaml").read_text())["training"]["seed"] == 1
    )  # the finished run
    assert (out / "model.safetensors").is_file()
    assert hidden_leftovers(tmp_path) == [] and not staging_dir(out).exists()


# ---------------------------------------------------------------------------------------------------------------
# One folder, one run


def test_second_run_into_a_busy_output_folder_is_refused_naming_the_first_and_the_first_is_intact(
    tmp_path, attributes_file, monkeypatch
):
    out = tmp_path / "run"
    second: dict[str, BaseException] = {}
    open_run = train.open_run

    def open_run_then_start_a_second(run, *args, **kwargs):
        open_run(run, *args, **kwargs)

        def start():
            try:
                train.main(tiny_args(out, attributes_file, "--training.seed", "1"))
            except BaseException as err:  # noqa: BLE001 - the test inspects whatever it was
                second["error"] = err

        thread = threading.Thread(target=start)  # another thread is refused like another process
        thread.start()
        thread.join()

    monkeypatch.setattr(train, "open_run", open_run_then_start_a_second)
    result = train.main(tiny_args(out, attributes_file, "--training.seed", "0"))

    error = second["error"]
    assert isinstance(error, OutputInUseError)
    line = describe_error(error)
    assert "\n" not in line and "training.output_dir" in line and str(out) in line
    assert f"pid {os.getpid()}" in line and "in use by another run" in line
    assert result["step"] == 4
    assert yaml.safe_load((out / "train_config.yaml").read_text())["training"]["seed"] == 0
    assert [r["step"] for r in train_records(out)] == [1, 2, 3, 4]

    # Once the first has finished, the folder is free again.
    monkeypatch.setattr(train, "open_run", open_run)
    reset_accelerate()
    train.main(tiny_args(out, attributes_file, "--training.max_steps", "1", "--training.seed", "1"))
    assert yaml.safe_load((out / "train_config.yaml").read_text())["training"]["seed"] == 1


def test_second_converter_into_one_output_is_refused_and_the_first_writes_its_rows(tmp_path):
    import datasets
    import numpy as np

    from hlss_hf.schema import features_for

    features = features_for("he", ["a", "b"])
    out = tmp_path / "data"
    refused: dict[str, BaseException] = {}

    def rows(first: bool):
        for i, label in enumerate(["a", "b"]):
            if first and i == 1:  # the first converter is writing: a second one starts

                def start():
                    try:
                        publishing.write_patch_dataset(
                            {"train": rows(False)}, features, output_dir=out, show_progress=False
                        )
                    except BaseException as err:  # noqa: BLE001
                        refused["error"] = err

                thread = threading.Thread(target=start)
                thread.start()
                thread.join()
            image = np.full((8, 8, 3), 10 if first else 200, dtype=np.uint8)
            yield {
                "image": image,
                "patient_id": f"p{i}",
                "slide_id": f"s{i}",
                "patch_id": f"x{i}",
                "label": label,
            }

    publishing.write_patch_dataset({"train": rows(True)}, features, output_dir=out, show_progress=False)
    assert isinstance(refused["error"], OutputInUseError) and "in use by another run" in str(refused["error"])
    written = datasets.load_from_disk(str(out))["train"]
    assert np.asarray(written[0]["image"]).max() == 10  # the first converter's rows


LOCK_HOLDER = """
import sys
from hlss_hf.publishing import output_lock
with output_lock(sys.argv[1], "--output"):
    print("locked", flush=True)
    sys.stdin.read()  # holds the lock until killed
"""


def test_lock_of_a_killed_process_is_free_and_a_live_one_is_named(tmp_path):
    target = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(target)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(
            OutputInUseError, match=rf"--output {target} is in use by another run \(pid {holder.pid} on host"
        ):
            with output_lock(target, "--output"):
                pass
    finally:
        holder.kill()  # SIGKILL: no clean-up runs; the kernel drops the lock with the process
        holder.wait()
    with output_lock(target) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
