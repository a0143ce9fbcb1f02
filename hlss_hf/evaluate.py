"""Evaluate a frozen HLSS image encoder: kNN, linear probe, zero-shot, or attribute explanations.

    python -m hlss_hf.evaluate knn --model_name_or_path out/hlss --dataset data/demo --output_dir out/eval
    python -m hlss_hf.evaluate linear --model_name_or_path out/hlss --dataset data/demo --output_dir out/eval
    python -m hlss_hf.evaluate zeroshot --model_name_or_path out/hlss --dataset data/demo --prompts prompts.yaml
    python -m hlss_hf.evaluate explain --model_name_or_path out/hlss --dataset data/demo --slide_id P001-S1
    python -m hlss_hf.evaluate knn --help                    # the mode's keys (--section.key) and their defaults

Each run writes ``<mode>_<split>.json`` (metrics, confusion matrices, the settings used) and its plots to
``output.output_dir``; ``output.update_card`` records the metrics in the model folder's README.md. The modes, the
slide / patient aggregation, the framings and the embedding cache: docs/evaluation.md.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from jsonargparse import ArgumentParser

from hlss_hf import cli
from hlss_hf.cli import Config, Section, check
from hlss_hf.errors import ConfigError
from hlss_hf.files import write_text_atomically

logger = logging.getLogger("hlss_hf.evaluate")

PROG = "python -m hlss_hf.evaluate"
DEFAULT_TEMPLATES = ("an image of {}.", "a histopathology image of {}.", "a microscopy image of {} tissue.")


@dataclass
class EvalModelConfig(Section):
    """The model evaluated and how its images are framed."""

    section: ClassVar[str] = "model"
    required: ClassVar[tuple[str, ...]] = ("model_name_or_path",)

    model_name_or_path: str | None = None
    """Model folder or Hub id (AutoModel.from_pretrained)."""
    framing: Literal["saved", "resize", "center_crop"] = "saved"
    """`saved` (the folder's processor), `resize` (whole patch, bicubic, the reference's) or `center_crop`."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """`fp32` (the reference's and training's kNN) or `bf16` (autocast: faster on GPUs, rounded)."""
    device: str | None = None
    """Torch device (null: cuda if available, else cpu)."""


@dataclass
class EvalDataConfig(Section):
    """The dataset and its splits."""

    section: ClassVar[str] = "data"
    required: ClassVar[tuple[str, ...]] = ("dataset",)

    dataset: str | None = None
    """Dataset folder or Hub id (datasets.load_dataset)."""
    validation_split: str = "validation"
    """The split evaluated."""
    train_split: str = "train"
    """The kNN bank / linear probe training split."""
    eval_batch_size: int = 64
    """Images per forward pass."""
    num_workers: int | None = None
    """DataLoader workers decoding images (null: 0 on the CPU, the machine's cores on an accelerator)."""
    max_samples: int | None = None
    """Use the first N rows of each split."""
    embedding_cache_dir: str | None = None
    """Embedding cache (null: <output.output_dir>/cache)."""
    cache: bool = True
    """Cache the embeddings."""

    def validate(self) -> None:
        super().validate()
        check(self.eval_batch_size >= 1, self.key("eval_batch_size"), "must be >= 1")
        check(self.max_samples is None or self.max_samples >= 1, self.key("max_samples"), "must be >= 1")
        check(self.num_workers is None or self.num_workers >= 0, self.key("num_workers"), "must be >= 0")


@dataclass
class EvalOutputConfig(Section):
    """Where the report goes."""

    section: ClassVar[str] = "output"

    output_dir: str = "eval_out"
    """Where the JSON report and PNG plots go."""
    update_card: bool = False
    """Write the metrics into <model>/README.md (a local model folder)."""


@dataclass
class KnnConfig(Section):
    """kNN on the frozen embeddings, the train split as the bank."""

    section: ClassVar[str] = "knn"

    k: int | None = None
    """Neighbours, at most the bank (null: the model's training.knn_k, as train.py reported; else 200)."""
    temperature: float = 0.07
    """Vote temperature."""
    aggregation: Literal["reference", "sum"] = "reference"
    """Slide / patient rule: `reference` (HLSS reference's) or `sum` (raw patch scores summed)."""

    def validate(self) -> None:
        super().validate()
        check(self.k is None or self.k >= 1, self.key("k"), "must be >= 1")


@dataclass
class LinearConfig(Section):
    """A linear probe trained on the train split's frozen embeddings."""

    section: ClassVar[str] = "linear"

    weight_decay: float = 1e-4
    """L2 penalty."""
    aggregation: Literal["reference", "sum"] = "sum"
    """Slide / patient rule: `reference` or `sum` (raw patch scores summed)."""


@dataclass
class ZeroShotConfig(Section):
    """Zero-shot classification with the text tower and class prompts."""

    section: ClassVar[str] = "zeroshot"

    prompts: str | None = None
    """YAML/JSON class -> [prompts] (null: the model's saved class descriptions, else templates)."""
    temperature: float = 0.01
    """Softmax temperature."""
    aggregation: Literal["reference", "sum"] = "sum"
    """Slide / patient rule: `reference` or `sum` (raw patch scores summed)."""


@dataclass
class ExplainConfig(Section):
    """Attribute explanations: per-class summaries and, for one patch, slide or patient, its top attributes."""

    section: ClassVar[str] = "explain"

    top_k: int = 5
    """Attributes listed per level / class."""
    affinity: Literal["banks", "heads"] = "banks"
    """Attribute affinity through the fixed banks (cosine to the descriptions) or the trained heads."""
    index: int | None = None
    """A patch to explain (row of data.validation_split)."""
    slide_id: str | None = None
    """A slide of data.validation_split to explain."""
    patient_id: str | None = None
    """A patient of data.validation_split to explain."""

    def validate(self) -> None:
        super().validate()
        check(self.top_k >= 1, self.key("top_k"), "must be >= 1")
        targets = [name for name in ("index", "slide_id", "patient_id") if getattr(self, name) is not None]
        if len(targets) > 1:
            raise ConfigError(f"config key '{self.key(targets[1])}': one target at a time, got {targets}")


@dataclass
class Evaluation(Config):
    """Settings every mode has; a mode adds its own section."""

    mode: ClassVar[str] = ""
    # The flags of before the one flag style: each answers with its key.
    renamed: ClassVar[dict[str, tuple[str, str]]] = {
        "model": ("model.model_name_or_path", ""),
        "split": ("data.validation_split", ""),
        "batch_size": ("data.eval_batch_size", ""),
        "cache_dir": ("data.embedding_cache_dir", ""),
        "no_cache": ("data.cache", " (write --data.cache false)"),
        "zeroshot_temperature": ("zeroshot.temperature", ""),
    }

    model: EvalModelConfig = field(default_factory=EvalModelConfig)
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    output: EvalOutputConfig = field(default_factory=EvalOutputConfig)

    def validate(self) -> None:
        super().validate()
        if self.output.update_card and not Path(self.model.model_name_or_path).is_dir():
            raise ConfigError(
                f"config key 'output.update_card' needs a local model folder; "
                f"{self.model.model_name_or_path!r} is not a directory"
            )

    @property
    def settings(self) -> Section:
        """The mode's own section."""
        return getattr(self, self.mode)


@dataclass
class KnnEvaluation(Evaluation):
    mode: ClassVar[str] = "knn"
    knn: KnnConfig = field(default_factory=KnnConfig)


@dataclass
class LinearEvaluation(Evaluation):
    mode: ClassVar[str] = "linear"
    linear: LinearConfig = field(default_factory=LinearConfig)


@dataclass
class ZeroShotEvaluation(Evaluation):
    mode: ClassVar[str] = "zeroshot"
    zeroshot: ZeroShotConfig = field(default_factory=ZeroShotConfig)


@dataclass
class ExplainEvaluation(Evaluation):
    mode: ClassVar[str] = "explain"
    explain: ExplainConfig = field(default_factory=ExplainConfig)


MODES: dict[str, type[Evaluation]] = {
    cls.mode: cls for cls in (KnnEvaluation, LinearEvaluation, ZeroShotEvaluation, ExplainEvaluation)
}


def parse_args(argv: list[str] | None = None) -> Evaluation:
    """The mode's settings from ``MODE --section.key value ...`` (``--help`` after the mode: its keys); raises
    :class:`ConfigError` naming the key. No mode or an unknown one ends as argparse does (usage, exit 2)."""
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    if not argv or argv[0] not in MODES:
        parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
        modes = parser.add_subcommands(dest="mode")
        for mode, cls in MODES.items():
            modes.add_subcommand(mode, ArgumentParser(), help=cls.sections()[mode].__doc__)
        parser.parse_args(argv)  # prints the help or the error, and exits
    return cli.parse(MODES[argv[0]], argv[1:], prog=f"{PROG} {argv[0]}")


def default_knn_k(model: str | os.PathLike) -> tuple[int, str]:
    """The kNN k when ``knn.k`` is not given, and where it came from: the model folder's ``train_config.yaml``
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


def _load_split(
    dataset_path: str, split: str, max_samples: int | None = None, split_key: str = "data.validation_split"
):
    """One split of ``data.dataset`` (:func:`hlss_hf.data.load_split`); errors name it or `split_key`."""
    from hlss_hf.data import load_split

    return load_split(dataset_path, split, max_samples=max_samples, key="data.dataset", split_key=split_key)


def load_prompts(path: str | None, class_names: list[str], saved: dict | None = None) -> dict[str, list[str]]:
    """Class prompts from a YAML / JSON file (`class -> prompt or [prompts]`), else `saved` (the model's
    `config.class_prompts`), else the default templates."""
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


def _load_model(config: Evaluation):
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

    path = config.model.model_name_or_path
    # A mistyped path is named, not looked up on the Hub.
    check_local_source(path, "model", "model.model_name_or_path")
    try:
        model_config = AutoConfig.from_pretrained(path)
    except OSError as err:  # transformers reports a missing repo / offline mode as OSError
        source_error = hub_source_error(path, "model", err, "model.model_name_or_path")
        if source_error is None:
            raise
        raise source_error from err
    # A fine-tuned classifier folder holds no text tower, banks or heads: loading it as an HLSSModel would fill
    # them with random weights, so it is loaded as what it is and the modes that need them say so.
    architectures = model_config.architectures or []
    if "HLSSForImageClassification" in architectures:
        if config.mode in ("zeroshot", "explain"):
            raise ValueError(
                f"{path} is a fine-tuned HLSSForImageClassification without text tower or attribute heads; "
                f"{config.mode} needs a pretrained HLSSModel folder (e.g. the output of train.py)"
            )
        model = AutoModelForImageClassification.from_pretrained(path)
    else:
        model = AutoModel.from_pretrained(path)
    device = config.model.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    try:
        processor = AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError) as err:
        logger.warning(
            "No image processor in %s (%s); using the default conversion and centre crop", path, err
        )
        processor = None
    tokenizer = None
    if config.mode == "zeroshot":
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise ValueError(
                f"zero-shot needs the text tower's tokenizer, none found in {path}: {err}"
            ) from err
    return model, processor, tokenizer


def frame_processor(processor, framing: str, model, modality: str):
    """The image processor for `model.framing` (docs/evaluation.md); a rewritten copy keeps normalisation."""
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
            f"model.framing {framing} rewrites an HLSSImageProcessor; the model folder holds a "
            f"{type(processor).__name__} (use --model.framing saved)"
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


def run(config: Evaluation) -> dict[str, Any]:
    """Run one evaluation; returns the report written to `<output.output_dir>/<mode>_<split>.json`."""
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

    mode, model_path, data = config.mode, config.model.model_name_or_path, config.data
    split, settings = data.validation_split, config.settings
    output_dir = Path(config.output.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = (data.embedding_cache_dir or output_dir / "cache") if data.cache else None

    # 1. Model and data.
    from hlss_hf.data.schema import modality_of

    model, processor, tokenizer = _load_model(config)
    evaluated = _load_split(data.dataset, split, data.max_samples)
    processor = frame_processor(processor, config.model.framing, model, modality_of(evaluated.features))
    aggregation = getattr(settings, "aggregation", None)

    def embed(rows):
        return extract_embeddings(
            model,
            rows,
            processor=processor,
            batch_size=data.eval_batch_size,
            cache_dir=cache_dir,
            num_workers=data.num_workers,
            precision=config.model.precision,
        )

    val = embed(evaluated)
    report: dict[str, Any] = {
        "mode": mode,
        "model": str(model_path),
        "dataset": str(data.dataset),
        "split": split,
        "num_patches": len(val),
        "class_names": val.class_names,
    }
    stem = f"{mode}_{split}"

    # 2. Explanations: per-class attribute summaries, and one target when asked.
    if mode == "explain":
        use_heads = settings.affinity == "heads"
        summary = explain_lib.class_attribute_summary(model, val, k=settings.top_k, use_heads=use_heads)
        report["class_summary"] = summary
        report["plots"] = [
            str(explain_lib.plot_class_heatmap(summary, level, output_dir / f"{stem}_classes_{level}.png"))
            for level in summary["levels"]
        ]
        print(explain_lib.format_class_summary(summary))
        if settings.index is not None or settings.slide_id is not None or settings.patient_id is not None:
            target = explain_lib.explain(
                model,
                val,
                index=settings.index,
                slide_id=settings.slide_id,
                patient_id=settings.patient_id,
                k=settings.top_k,
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

    # 3. Patch scores; the named warnings (hlss_hf.training.run_warnings) where numbers mean less than they seem.
    warnings: list = []
    if mode == "knn":
        train = embed(_load_split(data.dataset, data.train_split, data.max_samples, "data.train_split"))
        k, k_source = (settings.k, "knn.k") if settings.k is not None else default_knn_k(model_path)
        print(f"kNN with k={k} ({k_source})", flush=True)
        warnings += evaluation_warnings(train.labels.tolist(), val.labels.tolist(), val.class_names, k=k)
        k = min(k, len(train))  # k beyond the bank is clamped here and named by the k_exceeds_bank warning
        scores = knn_scores(train, val, k=k, temperature=settings.temperature)
        report["settings"] = {"k": k, "temperature": settings.temperature, "train_split": data.train_split}
    elif mode == "linear":
        import torch

        train = embed(_load_split(data.dataset, data.train_split, data.max_samples, "data.train_split"))
        if train.class_names != val.class_names:
            raise ValueError(
                f"class names differ: {data.train_split} {train.class_names}, {split} {val.class_names}"
            )
        warnings += evaluation_warnings(train.labels.tolist(), val.labels.tolist(), val.class_names)
        probe = train_linear_probe(train, weight_decay=settings.weight_decay)
        with torch.no_grad():
            scores = probe(val.embeddings).softmax(dim=-1)
        report["settings"] = {"weight_decay": settings.weight_decay, "train_split": data.train_split}
    else:
        prompts = load_prompts(
            settings.prompts, val.class_names, getattr(model.config, "class_prompts", None)
        )
        scores = zero_shot_scores(model, tokenizer, val, prompts, temperature=settings.temperature)
        # No bank: only the top-k check applies (the evaluated split stands in for the bank).
        warnings += evaluation_warnings(val.labels.tolist(), val.labels.tolist(), val.class_names)
        report["settings"] = {"prompts": prompts, "temperature": settings.temperature}

    # 4. Metrics, confusion matrices, plots.
    report["settings"].update(
        aggregation=aggregation, framing=_framing_summary(processor), precision=config.model.precision
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
                title=f"{mode} {level} ({split})",
            )
        )
        for level, m in matrices.items()
    ]
    _write_json(report, output_dir / f"{stem}.json")

    # 5. Model card.
    if config.output.update_card:
        from hlss_hf.hub.model_index import update_card_knn, update_model_card

        if mode == "knn":
            card = update_card_knn(
                model_path,
                report["metrics"],
                k=report["settings"]["k"],
                split=split,
                dataset=data.dataset,
                temperature=settings.temperature,
                aggregation=aggregation,
            )
        else:
            card = update_model_card(model_path, report, data.dataset)
        report["card"] = str(card)
        _write_json(report, output_dir / f"{stem}.json")
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the command line; a user's error is one line ``error: ...``, exit status 2, no empty output folder
    left behind (:func:`hlss_hf.cli.exit_on_error`)."""
    from hlss_hf.cli import debug_requested, exit_on_error
    from hlss_hf.files import remove_new_empty_folder
    from hlss_hf.sources import check_local_source

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or debug_requested()
    with exit_on_error(debug, user_errors=(ConfigError,), status=2):
        config = parse_args([arg for arg in argv if arg != "--debug"])
    data, output_dir = config.data, config.output.output_dir
    # Our progress at INFO; the libraries' (every HTTP request) only from WARNING.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("hlss_hf").setLevel(logging.INFO)
    cleanup = remove_new_empty_folder(output_dir)
    with exit_on_error(debug, user_errors=(ValueError,), status=2):
        try:
            # Both typos named before anything loads.
            check_local_source(config.model.model_name_or_path, "model", "model.model_name_or_path")
            check_local_source(data.dataset, "dataset", "data.dataset")
            # Data problems (a missing split or id column) show before the model loads.
            splits = {data.validation_split: "data.validation_split"}
            if config.mode in ("knn", "linear"):
                splits.setdefault(data.train_split, "data.train_split")
            for split, split_key in splits.items():
                _load_split(data.dataset, split, split_key=split_key)
            report = run(config)
        except BaseException:
            cleanup()
            raise
    if "aggregation" in report.get("settings", {}):
        print(f"slide / patient aggregation: {report['settings']['aggregation']}")
    for key, value in report.get("metrics", {}).items():
        print(f"{key}: {value:.4f}")
    print(f"report: {Path(output_dir) / f'{config.mode}_{data.validation_split}.json'}")
    return report


if __name__ == "__main__":
    main()
