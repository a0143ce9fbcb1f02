"""A newcomer's first mistakes with train.py and `python -m hlss_hf.evaluate` end in one line naming the thing.

Each case runs the command as a user would (a subprocess, offline unless it talks to the local Hub) and checks: a
non-zero exit, exactly one stderr line ``error: ...`` naming what is wrong, no traceback, and no output folder
left behind. Every case fails before a model is built.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

# End to end: each mistake runs the real program in a fresh process (the fast tier leaves them out).
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def offline_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HLSS_DEBUG", "HF_ENDPOINT")}
    env.update(
        PYTHONPATH=str(REPO),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf-home"),  # an empty cache: no Hub id resolves from it
    )
    return env


@pytest.fixture
def workdir(tmp_path):
    """The user's working folder: `data/` and `outputs/` exist, as after the README's first commands."""
    cwd = tmp_path / "work"
    (cwd / "data").mkdir(parents=True)
    (cwd / "outputs").mkdir()
    return cwd


def run(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def train(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    # The output folder's parent does not exist either: nothing of it may be left behind.
    out = ["--training.output_dir", str(cwd / "runs" / "first")]
    return run([sys.executable, str(REPO / "train.py"), *args, *out], cwd, env)


def evaluate(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    out = ["--output_dir", str(cwd / "evals" / "first")]
    return run([sys.executable, "-m", "hlss_hf.evaluate", "knn", *args, *out], cwd, env)


def nothing_left(cwd: Path) -> None:
    assert not (cwd / "runs").exists() and not (cwd / "evals").exists()


def save_without_ids(folder: Path, **columns: list) -> Path:
    """A saved dataset with labels and patch ids (and `columns`) but, unless given, no patient_id / slide_id."""
    rows = {"label": [0, 1], "patch_id": ["a", "b"], **columns}
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict(rows), "validation": datasets.Dataset.from_dict(rows)}
    ).save_to_disk(str(folder))
    return folder


# ------------------------------------------------------------------------------------------------ train.py
def test_train_missing_local_dataset_is_named_not_looked_up(workdir, tmp_path):
    proc = train(workdir, offline_env(tmp_path), "--data.dataset", "data/dmo")
    assert_one_line_error(proc, "'data/dmo'", "data.dataset", "no such folder")
    assert "Hub" not in proc.stderr
    nothing_left(workdir)


def test_train_hub_dataset_offline(workdir, tmp_path):
    proc = train(workdir, offline_env(tmp_path), "--data.dataset", "me/opensrh")
    assert_one_line_error(proc, "'me/opensrh'", "offline")
    nothing_left(workdir)


def test_train_malformed_yaml_names_file_and_line(workdir, tmp_path):
    (workdir / "broken.yaml").write_text("model:\n  vision: [a, b\ndata:\n  dataset: demo\n")
    proc = train(workdir, offline_env(tmp_path), "--config", "broken.yaml")
    assert_one_line_error(proc, "broken.yaml", "line 3", "not valid YAML")
    nothing_left(workdir)


def test_train_dataset_without_id_columns(workdir, tmp_path):
    save_without_ids(workdir / "data" / "flat")
    proc = train(workdir, offline_env(tmp_path), "--data.dataset", "data/flat")
    assert_one_line_error(proc, "data/flat", "patient_id or slide_id")
    nothing_left(workdir)


def test_train_debug_shows_the_traceback(workdir, tmp_path):
    env = offline_env(tmp_path)
    proc = train(workdir, env, "--data.dataset", "data/dmo", "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "SourceError" in proc.stderr
    proc = train(workdir, {**env, "HLSS_DEBUG": "1"}, "--data.dataset", "data/dmo")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_train_unknown_hub_dataset(workdir, local_hub):
    proc = train(workdir, {**local_hub.env(), "PYTHONPATH": str(REPO)}, "--data.dataset", "nobody/nothing")
    assert_one_line_error(proc, "'nobody/nothing'", local_hub.url, "no dataset repo")
    nothing_left(workdir)


# ------------------------------------------------------------------------------------ python -m hlss_hf.evaluate
def test_evaluate_missing_local_model(workdir, tmp_path):
    proc = evaluate(
        workdir, offline_env(tmp_path), "--model_name_or_path", "outputs/hlss-dem", "--dataset", "data/demo"
    )
    assert_one_line_error(proc, "model 'outputs/hlss-dem'", "model.model_name_or_path", "no such folder")
    nothing_left(workdir)


def test_evaluate_missing_local_dataset(workdir, tmp_path):
    (workdir / "outputs" / "hlss-demo").mkdir()
    proc = evaluate(
        workdir, offline_env(tmp_path), "--model_name_or_path", "outputs/hlss-demo", "--dataset", "./dmo"
    )
    assert_one_line_error(proc, "dataset './dmo'", "data.dataset", "no such folder")
    nothing_left(workdir)


def with_ids(folder: Path) -> Path:
    """A saved dataset that passes the data checks made before the model loads."""
    return save_without_ids(folder, patient_id=["p1", "p2"], slide_id=["p1-s1", "p2-s1"])


def test_evaluate_hub_model_offline(workdir, tmp_path):
    with_ids(workdir / "data" / "demo")
    proc = evaluate(
        workdir, offline_env(tmp_path), "--model_name_or_path", "me/hlss-srh", "--dataset", "data/demo"
    )
    assert_one_line_error(proc, "'me/hlss-srh'", "offline")
    nothing_left(workdir)


def test_evaluate_unknown_hub_model(workdir, local_hub):
    env = {**local_hub.env(), "PYTHONPATH": str(REPO)}
    with_ids(workdir / "data" / "demo")
    proc = evaluate(workdir, env, "--model_name_or_path", "nobody/nothing", "--dataset", "data/demo")
    assert_one_line_error(proc, "'nobody/nothing'", local_hub.url, "no model repo")
    nothing_left(workdir)


def test_evaluate_dataset_without_id_columns(workdir, tmp_path):
    # The data is checked before the model loads: an empty model folder is never opened.
    (workdir / "outputs" / "hlss-demo").mkdir()
    save_without_ids(workdir / "data" / "flat")
    proc = evaluate(
        workdir, offline_env(tmp_path), "--model_name_or_path", "outputs/hlss-demo", "--dataset", "data/flat"
    )
    assert_one_line_error(proc, "data/flat", "patient_id or slide_id")
    nothing_left(workdir)


def test_evaluate_folder_without_data_files(workdir, tmp_path):
    (workdir / "outputs" / "hlss-demo").mkdir()
    proc = evaluate(
        workdir, offline_env(tmp_path), "--model_name_or_path", "outputs/hlss-demo", "--dataset", "data"
    )
    assert_one_line_error(proc, "dataset 'data'", "data files")
    nothing_left(workdir)


# ------------------------------------------------------------------------------------------------ the rule
def test_looks_local_rule(tmp_path, monkeypatch):
    from hlss_hf.sources import looks_local

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for spec in ("./x", "../x", "/x/y", "~/x", "data/dmo", "a/b/c", ".hidden"):
        assert looks_local(spec), spec
    for spec in ("me/opensrh", "opensrh", "timm/resnet50_clip.cc12m"):
        assert not looks_local(spec), spec
    (tmp_path / "me").mkdir()  # a folder named like the namespace: the id now means that folder
    assert looks_local("me/opensrh")
