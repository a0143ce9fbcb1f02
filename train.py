#!/usr/bin/env python
"""HLSS pretraining with Accelerate: hierarchical visual contrastive + language-tied alignment losses.

    python train.py                                              # the demo: tiny towers, synthetic data, CPU
    python train.py --config configs/opensrh_hlss.yaml --data.dataset /data/opensrh-hf
    accelerate launch --multi_gpu --num_processes 8 train.py --config configs/opensrh_hlss.yaml
    python train.py --config configs/demo.yaml --training.lr 1e-4 --training.max_steps 50
    python train.py --training.max_steps_this_run 10          # stop early with a checkpoint ...
    python train.py --resume_from_checkpoint latest             # ... and continue exactly where it stopped
    python train.py --report_to wandb                            # trackers: tensorboard (default if installed)
    python train.py --config configs/tcga_hlss.yaml --push_to_hub me/hlss-tcga
    python train.py --help                                       # every config key with its help
    python train.py --debug ...                                  # an error's full traceback (or HLSS_DEBUG=1)

Configuration: one YAML file (``--config``, default ``configs/demo.yaml``) with sections ``model``, ``data``,
``training``, and command-line overrides of any field written ``--section.field value`` (or
``--section.field=value``; the section may be dropped when the field name is unique, e.g. ``--lr 1e-4``).
Unknown keys and impossible values stop the run before anything starts, naming the key.

Batches are ``[B, S, P, V, C, H, W]``: ``B`` patients per device (``training.per_device_batch_size``), ``S``
slides per patient, ``P`` patches per slide, ``V`` augmented views per patch. The loss gathers embeddings across
processes with gradient, process ``r`` of ``W`` receives batch ``W * s + r`` of one seeded permutation, and every
random draw depends on ``(seed, epoch, patient)`` only, so a run on ``W`` processes with ``B`` patients each trains
on the same batches, augmentations and learning rates as one process with ``W * B`` patients, with the same
gradients up to float rounding (summation order), which AdamW amplifies over steps
(``benchmarks/distributed_equality.py``). A BatchNorm tower is not equal: each process uses its own batch statistics.
On a CPU-only machine, ``accelerate launch --multi_gpu --num_processes N`` runs the processes on CPU with gloo
(train.py then builds the ``Accelerator`` with ``cpu=True``; the launcher's ``--cpu`` cannot be combined with
``--multi_gpu``).

Outputs in ``training.output_dir``: the model (``save_pretrained``: safetensors, config, processor, model card
README.md), ``metrics.jsonl`` (one JSON object per logged step and evaluation), ``checkpoints/step_N`` (for
``--resume_from_checkpoint``) and tracker logs.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import math
import os
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader, Sampler

REPO_ROOT = Path(__file__).resolve().parent
if str(REPO_ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

from hlss_hf.config import ConfigError, TrainConfig, flatten_config, format_help, parse_config  # noqa: E402
from hlss_hf.harness import (  # noqa: E402
    RESUMABLE_KEYS,
    CheckpointError,
    JsonlWriter,
    NonFiniteLossError,
    TrainState,
    all_finite,
    check_checkpoint,
    describe_changes,
    last_good_checkpoint,
    load_checkpoint,
    make_accelerator,
    plan_output,
    publish_output,
    record_next_step,
    resolve_resume_path,
    resume_changes,
    save_checkpoint,
    scheduler_steps,
    set_peak_lr,
    start_output,
    truncate_jsonl,
    weights_finite,
    write_files_atomically,
)

logger = logging.getLogger("hlss_hf.train")

DEFAULT_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
LOSS_KEYS = ("loss", "hvc_loss", "alignment_loss")


class TextTowerGuard:
    """A forward pre-hook on the text tower that fails while a training step runs.

    The attribute banks are computed once when the model is built; a text forward inside a step would mean
    the model silently re-encodes the descriptions (slow, and wrong for a frozen bank).
    """

    def __init__(self) -> None:
        self.active = False
        self.calls = 0

    def __call__(self, module: torch.nn.Module, args: Any) -> None:
        self.calls += 1
        if self.active:
            raise RuntimeError(
                "the text tower ran during a training step; the attribute banks must be precomputed"
            )


class EpochPermutationSampler(Sampler[int]):
    """A permutation of the dataset's indices drawn from ``(seed, epoch)`` only.

    The permutation is cut to a multiple of ``multiple`` (the global micro-batch: per-device batch x processes),
    so every process gets the same number of full batches and a run on W processes sees exactly the batches of
    a single-process run with W times the per-device batch.

    Args:
        length (`int`): Dataset size.
        seed (`int`): Base seed.
        multiple (`int`): Keep the first ``floor(length / multiple) * multiple`` indices of each permutation.
        drop_last (`bool`, *optional*, defaults to `True`): Cut to ``multiple``; `False` keeps every index.
    """

    def __init__(self, length: int, seed: int, multiple: int, drop_last: bool = True) -> None:
        self.length = length
        self.seed = seed
        self.multiple = multiple
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return (self.length // self.multiple) * self.multiple if self.drop_last else self.length

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch, 0x5EED]).permutation(self.length)
        return iter(order[: len(self)].tolist())


# ---------------------------------------------------------------------------------------------------------------
# Model


def resolve_tower(spec: Any, fallback: Any = None, role: str = "vision") -> Any:
    """Turn a tower spec from the config into what ``from_vision_text_pretrained`` accepts.

    Args:
        spec: Hub id / local folder (returned as is), ``pkg:<module>`` (that package's ``model`` folder), or a
            mapping of config fields with ``model_type`` (a ``PretrainedConfig``: random init).
        fallback: Used when ``spec`` is ``pkg:<module>`` and the module is not installed.
        role (`str`): `vision` or `text`, for error messages.
    """
    from transformers import AutoConfig

    if isinstance(spec, dict):
        fields = dict(spec)
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    if isinstance(spec, str) and spec.startswith("pkg:"):
        module_name = spec[len("pkg:") :]
        if importlib.util.find_spec(module_name) is None:
            if fallback is None:
                raise ConfigError(f"config key 'model.{role}': package {module_name!r} is not installed")
            logger.warning("%s is not installed; using model.%s_fallback", module_name, role)
            return resolve_tower(fallback, None, role)
        module = importlib.import_module(module_name)
        return os.path.join(os.path.dirname(module.__file__), "model")
    return spec


def resolve_attributes(spec: Any) -> Any:
    """A path, a file name shipped in ``hlss_hf/attributes/``, or a mapping, as accepted by the model."""
    from hlss_hf.modeling_hlss import shipped_attribute_file

    if isinstance(spec, dict):
        return spec
    if Path(spec).is_file():
        return str(spec)
    try:
        return shipped_attribute_file(spec)
    except ValueError as err:
        raise ConfigError(f"config key 'model.attributes': {err}") from err


def fallback_tokenizer(attributes: Any):
    """A BERT-style word-level tokenizer whose vocabulary is the words of the attribute descriptions.

    Only for a random-init text tower (a config, no checkpoint): it then has no tokenizer of its own, and any
    consistent tokenisation of the descriptions gives distinct random bank rows.
    """
    import re

    from transformers import BertTokenizerFast

    from hlss_hf.modeling_hlss import load_attributes

    words = set()
    for bank in load_attributes(attributes).values():
        for descriptions in bank.values():
            for text in descriptions:
                words.update(re.findall(r"\w+|[^\w\s]", text.lower()))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words)]
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "vocab.txt"
        path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
        return BertTokenizerFast(vocab_file=str(path), do_lower_case=True)


def build_tokenizer(config: TrainConfig, text: Any, attributes: Any):
    """The text tower's tokenizer: ``model.tokenizer``, else the tower's own (open_clip towers' too), else
    :func:`fallback_tokenizer`."""
    from hlss_hf.configuration_hlss import OpenCLIPTextConfig
    from hlss_hf.modeling_hlss import load_text_tokenizer

    spec = config.model.tokenizer
    if spec is not None:
        return load_text_tokenizer(resolve_tower(spec, None, "tokenizer"))
    if isinstance(text, str | OpenCLIPTextConfig):
        return load_text_tokenizer(text)
    vocab_size = getattr(text, "vocab_size", None)
    tokenizer = fallback_tokenizer(attributes)
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise ConfigError(
            f"config key 'model.text': vocab_size {vocab_size} is smaller than the {len(tokenizer)} words of the "
            "attribute descriptions; raise it or set model.tokenizer"
        )
    return tokenizer


def dataset_scale(dataset) -> dict[str, float]:
    """Median ``mpp`` / ``magnification`` of a (map-style) patch dataset, when its rows record them.

    Saved in the model config as provenance: users then know the scale the encoder expects.
    """
    scale = {}
    names = getattr(dataset, "column_names", None) or []
    for column in ("mpp", "magnification"):
        if column in names:
            values = np.asarray(dataset.data.column(column).to_numpy(zero_copy_only=False), dtype=np.float64)
            values = values[np.isfinite(values) & (values > 0)]
            if values.size:
                scale[column] = float(np.median(values))
    return scale


def build_model(config: TrainConfig, modality: str, tokenizer=None, scale: dict | None = None):
    """Build a fresh ``HLSSModel`` from the config (towers, attribute banks, loss settings).

    Args:
        config (`TrainConfig`): The run's config.
        modality (`str`): `he` or `srh` (from the dataset).
    """
    from hlss_hf.modeling_hlss import HLSSModel

    m = config.model
    kwargs = dict(
        temperature=m.temperature,
        base_temperature=m.base_temperature,
        lambda_patch=m.lambda_patch,
        lambda_slide=m.lambda_slide,
        lambda_patient=m.lambda_patient,
        lambda_align=m.lambda_align,
        align_temperature=m.align_temperature,
        alignment_reduction=m.alignment_reduction,
        use_visual_projection=m.use_visual_projection,
        modality=modality,
        image_size=config.data.crop_size,
    )
    if m.text_pooling is not None:
        kwargs["text_pooling"] = m.text_pooling
    if m.projection_dim is not None:
        kwargs["projection_dim"] = m.projection_dim
    kwargs.update(scale or {})
    kwargs.update(m.config_kwargs)
    model = HLSSModel.from_vision_text_pretrained(
        resolve_tower(m.vision, None, "vision"),
        resolve_tower(m.text, m.text_fallback, "text"),
        attributes=resolve_attributes(m.attributes),
        tokenizer=tokenizer,
        **kwargs,
    )
    # The text tower is frozen: only the vision tower, the projection and the heads train.
    model.text_model.requires_grad_(False)
    return model


def build_image_processor(config: TrainConfig, modality: str):
    """The evaluation / inference image processor: ``data.eval_framing`` ``resize`` scales the whole patch to
    ``data.crop_size`` (bicubic, the reference's framing); ``center_crop`` crops that size at native resolution,
    after an optional shortest-edge resize to ``data.eval_resize``."""
    from hlss_hf.processing_hlss import HLSSImageProcessor

    d = config.data
    if d.eval_framing == "resize":
        return HLSSImageProcessor(
            modality=modality,
            do_resize=True,
            size={"height": d.crop_size, "width": d.crop_size},
            resample="bicubic",
            do_center_crop=False,
        )
    return HLSSImageProcessor(
        modality=modality,
        do_resize=d.eval_resize is not None,
        size={"shortest_edge": d.eval_resize or d.crop_size},
        do_center_crop=True,
        crop_size=d.crop_size,
    )


def build_processor(image_processor, tokenizer):
    """The processor saved beside the model: the image processor + the text tower's tokenizer."""
    from hlss_hf.processing_hlss import HLSSProcessor

    return HLSSProcessor(image_processor=image_processor, tokenizer=tokenizer)


# ---------------------------------------------------------------------------------------------------------------
# Data


def load_splits(config: TrainConfig, accelerator) -> tuple[Any, Any]:
    """Load (train, validation) splits: the demo hierarchy, a local dataset folder or a Hub dataset id."""
    import datasets

    d = config.data
    if d.dataset == "demo":
        from dataset_scripts.demo import build_demo_dataset

        kwargs = dict(d.demo)
        accepted = set(inspect.signature(build_demo_dataset).parameters) - {"output_dir"}
        for key in kwargs:
            if key not in accepted:
                raise ConfigError(
                    f"config key 'data.demo.{key}': not an argument of build_demo_dataset ({sorted(accepted)}); "
                    "on the command line write mappings with a space after each colon: '{num_patients: 12}'"
                )
        kwargs.setdefault("seed", config.training.seed)
        if d.cache_dir is not None:
            cache = Path(d.cache_dir)
            if not (cache / "dataset_dict.json").is_file():
                if cache.exists():
                    # Never replace a folder we did not write (or an older layout of the demo): say so instead.
                    raise ConfigError(
                        f"config key 'data.cache_dir': {cache} exists but holds no saved dataset "
                        "(dataset_dict.json); delete it or choose another folder"
                    )
                # Main process first: the others then load the finished folder.
                build_demo_dataset(output_dir=cache, **kwargs)
            splits = datasets.load_from_disk(str(cache))
        else:
            splits = build_demo_dataset(output_dir=None, **kwargs)
        train = splits[d.train_split]
        val = splits[d.validation_split] if d.validation_split else None
        return train, val
    from hlss_hf.publishing import SourceError, check_local_source, hub_source_error
    from hlss_hf.schema import PATIENT_ID, SLIDE_ID

    # A mistyped local path stops here, named, instead of becoming a Hub lookup (hlss_hf.publishing.looks_local).
    check_local_source(d.dataset, "dataset", "data.dataset")
    path = Path(d.dataset)
    source = str(path) if path.is_dir() else d.dataset
    saved = path.is_dir() and (path / "dataset_dict.json").is_file()

    def load(split: str, key: str, streaming: bool):
        try:
            if saved and not streaming:
                # A save_to_disk folder (what the converters write): memory-mapped as it is, no cache copy.
                from hlss_hf.evaluate import load_split

                data = load_split(source, split)
            else:
                data = datasets.load_dataset(source, d.dataset_config_name, split=split, streaming=streaming)
        except SourceError:
            raise
        except ValueError as err:
            # load_split names a missing id column; datasets the missing split and the available ones.
            if "column" in str(err):
                raise ConfigError(f"config key 'data.dataset': {err}") from err
            if "split" in str(err).lower():
                raise ConfigError(f"config key '{key}': {err}") from err
            raise
        except Exception as err:
            # Offline with an uncached id, or no such repo: one line naming the dataset.
            source_error = hub_source_error(source, "dataset", err, "data.dataset")
            if source_error is None:
                raise
            raise source_error from err
        columns = data.column_names or (list(data.features) if data.features else None)  # None: a stream
        missing = [name for name in (PATIENT_ID, SLIDE_ID) if columns is not None and name not in columns]
        if missing:
            raise ConfigError(
                f"config key 'data.dataset': split {split!r} of {source!r} has no {' or '.join(missing)} column "
                f"(it has {columns}); HLSS samples patients and slides: write the data with dataset_scripts/"
            )
        return data

    train = load(d.train_split, "data.train_split", d.streaming)
    val = load(d.validation_split, "data.validation_split", False) if d.validation_split else None
    if d.demo:
        # The demo config's data.demo stays set when only data.dataset is overridden on the command line.
        logger.info("data.demo is ignored: data.dataset is %r, not the demo", d.dataset)
    return train, val


def build_train_loader(config: TrainConfig, train_ds, num_processes: int):
    """The hierarchical DataLoader of one process (before ``accelerator.prepare``)."""
    from hlss_hf.augmentation import build_augmentation
    from hlss_hf.data import HierarchicalPatchDataset, HierarchicalStreamingDataset, collate_hierarchical

    d, t = config.data, config.training
    transform = build_augmentation(d.augmentation, d.crop_size)
    common = dict(
        num_slides=d.num_slides,
        num_patches=d.num_patches,
        num_views=d.num_views,
        transform=transform,
        seed=t.seed,
    )
    # A private generator: creating a DataLoader iterator then never draws from the global RNG, which keeps
    # a resumed run's RNG stream identical to an uninterrupted one.
    generator = torch.Generator().manual_seed(t.seed)
    if d.streaming:
        dataset = HierarchicalStreamingDataset(train_ds, **common)
        loader = DataLoader(
            dataset,
            batch_size=t.per_device_batch_size,
            collate_fn=collate_hierarchical,
            num_workers=d.num_workers,
            drop_last=True,
            generator=generator,
        )
        return dataset, loader
    dataset = HierarchicalPatchDataset(train_ds, balance_classes=d.balance_classes, **common)
    global_batch = t.per_device_batch_size * num_processes
    if d.drop_last and len(dataset) < global_batch:
        raise ConfigError(
            f"config key 'training.per_device_batch_size': {len(dataset)} training patients cannot fill one "
            f"global batch of {global_batch} patients ({num_processes} process(es) x {t.per_device_batch_size})"
        )
    sampler = EpochPermutationSampler(len(dataset), t.seed, global_batch, drop_last=d.drop_last)
    loader = DataLoader(
        dataset,
        batch_size=t.per_device_batch_size,
        sampler=sampler,
        collate_fn=collate_hierarchical,
        num_workers=d.num_workers,
        drop_last=d.drop_last,
        generator=generator,
    )
    return dataset, loader


def optimizer_groups(model, t) -> list[dict]:
    """AdamW parameter groups: biases and norm weights exempt from decay unless ``training.weight_decay_all``."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            exempt = not t.weight_decay_all and (param.ndim < 2 or "norm" in name.lower())
            (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def schedule_length(t, max_steps: int, steps_per_epoch: int | None) -> int:
    """Optimizer steps the LR schedule spans: ``training.schedule_steps`` / ``schedule_epochs``, else the run.

    A schedule longer than the run stops part-way along its curve, as the reference's 40,000-epoch cosine
    stopped at epoch 11,199 (LR still ~0.9 of its peak).
    """
    if t.schedule_steps is not None:
        length = t.schedule_steps
    elif t.schedule_epochs is not None:
        if steps_per_epoch is None:
            raise ConfigError(
                "config key 'training.schedule_epochs': a streamed dataset has no epochs; "
                "use training.schedule_steps"
            )
        length = math.ceil(t.schedule_epochs * steps_per_epoch)
    else:
        return max_steps
    if length < max_steps:
        key = "schedule_steps" if t.schedule_steps is not None else "schedule_epochs"
        raise ConfigError(
            f"config key 'training.{key}': the schedule ({length} steps) ends before the run ({max_steps} steps)"
        )
    return length


# ---------------------------------------------------------------------------------------------------------------
# Evaluation, checkpoints, model card, Hub


def evaluate_knn(model, config: TrainConfig, train_ds, val_ds, image_processor) -> dict[str, float]:
    """kNN accuracy (patch / slide / patient) of the frozen embeddings on the validation split."""
    from hlss_hf.evaluation import extract_embeddings, knn_evaluate

    t = config.training
    was_training = model.training
    model.eval()
    # Evaluation must not move the training RNG stream (a run with evaluation equals one without).
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        kwargs = dict(processor=image_processor, batch_size=t.eval_batch_size, progress=False)
        train_set = extract_embeddings(model, train_ds, **kwargs)
        val_set = extract_embeddings(model, val_ds, **kwargs)
        metrics = knn_evaluate(
            train_set, val_set, k=t.knn_k, temperature=t.knn_temperature, aggregation=t.knn_aggregation
        )
    model.train(was_training)
    return {f"eval/{key}": float(value) for key, value in metrics.items()}


FALLBACK_CARD = """---
library_name: transformers
pipeline_tag: image-feature-extraction
tags: [hlss, histopathology, self-supervised-learning]
---

# {{ model_name }}

HLSS-pretrained {{ modality_name }} image encoder, trained on `{{ dataset_id }}` for {{ num_steps }} steps.

| Level | Accuracy |
|---|---|
| Patch | {{ patch_acc }} |
| Slide | {{ slide_acc }} |
| Patient | {{ patient_acc }} |

Command: `{{ training_command }}`
"""
_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def _tower_name(spec: Any, tower_config: Any) -> str:
    if isinstance(spec, str):
        return spec
    return f"random-init-{getattr(tower_config, 'model_type', 'model')}"


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hub_links(dataset: str, towers: list[Any]) -> str:
    """The card's `datasets` / `base_model` metadata: only names that are Hub ids (not local paths or configs).

    A ``pkg:<module>`` tower names the Hub model the package ships (``publishing.PACKAGED_MODELS``); an open_clip
    ``hf-hub:<id>`` tower names that repository.
    """
    from hlss_hf.publishing import PACKAGED_MODELS

    def hub_id(spec: Any) -> str | None:
        if isinstance(spec, str) and spec.startswith("pkg:"):
            return PACKAGED_MODELS.get(spec[len("pkg:") :])
        if isinstance(spec, str) and spec.startswith("hf-hub:"):
            spec = spec[len("hf-hub:") :]
        is_id = isinstance(spec, str) and _HUB_ID.match(spec) and not Path(spec).exists()
        return spec if is_id else None

    lines = []
    if hub_id(dataset):
        lines += ["datasets:", f"- {dataset}"]
    bases = list(dict.fromkeys(name for name in map(hub_id, towers) if name))
    if bases:
        lines += ["base_model:", *(f"- {name}" for name in bases)]
    return "".join(f"{line}\n" for line in lines)


def model_card_values(config: TrainConfig, state: TrainState, metrics: dict[str, float], ctx: dict) -> dict:
    """Every placeholder of ``model_card.md`` from the run (config, model, data, steps, metrics).

    Args:
        config (`TrainConfig`): The run's config.
        state (`TrainState`): Final step / epoch.
        metrics (`dict`): kNN metrics (``eval/patch/acc`` ...), possibly empty.
        ctx (`dict`): ``model`` (unwrapped), ``train_dataset``, ``modality``, ``num_processes``, ``device``,
            ``seconds``, ``argv``.
    """
    m, d, t = config.model, config.data, config.training
    model, modality = ctx["model"], ctx["modality"]
    mc = model.config
    names = getattr(mc, "attribute_names", None) or {}
    index = getattr(ctx.get("train_dataset"), "index", None)
    srh = modality == "srh"
    from hlss_hf.publishing import hub_url, license_metadata, model_index_yaml, scale_text

    if d.dataset == "demo":
        dataset_id = "hlss-synthetic-demo"
    else:
        dataset_id = Path(d.dataset).name if Path(d.dataset).exists() else d.dataset
    is_hub_dataset = d.dataset != "demo" and bool(_HUB_ID.match(d.dataset)) and not Path(d.dataset).exists()
    repo_id = t.push_to_hub or str(t.output_dir)
    model_name = t.push_to_hub.split("/")[-1] if t.push_to_hub else Path(t.output_dir).name
    num_labels = len(index.class_names) if index is not None else "n/a"
    from hlss_hf.augmentation import AUGMENTATION_PRESETS, DEFAULT_AUGMENTATION

    operations = d.augmentation if d.augmentation is not None else DEFAULT_AUGMENTATION
    if isinstance(operations, str):
        operations = AUGMENTATION_PRESETS[operations]
    used = [name for name, params in operations.items() if params is not False] or ["centre crop only"]
    if isinstance(d.augmentation, str):
        used[0] = f"preset {d.augmentation} ({used[0]}"
        used[-1] += ")"
    warmup = f"{t.lr_scheduler} schedule with {t.warmup_ratio:.0%} warm-up"
    device = ctx.get("device")
    hardware = f"{ctx.get('num_processes', 1)} x {device}"
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        hardware = f"{ctx.get('num_processes', 1)} x {torch.cuda.get_device_name(torch.device(device))}"
    values = {
        "license_fields": license_metadata(t.model_license, t.project_url),
        "model_index": model_index_yaml(
            model_name,
            metrics,
            k=t.knn_k,
            split=d.validation_split,
            dataset_name=dataset_id,
            dataset_id=d.dataset if is_hub_dataset else None,
            aggregation=t.knn_aggregation,
        ),
        "hub_links": _hub_links(d.dataset, [m.vision, m.text]),
        "knn_k": t.knn_k,
        "knn_temperature": t.knn_temperature,
        "knn_aggregation": t.knn_aggregation,
        "knn_aggregation_rule": "per patch L1-normalised, softmax, averaged, as the HLSS reference"
        if t.knn_aggregation == "reference"
        else "raw votes summed",
        "eval_framing": "the whole patch resized to the crop size (bicubic)"
        if d.eval_framing == "resize"
        else "a centre crop at native resolution",
        "modality_tag": "stimulated-raman-histology" if srh else "h-and-e",
        "modality_name": "SRH" if srh else "H&E",
        "dataset_id": dataset_id,
        "vision_model_name_or_path": _tower_name(m.vision, getattr(mc, "vision_config", None)),
        "text_model_name_or_path": _tower_name(m.text, getattr(mc, "text_config", None)),
        "vision_model_type": getattr(getattr(mc, "vision_config", None), "model_type", "n/a"),
        "text_model_type": getattr(getattr(mc, "text_config", None), "model_type", "n/a"),
        "model_name": model_name,
        "repo_id": repo_id,
        "hlss_hf_link": f"[`hlss_hf`]({t.project_url})" if t.project_url else "`hlss_hf`",
        "dataset_link": f"[`{dataset_id}`]({hub_url(d.dataset, 'dataset')})"
        if is_hub_dataset
        else f"`{dataset_id}`",
        "projection_dim": getattr(mc, "projection_dim", "n/a"),
        "num_patch_attributes": len(names.get("patch", [])),
        "num_slide_attributes": len(names.get("slide", [])),
        "num_patient_attributes": len(names.get("patient", [])),
        "image_size": d.crop_size,
        "scale": scale_text(getattr(mc, "mpp", None), getattr(mc, "magnification", None)),
        "input_description": "2-channel uint16 SRH arrays [H, W, 2]"
        if srh
        else "RGB images (PIL or uint8 arrays)",
        "example_prompt": "an SRH image of a glioma" if srh else "an H&E image of tumour tissue",
        "num_labels": num_labels,
        "class_names": ", ".join(f"`{name}`" for name in index.class_names) if index is not None else "n/a",
        "num_train_patients": index.num_patients if index is not None else "n/a (streamed)",
        "num_train_slides": index.num_slides if index is not None else "n/a",
        "num_train_patches": index.num_patches if index is not None else "n/a",
        "batch_patients": t.per_device_batch_size,
        "slides_per_patient": d.num_slides,
        "patches_per_slide": d.num_patches,
        "views_per_patch": d.num_views,
        "num_processes": ctx.get("num_processes", 1),
        "augmentations": ", ".join(used),
        "temperature": m.temperature,
        "lambda_patch": m.lambda_patch,
        "lambda_slide": m.lambda_slide,
        "lambda_patient": m.lambda_patient,
        "lambda_align": m.lambda_align,
        "align_temperature": m.align_temperature,
        "optimizer": f"AdamW (weight decay {t.weight_decay}, betas ({t.adam_beta1}, {t.adam_beta2}))",
        "learning_rate": t.lr,
        "schedule": warmup,
        "num_steps": state.step,
        "mixed_precision": ctx.get("mixed_precision", t.mixed_precision),
        "seed": t.seed,
        "hardware": hardware,
        "training_time": f"{ctx.get('seconds', 0.0) / 60:.1f} min",
        "training_command": "python train.py " + " ".join(shlex.quote(a) for a in ctx.get("argv", [])),
        "eval_split": d.validation_split or "none",
        "evaluation_notes": "" if metrics else "No evaluation ran.",
        "limitations": (
            "This checkpoint comes from the synthetic demo (tiny towers, procedural textures): it only "
            "demonstrates the pipeline and has no diagnostic or research value."
            if d.dataset == "demo"
            else f"Pretrained for {state.step} steps; check the evaluation above on your own data before use."
        ),
        "citation": "",
    }
    for level in ("patch", "slide", "patient"):
        for key in ("acc", "top2", "top3", "mca", "map"):
            value = metrics.get(f"eval/{level}/{key}")
            values[f"{level}_{key}"] = f"{100 * value:.1f}" if value is not None else "n/a"
    return values


def render_model_card(config: TrainConfig, state: TrainState, metrics: dict[str, float], ctx: dict) -> str:
    """Fill ``model_card.md`` (repo root) with :func:`model_card_values`; placeholders are ``{{ name }}``.

    Without the template (train.py copied away from the checkout), a short built-in card is used.
    """
    template_path = REPO_ROOT / "model_card.md"
    if template_path.is_file():
        template = template_path.read_text(encoding="utf-8")
    else:
        logger.warning("model_card.md template not found beside train.py; writing a short card")
        template = FALLBACK_CARD
    values = model_card_values(config, state, metrics, ctx)
    return _PLACEHOLDER.sub(lambda match: str(values.get(match.group(1), "n/a")), template)


def push_to_hub(config: TrainConfig) -> str:
    """Upload the output folder (model, processor, card, metrics) to ``training.push_to_hub``."""
    from huggingface_hub import HfApi

    api = HfApi()
    repo_id = config.training.push_to_hub
    api.create_repo(repo_id, private=config.training.hub_private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=config.training.output_dir,
        ignore_patterns=[
            "checkpoints/*",
            "runs/*",
            "demo_dataset/*",
            "*.tmp",
            config.training.project_name + "/*",
        ],
        commit_message="HLSS pretraining: model, processor and model card",
    )
    return str(getattr(commit, "commit_url", commit))


# ---------------------------------------------------------------------------------------------------------------
# Training


def _to_float(value: Any) -> float:
    return float(value.detach().float().item()) if torch.is_tensor(value) else float(value)


def _loss_parts(outputs, accelerator=None) -> dict[str, float]:
    """The loss and its parts as floats, averaged over processes when there are several.

    Terms computed per process (e.g. a per-sample mean over the local batch) then read as the global-batch
    value, like the gradient that DDP averages.
    """
    parts = {}
    for key in LOSS_KEYS:
        value = getattr(outputs, key, None)
        if value is not None:
            parts[key] = value
    for key, value in (getattr(outputs, "level_losses", None) or {}).items():
        parts[key] = value
    if accelerator is not None and accelerator.num_processes > 1 and parts:
        stacked = torch.stack(
            [torch.as_tensor(v, dtype=torch.float32).detach().reshape(()) for v in parts.values()]
        )
        stacked = accelerator.reduce(stacked.to(accelerator.device), reduction="mean")
        return dict(zip(parts, stacked.tolist(), strict=True))
    return {key: _to_float(value) for key, value in parts.items()}


def plan_run(config: TrainConfig) -> tuple[Path, Path | None, dict]:
    """Where this run writes, which checkpoint it resumes from and what settings it changes; nothing on disk yet.

    A resumed run's checkpoint is checked before anything heavy happens: unsafe content, another number of
    processes or a changed setting that cannot apply exactly stop the run here, naming each.
    """
    t = config.training
    resume_path, applied = None, {}
    if t.resume_from_checkpoint is not None:
        resume_path = resolve_resume_path(t.resume_from_checkpoint, t.output_dir)
        _, saved = check_checkpoint(resume_path)
        applied, refused = resume_changes(saved, config.to_dict())
        if refused:
            raise CheckpointError(
                f"resuming from {resume_path} with changed settings that would not apply exactly: "
                f"{describe_changes(refused)}. Resume with the checkpoint's values, or start a new run; these may "
                f"change on resume: {', '.join(sorted(RESUMABLE_KEYS))}"
            )
    run_dir = plan_output(t.output_dir, overwrite=t.overwrite_output_dir, resume=resume_path)
    return run_dir, resume_path, applied


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run HLSS pretraining.

    Args:
        argv (`list[str]`, *optional*): Command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        `dict`: ``{"step", "epoch", "output_dir", "metrics", "stopped_early"}`` (for tests and notebooks).
    """
    # 1. Settings: the config, where the run writes, what it resumes (before anything heavy happens).
    argv = sys.argv[1:] if argv is None else list(argv)
    config = parse_config(argv, default_config=DEFAULT_CONFIG)
    t, d = config.training, config.data
    run_dir, resume_path, changed = plan_run(config)
    out = Path(t.output_dir)

    # 2. Accelerator, logging, seed.
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    accelerator = make_accelerator(t, project_dir=run_dir)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logger.setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)
    set_seed(t.seed)

    # 3. Data (the main process first: it builds / downloads, the others read its cache).
    with accelerator.main_process_first():
        from hlss_hf.schema import modality_of

        train_ds, val_ds = load_splits(config, accelerator)
        modality = modality_of(train_ds.features)
        train_dataset, train_loader = build_train_loader(config, train_ds, accelerator.num_processes)

    # 4. Model, processor, optimizer, schedule.
    text = resolve_tower(config.model.text, config.model.text_fallback, "text")
    tokenizer = build_tokenizer(config, text, resolve_attributes(config.model.attributes))
    scale = dataset_scale(train_ds) if not d.streaming else {}
    model = build_model(config, modality, tokenizer, scale)
    image_processor = build_image_processor(config, modality)
    processor = build_processor(image_processor, tokenizer)
    guard = TextTowerGuard()
    model.text_model.register_forward_pre_hook(guard)
    optimizer = torch.optim.AdamW(
        optimizer_groups(model, t), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon
    )
    W = accelerator.num_processes
    if d.streaming:
        batches_per_epoch, max_steps, num_epochs = None, t.max_steps, 1
    else:
        # Per-process batches per epoch after sharding (the sampler makes it exact; a kept partial batch
        # is padded to every process by accelerate).
        batches_per_epoch = math.ceil(len(train_loader) / W) if not d.drop_last else len(train_loader) // W
        steps_per_epoch = math.ceil(batches_per_epoch / t.gradient_accumulation_steps)
        max_steps = t.max_steps if t.max_steps is not None else math.ceil(t.num_epochs * steps_per_epoch)
        num_epochs = math.ceil(max_steps / steps_per_epoch)
    schedule_steps = schedule_length(t, max_steps, steps_per_epoch if batches_per_epoch else None)
    warmup_steps = int(round(t.warmup_ratio * schedule_steps))
    scheduler = get_scheduler(
        t.lr_scheduler,
        optimizer,
        num_warmup_steps=scheduler_steps(accelerator, warmup_steps),
        num_training_steps=scheduler_steps(accelerator, schedule_steps),
    )

    # 5. Prepare, then resume (weights, optimizer, scheduler, RNG; counters from JSON).
    if d.streaming:
        # The streaming dataset shards patients over processes itself: accelerate must not shard it again.
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    else:
        model, optimizer, train_loader, scheduler = accelerator.prepare(
            model, optimizer, train_loader, scheduler
        )
    unwrapped = accelerator.unwrap_model(model)
    state = TrainState(num_processes=W)
    if resume_path is not None:
        accelerator.print(f"Resuming from {resume_path}")
        state, _ = load_checkpoint(accelerator, resume_path)
        if state.step >= max_steps:
            raise ConfigError(
                f"config key 'training.max_steps': the run ends at step {max_steps}, and checkpoint {resume_path} "
                f"is at step {state.step}; raise training.max_steps / num_epochs to train further"
            )
        if "training.lr" in changed:
            set_peak_lr(optimizer, scheduler, t.lr)
        if changed:
            accelerator.print(
                f"Changed on resume (applied from step {state.step + 1}): {describe_changes(changed)}"
            )
        if batches_per_epoch is not None and state.batch_in_epoch >= batches_per_epoch:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0

    # The config and data are valid and the model is built: only now does the run touch its folder.
    if accelerator.is_main_process:
        start_output(run_dir, out, resume=resume_path is not None)
        if resume_path is not None:
            truncate_jsonl(run_dir / "metrics.jsonl", state.step)
    accelerator.wait_for_everyone()
    S, P, V, B, GA = (
        d.num_slides,
        d.num_patches,
        d.num_views,
        t.per_device_batch_size,
        t.gradient_accumulation_steps,
    )
    images_per_step = B * S * P * V * W * GA
    if accelerator.is_main_process:
        n_patients = len(train_dataset) if not d.streaming else "streaming"
        print(
            "\n".join(
                [
                    "***** Running HLSS training *****",
                    f"  device: {accelerator.device} | processes: {W} | distributed: {accelerator.distributed_type}"
                    f" | mixed precision: {accelerator.mixed_precision}",
                    f"  data: {d.dataset} ({modality}) | train patients: {n_patients} | validation patches: "
                    f"{len(val_ds) if val_ds is not None else 0}",
                    f"  per-device batch [B={B}, S={S}, P={P}, V={V}, C=3, H={d.crop_size}, W={d.crop_size}] = "
                    f"{B * S * P * V} images",
                    f"  global batch: {B} x {W} processes x {GA} accumulation = {B * W * GA} patients = "
                    f"{images_per_step} images per optimizer step",
                    f"  optimizer steps: {max_steps} (warm-up {warmup_steps}, {t.lr_scheduler}, lr {t.lr}"
                    + (f", schedule over {schedule_steps} steps" if schedule_steps != max_steps else "")
                    + ")"
                    + (
                        f" | epochs: {num_epochs}, {batches_per_epoch} batches per process per epoch"
                        if batches_per_epoch
                        else ""
                    )
                    + (f" | starting at step {state.step}" if state.step else ""),
                    f"  output: {out}"
                    + (f" (written to {run_dir} until the run has finished)" if run_dir != out else ""),
                ]
            ),
            flush=True,
        )
    if t.trackers():
        accelerator.init_trackers(t.project_name, config=flatten_config(config))
    metrics_file = JsonlWriter(run_dir / "metrics.jsonl") if accelerator.is_main_process else None
    if metrics_file is not None and changed:
        metrics_file.write({"step": state.step, "resumed_with": {k: list(v) for k, v in changed.items()}})

    # 6. Train (after a kNN baseline of the untrained model, when asked for).
    initial_eval: dict[str, float] = {}
    if t.eval_before_training and t.eval_at_end and val_ds is not None and state.step == 0:
        accelerator.print("kNN evaluation before training (the same model, random-init vision tower):")
        initial_eval = _run_eval(
            accelerator, unwrapped, config, train_ds, val_ds, image_processor, state, metrics_file, quiet=True
        )
        accelerator.print(format_knn(initial_eval, t))
    run_start = time.perf_counter()
    run_limit = state.step + t.max_steps_this_run if t.max_steps_this_run else None
    progress = tqdm(
        total=max_steps,
        initial=state.step,
        disable=not accelerator.is_local_main_process,
        desc="HLSS",
        unit="step",
    )
    last_eval: dict[str, float] = {}
    stopped_early = False
    unchecked = resume_path  # the newest checkpoint whose next step has not run yet
    sums: dict[str, float] = {}
    micro = 0
    tic = time.perf_counter()
    model.train()
    while state.step < max_steps and not stopped_early:
        if d.streaming:
            loader = _stream_batches(train_loader, train_dataset, state.step * GA, accelerator.device)
        else:
            train_loader.set_epoch(state.epoch)
            train_dataset.set_epoch(state.epoch)
            loader = train_loader
            if state.batch_in_epoch:
                loader = accelerator.skip_first_batches(train_loader, state.batch_in_epoch)
        for batch in loader:
            with accelerator.accumulate(model):
                guard.active = True
                outputs = model(pixel_values=batch["pixel_values"], return_loss=True)
                if not all_finite(outputs.loss, accelerator):  # every process stops together
                    guard.active = False
                    raise non_finite_error(outputs, state, run_dir, unchecked, accelerator)
                accelerator.backward(outputs.loss)
                if accelerator.sync_gradients and t.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                guard.active = False
            state.batch_in_epoch += 1
            micro += 1
            for key, value in _loss_parts(outputs, accelerator).items():
                sums[key] = sums.get(key, 0.0) + value
            if not accelerator.sync_gradients:
                continue

            # One optimizer step done.
            state.step += 1
            progress.update(1)
            if unchecked is not None and accelerator.is_main_process:
                record_next_step(unchecked, finite=True)
            unchecked = None
            if state.step % t.logging_steps == 0 or state.step == max_steps:
                elapsed = time.perf_counter() - tic
                record = {k: v / micro for k, v in sums.items()}
                record.update(
                    step=state.step,
                    epoch=state.epoch,
                    lr=scheduler.get_last_lr()[0],
                    images_per_s=images_per_step * (micro / GA) / max(elapsed, 1e-9),
                )
                if accelerator.is_main_process:
                    metrics_file.write(record)
                progress.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}", lr=f"{record['lr']:.2e}")
                accelerator.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=state.step)
                sums, micro, tic = {}, 0, time.perf_counter()
            if (
                t.eval_steps
                and state.step % t.eval_steps == 0
                and val_ds is not None
                and state.step < max_steps
            ):
                last_eval = _run_eval(
                    accelerator, unwrapped, config, train_ds, val_ds, image_processor, state, metrics_file
                )
                tic = time.perf_counter()
            stop_here = run_limit is not None and state.step >= run_limit and state.step < max_steps
            if (t.save_steps and state.step % t.save_steps == 0) or stop_here:
                unchecked = save_checkpoint(
                    accelerator,
                    run_dir,
                    state,
                    config.to_dict(),
                    keep=t.save_total_limit,
                    finite_weights=weights_finite(unwrapped),
                )
                tic = time.perf_counter()
            if stop_here:
                stopped_early = True
                break
            if state.step >= max_steps:
                break
        else:
            state.epoch += 1
            state.batch_in_epoch = 0
            continue
        if (
            state.step >= max_steps
            and batches_per_epoch is not None
            and state.batch_in_epoch >= batches_per_epoch
        ):
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    progress.close()

    # 7. Finish: evaluate, save beside, swap in, push.
    if stopped_early:
        accelerator.print(
            f"Stopped after step {state.step} (training.max_steps_this_run); continue with "
            f"--resume_from_checkpoint latest"
        )
    else:
        if t.eval_at_end and val_ds is not None:
            last_eval = _run_eval(
                accelerator,
                unwrapped,
                config,
                train_ds,
                val_ds,
                image_processor,
                state,
                metrics_file,
                quiet=True,
            )
        # Every process takes part: with FSDP / DeepSpeed the full weights exist only once gathered.
        state_dict = accelerator.get_state_dict(model)
        if accelerator.is_main_process:
            card_context = {
                "model": unwrapped,
                "train_dataset": train_dataset,
                "modality": modality,
                "num_processes": W,
                "device": accelerator.device,
                "seconds": time.perf_counter() - run_start,
                "argv": argv,
                "mixed_precision": accelerator.mixed_precision,
            }
            save_final_model(
                run_dir,
                config,
                unwrapped,
                state_dict,
                processor,
                train_dataset,
                state,
                last_eval,
                card_context,
            )
            metrics_file.close()
            metrics_file = None
            publish_output(run_dir, out)
            print(f"Saved the model to {out}", flush=True)
            if last_eval:
                print(format_knn(last_eval, t), flush=True)
            if last_eval and initial_eval:
                print(format_knn_change(initial_eval, last_eval), flush=True)
            if t.push_to_hub:
                print(f"Pushed to {push_to_hub(config)}", flush=True)
        accelerator.wait_for_everyone()
    if metrics_file is not None:
        metrics_file.close()
    accelerator.end_training()
    return {
        "step": state.step,
        "epoch": state.epoch,
        "output_dir": str(out),
        "run_dir": str(run_dir),
        "metrics": last_eval,
        "stopped_early": stopped_early,
        "text_tower_calls_during_training": guard.calls,
    }


def non_finite_error(outputs, state: TrainState, run_dir: Path, unchecked: Path | None, accelerator):
    """The error for a non-finite loss at the next step, naming the checkpoint to go back to.

    The checkpoint written right before this step is not good (its next step is this one), so it is marked; the
    good one is the newest with finite weights whose next step's loss was finite.
    """
    if unchecked is not None and accelerator.is_main_process:
        record_next_step(unchecked, finite=False)
    accelerator.wait_for_everyone()
    parts = ", ".join(f"{k}={v}" for k, v in _loss_parts(outputs).items())
    good = last_good_checkpoint(run_dir)
    if good is None:
        advice = (
            "No checkpoint is known to be good: start again with a lower training.lr (or save more often)."
        )
    else:
        advice = (
            f"Last good checkpoint: {good} (finite weights, finite loss at the step after it). Continue with "
            f"--training.resume_from_checkpoint {good} --training.lr <lower> (lr may change on resume)."
        )
    return NonFiniteLossError(
        f"non-finite loss at step {state.step + 1} (epoch {state.epoch}): {parts}. {advice}"
    )


def save_final_model(
    run_dir, config, unwrapped, state_dict, processor, train_dataset, state, metrics, card_context
):
    """Model, processor, pipelines, card and settings, written beside and moved into ``run_dir`` (main process)."""
    from hlss_hf.pipeline_hlss import add_pipelines_to_folder

    index = getattr(train_dataset, "index", None)
    if index is not None:  # the class names travel with the model (fine-tuning, AutoPeftModel)
        unwrapped.config.id2label = dict(enumerate(index.class_names))
        unwrapped.config.label2id = {name: i for i, name in enumerate(index.class_names)}

    def write(folder: Path) -> None:
        unwrapped.save_pretrained(folder, state_dict=state_dict)
        processor.save_pretrained(folder)
        add_pipelines_to_folder(folder)  # the SRH-aware pipelines, also as remote code
        card = render_model_card(config, state, metrics, card_context)
        (folder / "README.md").write_text(card, encoding="utf-8")
        with open(folder / "train_config.yaml", "w", encoding="utf-8") as f:
            yaml.safe_dump(config.to_dict(), f, sort_keys=False)

    write_files_atomically(run_dir, write)


def _stream_batches(loader, dataset, skip: int, device):
    """Endless batches from a streaming loader (epoch after epoch), skipping the ``skip`` already trained on.

    Each process reads its own patients, so processes may finish a pass at different times; cycling keeps every
    process stepping until ``max_steps``.
    """
    from accelerate.utils import send_to_device

    epoch = 0
    while True:
        dataset.set_epoch(epoch)
        produced = False
        for batch in loader:
            produced = True
            if skip:
                skip -= 1
                continue
            yield send_to_device(batch, device)
        if not produced:
            raise RuntimeError(
                "the streaming training split produced no batch (fewer patients than one batch?)"
            )
        epoch += 1


def format_knn(metrics: dict[str, float], t) -> str:
    """One line per level: ``patch  acc 0.8125  top2 ...``, under a header naming k and the aggregation rule."""
    lines = [f"kNN evaluation (k={t.knn_k}, {t.knn_aggregation} aggregation) on the validation split:"]
    for level in ("patch", "slide", "patient"):
        items = sorted((key.split("/")[-1], v) for key, v in metrics.items() if key.split("/")[-2] == level)
        if items:
            lines.append(f"  {level:<8}" + "  ".join(f"{name} {value:.4f}" for name, value in items))
    return "\n".join(lines)


def format_knn_change(before: dict[str, float], after: dict[str, float]) -> str:
    """Accuracy per level before training (random init) and after, side by side."""
    lines = ["kNN accuracy, the same model before training (random init) -> after training:"]
    for level in ("patch", "slide", "patient"):
        key = next((k for k in after if k.split("/")[-2:] == [level, "acc"]), None)
        if key is not None and key in before:
            change = after[key] - before[key]
            lines.append(f"  {level:<8} {before[key]:.4f} -> {after[key]:.4f} ({change:+.4f})")
    return "\n".join(lines)


def _run_eval(
    accelerator, unwrapped, config, train_ds, val_ds, image_processor, state, metrics_file, quiet=False
) -> dict[str, float]:
    """kNN evaluation on the main process; the others wait."""
    metrics: dict[str, float] = {}
    if accelerator.is_main_process:
        metrics = evaluate_knn(unwrapped, config, train_ds, val_ds, image_processor)
        metrics_file.write({"step": state.step, **metrics})
        if not quiet:
            progress_write = f"step {state.step}: " + format_knn(metrics, config.training)
            accelerator.print(progress_write)
    accelerator.log(metrics, step=state.step)
    accelerator.wait_for_everyone()
    return metrics


def cli() -> None:
    """Entry point: ``--help`` lists every config key. Errors a user can fix (config, a missing dataset folder or Hub
    repo, a non-finite loss, file system, Hub) print one line ``error: ...`` and exit with status 1, leaving no
    empty output folder behind; ``--debug`` or ``HLSS_DEBUG=1`` shows the traceback instead."""
    from hlss_hf.publishing import debug_requested, exit_on_error, remove_new_empty_folder

    argv = sys.argv[1:]
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        print(format_help(TrainConfig, DEFAULT_CONFIG))
        return
    debug = "--debug" in argv or debug_requested()
    argv = [arg for arg in argv if arg != "--debug"]
    with exit_on_error(debug, user_errors=(ConfigError, CheckpointError, NonFiniteLossError)):
        output_dir = parse_config(argv, default_config=DEFAULT_CONFIG).training.output_dir
        cleanup = remove_new_empty_folder(output_dir)
        try:
            main(argv)
        except BaseException:
            cleanup()
            raise


if __name__ == "__main__":
    cli()
