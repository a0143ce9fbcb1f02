#!/usr/bin/env python
"""Training throughput: the full HLSS step vs a bare vision-tower loop, side by side in one run.

    python benchmarks/train_throughput.py                                   # tiny towers, CPU
    python benchmarks/train_throughput.py --vision-config vit-b16 --device cuda --bf16 --batch 32 2 2 2 --crop 224

Full step: ``HLSSModel`` forward on ``[B, S, P, V, C, H, W]`` + the HLSS loss (three SupCon levels through the
language-tied heads + alignment) + backward + AdamW step. Bare loop: the same vision tower (same weights) on the
same ``B*S*P*V`` images, forward + backward of a plain loss (mean of the pooled features) + AdamW step on the
tower. Both use the same synthetic pixels; timings alternate between the two loops to share machine noise.
The ratio full / bare says how much the HLSS heads, losses and projection cost on top of the backbone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

VISION_PRESETS = {
    "tiny": {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "patch_size": 8},
    "vit-ti16": {"model_type": "vit", "hidden_size": 192, "num_hidden_layers": 12, "num_attention_heads": 3,
                 "intermediate_size": 768, "patch_size": 16},
    "vit-s16": {"model_type": "vit", "hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6,
                "intermediate_size": 1536, "patch_size": 16},
    "vit-b16": {"model_type": "vit", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                "intermediate_size": 3072, "patch_size": 16},
}  # fmt: skip
TEXT_CONFIG = {"model_type": "bert", "vocab_size": 1024, "hidden_size": 32, "num_hidden_layers": 2,
               "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64}  # fmt: skip
ATTRIBUTES = {
    "patch": {f"patch attribute {i}": [f"patch description {i}"] for i in range(16)},
    "slide": {f"slide attribute {i}": [f"slide description {i}"] for i in range(16)},
    "patient": {f"patient attribute {i}": [f"patient description {i}"] for i in range(16)},
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--vision-config",
        default="tiny",
        help=f"a preset ({', '.join(VISION_PRESETS)}), a JSON/YAML file or a JSON string of config fields",
    )
    parser.add_argument("--text-hidden", type=int, default=32, help="hidden size of the (random) text tower")
    parser.add_argument("--batch", type=int, nargs=4, default=[4, 2, 2, 2], metavar=("B", "S", "P", "V"))
    parser.add_argument("--crop", type=int, default=32, help="image side in pixels")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for both loops")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per loop per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per loop first")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    return parser.parse_args(argv)


def vision_config(spec: str, crop: int):
    import yaml
    from transformers import AutoConfig

    if spec in VISION_PRESETS:
        fields = dict(VISION_PRESETS[spec])
    elif Path(spec).is_file():
        fields = yaml.safe_load(Path(spec).read_text())
    else:
        fields = json.loads(spec)
    fields = dict(fields)
    fields.setdefault("image_size", crop)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def build(args):
    from transformers import AutoConfig

    from hlss_hf.models.hlss.modeling_hlss import HLSSModel
    from hlss_hf.training.building import fallback_tokenizer

    torch.manual_seed(0)
    text_fields = dict(TEXT_CONFIG, hidden_size=args.text_hidden, intermediate_size=2 * args.text_hidden)
    text = AutoConfig.for_model(text_fields.pop("model_type"), **text_fields)
    model = HLSSModel.from_vision_text_pretrained(
        vision_config(args.vision_config, args.crop),
        text,
        attributes=ATTRIBUTES,
        tokenizer=fallback_tokenizer(ATTRIBUTES),
        image_size=args.crop,
    )
    model.text_model.requires_grad_(False)
    return model.to(args.device).train()


def pooled(outputs) -> torch.Tensor:
    if getattr(outputs, "pooler_output", None) is not None:
        return outputs.pooler_output.flatten(1)
    return outputs.last_hidden_state.mean(dim=1)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build(args)
    B, S, P, V = args.batch
    n = B * S * P * V
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(B, S, P, V, 3, args.crop, args.crop, generator=generator).to(device)
    flat = pixels.reshape(n, 3, args.crop, args.crop)
    full_opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    bare_opt = torch.optim.AdamW(model.vision_model.parameters(), lr=1e-4)
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if args.bf16
        else torch.autocast(device_type=device.type, enabled=False)
    )

    def full_step():
        with autocast:
            loss = model(pixel_values=pixels, return_loss=True).loss
        loss.backward()
        full_opt.step()
        full_opt.zero_grad(set_to_none=True)

    def bare_step():
        with autocast:
            loss = pooled(model.vision_model(pixel_values=flat)).float().mean()
        loss.backward()
        bare_opt.step()
        bare_opt.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(step, count):
        sync()
        tic = time.perf_counter()
        for _ in range(count):
            step()
        sync()
        return n * count / (time.perf_counter() - tic)

    timed(bare_step, args.warmup)
    timed(full_step, args.warmup)
    bare, full = [], []
    for _ in range(args.rounds):
        bare.append(timed(bare_step, args.steps))
        full.append(timed(full_step, args.steps))
    result = {
        "vision_config": args.vision_config,
        "batch": [B, S, P, V],
        "images_per_step": n,
        "crop": args.crop,
        "device": str(device),
        "bf16": args.bf16,
        "threads": torch.get_num_threads(),
        "bare_images_per_s": statistics.median(bare),
        "hlss_images_per_s": statistics.median(full),
    }
    result["ratio_hlss_over_bare"] = result["hlss_images_per_s"] / result["bare_images_per_s"]
    print(
        f"vision={args.vision_config} batch [B,S,P,V]={args.batch} ({n} images of {args.crop}px) "
        f"device={device} bf16={args.bf16} threads={result['threads']}"
    )
    print(f"  bare vision loop : {result['bare_images_per_s']:10.1f} images/s")
    print(f"  full HLSS step   : {result['hlss_images_per_s']:10.1f} images/s")
    print(f"  ratio HLSS / bare: {result['ratio_hlss_over_bare']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
