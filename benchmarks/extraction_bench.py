#!/usr/bin/env python
"""Embedding extraction throughput: the input pipeline alone, and `extract_embeddings` against the forward pass.

    python benchmarks/extraction_bench.py                                   # both parts, ViT-Ti/16, CPU
    python benchmarks/extraction_bench.py --part pipeline                   # input pipeline only, per core
    python benchmarks/extraction_bench.py --part extract --vision-config vit-b16 --device cuda --num-patients 48

Part `pipeline` (one core, main process): decode + preprocess to model-ready tensors, today's path (kept in this
file: datasets' numpy formatting with PIL decoding, `decode_image` and the processor's per-image loop) against the
batched one `extract_embeddings` runs now, alternating rounds, for H&E stored as PNG, JPEG and raw arrays (real
tiles of the shared SVS region when openslide is there) and SRH uint16 arrays, in three framings (native centre
crop; the reference's whole-patch bicubic resize; the same with `resize_uint8`). Outputs are compared (0 where the
storage is lossless and the framing exact). Then a decode-time / size table of H&E codecs and `model_fingerprint`
before and now.

Part `extract`: a demo H&E dataset (`dataset_scripts/demo.py`, 256 px PNG patches) is written to a temporary folder
and read back with `load_dataset`; the processor resizes to the crop and normalises. Side by side, alternating rounds:
- extract: `hlss_hf.evaluation.extract_embeddings` (batched decode, one processor call per batch), in the main
  process, with `--num-workers` DataLoader workers preparing the next batches during the forward and, on an
  accelerator, with its default worker count (`extract-auto`);
- forward: `get_image_features` alone on ready tensors of the same batches (the model's share of the time);
- per-row: the obvious loop, `dataset[i]` (datasets decodes a PIL image per row) and the processor per image;
- cached: a second `extract_embeddings` call with a warm `cache_dir` (no forward pass).
The embeddings of the computing paths are checked equal after the report is printed (max differences reported;
tolerance 1e-4 on CPU, 5e-2 on CUDA, where every path runs under bf16 autocast, `extract_embeddings(precision="bf16")`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
for path in (HERE.parent, HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from train_throughput import VISION_PRESETS, build  # noqa: E402 - the same model builder as training

# a real H&E region (the project's test data)
SVS = HERE.parent.parent / "shared" / "data" / "cmu_small_region.svs"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vision-config", default="vit-ti16", help=f"a preset ({', '.join(VISION_PRESETS)})")
    parser.add_argument("--crop", type=int, default=224, help="model input side in pixels")
    parser.add_argument("--patch-size", type=int, default=256, help="stored patch side in pixels")
    parser.add_argument("--num-patients", type=int, default=8, help="demo patients (16 patches each)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--modality", choices=("he", "srh"), default="he", help="demo patches of the extract part"
    )
    parser.add_argument(
        "--image-format", choices=("png", "raw"), default="png", help="H&E storage of the extract part"
    )
    parser.add_argument("--num-workers", type=int, default=1, help="DataLoader workers of the second extract")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (median reported)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument(
        "--part",
        choices=("all", "pipeline", "extract"),
        default="all",
        help="pipeline: the input pipeline alone, today's path vs the batched one, per core, and the model "
        "fingerprint; extract: extract_embeddings against the forward pass; all: both",
    )
    parser.add_argument("--pipeline-images", type=int, default=128, help="patches per pipeline case")
    parser.add_argument(
        "--pipeline-patch", type=int, default=300, help="stored patch side of the pipeline cases"
    )
    parser.add_argument("--jpeg-quality", type=int, default=90, help="quality of the JPEG storage case")
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
    report = {}
    if args.part in ("all", "pipeline"):
        report["pipeline"] = pipeline_bench(args)
        report["fingerprint"] = fingerprint_bench(build(args).eval())
    if args.part in ("all", "extract"):
        report["extract"] = extract_bench(args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


def extract_bench(args) -> dict:
    import datasets

    from hlss_hf.data.demo import build_demo_dataset
    from hlss_hf.data.schema import decode_image
    from hlss_hf.evaluation import extract_embeddings
    from hlss_hf.models.hlss.processing_hlss import HLSSImageProcessor

    datasets.disable_progress_bars()
    model = build(args).eval()
    processor = HLSSImageProcessor(
        modality=args.modality,
        do_resize=True,
        size={"height": args.crop, "width": args.crop},
        do_normalize=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        build_demo_dataset(
            Path(tmp) / "demo",
            num_patients=args.num_patients,
            slides_per_patient=(2, 2),
            patches_per_slide=8,
            patch_size=args.patch_size,
            val_fraction=0.0,
            modality=args.modality,
            image_format=args.image_format if args.modality == "he" else None,
            align_fraction=0,
        )
        split = datasets.load_dataset(str(Path(tmp) / "demo"), split="train")
        n = len(split)

        # bf16 autocast on CUDA (the precision the GPU runs were measured at), fp32 elsewhere; the same for the
        # extract_embeddings paths and the bare forward.
        precision = "bf16" if torch.device(args.device).type == "cuda" else "fp32"

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
                precision=precision,
            ).embeddings

        batches = [
            processor(
                images=[decode_image(split[i]["image"]) for i in range(s, min(s + args.batch_size, n))]
            )["pixel_values"]
            for s in range(0, n, args.batch_size)
        ]

        def autocast():
            if precision == "bf16":
                return torch.autocast("cuda", dtype=torch.bfloat16)
            return contextlib.nullcontext()

        @torch.inference_mode()
        def forward():
            with autocast():
                return torch.cat(
                    [
                        model.get_image_features(pixel_values=b.to(args.device)).pooler_output.float().cpu()
                        for b in batches
                    ]
                )

        @torch.inference_mode()
        def per_row():
            out = []
            with autocast():
                for i in range(n):
                    image = decode_image(split[i]["image"])
                    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
                    out.append(
                        model.get_image_features(pixel_values=pixels.to(args.device))
                        .pooler_output.float()
                        .cpu()
                    )
            return torch.cat(out)

        workers = f"extract-{args.num_workers}w"
        methods = {
            "extract": extract,
            workers: lambda: extract(num_workers=args.num_workers),
            "forward": forward,
            "per-row": per_row,
        }
        if torch.device(args.device).type != "cpu":
            # extract_embeddings' own choice on an accelerator (default_num_workers: the cores but one).
            methods["extract-auto"] = lambda: extract(num_workers=None)
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
            for name in (
                workers,
                "forward",
                "per-row",
                "cached",
                *(["extract-auto"] if "extract-auto" in results else []),
            )
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
    storage = "SRH uint16 arrays" if args.modality == "srh" else f"H&E {args.image_format}"
    print(
        f"{n} {storage} images of {args.patch_size} px -> {args.crop} px, {args.vision_config}, "
        f"batch {args.batch_size}"
    )
    for name, rate in report["images_per_s"].items():
        print(f"  {name:8s} {rate:8.1f} images/s")
    print(f"  extract / forward time {report['extract_over_forward_time']:.2f}")
    print(f"  {workers} / forward time {report['workers_over_forward_time']:.2f}")
    print(f"  per-row / extract time {report['per_row_over_extract_time']:.2f}")
    print(f"  cache: first {uncached:.2f} s, rerun {cached:.3f} s ({report['cache']['speedup']:.0f}x)")
    print("  max |embedding - extract|: " + ", ".join(f"{k} {v:.1e}" for k, v in max_diff.items()))
    # Checked after the report is out. On CUDA every path runs under bf16 autocast,
    # whose rounding may depend on the batch size (per-row runs batches of one): a bf16-sized tolerance there.
    atol = 5e-2 if torch.device(args.device).type == "cuda" else 1e-4
    for name, diff in max_diff.items():
        if diff > atol:
            raise AssertionError(
                f"{name} embeddings differ from extract_embeddings' by {diff:.2e} (> {atol})"
            )
    return report


# ---------------------------------------------------------------------------------------------------------------
# Input pipeline alone: decode + preprocess to model-ready tensors, today's path vs the batched one (issue 13)
# ---------------------------------------------------------------------------------------------------------------


def _he_tiles(patch: int, count: int):
    """`count` real H&E tiles of `patch` px from the shared SVS region (repeated as needed), or `None`."""
    try:
        import openslide

        slide = openslide.OpenSlide(str(SVS))
        rgb = np.array(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    except Exception:  # noqa: BLE001 - no openslide or no file: the synthetic demo tiles are used
        return None
    tiles = [
        rgb[y : y + patch, x : x + patch]
        for y in range(0, rgb.shape[0] - patch + 1, patch)
        for x in range(0, rgb.shape[1] - patch + 1, patch)
    ]
    return [tiles[i % len(tiles)] for i in range(count)]


def _synthetic_he(patch: int, count: int):
    from hlss_hf.data.demo import build_demo_dataset

    demo = build_demo_dataset(
        num_patients=max(2, count // 16 + 1), patch_size=patch, val_fraction=0.0, align_fraction=0
    )
    images = demo["train"].with_format("numpy")["image"][:count]
    return [np.asarray(image)[..., :3] for image in images]


def _srh_patches(patch: int, count: int):
    """Smooth uint16 [CH2, CH3] patches in the OpenSRH value range (decode cost does not depend on content)."""
    rng = np.random.default_rng(0)
    small = rng.integers(2000, 40000, size=(count, patch // 10 + 1, patch // 10 + 1, 2))
    return [np.kron(s, np.ones((10, 10, 1)))[:patch, :patch].astype(np.uint16) for s in small]


def _encode(image: np.ndarray, fmt: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _store(images, storage: str, quality: int):
    """A one-column dataset in a storage format: `png` / `jpeg` (datasets.Image) or `raw` (Array3D)."""
    import datasets

    if storage in ("png", "jpeg"):
        fmt = "PNG" if storage == "png" else "JPEG"
        encoded = [{"bytes": _encode(image, fmt, quality), "path": None} for image in images]
        data = datasets.Dataset.from_dict(
            {"image": encoded}, features=datasets.Features({"image": datasets.Image()})
        )
        return data, float(np.mean([len(e["bytes"]) for e in encoded]))
    shape, dtype = images[0].shape, str(images[0].dtype)
    feature = datasets.Array3D(shape=shape, dtype=dtype)
    data = datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": feature}))
    return data, float(images[0].nbytes)


def _today_batches(data, processor, batch_size: int):
    """The input path before issue 13, kept here to measure against: datasets' numpy formatting (PIL decode;
    int64 widening of integer arrays), `decode_image` per row, and the processor's per-image loop."""
    from hlss_hf.data.schema import decode_image
    from hlss_hf.models.hlss.pixels_hlss import he_to_float, srh_to_float

    column = data.select_columns(["image"]).with_format("numpy")
    convert = srh_to_float if processor.modality == "srh" else he_to_float
    for start in range(0, len(data), batch_size):
        outputs = []
        for value in column[start : start + batch_size]["image"]:
            pixels = convert(decode_image(value)).unsqueeze(0)
            if processor.do_resize:
                pixels = processor.resize(pixels, processor.size, processor.resample, processor.antialias)
            if processor.do_center_crop:
                pixels = processor.center_crop(pixels, processor.crop_size)
            outputs.append(pixels)
        pixels = torch.cat(outputs).to(torch.float32)
        if processor.do_normalize:
            pixels = processor.normalize(pixels, processor.image_mean, processor.image_std)
        yield pixels.contiguous()


def _new_batches(data, processor, batch_size: int):
    """What `extract_embeddings` runs per batch now (its `_ImageBatches`)."""
    from hlss_hf.evaluation.embeddings import _image_column, _ImageBatches

    batches = _ImageBatches(_image_column(data), batch_size, processor, processor.modality, None)
    for i in range(len(batches)):
        yield batches[i]


def pipeline_bench(args) -> dict:
    """Images/s of the input pipeline alone, one core, today's path and the new one alternating."""
    import datasets

    from hlss_hf.models.hlss.processing_hlss import HLSSImageProcessor

    datasets.disable_progress_bars()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per core
    n, patch = args.pipeline_images, args.pipeline_patch
    he = _he_tiles(patch, n)
    he_source = f"{SVS.name} tiles" if he is not None else "synthetic demo tiles"
    he = he if he is not None else _synthetic_he(patch, n)
    srh = _srh_patches(patch, n)
    framings = {
        "crop": dict(do_center_crop=True, crop_size=args.crop, do_normalize=True),
        "resize": dict(
            do_resize=True,
            size={"height": args.crop, "width": args.crop},
            resample="bicubic",
            do_center_crop=False,
            do_normalize=True,
        ),
    }
    # The reference framing with the opt-in 8-bit resize (H&E only; measured against today's float resize).
    framings["resize-u8"] = dict(framings["resize"], resize_uint8=True)
    cases = [("he", s, he) for s in ("png", "jpeg", "raw")] + [("srh", "raw", srh)]
    rows = []
    reference_pixels = {}  # (modality, framing) -> today's output from the lossless storage
    for modality, storage, images in cases:
        data, stored_bytes = _store(images, storage, args.jpeg_quality)
        for framing, settings in framings.items():
            if framing == "resize-u8" and modality == "srh":
                continue  # SRH is resized as float whatever the option
            processor = HLSSImageProcessor(modality=modality, **settings)
            paths = {
                name: lambda batches=batches, data=data, processor=processor: torch.cat(
                    list(batches(data, processor, args.batch_size))
                )
                for name, batches in (("today", _today_batches), ("new", _new_batches))
            }
            times = {name: [] for name in paths}
            out = {}
            for _ in range(args.rounds):
                for name, fn in paths.items():
                    seconds, out[name] = timed(fn)
                    times[name].append(seconds)
            if storage != "jpeg":  # lossless: today's output here is the exact one for these pixels
                reference_pixels.setdefault((modality, framing), out["today"])
            base = reference_pixels[(modality, framing)]
            rate = {name: n / statistics.median(values) for name, values in times.items()}
            rows.append(
                {
                    "modality": modality,
                    "storage": storage + (f" q{args.jpeg_quality}" if storage == "jpeg" else ""),
                    "framing": framing,
                    "kb_per_patch": stored_bytes / 1024,
                    "today_images_per_s": rate["today"],
                    "new_images_per_s": rate["new"],
                    "new_over_today": rate["new"] / rate["today"],
                    "max_abs_diff_new_vs_today": float((out["new"] - out["today"]).abs().max()),
                    "max_abs_diff_vs_lossless": float((out["new"] - base).abs().max()),
                    "mean_abs_diff_vs_lossless": float((out["new"] - base).abs().mean()),
                }
            )
    # Against today's path on PNG (same framing): what a change of H&E storage format buys on top.
    today_png = {r["framing"]: r["today_images_per_s"] for r in rows if r["storage"] == "png"}
    for row in rows:
        is_he = row["modality"] == "he"
        row["new_over_today_png"] = row["new_images_per_s"] / today_png[row["framing"]] if is_he else None
    torch.set_num_threads(threads)
    codecs = codec_bench(he, args.rounds)
    print(
        f"\nInput pipeline, 1 core: {n} patches of {patch} px ({he_source} for H&E), batch {args.batch_size}, "
        f"to {args.crop} px normalised; median of {args.rounds} alternating rounds"
    )
    print(
        "  framings: crop = native resolution, centre crop; resize = whole patch resized bicubic (the reference's);"
    )
    print(
        "  resize-u8 = the same with resize_uint8=True. Diffs: against today's output from lossless storage."
    )
    print(
        f"  {'modality':8s} {'storage':9s} {'framing':9s} {'KB/patch':>8s} {'today/s':>8s} {'new/s':>8s} "
        f"{'new/today':>9s} {'vs PNG today':>12s} {'max diff':>9s} {'mean diff':>9s}"
    )
    for r in rows:
        vs_png = f"{r['new_over_today_png']:.2f}" if r["new_over_today_png"] is not None else "-"
        print(
            f"  {r['modality']:8s} {r['storage']:9s} {r['framing']:9s} {r['kb_per_patch']:8.1f} "
            f"{r['today_images_per_s']:8.1f} {r['new_images_per_s']:8.1f} {r['new_over_today']:9.2f} "
            f"{vs_png:>12s} {r['max_abs_diff_vs_lossless']:9.1e} {r['mean_abs_diff_vs_lossless']:9.1e}"
        )
    return {"source": he_source, "rows": rows, "codecs": codecs}


def codec_bench(tiles, rounds: int) -> list[dict]:
    """Decode time (one core) against stored size for H&E storage codecs, on the same tiles."""
    import imagecodecs

    def pil(data):
        return np.array(Image.open(io.BytesIO(data)).convert("RGB"))

    shape = tiles[0].shape
    codecs = {
        "PNG, PIL (today)": (lambda t: _encode(t, "PNG", 0), pil, True),
        "PNG, imagecodecs (now)": (lambda t: _encode(t, "PNG", 0), imagecodecs.png_decode, True),
        "JPEG q90, PIL": (lambda t: _encode(t, "JPEG", 90), pil, False),
        "JPEG q90, imagecodecs": (lambda t: _encode(t, "JPEG", 90), imagecodecs.jpeg8_decode, False),
        "JPEG q95, imagecodecs": (lambda t: _encode(t, "JPEG", 95), imagecodecs.jpeg8_decode, False),
        "WebP lossless": (lambda t: imagecodecs.webp_encode(t, lossless=True), imagecodecs.webp_decode, True),
        "QOI": (lambda t: imagecodecs.qoi_encode(t), imagecodecs.qoi_decode, True),
        "raw + zstd": (
            lambda t: imagecodecs.zstd_encode(t.tobytes()),
            lambda d: np.frombuffer(imagecodecs.zstd_decode(d), np.uint8).reshape(shape),
            True,
        ),
        "raw (Array3D)": (lambda t: t.tobytes(), lambda d: np.frombuffer(d, np.uint8).reshape(shape), True),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    for name, (encode, decode, lossless) in codecs.items():
        try:
            encoded = [encode(t) for t in tiles]
        except Exception as err:  # noqa: BLE001 - a codec missing from this imagecodecs build
            print(f"  {name}: skipped ({err})")
            continue
        seconds = min(timed(lambda: [decode(e) for e in encoded])[0] for _ in range(rounds))  # noqa: B023
        exact = all(np.array_equal(decode(e), t) for e, t in zip(encoded, tiles, strict=True))
        if exact != lossless:
            raise AssertionError(f"{name}: lossless {exact}, expected {lossless}")
        kb = float(np.mean([len(e) for e in encoded])) / 1024
        rows.append(
            {"codec": name, "kb_per_patch": kb, "decode_ms": 1e3 * seconds / len(tiles), "lossless": exact}
        )
    torch.set_num_threads(threads)
    print(f"\nH&E storage codecs, {len(tiles)} tiles of {shape[0]} px, decode on one core:")
    for r in rows:
        print(
            f"  {r['codec']:24s} {r['kb_per_patch']:7.1f} KB/patch  {r['decode_ms']:6.2f} ms  lossless {r['lossless']}"
        )
    return rows


def fingerprint_bench(model) -> dict:
    """`model_fingerprint` before issue 13 (sha256 over a bytes copy of every tensor) and now (xxh3, no copy,
    remembered until a tensor changes)."""
    from hlss_hf.evaluation import model_fingerprint

    def before():
        digest = hashlib.sha256(type(model).__qualname__.encode())
        for name, tensor in sorted(model.state_dict().items()):
            tensor = tensor.detach().cpu().contiguous()
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    model_fingerprint.cache_clear()
    old, _ = timed(before)
    first, _ = timed(lambda: model_fingerprint(model))
    again, _ = timed(lambda: model_fingerprint(model))
    params = sum(p.numel() for p in model.parameters())
    print(
        f"\nmodel_fingerprint ({params / 1e6:.1f}M parameters): before {old * 1e3:.0f} ms, now {first * 1e3:.0f} ms "
        f"({old / first:.1f}x), repeated call {again * 1e3:.1f} ms"
    )
    return {"params": params, "before_s": old, "now_s": first, "repeat_s": again}


if __name__ == "__main__":
    main()
