#!/usr/bin/env python
"""Does pretraining learn, and does the language tie help? kNN and zero-shot accuracy of HLSS against its
ablations, from random towers and from towers aligned on image-caption pairs.

    python benchmarks/learning_bench.py                      # docs/benchmarks.md table: 3 seeds, ~30 min on 2 cores
    python benchmarks/learning_bench.py --seeds 0 --steps 100 --methods random,hidisc,aligned,aligned-hlss
    python benchmarks/learning_bench.py --tower vit --lr 1e-4   # the other settings measured for the defaults

Data: the synthetic hierarchy of ``dataset_scripts/demo.py`` with its defaults (the demo's data: classes differ
in nuclear size, shape, chromatin texture and arrangement, not in colour; per-slide stain with hue rotations up to
a quarter turn; per-patient shifts of nuclear size, coverage, darkness and stroma), built once per data seed:
``train`` patients for pretraining, held-out ``validation`` patients for evaluation, and ``align`` patients (with
their captions) for the image-text alignment that the ``aligned`` rows start from, disjoint from the other two.

Methods, on the same data, tower initialisation (per seed), optimiser, schedule, steps and batches:

* ``random``: the untrained model (kNN on its random features);
* ``simclr``: patch-level contrast only (``lambda_slide = lambda_patient = lambda_align = 0``; heads randomly
  initialised, not from text);
* ``hidisc``: patch, slide and patient contrast without the language tie (``lambda_align = 0``, random heads);
* ``hlss``: the full objective (heads initialised from the text attribute banks, alignment loss on);
* ``aligned``: the image tower aligned with the frozen text tower on (patch, caption) pairs of the ``align``
  patients (``configs/demo_align.yaml``: CLIP's loss, its steps), not pretrained further: HLSS's starting point,
  as the reference starts from CLIP;
* ``aligned-simclr``, ``aligned-hidisc``, ``aligned-hlss``: the three objectives above started from that tower;
* ``aligned-hlss-noha``: HLSS with text-initialised heads but without the alignment loss (``lambda_align = 0``);
* ``aligned-hlss-centered``: HLSS with the heads initialised from the banks less their shared direction
  (``model.head_init: text_centered``, what ``configs/demo.yaml`` runs).

Each row reports kNN accuracy (k = ``--knn-k``) at patch, slide and patient level as ``train.py`` evaluates it,
zero-shot accuracy with the demo's class descriptions (``model.class_prompts`` of ``configs/demo.yaml``), and how
many of the classes' top-3 attributes (``hlss_hf.evaluation.explain.class_attribute_summary`` with the fixed banks, as
``train.py`` explains; 3 levels x 3 classes x 3 = 27) contradict what the generator draws for the class
(``dataset_scripts.demo.contradicted_terms``: "round nuclei" for the spindle-celled class); mean and spread (min-max)
over the seeds. Also printed: a colour-statistics baseline (per-patch RGB mean / std / quantiles as the
embedding), which says how much of the task colour alone solves.
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

from hlss_hf.data import build_train_loader  # noqa: E402
from hlss_hf.data.augmentation import DEFAULT_AUGMENTATION  # noqa: E402
from hlss_hf.training import building  # noqa: E402
from hlss_hf.training.config import parse_config  # noqa: E402

LEVELS = ("patch", "slide", "patient")
METHODS = (
    "random",
    "simclr",
    "hidisc",
    "hlss",
    "aligned",
    "aligned-simclr",
    "aligned-hidisc",
    "aligned-hlss-noha",
    "aligned-hlss",
    "aligned-hlss-centered",
)

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
    "paper": None,  # hlss_hf.data.augmentation.DEFAULT_AUGMENTATION
    # The paper set with the stain-wide colour jitter: configs/tcga_hlss.yaml's.
    "paper_stain": {
        **DEFAULT_AUGMENTATION,
        "color_jitter": {"p": 0.8, "brightness": 0.3, "contrast": 0.3, "saturation": 0.4, "hue": 0.25},
    },
}


def build_config(args: argparse.Namespace, seed: int, name: str = "demo.yaml"):
    """train.py's config for one run: ``configs/<name>`` (the demo, or its alignment stage) with the benchmark's
    data, tower and optimiser (the alignment keeps its own batch, steps and learning rate)."""
    config = parse_config(
        ["--config", str(REPO / "configs" / name), "--model.init_from", "null", "--model.init_config", "null"]
    )
    m, d, t = config.model, config.data, config.training
    m.vision = copy.deepcopy(TOWERS[args.tower])
    m.head_init = "text"  # the method's heads; the -centered rows switch them
    d.demo = {"patch_size": args.patch_size, "seed": args.data_seed}
    for key in ("num_patients", "val_fraction", "align_fraction", "patches_per_slide"):
        if getattr(args, key) is not None:
            d.demo[key] = getattr(args, key)
    d.crop_size = args.crop_size
    d.eval_resize = int(str(args.eval_resize).split(",")[0]) or None
    d.augmentation = copy.deepcopy(AUGMENTATIONS[args.aug])
    t.seed = seed
    t.knn_k = args.knn_k
    if m.objective == "hlss":
        t.per_device_batch_size = args.batch
        t.lr = args.lr
        t.weight_decay = args.weight_decay
        m.temperature = m.base_temperature = args.temperature
        m.align_temperature = args.align_temperature
        m.alignment_reduction = args.alignment_reduction
        m.lambda_align = args.lambda_align
    return config


def set_method(model, method: str, seed: int) -> None:
    """Switch the loss terms and head initialisation of ``model`` (an untrained copy) to ``method``."""
    c = model.config
    objective = method.removeprefix("aligned-")
    if objective in ("simclr", "hidisc"):
        c.lambda_align = 0.0
        # No language tie: the heads start random (seeded), not from the text attribute banks.
        generator = torch.Generator().manual_seed(10_000 + seed)
        for head in model.heads.values():
            bound = 1.0 / math.sqrt(head.in_features)
            with torch.no_grad():
                head.weight.uniform_(-bound, bound, generator=generator)
                head.bias.uniform_(-bound, bound, generator=generator)
    if objective == "simclr":
        c.lambda_slide = c.lambda_patient = 0.0
    if objective == "hlss-noha":
        c.lambda_align = 0.0
    if objective == "hlss-centered":
        # The heads from the banks less their shared direction (HLSSConfig.head_init "text_centered").
        from hlss_hf.models.hlss.text_hlss import head_init_weights

        c.head_init = "text_centered"
        for level, head in model.heads.items():
            with torch.no_grad():
                head.weight.copy_(head_init_weights(getattr(model, f"bank_{level}"), c.head_init))


def pretrain(model, config, train_ds, steps: int, seed: int, captions=None) -> list[float]:
    """AdamW + cosine schedule with warm-up + grad clipping, as train.py runs them; returns the losses. With
    ``captions`` (a :class:`hlss_hf.training.building.CaptionTable`), the image-text loss of the alignment stage."""
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
            text = {} if captions is None else {"text_embeds": captions.lookup(batch["rows"])}
            loss = model(pixel_values=batch["pixel_values"], return_loss=True, **text).loss
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


def evaluate(model, config, tokenizer, splits, eval_resize: int | None = None) -> dict[str, float]:
    """train.py's kNN evaluation, zero-shot accuracy with ``model.class_prompts`` and how many of the classes' top-3
    attributes (3 levels x classes x 3) contradict what the generator draws for the class; ``eval_resize``
    overrides ``data.eval_resize`` (0: none)."""
    from hlss_hf.data.demo import contradicted_terms
    from hlss_hf.evaluation import (
        class_text_embeddings,
        extract_embeddings,
        hierarchical_metrics,
        knn_evaluate,
        zero_shot_probabilities,
    )
    from hlss_hf.evaluation.explain import class_attribute_summary

    if eval_resize is not None:
        config = copy.deepcopy(config)
        config.data.eval_resize = eval_resize or None
    t = config.training
    kwargs = dict(
        processor=building.build_image_processor(config, "he"), batch_size=t.eval_batch_size, progress=False
    )
    model.eval()
    with torch.no_grad():
        bank, val = (
            extract_embeddings(model, splits["train"], **kwargs),
            extract_embeddings(model, splits["validation"], **kwargs),
        )
    metrics = knn_evaluate(bank, val, k=t.knn_k, temperature=t.knn_temperature, aggregation=t.knn_aggregation)
    scores = {level: metrics[f"{level}/acc"] for level in LEVELS}
    prompts = building.class_prompts_for(config, val.class_names)
    class_embeds = class_text_embeddings(model, tokenizer, prompts, val.class_names)
    zero_shot = hierarchical_metrics(
        zero_shot_probabilities(val.embeddings, class_embeds, 0.01),
        val.labels,
        val.slide_ids,
        val.patient_ids,
        val.num_classes,
        aggregation="sum",
    )
    scores.update({f"zero-shot {level}": zero_shot[f"{level}/acc"] for level in LEVELS})
    summary = class_attribute_summary(model, val, k=3, use_heads=False)
    scores["contradicted"] = sum(
        item["attribute"] in contradicted_terms(val.class_names.index(name))
        for data in summary["levels"].values()
        for name, items in data["top"].items()
        for item in items
    )
    return scores


def align(config, tokenizer, split, seed: int, cache: str | None):
    """The alignment stage as configs/demo_align.yaml runs it (its batch, steps, schedule) on ``split``; with
    ``cache``, kept in ``cache/seed<seed>`` with its settings and reused while they are the same."""
    from hlss_hf.models.hlss.modeling_hlss import HLSSModel

    folder = Path(cache) / f"seed{seed}" if cache else None
    settings = json.dumps(config.to_dict(), sort_keys=True, default=str)
    if folder is not None and (folder / "settings.json").is_file():
        if (folder / "settings.json").read_text() == settings:
            print(f"seed {seed} alignment: reused {folder}", flush=True)
            return HLSSModel.from_pretrained(folder)
    tic = time.perf_counter()
    torch.manual_seed(seed)
    aligned = building.build_model(config, "he", tokenizer)
    captions = building.build_caption_table(aligned, tokenizer, split, "caption")
    t = config.training
    steps = t.max_steps or math.ceil(
        t.num_epochs * (len(set(split["patient_id"])) // t.per_device_batch_size)
    )
    curve = pretrain(aligned, config, split, steps, seed, captions)
    print(
        f"seed {seed} alignment: {steps} steps, loss {np.mean(curve[:10]):.2f} -> {np.mean(curve[-10:]):.2f} "
        f"({time.perf_counter() - tic:.0f} s)",
        flush=True,
    )
    if folder is not None:
        aligned.save_pretrained(folder)
        (folder / "settings.json").write_text(settings)
    return aligned


def colour_baseline(train_ds, val_ds, k: int) -> dict[str, float]:
    """kNN on per-patch colour statistics (RGB mean, std, 10/50/90 % quantiles; standardised)."""
    from hlss_hf.data.schema import decode_image
    from hlss_hf.evaluation import EmbeddingSet, knn_evaluate

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


COLUMNS = (*LEVELS, *(f"zero-shot {level}" for level in LEVELS), "contradicted")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="model / training seeds (comma-separated)")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic data")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument(
        "--steps", type=int, default=250, help="pretraining steps (the alignment: its config's)"
    )
    parser.add_argument("--batch", type=int, default=8, help="patients per step (B); S=P=V=2")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate from random towers")
    parser.add_argument(
        "--aligned-lr",
        type=float,
        default=3e-4,
        help="learning rate from the aligned towers (configs/demo.yaml's)",
    )
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--lambda-align", type=float, default=1.0, help="HA weight of the HLSS rows")
    parser.add_argument("--align-temperature", type=float, default=1.0, help="HA temperature tau_a")
    parser.add_argument("--alignment-reduction", default="mean", help="HA reduction over images: mean or sum")
    parser.add_argument(
        "--aligned-cache",
        help="a folder keeping each seed's aligned tower (made once, reused by later runs with the same settings)",
    )
    parser.add_argument("--tower", choices=sorted(TOWERS), default="resnet")
    parser.add_argument("--aug", choices=sorted(AUGMENTATIONS), default="stain")
    parser.add_argument("--num-patients", type=int, help="default: the demo's")
    parser.add_argument("--val-fraction", type=float, help="default: the demo's")
    parser.add_argument("--align-fraction", type=float, help="default: the demo's")
    parser.add_argument("--patches-per-slide", type=int, help="default: the demo's")
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
    align_config = build_config(args, seeds[0], "demo_align.yaml")
    splits = building._demo_splits(config)
    train_ds, val_ds = splits["train"], splits["validation"]
    n_val = len(set(val_ds["patient_id"]))
    print(
        f"data: {len(set(train_ds['patient_id']))} train / {n_val} validation / "
        f"{len(set(splits['align']['patient_id']))} align patients, {len(train_ds)} / {len(val_ds)} / "
        f"{len(splits['align'])} patches ({time.perf_counter() - start:.0f} s)",
        flush=True,
    )
    print(f"settings: {vars(args)}", flush=True)
    results: dict[str, dict[str, list[float]]] = {m: {c: [] for c in COLUMNS} for m in methods}
    losses: dict[str, list[tuple[float, float]]] = {m: [] for m in methods}
    colour = colour_baseline(train_ds, val_ds, args.knn_k)
    print("colour statistics: " + " / ".join(f"{colour[level]:.3f}" for level in LEVELS), flush=True)
    text = building.resolve_tower(config.model.text, config.model.text_fallback, "text")
    tokenizer = building.build_tokenizer(config, text, building.resolve_attributes(config.model.attributes))
    for seed in seeds:
        config, align_config = build_config(args, seed), build_config(args, seed, "demo_align.yaml")
        torch.manual_seed(seed)
        base = building.build_model(config, "he", tokenizer, class_names=val_ds.features["label"].names)
        aligned = None
        if any(method.startswith("aligned") for method in methods):
            aligned = align(align_config, tokenizer, splits["align"], seed, args.aligned_cache)
        for method in methods:
            tic = time.perf_counter()
            if method.startswith("aligned"):
                model = building.build_model(
                    config,
                    "he",
                    tokenizer,
                    class_names=val_ds.features["label"].names,
                    start=copy.deepcopy(aligned),
                )
            else:
                model = copy.deepcopy(base)
            if method not in ("random", "aligned"):
                set_method(model, method, seed)
                run_config = config
                if method.startswith(
                    "aligned"
                ):  # fine-tuning the aligned towers, at configs/demo.yaml's rate
                    run_config = copy.deepcopy(config)
                    run_config.training.lr = args.aligned_lr
                curve = pretrain(model, run_config, train_ds, args.steps, seed)
                first, last = np.mean(curve[:10]), np.mean(curve[-10:])
                losses[method].append((float(first), float(last)))
            scores = evaluate(model, config, tokenizer, splits)
            for size in [int(v) for v in str(args.eval_resize).split(",")[1:]]:
                other = evaluate(model, config, tokenizer, splits, size)
                print(
                    f"  (eval_resize {size}: " + " / ".join(f"{other[lv]:.3f}" for lv in LEVELS) + ")",
                    flush=True,
                )
            for column in COLUMNS:
                results[method][column].append(scores[column])
            loss_text = f" | loss {first:.2f} -> {last:.2f}" if method not in ("random", "aligned") else ""
            print(
                f"seed {seed} {method:<17} kNN "
                + " / ".join(f"{scores[level]:.3f}" for level in LEVELS)
                + " | zero-shot "
                + " / ".join(f"{scores['zero-shot ' + level]:.3f}" for level in LEVELS)
                + f" | contradicted {scores['contradicted']}{loss_text} ({time.perf_counter() - tic:.0f} s)",
                flush=True,
            )
    print(
        f"\nAccuracy on {n_val} held-out patients, mean (min-max) over seeds {seeds}: kNN (k={args.knn_k}) and "
        f"zero-shot with the class descriptions; contradicted: of the 27 top-3 attributes (levels x classes), those "
        f"that contradict the class. {args.steps} steps, tower {args.tower}, lr {args.lr} (aligned rows {args.aligned_lr}), aug {args.aug}, eval_resize "
        f"{args.eval_resize}"
    )
    print("| method | " + " | ".join(COLUMNS) + " |\n|---|" + "---:|" * len(COLUMNS))
    print("| colour statistics | " + " | ".join(f"{colour[level]:.3f}" for level in LEVELS) + " | | | | |")
    for method in methods:
        print(f"| {method} | " + " | ".join(summary(results[method][c]) for c in COLUMNS) + " |")
    print(f"total {time.perf_counter() - start:.0f} s", flush=True)
    out = {"settings": vars(args), "colour": colour, "results": results, "losses": losses}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
