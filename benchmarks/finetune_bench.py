#!/usr/bin/env python
"""LoRA fine-tuning vs head-only and full fine-tuning of an HLSS classifier, side by side in one run.

    python benchmarks/finetune_bench.py                                   # ViT-Ti/16 tower, 64 px, CPU
    python benchmarks/finetune_bench.py --vision-config vit-b16 --crop 224 --batch 64 --device cuda

The same `HLSSForImageClassification` (same weights) is trained three ways on the same synthetic pixels:
- head: only `classifier` trains (a linear probe on the frozen tower);
- lora: `hlss_hf.training.lora.lora_config_for(model, r, alpha)` (LoRA on the tower's q/v projections + the head),
  as finetune.py does;
- full: every parameter of the tower, the projection and the head trains.
Per mode: trainable parameters, bytes to save (head weights / adapter safetensors / whole model), median training step
(forward + cross-entropy + backward + AdamW), alternating between modes so they share machine noise. Then
inference: the unmerged LoRA model vs `merge_and_unload()` (which must equal it, and costs what the base costs).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
for path in (HERE.parent, HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from train_throughput import TEXT_CONFIG, VISION_PRESETS  # noqa: E402 - the towers of every benchmark

MODES = ("head", "lora", "full")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vision-config", default="vit-ti16", choices=sorted(VISION_PRESETS))
    parser.add_argument("--crop", type=int, default=64, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=32, help="images per training step")
    parser.add_argument("--num-labels", type=int, default=7)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-alpha", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per mode and round")
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating rounds (the median step is reported)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    for key in ("crop", "batch", "num_labels", "lora_r", "lora_alpha", "steps", "rounds"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1")
    return args


def build_base(args) -> torch.nn.Module:
    """A random-weight `HLSSForImageClassification` with the chosen tower (seeded: identical per call)."""
    from transformers import AutoConfig

    from hlss_hf import HLSSConfig, HLSSForImageClassification

    fields = dict(VISION_PRESETS[args.vision_config], image_size=args.crop)
    vision = AutoConfig.for_model(**fields)
    text = AutoConfig.for_model(**TEXT_CONFIG)
    config = HLSSConfig(
        vision_config=vision, text_config=text, image_size=args.crop, num_labels=args.num_labels
    )
    torch.manual_seed(0)
    return HLSSForImageClassification(config)


def build(mode: str, args) -> torch.nn.Module:
    """The model of one mode, with exactly its trainable parameters requiring grad."""
    from peft import get_peft_model

    from hlss_hf.training.lora import lora_config_for

    model = build_base(args)
    if mode == "lora":
        model = get_peft_model(model, lora_config_for(model, r=args.lora_r, alpha=args.lora_alpha))
    elif mode == "head":
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith("classifier."))
    return model.to(args.device)


def saved_bytes(mode: str, model) -> int:
    """Bytes of what must be stored: the classifier (head), the adapter + head (lora) or the whole model."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as folder:
        if mode == "head":
            path = Path(folder) / "classifier.safetensors"
            save_file({k: v.contiguous() for k, v in model.classifier.state_dict().items()}, str(path))
            return path.stat().st_size
        model.save_pretrained(folder)
        return (
            (Path(folder) / ("adapter_model.safetensors" if mode == "lora" else "model.safetensors"))
            .stat()
            .st_size
        )


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(model, optimizer, pixels, labels, steps: int, device: str) -> float:
    """Seconds per training step (forward + loss + backward + AdamW), mean over `steps`."""
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = model(pixel_values=pixels, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync(device)
    return (time.perf_counter() - start) / steps


@torch.no_grad()
def time_forward(model, pixels, steps: int, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        model(pixel_values=pixels)
    sync(device)
    return (time.perf_counter() - start) / steps


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(args.batch, 3, args.crop, args.crop, generator=generator).to(args.device)
    labels = torch.randint(0, args.num_labels, (args.batch,), generator=generator).to(args.device)

    models, optimizers, results = {}, {}, {}
    for mode in MODES:
        model = build(mode, args).train()
        params = [p for p in model.parameters() if p.requires_grad]
        models[mode] = model
        optimizers[mode] = torch.optim.AdamW(params, lr=1e-4)
        results[mode] = {
            "trainable": sum(p.numel() for p in params),
            "total": sum(p.numel() for p in model.parameters()),
            "saved_bytes": saved_bytes(mode, model),
            "step_s": [],
        }
        time_steps(model, optimizers[mode], pixels, labels, 2, args.device)  # warm-up
    for _ in range(args.rounds):  # alternate so the modes share the machine's noise
        for mode in MODES:
            step = time_steps(models[mode], optimizers[mode], pixels, labels, args.steps, args.device)
            results[mode]["step_s"].append(step)

    # Inference: unmerged LoRA vs merged (must agree; merged costs what the plain model costs).
    lora = models["lora"].eval()
    merged = copy.deepcopy(lora).merge_and_unload().eval()
    with torch.no_grad():
        max_diff = float((lora(pixel_values=pixels).logits - merged(pixel_values=pixels).logits).abs().max())
    for model in (lora, merged):
        time_forward(model, pixels, 1, args.device)
    unmerged_s, merged_s = [], []
    for _ in range(args.rounds):
        unmerged_s.append(time_forward(lora, pixels, args.steps, args.device))
        merged_s.append(time_forward(merged, pixels, args.steps, args.device))

    full = results["full"]
    print(
        f"tower {args.vision_config}, {args.crop} px, batch {args.batch}, {args.num_labels} classes, "
        f"LoRA r={args.lora_r} alpha={args.lora_alpha}, device {args.device}, threads {torch.get_num_threads()}"
    )
    print(
        "| mode | trainable params | % of model | saved MB | saved / full model | step s | images/s | step / full |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    summary = {"args": vars(args), "modes": {}}
    full_step = statistics.median(full["step_s"])
    for mode in MODES:
        r = results[mode]
        step = statistics.median(r["step_s"])
        row = {
            "trainable": r["trainable"],
            "trainable_fraction": r["trainable"] / full["total"],
            "saved_mb": r["saved_bytes"] / 2**20,
            "saved_vs_full": r["saved_bytes"] / full["saved_bytes"],
            "step_s": step,
            "images_per_s": args.batch / step,
            "step_vs_full": step / full_step,
        }
        summary["modes"][mode] = row
        print(
            f"| {mode} | {row['trainable']:,} | {100 * row['trainable_fraction']:.2f} | {row['saved_mb']:.3f} | "
            f"{row['saved_vs_full']:.4f} | {step:.3f} | {row['images_per_s']:.1f} | {row['step_vs_full']:.2f} |"
        )
    summary["inference"] = {
        "unmerged_s": statistics.median(unmerged_s),
        "merged_s": statistics.median(merged_s),
        "unmerged_vs_merged": statistics.median(unmerged_s) / statistics.median(merged_s),
        "max_logit_diff": max_diff,
    }
    inf = summary["inference"]
    print(
        f"inference per batch: unmerged LoRA {inf['unmerged_s']:.3f} s, merged {inf['merged_s']:.3f} s "
        f"(unmerged / merged {inf['unmerged_vs_merged']:.2f}); max |logit difference| {max_diff:.2e}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


if __name__ == "__main__":
    main()
