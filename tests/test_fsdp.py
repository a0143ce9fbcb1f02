"""Evaluation and saving of a sharded model: FSDP2 on 2 CPU processes (gloo), DDP on 2, FSDP on GPUs when present.

Each test launches ``tests/fsdp_script.py`` with ``accelerate launch`` and checks its JSON report: the distributed
kNN (:func:`hlss_hf.evaluation.distributed_knn_evaluate`) gives, on every process, the metrics of the one-process
path (`extract_embeddings` + `knn_evaluate`) run on the weights `accelerator.get_state_dict` returns, for a
map-style and a streamed training split; the training RNG does not move; the full state dict has the
one-process layout (keys and shapes).

accelerate 1.15 prepares every ``cpu=True`` run with DDP (``DistributedType.MULTI_CPU``), FSDP plugin or not, so the
CPU FSDP test sets the distributed type by hand (see the script's docstring); torch's FSDP2 does the rest.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available"),
    pytest.mark.skipif(shutil.which("accelerate") is None, reason="the accelerate CLI is not on PATH"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from test_train import small_demo_folder

    folder = tmp_path_factory.mktemp("fsdp") / "demo"
    # 84 train / 36 validation patches: with 2 processes x batch 8 the last round of each split reaches only
    # process 0, so process 1 runs a padding forward there (FSDP would hang without it).
    return small_demo_folder(folder)


_ABORT = "terminate called without an active exception"


def _launch(mode: str, data: Path, report: Path, launch: list[str], *extra: str) -> dict:
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)
    )

    def run():
        cmd = [
            sys.executable, "-m", "accelerate.commands.launch", *launch,
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()),
            str(REPO / "tests" / "fsdp_script.py"), "--mode", mode, "--data", str(data), "--report", str(report),
            *extra,
        ]  # fmt: skip
        return cmd, subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)

    cmd, proc = run()
    if proc.returncode != 0 and _ABORT in proc.stderr:
        # Seen once in ~10 runs of the FSDP2-on-CPU case (gloo; FSDP on CPU is forced, see fsdp_script.py) on the
        # loaded 2-core machine: a process aborts in torch's C++ before any check is made. Launched once more; a
        # second abort, or any other failure, fails the test.
        cmd, proc = run()
    assert proc.returncode == 0, (
        f"{' '.join(cmd)}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    )
    return json.loads(report.read_text(encoding="utf-8"))


def _check_report(report: dict, processes: int) -> None:
    assert report["num_processes"] == processes
    assert report["loss_finite"]
    reference = report["reference"]
    assert set(reference) >= {"patch/acc", "slide/acc", "patient/acc"}
    for rank, seen in enumerate(report["per_process"]):
        assert seen["metrics"] == pytest.approx(reference, abs=1e-6), rank
        assert seen["stream"] == pytest.approx(reference, abs=1e-6), rank
        assert seen["rng_unchanged"], rank
    assert report["stream_rows_equal"]
    assert report["stream_embedding_max_diff"] < 1e-5
    assert report["state_layout_equal"], (report["state_keys_missing"], report["state_keys_extra"])
    if report["patched_get_input_embeddings"]:
        warnings.warn(
            "HLSSModel.get_input_embeddings raises NotImplementedError (transformers' default), which stops "
            "accelerate's FSDP2 prepare; the test script stood in `lambda self: None`",
            stacklevel=2,
        )


@pytest.mark.parametrize("wrap", ["none", "transformer"])
def test_fsdp2_on_two_cpu_processes_evaluates_and_saves_whole_weights(demo_data, tmp_path, wrap):
    launch = ["--multi_gpu", "--num_processes", "2"]
    report = _launch("fsdp", demo_data, tmp_path / "report.json", launch, "--wrap", wrap)
    assert report["distributed_type"] == "DistributedType.FSDP"
    assert report["wrapped"].startswith("FSDP")  # fully_shard's subclass of HLSSModel
    # Really sharded: each process holds about half of the trainable elements.
    assert report["trainable_elements_local"] < 0.6 * report["trainable_elements_full"]
    if wrap == "none":
        # The path train.py used before: the unwrapped module on the main process alone sees only its shards.
        assert "DTensor" in (report["unwrapped_main_only_error"] or "")
    # FSDP2's full state dict is gathered to the main process (offloaded to the CPU); the others get {}.
    assert report["state_dict_sizes"][1] == 0 < report["state_dict_sizes"][0]
    _check_report(report, processes=2)


def test_ddp_on_two_cpu_processes_equals_one_process(demo_data, tmp_path):
    report = _launch("ddp", demo_data, tmp_path / "report.json", ["--multi_gpu", "--num_processes", "2"])
    assert report["distributed_type"] == "DistributedType.MULTI_CPU"
    assert report["wrapped"] == "DistributedDataParallel"
    _check_report(report, processes=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP without overrides needs CUDA devices")
def test_fsdp_on_gpus_with_the_example_config(demo_data, tmp_path):
    processes = min(2, torch.cuda.device_count())
    launch = [
        "--config_file",
        str(REPO / "configs" / "accelerate_fsdp.yaml"),
        "--num_processes",
        str(processes),
    ]
    report = _launch("fsdp-gpu", demo_data, tmp_path / "report.json", launch)
    assert report["distributed_type"] == "DistributedType.FSDP"
    _check_report(report, processes=processes)
