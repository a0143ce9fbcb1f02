#!/usr/bin/env python
"""Embedding extraction throughput: `extract_embeddings` vs the bare forward, a per-row loop and its cache.

    python benchmarks/extraction_bench.py                                   # ViT-Ti/16, 224 px, H&E, CPU
    python benchmarks/extraction_bench.py --vision-config vit-b16 --device cuda --num-patients 64

A demo H&E dataset (`dataset_scripts/demo.py`, 256 px PNG patches) is written to a temporary folder and read back
with `load_dataset`; the processor resizes to the crop and normalises. Side by side, alternating rounds:
- extract: `hlss_hf.evaluation.extract_embeddings` (batched numpy decode, one processor call per batch), in the
  main process and with `--num-workers` DataLoader workers preparing the next batches during the forward;
- forward: `get_image_features` alone on ready tensors of the same batches (the model's share of the time);
- per-row: the obvious loop, `dataset[i]` (datasets decodes a PIL image per row) and the processor per image;
- cached: a second `extract_embeddings` call with a warm `cache_dir` (no forward pass).
The embeddings of the computing paths are checked equal after the report is printed (max differences reported;
tolerance 1e-4 on CPU, 5e-2 on CUDA, where every path runs under the bf16 autocast `extract_embeddings` uses there).
"""

from __future__ import annotations

import argparse
import contextlib
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

from train_throughput import VISION_PRESETS, build  # noqa: E402 - the same model builder as training


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vision-config", default="vit-ti16", help=f"a preset ({', '.join(VISION_PRESETS)})")
    parser.add_argument("--crop", type=int, default=224, help="model input side in pixels")
    parser.add_argument("--patch-size", type=int, default=256, help="stored patch side in pixels")
    parser.add_argument("--num-patients", type=int, default=8, help="demo patients (16 patches each)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=1, help="DataLoader workers of the second extract")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (median reported)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    # train_throughput.build reads these fields.
    args.text_hidden = 32
    return args


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import datasets

    from dataset_scripts.demo import build_demo_dataset
    from hlss_hf.evaluation import extract_embeddings
    from hlss_hf.processing_hlss import HLSSImageProcessor
    from hlss_hf.schema import decode_image

    datasets.disable_progress_bars()
    model = build(args).eval()
    processor = HLSSImageProcessor(
        modality="he", do_resize=True, size={"height": args.crop, "width": args.crop}, do_normalize=True
    )
    with tempfile.TemporaryDirectory() as tmp:
        build_demo_dataset(
            Path(tmp) / "demo",
            num_patients=args.num_patients,
            slides_per_patient=(2, 2),
            patches_per_slide=8,
            patch_size=args.patch_size,
            val_fraction=0.0,
        )
        split = datasets.load_dataset(str(Path(tmp) / "demo"), split="train")
        n = len(split)

        def extract(cache_dir=None, num_workers=0):
            return extract_embeddings(
                model,
                split,
                processor,
                batch_size=args.batch_size,
                cache_dir=cache_dir,
                device=args.device,
                progress=False,
                num_workers=num_workers,
            ).embeddings

        batches = [
            processor(
                images=[decode_image(split[i]["image"]) for i in range(s, min(s + args.batch_size, n))]
            )["pixel_values"]
            for s in range(0, n, args.batch_size)
        ]

        def autocast():
            # The precision extract_embeddings uses: bf16 autocast on CUDA, fp32 elsewhere.
            if torch.device(args.device).type == "cuda":
                return torch.autocast("cuda", dtype=torch.bfloat16)
            return contextlib.nullcontext()

        @torch.inference_mode()
        def forward():
            with autocast():
                return torch.cat(
                    [model.get_image_features(pixel_values=b.to(args.device)).float().cpu() for b in batches]
                )

        @torch.inference_mode()
        def per_row():
            out = []
            with autocast():
                for i in range(n):
                    pixels = processor(images=split[i]["image"], return_tensors="pt")["pixel_values"]
                    out.append(model.get_image_features(pixel_values=pixels.to(args.device)).float().cpu())
            return torch.cat(out)

        workers = f"extract-{args.num_workers}w"
        methods = {
            "extract": extract,
            workers: lambda: extract(num_workers=args.num_workers),
            "forward": forward,
            "per-row": per_row,
        }
        times = {name: [] for name in methods}
        results = {}
        forward()  # warm-up
        for _ in range(args.rounds):
            for name, fn in methods.items():
                seconds, results[name] = timed(fn)
                times[name].append(seconds)
        cache_dir = Path(tmp) / "cache"
        uncached, _ = timed(lambda: extract(cache_dir))
        cached, results["cached"] = timed(lambda: extract(cache_dir))
        max_diff = {
            name: float((results[name] - results["extract"]).abs().max())
            for name in (workers, "forward", "per-row", "cached")
        }

    median = {name: statistics.median(values) for name, values in times.items()}
    report = {
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "images": n,
        "images_per_s": {name: n / seconds for name, seconds in median.items()},
        "extract_over_forward_time": median["extract"] / median["forward"],
        "workers_over_forward_time": median[workers] / median["forward"],
        "per_row_over_extract_time": median["per-row"] / median["extract"],
        "cache": {"first_s": uncached, "rerun_s": cached, "speedup": uncached / cached},
        "max_abs_diff_vs_extract": max_diff,
    }
    print(
        f"{n} images of {args.patch_size} px -> {args.crop} px, {args.vision_config}, batch {args.batch_size}"
    )
    for name, rate in report["images_per_s"].items():
        print(f"  {name:8s} {rate:8.1f} images/s")
    print(f"  extract / forward time {report['extract_over_forward_time']:.2f}")
    print(f"  {workers} / forward time {report['workers_over_forward_time']:.2f}")
    print(f"  per-row / extract time {report['per_row_over_extract_time']:.2f}")
    print(f"  cache: first {uncached:.2f} s, rerun {cached:.3f} s ({report['cache']['speedup']:.0f}x)")
    print("  max |embedding - extract|: " + ", ".join(f"{k} {v:.1e}" for k, v in max_diff.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    # Checked after the report is out. On CUDA every path runs under bf16 autocast (as extract_embeddings does),
    # whose rounding may depend on the batch size (per-row runs batches of one): a bf16-sized tolerance there.
    atol = 5e-2 if torch.device(args.device).type == "cuda" else 1e-4
    for name, diff in max_diff.items():
        if diff > atol:
            raise AssertionError(
                f"{name} embeddings differ from extract_embeddings' by {diff:.2e} (> {atol})"
            )
    return report


if __name__ == "__main__":
    main()
