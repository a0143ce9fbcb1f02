"""Reliability, round two: every run can be finished, a swap is never half done, one folder holds one run.

Each test injects its fault at a marked point (a patched function or rename, a lock held by a live process), never
by timing, and fails on the code before these guarantees existed.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json
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

from _tiny import he_rows  # noqa: E402
from test_harness import reset_accelerate  # noqa: E402
from test_train import read_metrics, tiny_args, train_records  # noqa: E402

import train  # noqa: E402
from hlss_hf import files  # noqa: E402
from hlss_hf.cli import describe_error  # noqa: E402
from hlss_hf.data import writer  # noqa: E402
from hlss_hf.errors import OutputInUseError  # noqa: E402
from hlss_hf.files import output_lock, swap_in  # noqa: E402
from hlss_hf.training.checkpoints import list_checkpoints, staging_dir  # noqa: E402

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


def test_run_killed_in_its_final_save_resumes_into_it_and_ends_as_an_uninterrupted_run(
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

    # Killed while moving the saved model into place (after its final evaluation was logged): part of the
    # files are in, and the last checkpoint is at the last step. A kill in the final evaluation leaves the same.
    out = tmp_path / "cut"
    reset_accelerate()
    revive = kill_on_rename(
        monkeypatch, lambda src, dst: src.parent.name == ".write.tmp" and dst.name == "model.safetensors"
    )
    with pytest.raises(Killed):
        train.main(tiny_args(out, attributes_file, *common))
    revive()
    assert [p.name for p in list_checkpoints(out)] == ["step_2", "step_4"]
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
    assert files.remove_stale_temporaries(target) == []  # without the lock nothing is judged
    with output_lock(target):
        assert files.remove_stale_temporaries(target) == []
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
    from hlss_hf.errors import ConfigError

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

    def open_run_then_start_a_second(*args, **kwargs):
        log = open_run(*args, **kwargs)

        def start():
            try:
                train.main(tiny_args(out, attributes_file, "--training.seed", "1"))
            except BaseException as err:  # noqa: BLE001 - the test inspects whatever it was
                second["error"] = err

        thread = threading.Thread(target=start)  # another thread is refused like another process
        thread.start()
        thread.join()
        return log

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


def test_second_converter_into_one_output_is_refused_and_the_first_writes_its_rows(tmp_path):
    import datasets
    import numpy as np

    from hlss_hf.data.schema import features_for

    features = features_for("he", ["a", "b"])
    out = tmp_path / "data"
    refused: dict[str, BaseException] = {}

    def rows(first: bool):
        for i, label in enumerate(["a", "b"]):
            if first and i == 1:  # the first converter is writing: a second one starts

                def start():
                    try:
                        writer.write_patch_dataset(
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

    writer.write_patch_dataset({"train": rows(True)}, features, output_dir=out, show_progress=False)
    assert isinstance(refused["error"], OutputInUseError) and "in use by another run" in str(refused["error"])
    written = datasets.load_from_disk(str(out))["train"]
    assert np.asarray(written[0]["image"]).max() == 10  # the first converter's rows


class LockHolder:
    """A forked process that holds ``output_lock(target)`` until it is killed (SIGKILL: no clean-up runs)."""

    def __init__(self, target: Path) -> None:
        import signal

        self.signal = signal
        ready_read, ready_write = os.pipe()
        hold_read, self._hold_write = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the holder: takes the lock, says so, then waits until it is killed
            try:
                with output_lock(target, "--output"):
                    os.write(ready_write, b"1")
                    os.read(hold_read, 1)
            finally:
                os._exit(0)
        assert os.read(ready_read, 1) == b"1"

    def kill(self) -> None:
        os.kill(self.pid, self.signal.SIGKILL)  # the kernel drops the lock with the process
        os.waitpid(self.pid, 0)


def test_lock_of_a_killed_process_is_free_and_a_live_one_is_named(tmp_path):
    target = tmp_path / "out"
    holder = LockHolder(target)
    try:
        with pytest.raises(
            OutputInUseError, match=rf"--output {target} is in use by another run \(pid {holder.pid} on host"
        ):
            with output_lock(target, "--output"):
                pass
    finally:
        holder.kill()
    with output_lock(target) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists()  # released: nothing left beside the output


def test_finetune_and_a_converter_refuse_a_busy_output_in_one_line(tmp_path, monkeypatch):
    import finetune
    from dataset_scripts import demo

    target = tmp_path / "out"
    holder = LockHolder(target)
    try:
        with pytest.raises(OutputInUseError, match="training.output_dir"):
            finetune.main(
                ["--model_name_or_path", "unused", "--dataset", "unused", "--output_dir", str(target)]
            )
        with pytest.raises(SystemExit) as caught:
            demo.main(["--output_dir", str(target), "--num-patients", "6"])
        assert str(caught.value.code).startswith("error: output") and "in use by another run" in str(
            caught.value.code
        )
    finally:
        holder.kill()
    assert not target.exists()


def test_file_system_without_locks_runs_unguarded_with_a_warning(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with output_lock(tmp_path / "out"):
        pass
    assert "has no locks" in caplog.text
    monkeypatch.undo()

    # An output at a mount point whose parent the user may not write: no lock file, the run still goes on.
    real_open = os.open

    def no_write_beside(path, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_write_beside)
    with output_lock(tmp_path / "mounted"):
        pass
    monkeypatch.undo()
    assert "cannot create its lock file" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# One line for every user error, validation at the door


def cli_error(monkeypatch, argv) -> str:
    """Run ``train.py`` as the command line does; return its one ``error:`` line."""
    monkeypatch.setattr(sys, "argv", ["train.py", *argv])
    with pytest.raises(SystemExit) as caught:
        train.cli()
    message = str(caught.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


@pytest.mark.parametrize(
    "extra, named",
    [
        (["--training.seed", "-1"], "training.seed"),
        (["--training.seed", str(2**40)], "training.seed"),
        (["--model.temperature", "inf"], "model.temperature"),
        (["--model.temperature", "1e-30"], "model.temperature"),
        (["--training.knn_temperature", "inf"], "training.knn_temperature"),
        (["--training.output_dir", "[a,b]"], "training.output_dir"),
        (["--data.augmentation", "{solarise: {p: 0.5}}"], "unknown augmentation 'solarise'"),
        (["--data.num_slides", "50"], "data.num_slides"),
        (
            ["--data.crop_size", "48", "--data.eval_resize", "48"],
            "patches are 40x40 px, smaller than data.crop_size 48",
        ),
    ],
)
def test_bad_setting_is_one_error_line_naming_it(tmp_path, attributes_file, monkeypatch, extra, named):
    argv = tiny_args(tmp_path / "run", attributes_file, *extra)
    if "[a,b]" in extra:
        argv = [a for a in argv if a != str(tmp_path / "run")]
        argv.remove("--training.output_dir")
    assert named in cli_error(monkeypatch, argv)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "text, named",
    [
        (
            "patch: {dense: [a]}\nslide: {}\npatient: {n: [b]}\n",
            "level 'slide' is missing or has no attributes",
        ),
        ("patch: {dense: [a]}\npatient: {n: [b]}\n", "level 'slide' is missing"),
        ("patch: {dense: [3]}\nslide: {c: [a]}\npatient: {n: [b]}\n", "patch/dense"),
        ("patch:\n  dense: [a]\n  dense: [b]\nslide: {c: [a]}\npatient: {n: [b]}\n", "'dense' appears twice"),
    ],
)
def test_malformed_attribute_file_is_a_config_error_naming_the_item(tmp_path, text, named):
    from hlss_hf.errors import ConfigError
    from hlss_hf.training.building import resolve_attributes

    path = tmp_path / "attributes.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="model.attributes") as caught:
        resolve_attributes(str(path))
    assert named in str(caught.value) and "\n" not in describe_error(caught.value, (ConfigError,))


def test_duplicate_attribute_in_a_json_file_is_refused(tmp_path):
    from hlss_hf.models.hlss.attributes_hlss import load_attributes

    path = tmp_path / "attributes.json"
    path.write_text('{"patch": {"a": ["x"], "a": ["y"]}, "slide": {"c": ["x"]}, "patient": {"n": ["x"]}}')
    with pytest.raises(ValueError, match="'a' appears twice"):
        load_attributes(str(path))


@pytest.fixture(scope="module")
def cut_checkpoint(tmp_path_factory):
    """A tiny run stopped after step 2 with its checkpoint (copied by each test that edits it)."""
    from test_train import ATTRIBUTES

    root = tmp_path_factory.mktemp("cut")
    attributes = root / "attributes.yaml"
    attributes.write_text(yaml.safe_dump(ATTRIBUTES))
    reset_accelerate()
    train.main(tiny_args(root / "run", str(attributes), "--training.max_steps_this_run", "2"))
    reset_accelerate()
    return root / "run", str(attributes)


def edited_copy(cut_checkpoint, tmp_path, edit) -> Path:
    import shutil

    run, _ = cut_checkpoint
    out = tmp_path / "run"
    shutil.copytree(run, out)
    edit(out / "checkpoints" / "step_2")
    return out


def set_counter(**values):
    def edit(checkpoint):
        path = checkpoint / "train_state.json"
        state = json.loads(path.read_text())
        path.write_text(json.dumps({**state, **values}))

    return edit


@pytest.mark.parametrize(
    "edit, named",
    [
        (set_counter(step=-5), "'step' is -5"),
        (set_counter(step=0), "'step' is 0"),
        (set_counter(step=3.7), "'step' is 3.7"),
        (set_counter(step="2"), "'step' is '2'"),
        (set_counter(step=True), "'step' is True"),
        (set_counter(step=30), "the folder is step 2"),
        (set_counter(epoch=-1), "'epoch' is -1"),
        (set_counter(batch_in_epoch=-2), "'batch_in_epoch' is -2"),
        (set_counter(num_processes=0), "'num_processes' is 0"),
        (set_counter(epoch=1), "no position of this run"),  # in range, but not where step 2 is
        (lambda c: (c / "model.safetensors").write_bytes(b"not safetensors"), "cannot be loaded"),
        (
            lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:1000]),
            "cannot be loaded",
        ),
    ],
)
def test_edited_or_damaged_checkpoint_is_refused_in_one_line(
    cut_checkpoint, tmp_path, monkeypatch, edit, named
):
    out = edited_copy(cut_checkpoint, tmp_path, edit)
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    message = cli_error(monkeypatch, tiny_args(out, cut_checkpoint[1], "--resume_from_checkpoint", "latest"))
    assert "step_2" in message and named in message
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before  # nothing renamed or set aside


def test_garbage_health_file_is_unknown_health_and_the_run_resumes(cut_checkpoint, tmp_path, caplog):
    out = edited_copy(cut_checkpoint, tmp_path, lambda c: (c / "health.json").write_text("{garbage"))
    result = train.main(tiny_args(out, cut_checkpoint[1], "--resume_from_checkpoint", "latest"))
    assert result["step"] == 4 and "health counts as unknown" in caplog.text


def he_dataset(rows):
    import datasets

    from hlss_hf.data.schema import features_for

    features = features_for("he", ["a", "b"])
    features = datasets.Features({k: v for k, v in features.items() if k in rows})
    return datasets.Dataset.from_dict(rows, features=features)


@pytest.mark.parametrize(
    "change, named",
    [
        (
            lambda r: r["patient_id"].__setitem__(5, None),
            "column 'patient_id' has 1 missing values (first at row 5)",
        ),
        (
            lambda r: r["label"].__setitem__(5, 1 - r["label"][5]),
            "patient 'p1' has rows with different labels",
        ),
        (lambda r: r.pop("label"), "no column(s) ['label']"),
        (
            lambda r: r["slide_id"].__setitem__(4, "s0"),
            "slide 's0' belongs to several patients: ['p0', 'p1']",
        ),
    ],
)
def test_bad_hierarchy_is_a_dataset_error_naming_the_item(change, named):
    from hlss_hf.data import HierarchyIndex
    from hlss_hf.errors import DatasetError

    rows = he_rows()
    change(rows)
    with pytest.raises(DatasetError) as caught:
        HierarchyIndex.from_dataset(he_dataset(rows))
    assert named in describe_error(caught.value)


def png(mode: str, size: int = 12, bits16: bool = False) -> dict:
    import io

    import numpy as np
    from PIL import Image

    if bits16:
        image = Image.fromarray(np.full((size, size), 300, dtype=np.uint16))
    else:
        image = Image.new(mode, (size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


@pytest.mark.parametrize(
    "image, named",
    [
        ({"bytes": b"", "path": None}, "row 5: cannot read its image"),
        ({"bytes": b"\x89PNG\r\n\x1a\nbroken", "path": None}, "row 5: cannot read its image"),
        (png("L"), "image mode L"),
        (png("RGBA"), "image mode RGBA"),
        (png("I", bits16=True), "row 5"),
    ],
)
def test_unreadable_or_wrong_patch_names_its_row_alone(image, named):
    from hlss_hf.data import HierarchicalPatchDataset
    from hlss_hf.errors import DatasetError

    rows = he_rows()
    rows["image"] = [png("RGB") for _ in rows["image"]]
    rows["image"][5] = image
    dataset = HierarchicalPatchDataset(he_dataset(rows), num_slides=1, num_patches=2)
    with pytest.raises(DatasetError) as caught:
        dataset.read_images([4, 5, 8, 11], patient="p1")
    message = describe_error(caught.value)
    assert named in message and "[4, 5" not in message and "patient 'p1'" in message


def test_error_in_a_loader_worker_is_its_own_line():
    from torch.utils.data import DataLoader

    from hlss_hf.data import HierarchicalPatchDataset, collate_hierarchical
    from hlss_hf.errors import DatasetError

    rows = he_rows()
    rows["image"] = [png("RGB") for _ in rows["image"]]
    rows["image"][1] = {"bytes": b"", "path": None}
    dataset = HierarchicalPatchDataset(he_dataset(rows), num_slides=2, num_patches=2)
    loader = DataLoader(dataset, batch_size=1, num_workers=1, collate_fn=collate_hierarchical)
    with pytest.raises(DatasetError) as caught:
        next(iter(loader))
    message = describe_error(caught.value)
    assert message.startswith("patient 'p0': row 1: cannot read its image") and "Traceback" not in message


def test_corrupt_evaluation_cache_is_rebuilt_with_a_warning(tmp_path):
    from test_evaluation import _CountingModel, _he_dataset

    from hlss_hf.evaluation import extract_embeddings

    torch.manual_seed(0)
    model, dataset = _CountingModel(), _he_dataset(6)
    first = extract_embeddings(model, dataset, batch_size=8, cache_dir=tmp_path, progress=False)
    (cache,) = tmp_path.glob("embeddings-*.pt")
    cache.write_bytes(cache.read_bytes()[:100])  # torn by a full disk
    with pytest.warns(UserWarning, match="unreadable cached embeddings"):
        again = extract_embeddings(model, dataset, batch_size=8, cache_dir=tmp_path, progress=False)
    torch.testing.assert_close(again.embeddings, first.embeddings)
    assert model.calls == 2
    extract_embeddings(model, dataset, batch_size=8, cache_dir=tmp_path, progress=False)
    assert model.calls == 2  # the rebuilt cache is whole again


# OpenSRH metadata: each shape the converter is given by mistake, named as it is.


def opensrh_plan(tmp_path, meta, split):
    from dataset_scripts.opensrh import plan_opensrh
    from hlss_hf.data.schema import OPENSRH_CLASSES
    from hlss_hf.data.writer import InvalidItems

    (tmp_path / "root" / "p").mkdir(parents=True)
    (tmp_path / "root" / "p" / "a.tif").write_bytes(b"")
    return plan_opensrh(tmp_path / "root", meta, split, list(OPENSRH_CLASSES), False, InvalidItems())


@pytest.mark.parametrize(
    "meta, split, named",
    [
        ({}, {"train": [], "val": "NIO_1"}, "split file: 'val' must be a list of patient ids, got str"),
        (
            {"NIO_1": {"class": "hgg", "slides": {"1": {"tumor_patches": "p/a.tif"}}}},
            {"train": ["NIO_1"]},
            "'tumor_patches' must be a list of file paths",
        ),
        (
            {"NIO_1": {"class": "hgg", "slides": {"1": ["p/a.tif"]}}},
            {"train": ["NIO_1"]},
            "slide NIO_1-1: metadata record is a list",
        ),
        (
            {"NIO_1": {"class": "hgg", "slides": {"1": {"tumor_patches": ["/etc/hostname"]}}}},
            {"train": ["NIO_1"]},
            "file /etc/hostname: outside the dataset folder",
        ),
        (
            {
                "NIO_1": {
                    "class": "hgg",
                    "slides": {"1": {"tumor_patches": ["../root/p/a.tif", "p/../../x.tif"]}},
                }
            },
            {"train": ["NIO_1"]},
            "file p/../../x.tif: outside the dataset folder",
        ),
    ],
)
def test_opensrh_metadata_of_the_wrong_shape_or_outside_the_root_is_named(tmp_path, meta, split, named):
    from hlss_hf.errors import ConversionError

    with pytest.raises(ConversionError) as caught:
        opensrh_plan(tmp_path, meta, split)
    assert named in str(caught.value) and "under both" not in str(caught.value)


def test_disk_full_while_writing_a_checkpoint_is_one_line_naming_the_path_and_the_bytes(
    tmp_path, attributes_file, monkeypatch
):
    import resource
    import signal

    from accelerate import Accelerator

    save_state = Accelerator.save_state

    def save_state_on_a_full_disk(self, output_dir=None, **kwargs):
        # A 1 MB file-size limit while the checkpoint is written: its weights (a few MB) hit it, and the kernel
        # fails the write with EFBIG as a full disk fails it with ENOSPC (SIGXFSZ ignored, as a full disk sends
        # no signal). The limit is restored at once; only the soft limit moves.
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, hard))
        try:
            return save_state(self, output_dir, **kwargs)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, handler)

    monkeypatch.setattr(Accelerator, "save_state", save_state_on_a_full_disk)
    out = tmp_path / "run"
    message = cli_error(
        monkeypatch,
        tiny_args(out, attributes_file, "--training.save_steps", "1", "--training.max_steps", "1"),
    )
    assert "no space left writing" in message and "step_1.tmp" in message
    assert "it needs about" in message and "File too large" in message
