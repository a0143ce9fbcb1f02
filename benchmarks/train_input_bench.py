#!/usr/bin/env python
"""Training input end to end: the shipped config's loader + train step against the same step on a ready batch.

    python benchmarks/train_input_bench.py                       # SRH and H&E (PNG, raw), tiny tower, CPU
    python benchmarks/train_input_bench.py --device cuda --vision-config vit-b16 --mixed-precision bf16 \\
        --patients 64 --batch-size 32                               # the GPU run (benchmarks/README.md)

For each case the shipped config, read by train.py's own parser (``configs/opensrh_hlss.yaml`` for SRH,
``configs/tcga_hlss.yaml`` for H&E), gives the augmentation, S / P / V, crop, DataLoader workers and batch size;
``--batch-size``, ``--num-workers`` and ``--mixed-precision`` override them. The data are the fixtures of
``benchmarks/data_throughput.py``: OpenSRH-layout TIFFs through ``dataset_scripts/opensrh.py``, and a real H&E
slide tiled by ``dataset_scripts/wsi.py`` as PNG and as raw arrays. The model is an ``HLSSModel`` with a
random vision tower (``--vision-config``) and a tiny random text tower (the banks' size does not change the step).

Two loops run the step train.py runs (forward with the HLSS loss, the non-finite check, backward, clipping when
the config clips, AdamW, scheduler), alternating, ``--rounds`` times:

- **ready**: on one batch already on the device (the step alone);
- **loader**: on batches from ``build_train_loader`` + ``accelerator.prepare``, epoch after epoch as train.py
  iterates them (so epoch starts, where the workers' pipeline drains, are included). Each loader round first
  takes ``num_workers * 2`` batches untimed: the workers' prefetch, filled while the ready round ran.

``loader / ready`` (images/s) is the share of the step's speed that training keeps with its input pipeline; issue
13's goal on a GPU is >= 0.9. On a CPU the workers share the cores with the model, so the CPU figure only shows
the script works.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "benchmarks", ROOT / "dataset_scripts"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

CONFIGS = {"srh": ROOT / "configs" / "opensrh_hlss.yaml", "he": ROOT / "configs" / "tcga_hlss.yaml"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cases", nargs="+", default=["srh", "he-png", "he-raw"], choices=["srh", "he-png", "he-raw"]
    )
    parser.add_argument(
        "--vision-config", default="tiny", help="a preset of train_throughput.py (tiny, vit-b16...)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mixed-precision", default=None, help="no / bf16 / fp16 (default: the config's)")
    parser.add_argument("--batch-size", type=int, default=2, help="patients per step (the configs say 32)")
    parser.add_argument(
        "--num-workers", type=int, default=None, help="DataLoader workers (default: the config's)"
    )
    parser.add_argument(
        "--no-pin-memory", action="store_true", help="do not pin batches on CUDA (the lever off)"
    )
    parser.add_argument(
        "--compare-levers",
        action="store_true",
        help="also run each case with pinning off (CUDA), with one iteration per epoch, and with that and the "
        "workers restarted every epoch",
    )
    parser.add_argument(
        "--no-spanning",
        action="store_true",
        help="one loader iteration per epoch, not one across epochs (the lever off)",
    )
    parser.add_argument(
        "--no-persistent-workers", action="store_true", help="restart the workers every epoch (the lever off)"
    )
    parser.add_argument(
        "--patients", type=int, default=8, help="fixture patients (2 slides x --patches each)"
    )
    parser.add_argument("--patches", type=int, default=16, help="fixture patches per slide")
    parser.add_argument("--size", type=int, default=300, help="fixture patch side (pixels)")
    parser.add_argument("--he-slide", default=None, help="the H&E slide to tile (default: the shared region)")
    parser.add_argument(
        "--simulate-step-ms",
        type=float,
        default=None,
        help="replace the step by a sleep of this many ms (a device step as the host sees it: waiting, cores free)",
    )
    parser.add_argument("--steps", type=int, default=5, help="timed steps per loop per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--workdir", default=None, help="where the fixtures go (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    return parser.parse_args(argv)


def fixture(case: str, args, workdir: Path):
    """The case's training split (a memory-mapped ``datasets.Dataset``), or a string saying why there is none."""
    import data_throughput

    spec = argparse.Namespace(
        patients=args.patients,
        slides=2,
        patches=args.patches,
        size=args.size,
        he_slide=args.he_slide or str(data_throughput.HE_SLIDE),
    )
    if case == "srh":
        return data_throughput.srh_dataset(spec, workdir / "srh")[0]
    if "he" not in _BUILT:  # one tiling gives both H&E cases
        _BUILT["he"] = data_throughput.he_datasets(spec, workdir / "he")
    built = _BUILT["he"]
    return built if isinstance(built, str) else built[0][case.split("-")[1]]


_BUILT: dict = {}


def run_case(case: str, dataset, args) -> dict:
    from train_throughput import build
    from transformers import get_scheduler

    from hlss_hf.data import build_train_loader
    from hlss_hf.training.config import TrainConfig, parse_config
    from hlss_hf.training.loop import all_finite
    from hlss_hf.training.optim import make_accelerator

    modality = case.split("-")[0]
    overrides = ["--config", str(CONFIGS[modality]), "--training.per_device_batch_size", str(args.batch_size)]
    overrides += ["--training.cpu", str(args.device == "cpu").lower(), "--training.report_to", "none"]
    if args.num_workers is not None:
        overrides += ["--data.num_workers", str(args.num_workers)]
    if args.mixed_precision is not None:
        overrides += ["--training.mixed_precision", args.mixed_precision]
    config = parse_config(overrides, TrainConfig)
    d, t = config.data, config.training

    # train_throughput's model: the vision preset at the config's crop, a tiny random text tower, frozen.
    spec = argparse.Namespace(
        vision_config=args.vision_config, crop=d.crop_size, text_hidden=32, device="cpu"
    )
    model = build(spec)
    accelerator = make_accelerator(t)
    train_dataset, loader = build_train_loader(config, dataset, accelerator.num_processes, accelerator.device)
    if args.no_pin_memory:
        loader.pin_memory = False  # the lever off: pageable batches, blocking copies
    if args.no_persistent_workers and loader.persistent_workers:
        loader = torch.utils.data.DataLoader(  # the same loader, its workers restarted every epoch
            loader.dataset,
            batch_sampler=loader.batch_sampler,
            collate_fn=loader.collate_fn,
            generator=loader.generator,
            num_workers=loader.num_workers,
            pin_memory=loader.pin_memory,
        )
    workers, pinned, batches_per_epoch = loader.num_workers, loader.pin_memory, len(loader)
    # As train.py: one iteration across epochs when epochs hold whole accumulation groups.
    sampler = loader.batch_sampler
    spanning = not args.no_spanning and batches_per_epoch % t.gradient_accumulation_steps == 0
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.lr)
    scheduler = get_scheduler("constant", optimizer)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    model.train()

    def step(batch):
        if args.simulate_step_ms is not None:
            time.sleep(args.simulate_step_ms / 1000)  # the host waiting on a device step; the cores stay free
            return
        with accelerator.accumulate(model):
            outputs = model(pixel_values=batch["pixel_values"], return_loss=True)
            if not all_finite(outputs.loss, accelerator):
                raise RuntimeError(f"{case}: non-finite loss")
            accelerator.backward(outputs.loss)
            if accelerator.sync_gradients and t.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

    waits = {True: [], False: []}  # seconds spent waiting for a batch: the first of an epoch, the others

    def epochs():
        epoch = 0
        sampler.num_epochs = 1000 if spanning else 1  # more than the benchmark takes
        while True:
            loader.set_epoch(epoch)
            train_dataset.set_epoch(epoch)
            batches, count = iter(loader), 0
            while True:
                tic = time.perf_counter()
                batch = next(batches, None)
                if batch is None:
                    break
                waits[count % batches_per_epoch == 0].append(time.perf_counter() - tic)
                count += 1
                yield batch
            epoch += sampler.num_epochs

    def sync():
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(batches) -> float:
        sync()
        tic = time.perf_counter()
        for batch in batches:
            step(batch)
        sync()
        return time.perf_counter() - tic

    stream = epochs()
    ready = next(stream)
    images = math.prod(ready["pixel_values"].shape[:4])  # B * S * P * V
    buffered = max(workers, 1) * 2
    for _ in range(2):  # warm-up: first steps, worker start
        step(ready), step(next(stream))
    ready_rates, loader_rates = [], []
    waits[True].clear(), waits[False].clear()
    for _ in range(args.rounds):
        ready_rates.append(images * args.steps / timed(ready for _ in range(args.steps)))
        for _ in range(buffered):
            next(stream)
        loader_rates.append(images * args.steps / timed(next(stream) for _ in range(args.steps)))
    result = {
        "case": case,
        "config": CONFIGS[modality].name,
        "num_workers": workers,
        "pin_memory": pinned,
        "persistent_workers": loader.persistent_workers,
        "across_epochs": spanning,
        "batch_patients": args.batch_size,
        "images_per_step": images,
        "batches_per_epoch": batches_per_epoch,
        "mixed_precision": str(accelerator.mixed_precision),
        "simulated_step_ms": args.simulate_step_ms,
        # Mean wait for a batch: at an epoch's start the workers' pipeline has drained (non-persistent workers
        # restart and each builds a whole batch before the first arrives); elsewhere only what prefetch misses.
        "epoch_first_wait_ms": 1000 * statistics.fmean(waits[True]) if waits[True] else None,
        "other_wait_ms": 1000 * statistics.fmean(waits[False]) if waits[False] else None,
        "ready_images_per_s": statistics.median(ready_rates),
        "loader_images_per_s": statistics.median(loader_rates),
    }
    result["loader_over_ready"] = result["loader_images_per_s"] / result["ready_images_per_s"]
    return result


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory(prefix="hlss-train-input-") as tmp:
        workdir = Path(args.workdir or tmp)
        variants = [{}]
        if args.compare_levers:  # each lever off in turn (pinning only matters on CUDA)
            variants += [{"no_pin_memory": True}] if args.device.startswith("cuda") else []
            variants += [{"no_spanning": True}, {"no_spanning": True, "no_persistent_workers": True}]
        for case in args.cases:
            dataset = fixture(case, args, workdir)
            if isinstance(dataset, str):
                print(f"{case}: {dataset}")
                continue
            for variant in variants:
                results.append(run_case(case, dataset, argparse.Namespace(**{**vars(args), **variant})))
                gc.collect()  # the previous model and optimizer, before the next is built
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    step = f"simulated {args.simulate_step_ms} ms step" if args.simulate_step_ms is not None else "real step"
    print(
        f"vision={args.vision_config} device={args.device} ({step}) fixture {args.patients} patients x 2 slides x "
        f"{args.patches} patches of {args.size} px; {args.rounds} rounds of {args.steps} steps, median"
    )
    print(
        f"{'case':<8} {'config':<18} {'workers':>7} {'pinned':>6} {'persist':>7} {'span':>5} {'img/step':>8} {'ready img/s':>12} "
        f"{'loader img/s':>13} {'ratio':>6} {'batches/epoch':>13} {'wait 1st ms':>11} {'wait other ms':>13}"
    )

    def ms(value, width):  # "-" when no timed batch fell there (e.g. no epoch start in the timed steps)
        return f"{'-':>{width}}" if value is None else f"{value:>{width}.1f}"

    for r in results:
        print(
            f"{r['case']:<8} {r['config']:<18} {r['num_workers']:>7} {str(r['pin_memory']):>6} "
            f"{str(r['persistent_workers']):>7} {str(r['across_epochs']):>5} {r['images_per_step']:>8} {r['ready_images_per_s']:>12.1f} "
            f"{r['loader_images_per_s']:>13.1f} {r['loader_over_ready']:>6.3f} {r['batches_per_epoch']:>13} "
            f"{ms(r['epoch_first_wait_ms'], 11)} {ms(r['other_wait_ms'], 13)}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
