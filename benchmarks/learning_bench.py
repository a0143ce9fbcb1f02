#!/usr/bin/env python
"""Does pretraining learn? kNN accuracy of random init against SimCLR-like, HiDisc-like and HLSS pretraining.

    python benchmarks/learning_bench.py                      # the README table: 3 seeds, ~15 min on 2 cores
    python benchmarks/learning_bench.py --seeds 0 --steps 100 --methods random,hidisc
    python benchmarks/learning_bench.py --tower vit --lr 1e-4   # the other settings measured for the defaults

Data: the synthetic hierarchy of ``dataset_scripts/demo.py`` (classes differ in nuclear size, shape, chromatin
texture and arrangement, not in colour; per-slide stain with hue rotations up to a quarter turn; per-patient
shifts of nuclear size, coverage, darkness and stroma), built once per data seed, with many held-out patients.

Methods, on the same data, tower initialisation (per seed), optimiser, schedule, steps and batches:

* ``random``: the untrained model (kNN on its random features);
* ``simclr``: patch-level contrast only (``lambda_slide = lambda_patient = lambda_align = 0``; heads randomly
  initialised, not from text);
* ``hidisc``: patch, slide and patient contrast without the language tie (``lambda_align = 0``, random heads);
* ``hlss``: the full objective (heads initialised from the text attribute banks, alignment loss on).

Also printed: a colour-statistics baseline (per-patch RGB mean / std / quantiles as the embedding), which says
how much of the task colour alone solves. kNN (k = ``--knn-k``) on the validation split at patch, slide and
patient level, as ``train.py`` evaluates it; mean and spread (min-max) over the seeds.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from hlss_hf import building  # noqa: E402
from hlss_hf.augmentation import DEFAULT_AUGMENTATION  # noqa: E402
from hlss_hf.config import parse_config  # noqa: E402
from hlss_hf.data import build_train_loader  # noqa: E402

LEVELS = ("patch", "slide", "patient")
METHODS = ("random", "simclr", "hidisc", "hlss")

#: Towers measured for the defaults (random init, 32 px crops).
TOWERS = {
    "resnet": {
        "model_type": "resnet",
        "num_channels": 3,
        "embedding_size": 16,
        "hidden_sizes": [16, 32, 64, 128],
        "depths": [1, 1, 1, 1],
        "layer_type": "basic",
    },
    # BatchNorm-free (LayerNorm): a W-process run equals one process with W times the batch up to float
    # rounding, as with the ViT.
    "convnext": {
        "model_type": "convnext",
        "num_channels": 3,
        "patch_size": 4,
        "hidden_sizes": [16, 32, 64, 128],
        "depths": [1, 1, 1, 1],
    },
    "vit": {
        "model_type": "vit",
        "image_size": 32,
        "patch_size": 8,
        "num_channels": 3,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
    },
}

#: Augmentation sets measured (``--aug``): ``weak`` is the earlier demo set (the paper's colour jitter: p 0.3,
#: hue 0.05), ``stain`` configs/demo.yaml's (jitter as wide as the demo's slide-to-slide stain hue).
AUGMENTATIONS = {
    "weak": {
        "random_resized_crop": {"p": 1.0, "scale": [0.3, 1.0]},
        "horizontal_flip": {"p": 0.5},
        "vertical_flip": {"p": 0.5},
        "color_jitter": {"p": 0.3, "brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.05},
        "gaussian_blur": {"p": 0.2, "kernel_size": 3, "sigma": [0.1, 1.0]},
    },
    "stain": {
        "random_resized_crop": {"p": 1.0, "scale": [0.3, 1.0]},
        "horizontal_flip": {"p": 0.5},
        "vertical_flip": {"p": 0.5},
        "color_jitter": {"p": 0.8, "brightness": 0.3, "contrast": 0.3, "saturation": 0.4, "hue": 0.25},
        "gaussian_blur": {"p": 0.2, "kernel_size": 3, "sigma": [0.1, 1.0]},
    },
    "paper": None,  # hlss_hf.augmentation.DEFAULT_AUGMENTATION
    # The paper set with the stain-wide colour jitter: configs/tcga_hlss.yaml's.
    "paper_stain": {
        **DEFAULT_AUGMENTATION,
        "color_jitter": {"p": 0.8, "brightness": 0.3, "contrast": 0.3, "saturation": 0.4, "hue": 0.25},
    },
}


def build_config(args: argparse.Namespace, seed: int):
    """train.py's config for one run: configs/demo.yaml with the benchmark's data, tower and optimiser."""
    config = parse_config(["--config", str(REPO / "configs" / "demo.yaml")])
    m, d, t = config.model, config.data, config.training
    m.vision = copy.deepcopy(TOWERS[args.tower])
    d.demo = {
        "num_patients": args.patients,
        "patches_per_slide": args.patches_per_slide,
        "patch_size": args.patch_size,
        "val_fraction": args.val_fraction,
        "seed": args.data_seed,
    }
    d.crop_size = args.crop_size
    d.eval_resize = int(str(args.eval_resize).split(",")[0]) or None
    d.augmentation = copy.deepcopy(AUGMENTATIONS[args.aug])
    t.seed = seed
    t.per_device_batch_size = args.batch
    t.lr = args.lr
    t.weight_decay = args.weight_decay
    t.knn_k = args.knn_k
    m.temperature = m.base_temperature = args.temperature
    return config


def set_method(model, method: str, seed: int) -> None:
    """Switch the loss terms and head initialisation of ``model`` (an untrained copy) to ``method``."""
    c = model.config
    if method in ("simclr", "hidisc"):
        c.lambda_align = 0.0
        # No language tie: the heads start random (seeded), not from the text attribute banks.
        generator = torch.Generator().manual_seed(10_000 + seed)
        for head in model.heads.values():
            bound = 1.0 / math.sqrt(head.in_features)
            with torch.no_grad():
                head.weight.uniform_(-bound, bound, generator=generator)
                head.bias.uniform_(-bound, bound, generator=generator)
    if method == "simclr":
        c.lambda_slide = c.lambda_patient = 0.0


def pretrain(model, config, train_ds, steps: int, seed: int) -> list[float]:
    """AdamW + cosine schedule with warm-up + grad clipping, as train.py runs them; returns the losses."""
    from transformers import get_scheduler

    t = config.training
    torch.manual_seed(seed)
    dataset, loader = build_train_loader(config, train_ds, 1)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t.lr,
    )
    scheduler = get_scheduler(
        t.lr_scheduler, optimizer, num_warmup_steps=round(t.warmup_ratio * steps), num_training_steps=steps
    )
    losses, step, epoch = [], 0, 0
    model.train()
    while step < steps:
        loader.batch_sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        for batch in loader:
            loss = model(pixel_values=batch["pixel_values"], return_loss=True).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            step += 1
            if step >= steps:
                break
        epoch += 1
    model.eval()
    return losses


def knn(model, config, train_ds, val_ds, eval_resize: int | None = None) -> dict[str, float]:
    """train.py's kNN evaluation; ``eval_resize`` overrides ``data.eval_resize`` (0: none)."""
    if eval_resize is not None:
        config = copy.deepcopy(config)
        config.data.eval_resize = eval_resize or None
    from hlss_hf.evaluation import extract_embeddings, knn_evaluate

    t = config.training
    kwargs = dict(processor=building.build_image_processor(config, "he"), batch_size=t.eval_batch_size, progress=False)
    model.eval()
    with torch.no_grad():
        bank, queries = extract_embeddings(model, train_ds, **kwargs), extract_embeddings(model, val_ds, **kwargs)
    metrics = knn_evaluate(bank, queries, k=t.knn_k, temperature=t.knn_temperature, aggregation=t.knn_aggregation)
    return {level: metrics[f"{level}/acc"] for level in LEVELS}


def colour_baseline(train_ds, val_ds, k: int) -> dict[str, float]:
    """kNN on per-patch colour statistics (RGB mean, std, 10/50/90 % quantiles; standardised)."""
    from hlss_hf.evaluation import EmbeddingSet, knn_evaluate
    from hlss_hf.schema import decode_image

    def features(ds):
        rows = []
        for row in ds.select_columns(["image"]):
            pixels = decode_image(row["image"]).reshape(-1, 3).astype(np.float32) / 255.0
            rows.append(
                np.concatenate([pixels.mean(0), pixels.std(0), *np.quantile(pixels, [0.1, 0.5, 0.9], axis=0)])
            )
        return np.stack(rows)

    tr, va = features(train_ds), features(val_ds)
    mean, std = tr.mean(0), tr.std(0) + 1e-6

    def embedding_set(ds, x):
        z = torch.nn.functional.normalize(torch.as_tensor((x - mean) / std), dim=-1)
        return EmbeddingSet(z, ds["label"], ds["slide_id"], ds["patient_id"], ds.features["label"].names)

    metrics = knn_evaluate(embedding_set(train_ds, tr), embedding_set(val_ds, va), k=k, temperature=0.07)
    return {level: metrics[f"{level}/acc"] for level in LEVELS}


def summary(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ({min(values):.2f}-{max(values):.2f})"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="model / training seeds (comma-separated)")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic data")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--batch", type=int, default=8, help="patients per step (B); S=P=V=2")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--tower", choices=sorted(TOWERS), default="resnet")
    parser.add_argument("--aug", choices=sorted(AUGMENTATIONS), default="stain")
    parser.add_argument("--patients", type=int, default=60)
    parser.add_argument("--val-fraction", type=float, default=0.4)
    parser.add_argument("--patches-per-slide", type=int, default=8)
    parser.add_argument("--patch-size", type=int, default=64)
    parser.add_argument("--crop-size", type=int, default=32)
    parser.add_argument(
        "--eval-resize",
        default="40",
        help="evaluation resize (0: centre crop without resizing); a comma-separated list also prints the others",
    )
    parser.add_argument("--knn-k", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    for method in methods:
        if method not in METHODS:
            parser.error(f"unknown method {method!r}; choose from {METHODS}")

    start = time.perf_counter()
    config = build_config(args, seeds[0])
    train_ds, val_ds = building.load_splits(config)
    n_val = len(set(val_ds["patient_id"]))
    print(
        f"data: {len(set(train_ds['patient_id']))} train / {n_val} validation patients, "
        f"{len(train_ds)} / {len(val_ds)} patches ({time.perf_counter() - start:.0f} s)",
        flush=True,
    )
    print(f"settings: {vars(args)}", flush=True)
    results: dict[str, dict[str, list[float]]] = {m: {level: [] for level in LEVELS} for m in methods}
    losses: dict[str, list[tuple[float, float]]] = {m: [] for m in methods}
    colour = colour_baseline(train_ds, val_ds, args.knn_k)
    print("colour statistics: " + " / ".join(f"{colour[level]:.3f}" for level in LEVELS), flush=True)
    text = building.resolve_tower(config.model.text, config.model.text_fallback, "text")
    tokenizer = building.build_tokenizer(config, text, building.resolve_attributes(config.model.attributes))
    for seed in seeds:
        config = build_config(args, seed)
        torch.manual_seed(seed)
        base = building.build_model(config, "he", tokenizer)
        for method in methods:
            tic = time.perf_counter()
            model = copy.deepcopy(base)
            if method != "random":
                set_method(model, method, seed)
                curve = pretrain(model, config, train_ds, args.steps, seed)
                first, last = np.mean(curve[:10]), np.mean(curve[-10:])
                losses[method].append((float(first), float(last)))
            scores = knn(model, config, train_ds, val_ds)
            for size in [int(v) for v in str(args.eval_resize).split(",")[1:]]:
                other = knn(model, config, train_ds, val_ds, size)
                print(
                    f"  (eval_resize {size}: " + " / ".join(f"{other[lv]:.3f}" for lv in LEVELS) + ")",
                    flush=True,
                )
            for level in LEVELS:
                results[method][level].append(scores[level])
            loss_text = f" | loss {first:.2f} -> {last:.2f}" if method != "random" else ""
            print(
                f"seed {seed} {method:<7} "
                + " / ".join(f"{scores[level]:.3f}" for level in LEVELS)
                + f"{loss_text} ({time.perf_counter() - tic:.0f} s)",
                flush=True,
            )
    print(
        f"\nkNN accuracy (k={args.knn_k}) on {n_val} held-out patients, mean (min-max) over seeds {seeds}; "
        f"{args.steps} steps, tower {args.tower}, lr {args.lr}, aug {args.aug}, eval_resize {args.eval_resize}"
    )
    print("| method | patch | slide | patient |\n|---|---:|---:|---:|")
    print("| colour statistics | " + " | ".join(f"{colour[level]:.3f}" for level in LEVELS) + " |")
    for method in methods:
        print(f"| {method} | " + " | ".join(summary(results[method][level]) for level in LEVELS) + " |")
    print(f"total {time.perf_counter() - start:.0f} s", flush=True)
    out = {"settings": vars(args), "colour": colour, "results": results, "losses": losses}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
