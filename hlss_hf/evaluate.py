"""Evaluate a frozen HLSS image encoder: kNN, linear probe, zero-shot, or attribute explanations.

    python -m hlss_hf.evaluate knn --model out/hlss --dataset data/demo --output-dir out/eval
    python -m hlss_hf.evaluate linear --model out/hlss --dataset data/demo --split validation --output-dir out/eval
    python -m hlss_hf.evaluate zeroshot --model out/hlss --dataset data/demo --prompts prompts.yaml --output-dir out/eval
    python -m hlss_hf.evaluate explain --model out/hlss --dataset data/demo --slide-id P001-S1 --output-dir out/eval
    python -m hlss_hf.evaluate knn --model out/hlss --dataset data/demo --output-dir out/eval --update-card

kNN and the linear probe use `--train-split` as the bank / training set and report patch, slide and patient metrics
on `--split` (docs/method.md, kNN evaluation). `--aggregation` picks how patch scores become slide / patient
scores: `reference` (the
HLSS reference's rule: per patch L1-normalise, softmax, then average per group; the kNN default) or `sum` (raw
scores summed; the linear / zero-shot default). `--framing` picks the image framing: `saved` (the model folder's
processor), `resize` (the reference's: the whole patch resized bicubic to the model's image size) or
`center-crop` (native resolution, centre crop). Embeddings are computed in fp32, as the reference evaluates and
the training-time kNN runs; `--precision bf16` autocasts the forward (faster on GPUs). The report's `settings` say
which rule, framing and precision were used. Each run writes `<mode>_<split>.json` (metrics, confusion matrices,
settings) and
`<mode>_<split>_confusion_<level>.png` to `--output-dir`; `--update-card` records the metrics as model-index
evaluation results in the model folder's README.md. `explain` writes per-class attribute summaries (JSON and one
heatmap PNG per level) and, with `--index`, `--slide-id` or `--patient-id`, that target's top attributes.
Zero-shot prompts: a YAML/JSON file `class -> [prompts]`; without one, the class descriptions saved with the model
(`config.class_prompts`), else "an image of {class}" style templates. Explanations rank each class's (or target's)
attributes by how much more its patches are tied to them than patches in general (`hlss_hf.explain`), through the
fixed banks (`--affinity banks`, the default: cosine to the descriptions) or the trained heads (`--affinity heads`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from hlss_hf.files import write_text_atomically

logger = logging.getLogger("hlss_hf.evaluate")

MODES = ("knn", "linear", "zeroshot", "explain")
AGGREGATIONS = ("reference", "sum")  # hlss_hf.evaluation.AGGREGATIONS (not imported: --help stays fast)
FRAMINGS = ("saved", "resize", "center-crop")
PRECISIONS = ("fp32", "bf16")  # hlss_hf.evaluation.PRECISIONS (not imported, as above)
DEFAULT_TEMPLATES = ("an image of {}.", "a histopathology image of {}.", "a microscopy image of {} tissue.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m hlss_hf.evaluate",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("mode", choices=MODES, help="evaluation to run")
    parser.add_argument(
        "--debug", action="store_true", help="on an error, show the full traceback (or HLSS_DEBUG=1)"
    )
    parser.add_argument("--model", required=True, help="model folder or Hub id (AutoModel.from_pretrained)")
    parser.add_argument("--dataset", required=True, help="dataset folder or Hub id (datasets.load_dataset)")
    parser.add_argument("--split", default="validation", help="split to evaluate (default: validation)")
    parser.add_argument(
        "--train-split", default="train", help="kNN bank / probe training split (default: train)"
    )
    parser.add_argument("--output-dir", default="eval_out", help="where the JSON report and PNG plots go")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="DataLoader workers decoding images while the model runs (default: 0 on the CPU, the machine's "
        "cores on an accelerator)",
    )
    parser.add_argument("--cache-dir", default=None, help="embedding cache (default: <output-dir>/cache)")
    parser.add_argument("--no-cache", action="store_true", help="do not cache embeddings")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--max-samples", type=int, default=None, help="use the first N rows of each split")
    parser.add_argument(
        "--k",
        type=int,
        default=None,
        help="kNN neighbours, clamped to the bank size (default: the k train.py evaluated the model with, "
        "training.knn_k of its train_config.yaml, so both report the same numbers; else 200, the paper's)",
    )
    parser.add_argument("--temperature", type=float, default=0.07, help="kNN vote temperature")
    parser.add_argument(
        "--aggregation",
        choices=AGGREGATIONS,
        default=None,
        help="slide / patient rule: reference (HLSS reference: per patch L1-normalise + softmax, averaged) or sum "
        "(raw patch scores summed); default: reference for knn, sum for linear and zeroshot",
    )
    parser.add_argument(
        "--framing",
        choices=FRAMINGS,
        default="saved",
        help="image framing: saved (the model folder's processor), resize (whole patch resized bicubic to the "
        "model's image size, as the reference evaluates) or center-crop (native resolution, centre crop)",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="embedding forward: fp32 (default; the reference's evaluation and the training-time kNN) or bf16 "
        "(autocast: faster on GPUs, embeddings rounded to bf16)",
    )
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="linear probe L2 penalty")
    parser.add_argument(
        "--prompts",
        default=None,
        help="zero-shot prompts: YAML/JSON class -> [prompts] (default: the model's saved class descriptions)",
    )
    parser.add_argument(
        "--zeroshot-temperature", type=float, default=0.01, help="zero-shot softmax temperature"
    )
    parser.add_argument("--top-k", type=int, default=5, help="explain: attributes listed per level / class")
    parser.add_argument(
        "--affinity",
        choices=("banks", "heads"),
        default="banks",
        help="explain: attribute affinity through the fixed banks (cosine to the descriptions) or the trained heads",
    )
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--index", type=int, default=None, help="explain: a patch (row of --split)")
    target.add_argument("--slide-id", default=None, help="explain: a slide of --split")
    target.add_argument("--patient-id", default=None, help="explain: a patient of --split")
    parser.add_argument("--update-card", action="store_true", help="write metrics into <model>/README.md")
    args = parser.parse_args(argv)
    for name in ("batch_size", "k", "top_k"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_samples is not None and args.max_samples < 1:
        parser.error("--max-samples must be >= 1")
    if args.num_workers is not None and args.num_workers < 0:
        parser.error("--num-workers must be >= 0")
    if args.update_card and not Path(args.model).is_dir():
        parser.error(f"--update-card needs a local model folder; {args.model!r} is not a directory")
    return args


def default_knn_k(model: str | os.PathLike) -> tuple[int, str]:
    """The kNN k when ``--k`` is not given, and where it came from: the model folder's ``train_config.yaml``
    (``training.knn_k``, the k train.py's own evaluation used), else 200 (the paper's)."""
    import yaml

    path = Path(model) / "train_config.yaml"
    if path.is_file():
        try:
            k = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("training", {}).get("knn_k")
        except (yaml.YAMLError, AttributeError):
            k = None
        if isinstance(k, int) and not isinstance(k, bool) and k >= 1:
            return k, f"training.knn_k of {path}"
    return 200, "the default, the paper's"


def _write_json(payload: Any, path: Path) -> None:
    write_text_atomically(path, json.dumps(payload, indent=2, allow_nan=True))


def _load_split(dataset_path: str, split: str, max_samples: int | None = None, split_key: str = "--split"):
    """One split of ``--dataset`` (:func:`hlss_hf.data.load_split`: a folder or Hub id, with the patient and slide
    ids the slide and patient metrics need); errors name ``--dataset`` or `split_key`."""
    from hlss_hf.data.loading import load_split

    return load_split(dataset_path, split, max_samples=max_samples, key="--dataset", split_key=split_key)


def load_prompts(path: str | None, class_names: list[str], saved: dict | None = None) -> dict[str, list[str]]:
    """Class prompts from a YAML / JSON file (`class -> prompt or [prompts]`), else the class descriptions saved with
    the model (`saved`, its `config.class_prompts`), else the default templates."""
    if path is None and saved:
        return {str(k): list(v) for k, v in saved.items()}
    if path is None:
        return {name: [t.format(name.replace("_", " ")) for t in DEFAULT_TEMPLATES] for name in class_names}
    import yaml

    with open(path) as handle:
        raw = yaml.safe_load(handle)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping class -> [prompts], got {type(raw).__name__}")
    return {str(k): [v] if isinstance(v, str) else [str(p) for p in v] for k, v in raw.items()}


def _load_model(args):
    import torch
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModel,
        AutoModelForImageClassification,
        AutoTokenizer,
    )

    from hlss_hf import register_auto_classes
    from hlss_hf.sources import check_local_source, hub_source_error

    register_auto_classes()  # `python -m hlss_hf.evaluate` defers it until the arguments are read

    check_local_source(args.model, "model", "--model")  # a mistyped path is named, not looked up on the Hub
    try:
        model_config = AutoConfig.from_pretrained(args.model)
    except OSError as err:  # transformers reports a missing repo / offline mode as OSError
        source_error = hub_source_error(args.model, "model", err, "--model")
        if source_error is None:
            raise
        raise source_error from err
    # A fine-tuned classifier folder holds no text tower, banks or heads: loading it as an HLSSModel would fill
    # them with random weights, so it is loaded as what it is and the modes that need them say so.
    architectures = model_config.architectures or []
    if "HLSSForImageClassification" in architectures:
        if args.mode in ("zeroshot", "explain"):
            raise ValueError(
                f"{args.model} is a fine-tuned HLSSForImageClassification without text tower or attribute heads; "
                f"{args.mode} needs a pretrained HLSSModel folder (e.g. the output of train.py)"
            )
        model = AutoModelForImageClassification.from_pretrained(args.model)
    else:
        model = AutoModel.from_pretrained(args.model)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    try:
        processor = AutoImageProcessor.from_pretrained(args.model)
    except (OSError, ValueError) as err:
        logger.warning(
            "No image processor in %s (%s); using the default conversion and centre crop", args.model, err
        )
        processor = None
    tokenizer = None
    if args.mode == "zeroshot":
        try:
            tokenizer = AutoTokenizer.from_pretrained(args.model)
        except (OSError, ValueError) as err:
            raise ValueError(
                f"zero-shot needs the text tower's tokenizer, none found in {args.model}: {err}"
            ) from err
    return model, processor, tokenizer


def frame_processor(processor, framing: str, model, modality: str):
    """The image processor for `--framing`: the saved one (`saved`), or a copy that resizes the whole patch to the
    model's image size, bicubic, without a crop (`resize`, the reference's evaluation framing), or that keeps the
    native resolution and centre-crops that size (`center-crop`). Other settings (normalisation) are kept."""
    if framing == "saved":
        return processor
    import copy

    from hlss_hf.models.hlss.processing_hlss import HLSSImageProcessor

    if processor is None:
        framed = HLSSImageProcessor(modality=modality)
    elif isinstance(processor, HLSSImageProcessor):
        framed = copy.deepcopy(processor)
    else:
        raise ValueError(
            f"--framing {framing} rewrites an HLSSImageProcessor; the model folder holds a "
            f"{type(processor).__name__} (use --framing saved)"
        )
    side = getattr(getattr(model, "config", None), "image_size", None) or framed.crop_size["height"]
    if framing == "resize":
        framed.do_resize, framed.size, framed.resample = True, {"height": side, "width": side}, "bicubic"
        framed.do_center_crop = False
    else:
        framed.do_resize, framed.do_center_crop = False, True
        framed.crop_size = {"height": side, "width": side}
    return framed


def _framing_summary(processor) -> dict[str, Any] | str:
    """What the report records about the framing."""
    if processor is None:
        return "default conversion, centre crop to the model's image size at native resolution"
    keys = ("do_resize", "size", "resample", "antialias", "do_center_crop", "crop_size")
    return {k: getattr(processor, k) for k in keys if hasattr(processor, k)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run one evaluation; returns the report written to `<output-dir>/<mode>_<split>.json`."""
    from hlss_hf.evaluation import explain as explain_lib
    from hlss_hf.evaluation import (
        extract_embeddings,
        hierarchical_confusion_matrices,
        hierarchical_metrics,
        knn_scores,
        train_linear_probe,
        zero_shot_scores,
    )
    from hlss_hf.training.run_warnings import WarningLog, evaluation_warnings, informative_metrics

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = None if args.no_cache else (args.cache_dir or output_dir / "cache")

    # 1. Model and data.
    from hlss_hf.data.schema import modality_of

    model, processor, tokenizer = _load_model(args)
    evaluated = _load_split(args.dataset, args.split, args.max_samples)
    processor = frame_processor(processor, args.framing, model, modality_of(evaluated.features))
    aggregation = args.aggregation or ("reference" if args.mode == "knn" else "sum")

    def embed(data):
        return extract_embeddings(
            model,
            data,
            processor=processor,
            batch_size=args.batch_size,
            cache_dir=cache_dir,
            num_workers=args.num_workers,
            precision=args.precision,
        )

    val = embed(evaluated)
    report: dict[str, Any] = {
        "mode": args.mode,
        "model": str(args.model),
        "dataset": str(args.dataset),
        "split": args.split,
        "num_patches": len(val),
        "class_names": val.class_names,
    }
    stem = f"{args.mode}_{args.split}"

    # 2. Explanations: per-class attribute summaries, and one target when asked.
    if args.mode == "explain":
        use_heads = args.affinity == "heads"
        summary = explain_lib.class_attribute_summary(model, val, k=args.top_k, use_heads=use_heads)
        report["class_summary"] = summary
        report["plots"] = [
            str(explain_lib.plot_class_heatmap(summary, level, output_dir / f"{stem}_classes_{level}.png"))
            for level in summary["levels"]
        ]
        print(explain_lib.format_class_summary(summary))
        if args.index is not None or args.slide_id is not None or args.patient_id is not None:
            target = explain_lib.explain(
                model,
                val,
                index=args.index,
                slide_id=args.slide_id,
                patient_id=args.patient_id,
                k=args.top_k,
                use_heads=use_heads,
            )
            print(explain_lib.format_explanation(target))
            report["target"] = target
            name = f"{target['target']['kind']}_{target['target']['id']}".replace(os.sep, "_")
            report["plots"].append(
                str(explain_lib.plot_explanation(target, output_dir / f"{stem}_{name}.png"))
            )
        _write_json(report, output_dir / f"{stem}.json")
        return report

    # 3. Patch scores; the named warnings (hlss_hf.run_warnings) where numbers mean less than they seem.
    warnings: list = []
    if args.mode == "knn":
        train = embed(_load_split(args.dataset, args.train_split, args.max_samples, "--train-split"))
        k, k_source = (args.k, "--k") if args.k is not None else default_knn_k(args.model)
        print(f"kNN with k={k} ({k_source})", flush=True)
        warnings += evaluation_warnings(train.labels.tolist(), val.labels.tolist(), val.class_names, k=k)
        # k beyond the bank is clamped here and named by the k_exceeds_bank warning.
        scores = knn_scores(train, val, k=min(k, len(train)), temperature=args.temperature)
        report["settings"] = {
            "k": min(k, len(train)),
            "temperature": args.temperature,
            "train_split": args.train_split,
        }
    elif args.mode == "linear":
        import torch

        train = embed(_load_split(args.dataset, args.train_split, args.max_samples, "--train-split"))
        if train.class_names != val.class_names:
            raise ValueError(
                f"class names differ: {args.train_split} {train.class_names}, {args.split} {val.class_names}"
            )
        warnings += evaluation_warnings(train.labels.tolist(), val.labels.tolist(), val.class_names)
        probe = train_linear_probe(train, weight_decay=args.weight_decay)
        with torch.no_grad():
            scores = probe(val.embeddings).softmax(dim=-1)
        report["settings"] = {"weight_decay": args.weight_decay, "train_split": args.train_split}
    else:
        prompts = load_prompts(args.prompts, val.class_names, getattr(model.config, "class_prompts", None))
        scores = zero_shot_scores(model, tokenizer, val, prompts, temperature=args.zeroshot_temperature)
        # No bank: only the top-k check applies (the evaluated split stands in for the bank).
        warnings += evaluation_warnings(val.labels.tolist(), val.labels.tolist(), val.class_names)
        report["settings"] = {"prompts": prompts, "temperature": args.zeroshot_temperature}

    # 4. Metrics, confusion matrices, plots.
    report["settings"].update(
        aggregation=aggregation, framing=_framing_summary(processor), precision=args.precision
    )
    report["metrics"] = informative_metrics(
        hierarchical_metrics(
            scores, val.labels, val.slide_ids, val.patient_ids, val.num_classes, aggregation=aggregation
        ),
        val.num_classes,
    )
    log = WarningLog()
    log.add(warnings)  # each name printed once
    report["warnings"] = log.to_list()
    matrices = hierarchical_confusion_matrices(
        scores, val.labels, val.slide_ids, val.patient_ids, val.num_classes, aggregation=aggregation
    )
    report["confusion_matrices"] = {level: m.tolist() for level, m in matrices.items()}
    report["plots"] = [
        str(
            explain_lib.plot_confusion_matrix(
                m,
                val.class_names,
                output_dir / f"{stem}_confusion_{level}.png",
                title=f"{args.mode} {level} ({args.split})",
            )
        )
        for level, m in matrices.items()
    ]
    _write_json(report, output_dir / f"{stem}.json")

    # 5. Model card.
    if args.update_card:
        from hlss_hf.hub.model_index import update_card_knn, update_model_card

        if args.mode == "knn":
            card = update_card_knn(
                args.model,
                report["metrics"],
                k=report["settings"]["k"],
                split=args.split,
                dataset=args.dataset,
                temperature=args.temperature,
                aggregation=aggregation,
            )
        else:
            card = update_model_card(args.model, report, args.dataset)
        report["card"] = str(card)
        _write_json(report, output_dir / f"{stem}.json")
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the command line. Bad input (a missing folder or Hub repo, a missing split or column, unknown classes, no
    text tower...), file-system and Hub errors print one line ``error: ...`` and exit with status 2, leaving no
    empty output folder behind; ``--debug`` or ``HLSS_DEBUG=1`` shows the traceback instead."""
    from hlss_hf.cli import debug_requested, exit_on_error
    from hlss_hf.files import remove_new_empty_folder
    from hlss_hf.sources import check_local_source

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or debug_requested()
    args = parse_args([arg for arg in argv if arg != "--debug"])
    # Our progress at INFO; the libraries' (every HTTP request) only from WARNING.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("hlss_hf").setLevel(logging.INFO)
    cleanup = remove_new_empty_folder(args.output_dir)
    with exit_on_error(debug, user_errors=(ValueError,), status=2):
        try:
            for spec, kind in ((args.model, "model"), (args.dataset, "dataset")):
                check_local_source(spec, kind, f"--{kind}")  # both typos named before anything loads
            # Data problems (a missing split or id column) show before the model loads.
            banked = args.mode in ("knn", "linear")
            splits = {args.split: "--split"}
            if banked:
                splits.setdefault(args.train_split, "--train-split")
            for split, split_key in splits.items():
                _load_split(args.dataset, split, split_key=split_key)
            report = run(args)
        except BaseException:
            cleanup()
            raise
    if "aggregation" in report.get("settings", {}):
        print(f"slide / patient aggregation: {report['settings']['aggregation']}")
    for key, value in report.get("metrics", {}).items():
        print(f"{key}: {value:.4f}")
    print(f"report: {Path(args.output_dir) / (args.mode + '_' + args.split + '.json')}")
    return report


if __name__ == "__main__":
    main()
