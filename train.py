#!/usr/bin/env python
"""HLSS pretraining with Accelerate: hierarchical visual contrastive + language-tied alignment losses; and the
image-text alignment HLSS starts from (``model.objective: align``).

    python train.py                                              # the demo: its alignment stage, then HLSS, CPU
    python train.py --config configs/demo_align.yaml             # the demo's alignment stage alone
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

The demo (``configs/demo.yaml``) starts HLSS from towers aligned on (patch, caption) pairs: ``model.init_from``
names that model and ``model.init_config`` (``configs/demo_align.yaml``) makes it first when the folder does not
exist. With ``model.objective: align`` each drawn patch is paired with its ``data.text_column`` text and CLIP's
loss trains the image tower against the frozen text tower (every distinct text embedded once, before training).

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
``--resume_from_checkpoint``; state as safetensors and JSON, nothing pickled) and tracker logs. A run that
replaces an earlier one works in ``<output_dir>.incoming`` and swaps it in when it has finished
(:mod:`hlss_hf.harness`: outputs never lost, resume with changed settings applied or refused, non-finite losses).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent
if str(REPO_ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

# hlss_hf registers its Auto classes (loading torch: seconds) once this program has read its command line, so that
# --help and settings errors answer at once (hlss_hf/__init__.py).
HLSS_HF_PARSE_FIRST = True

from hlss_hf.cli import check_command_line
from hlss_hf.config import TrainConfig, command_line_value, flatten_config, format_help, parse_config
from hlss_hf.errors import ConfigError

DEFAULT_CONFIG = REPO_ROOT / "configs" / "demo.yaml"


def names_config_file(argv: list[str]) -> bool:
    """Whether the command line gives ``--config`` (as ``--config F`` or ``--config=F``)."""
    return any(arg == "--config" or arg.startswith("--config=") for arg in argv)


def default_config_for(argv: list[str]) -> Path | None:
    """The settings file a command line without ``--config`` runs with: the demo's (``configs/demo.yaml``) for the
    demo only. ``--data.dataset <yours>`` gets the built-in defaults, meant for real data (the device from the
    launcher, no overwriting, ``outputs/hlss-<dataset name>``, the CLIP ViT-B/16 towers at 224 px), not the demo's
    CPU, tiny tower, 32 px crops and overwritten ``outputs/hlss-demo``."""
    if names_config_file(argv):
        return None
    dataset = command_line_value(argv, "data.dataset")
    return DEFAULT_CONFIG if dataset in (None, "demo") else None


def print_help(argv: list[str]) -> None:
    """This docstring and every config key, with the defaults this command line's run would use: its --config, else
    the demo's for the demo and the built-in ones for any other --data.dataset."""
    print(__doc__)
    config_file = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"), None)
    config_file = config_file or default_config_for([a for a in argv if a not in ("-h", "--help")])
    print(format_help(TrainConfig, config_file))
    if config_file is not None and Path(config_file).resolve() == DEFAULT_CONFIG.resolve():
        print(
            f"\n{DEFAULT_CONFIG.name} applies to the demo only: with --data.dataset <your data> (and no --config) "
            "the run takes the built-in defaults; `python train.py --help --data.dataset <your data>` lists them."
        )


def check_train_command_line(argv: list[str]) -> None:
    """``--help`` and settings errors of this command line (:func:`hlss_hf.cli.check_command_line`)."""
    check_command_line(
        argv,
        lambda args: parse_config(args, default_config=default_config_for(args)),
        lambda: print_help(argv),
    )


if __name__ == "__main__":
    check_train_command_line(sys.argv[1:])  # before torch and the model code load

import torch

from hlss_hf.data import build_train_loader
from hlss_hf.data import stream_batches as _stream_batches
from hlss_hf.errors import CheckpointError, NonFiniteLossError
from hlss_hf.evaluation import (
    class_text_embeddings,
    distributed_evaluate,
    hierarchical_confusion_matrices,
    hierarchical_metrics,
    knn_scores,
    zero_shot_probabilities,
)
from hlss_hf.explain import class_attribute_summary
from hlss_hf.files import write_files_atomically
from hlss_hf.model_card import push_to_hub, render_model_card
from hlss_hf.training.building import (
    CaptionTable,
    build_caption_table,
    build_image_processor,
    build_model,
    build_processor,
    build_tokenizer,
    class_prompts_for,
    dataset_scale,
    load_splits,
    resolve_attributes,
    resolve_tower,
)
from hlss_hf.training.checkpoints import (
    RESUMABLE_KEYS,
    JsonlWriter,
    TrainState,
    check_checkpoint,
    describe_changes,
    flatten,
    holds_output_dir,
    last_good_checkpoint,
    load_checkpoint,
    plan_output,
    publish_output,
    record_next_step,
    resolve_resume_path,
    resume_changes,
    save_checkpoint,
    set_aside_later_checkpoints,
    start_output,
    truncate_jsonl,
)
from hlss_hf.training.loop import all_finite, weights_finite
from hlss_hf.training.optim import make_accelerator, scheduler_steps, set_peak_lr
from hlss_hf.training.run_warnings import (
    RunWarning,
    WarningLog,
    evaluation_warnings,
    informative_metrics,
    training_warnings,
)

logger = logging.getLogger("hlss_hf.train")

LOSS_KEYS = ("loss", "hvc_loss", "alignment_loss", "image_text_loss")
LEVELS = ("patch", "slide", "patient")
OBJECTIVE_NAMES = {"hlss": "HLSS training", "align": "image-text alignment (the stage before HLSS)"}
#: Softmax temperature of the zero-shot class scores (CLIP's logit scale of 100), as `evaluate zeroshot`'s default.
ZERO_SHOT_TEMPERATURE = 0.01
#: Attributes listed per class and level in the run's explanation (`evaluate explain` lists more).
TOP_ATTRIBUTES = 3
#: The output folder's subfolder of PNG plots (loss curve, kNN confusion matrices).
PLOTS_DIR = "plots"


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


def optimizer_groups(model, t) -> list[dict]:
    """AdamW parameter groups: biases and norm weights exempt from decay unless ``training.weight_decay_all``."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            exempt = not t.weight_decay_all and (param.ndim < 2 or "norm" in name.lower())
            (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def reference_steps_per_epoch(num_patients: int, batch_size: int, num_processes: int) -> int:
    """Optimizer steps per epoch that the HLSS reference's LR schedule counts: ``floor(ceil(N / B) / W)``.

    The reference sizes its scheduler from the single-process loader's length (``ceil(N / B)`` batches of ``B``
    patients, the last one short), floor-divided by the number of GPUs ``W``, while each of its DDP processes runs
    ``ceil(N / (B W))`` steps per epoch; on several processes its LR therefore moves faster than its epochs
    (``training.schedule_length: reference``).

    Args:
        num_patients (`int`): N, the training patients per epoch (after class balancing).
        batch_size (`int`): B, patients per device batch.
        num_processes (`int`): W.

    Raises:
        ConfigError: when the formula gives 0 (``N <= B (W - 1)``): the reference's schedule then has length 0.
    """
    steps = math.ceil(num_patients / batch_size) // num_processes
    if steps == 0:
        # The reference runs such a schedule with max(1, 0) as its length: the LR alternates between the peak
        # and 0 from one step to the next. Nothing worth reproducing.
        raise ConfigError(
            f"config key 'training.schedule_length': reference counts floor(ceil({num_patients} / {batch_size}) / "
            f"{num_processes}) = 0 steps per epoch ({num_patients} training patients, {batch_size} per device, "
            f"{num_processes} processes), a schedule of length 0; it needs more than "
            f"{batch_size * (num_processes - 1)} patients, fewer processes, or training.schedule_length run"
        )
    return steps


def schedule_length(
    t, max_steps: int, steps_per_epoch: int | None, reference_steps: int | None = None
) -> int:
    """Optimizer steps the LR schedule spans: ``training.schedule_steps`` / ``schedule_epochs``, else the run.

    A schedule longer than the run stops part-way along its curve, as the reference's 40,000-epoch cosine
    stopped at epoch 11,199. With ``reference_steps`` (``training.schedule_length: reference``,
    :func:`reference_steps_per_epoch`) the schedule spans ``schedule_epochs`` (else ``num_epochs``) epochs of
    that many steps, whatever the run takes per epoch.
    """
    if reference_steps is not None:
        epochs = t.schedule_epochs if t.schedule_epochs is not None else t.num_epochs
        length = math.ceil(epochs * reference_steps)
        if length < max_steps:
            raise ConfigError(
                f"config key 'training.schedule_length': reference counts {reference_steps} steps per epoch, "
                f"so the schedule ({length} steps over {epochs:g} epochs) ends before the run ({max_steps} "
                "steps); set training.schedule_epochs longer"
            )
        return length
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


def warmup_length(t, schedule_steps: int, reference_steps: int | None = None) -> int:
    """Warm-up steps: ``training.warmup_ratio`` of the schedule, rounded; with ``reference_steps`` the reference's
    ``int(warmup_ratio * epochs * steps_per_epoch)`` (truncated, multiplied in that order)."""
    if reference_steps is not None:
        epochs = t.schedule_epochs if t.schedule_epochs is not None else t.num_epochs
        return int(t.warmup_ratio * epochs * reference_steps)
    return int(round(t.warmup_ratio * schedule_steps))


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


def make_init_model(config: TrainConfig) -> None:
    """Make ``model.init_from`` by running ``model.init_config`` when that folder does not exist yet (the demo's
    image-text alignment, made on its first run and reused afterwards).

    An existing folder is used as it is, unless it was made with other settings than ``model.init_config``: then the
    run stops naming them (the folder is never replaced by a run that did not make it).
    """
    m = config.model
    if m.init_from is None or m.init_config is None:
        return
    init_config = m.init_config
    if not Path(init_config).is_file() and (REPO_ROOT / init_config).is_file():
        init_config = str(REPO_ROOT / init_config)  # a config of this checkout, run from elsewhere
    init_args = ["--config", init_config, "--training.output_dir", m.init_from]
    wanted = parse_config(init_args)
    folder = Path(m.init_from)
    if folder.exists():
        made = folder / "train_config.yaml"
        if not made.is_file():
            raise ConfigError(
                f"config key 'model.init_from': {folder} exists but holds no train_config.yaml, so it was not made "
                f"by {m.init_config}; set model.init_config null to start from it as it is, or choose another folder"
            )
        saved = yaml.safe_load(made.read_text(encoding="utf-8"))
        applied, refused = resume_changes(saved, wanted.to_dict())
        # The same folder may be named another way; keys newer than the folder keep their defaults.
        known = set(flatten(saved)) - {"training.output_dir"}
        changed = {key: values for key, values in {**applied, **refused}.items() if key in known}
        if changed:
            raise ConfigError(
                f"config key 'model.init_from': {folder} was made with other settings than {m.init_config} "
                f"({describe_changes(changed)}); delete that folder to make it again, or choose another folder"
            )
        return
    # This run's own data mistakes (a missing folder or split, an unknown Hub repo, no id columns) are named before
    # the first stage takes its time (the run reads a dataset again from its cache, and builds the demo again).
    load_splits(config)
    print(f"Making {folder} first, with {m.init_config} (the model this run starts from)", flush=True)
    main(init_args)
    print(f"Made {folder}; now the run of this config", flush=True)


@dataclasses.dataclass
class Run:
    """What the stages of :func:`main` share: the settings, the accelerator, the data, the prepared model and its
    optimizer and schedule, and the counters."""

    config: TrainConfig
    argv: list[str]
    accelerator: Any
    run_dir: Path
    train_ds: Any = None
    val_ds: Any = None
    modality: str = "he"
    train_dataset: Any = None
    train_loader: Any = None
    model: Any = None
    optimizer: Any = None
    scheduler: Any = None
    processor: Any = None
    image_processor: Any = None
    guard: TextTowerGuard = dataclasses.field(default_factory=TextTowerGuard)
    # objective align: every training caption's text embedding, computed once (the text tower is frozen).
    captions: CaptionTable | None = None
    # model.class_prompts: one text embedding per class, for the zero-shot evaluation.
    class_embeds: torch.Tensor | None = None
    max_steps: int = 0
    batches_per_epoch: int | None = None
    # The loader's batch sampler when one iteration may run across epochs (train_loop), else None.
    train_sampler: Any = None
    schedule_steps: int = 0
    warmup_steps: int = 0
    # Steps per epoch the schedule counts with training.schedule_length reference, else None.
    reference_steps: int | None = None
    state: TrainState = dataclasses.field(default_factory=TrainState)
    metrics_file: JsonlWriter | None = None
    # Named warnings (hlss_hf.run_warnings), printed once, logged to metrics.jsonl and written into the card.
    warnings: WarningLog | None = None

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def log(self, record: dict[str, Any], tracker_prefix: str = "") -> None:
        """One line of ``metrics.jsonl`` (main process) and the trackers (numbers only)."""
        if self.metrics_file is not None:
            self.metrics_file.write({"step": self.state.step, **record})
        numbers = {tracker_prefix + k: v for k, v in record.items() if isinstance(v, int | float)}
        self.accelerator.log(numbers, step=self.state.step)

    def warn(self, warnings: list[RunWarning]) -> None:
        """Print each new named warning once (main process) and log it to ``metrics.jsonl``."""
        for warning in self.warnings.add(warnings):
            self.log({"warning": warning.name, "message": warning.message})


def load_data(run: Run) -> None:
    """The splits and the hierarchical loader (the main process first: it builds / downloads, the others read its
    cache)."""
    from hlss_hf.schema import modality_of

    with run.accelerator.main_process_first():
        run.train_ds, run.val_ds = load_splits(run.config)
        run.modality = modality_of(run.train_ds.features)
        run.train_dataset, run.train_loader = build_train_loader(
            run.config, run.train_ds, run.accelerator.num_processes, run.accelerator.device
        )


def build_training(run: Run) -> None:
    """Model (towers, banks, heads), processors, optimizer and LR schedule, prepared by Accelerate."""
    from transformers import get_scheduler

    config, accelerator = run.config, run.accelerator
    t, d = config.training, config.data
    text = resolve_tower(config.model.text, config.model.text_fallback, "text")
    tokenizer = build_tokenizer(config, text, resolve_attributes(config.model.attributes))
    class_names = run.train_ds.features["label"].names
    model = build_model(
        config,
        run.modality,
        tokenizer,
        dataset_scale(run.train_ds) if not d.streaming else {},
        class_names=class_names,
    )
    run.image_processor = build_image_processor(config, run.modality)
    run.processor = build_processor(run.image_processor, tokenizer)
    # Text embeddings the run needs, computed once before Accelerate wraps (and may shard) the model.
    model.to(accelerator.device)
    if config.model.objective == "align":
        run.captions = build_caption_table(
            model, tokenizer, run.train_ds, d.text_column, progress=accelerator.is_local_main_process
        )
    prompts = class_prompts_for(config, class_names)
    if prompts is not None:
        run.class_embeds = class_text_embeddings(model, tokenizer, prompts, class_names)
    model.text_model.register_forward_pre_hook(run.guard)
    optimizer = torch.optim.AdamW(
        optimizer_groups(model, t), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon
    )
    W = accelerator.num_processes
    steps_per_epoch = None
    if d.streaming:
        run.max_steps = t.max_steps
    else:
        # Per-process batches per epoch after sharding (the batch sampler deals every process as many).
        run.batches_per_epoch = len(run.train_loader) // W
        steps_per_epoch = math.ceil(run.batches_per_epoch / t.gradient_accumulation_steps)
        if run.batches_per_epoch % t.gradient_accumulation_steps == 0:
            # Epochs of whole accumulation groups: one loader iteration can run across epochs with the batches,
            # shards and gradient syncs of per-epoch iterations (EpochBatchSampler), and the workers then build
            # the next epoch's first batches while the last ones train (benchmarks/README.md, "Training input end
            # to end"). Otherwise an epoch's last, short group syncs at the end of its iteration: per-epoch loops.
            run.train_sampler = run.train_loader.batch_sampler
        run.max_steps = t.max_steps if t.max_steps is not None else math.ceil(t.num_epochs * steps_per_epoch)
    if t.schedule_length == "reference":
        run.reference_steps = reference_steps_per_epoch(len(run.train_dataset), t.per_device_batch_size, W)
    run.schedule_steps = schedule_length(t, run.max_steps, steps_per_epoch, run.reference_steps)
    run.warmup_steps = warmup_length(t, run.schedule_steps, run.reference_steps)
    scheduler = get_scheduler(
        t.lr_scheduler,
        optimizer,
        num_warmup_steps=scheduler_steps(accelerator, run.warmup_steps),
        num_training_steps=scheduler_steps(accelerator, run.schedule_steps),
    )
    if d.streaming:
        # The streaming dataset shards patients over processes itself: accelerate must not shard it again.
        run.model, run.optimizer, run.scheduler = accelerator.prepare(model, optimizer, scheduler)
    else:
        run.model, run.optimizer, run.train_loader, run.scheduler = accelerator.prepare(
            model, optimizer, run.train_loader, scheduler
        )
    run.state = TrainState(num_processes=W)


def resume(run: Run, path: Path, changed: dict) -> None:
    """Weights, optimizer, scheduler and RNG from the checkpoint (counters from its JSON); the settings that
    changed (already checked by :func:`plan_run`) are applied."""
    t = run.config.training
    run.accelerator.print(f"Resuming from {path}")
    run.state, _ = load_checkpoint(run.accelerator, path)
    if run.state.step > run.max_steps:
        raise ConfigError(
            f"config key 'training.max_steps': the run ends at step {run.max_steps}, and checkpoint {path} is at "
            f"step {run.state.step}; raise training.max_steps / num_epochs to train further"
        )
    if run.batches_per_epoch is not None:
        # The counters must describe one position of this run's batches: an edited file would shift them.
        state, per_epoch = run.state, math.ceil(run.batches_per_epoch / t.gradient_accumulation_steps)
        expected = state.epoch * per_epoch + math.ceil(state.batch_in_epoch / t.gradient_accumulation_steps)
        if state.batch_in_epoch > run.batches_per_epoch or expected != state.step:
            raise CheckpointError(
                f"checkpoint {path}: train_state.json says step {state.step}, epoch {state.epoch}, batch_in_epoch "
                f"{state.batch_in_epoch}, which is no position of this run ({run.batches_per_epoch} batches per "
                "epoch); the file was edited or belongs to another run"
            )
    if run.state.step == run.max_steps:
        # Killed in its final evaluation or save: the run resumes into them, with nothing left to train.
        run.accelerator.print(f"Checkpoint {path} is at the run's last step: finishing (evaluation and save)")
    if "training.lr" in changed:
        set_peak_lr(run.optimizer, run.scheduler, t.lr)
    if changed:
        run.accelerator.print(
            f"Changed on resume (applied from step {run.state.step + 1}): {describe_changes(changed)}"
        )
    if run.batches_per_epoch is not None and run.state.batch_in_epoch >= run.batches_per_epoch:
        run.state.epoch, run.state.batch_in_epoch = run.state.epoch + 1, 0


def open_run(run: Run, out: Path, resumed: bool, changed: dict) -> None:
    """The settings, data and model are valid: only now does the run touch its folder. Prints what will run."""
    config, accelerator, state = run.config, run.accelerator, run.state
    t, d = config.training, config.data
    if accelerator.is_main_process:
        start_output(run.run_dir, out, resume=resumed)
        if resumed:
            truncate_jsonl(
                run.run_dir / "metrics.jsonl", state.step, evaluations_at_max_step=state.step < run.max_steps
            )
            for path in set_aside_later_checkpoints(run.run_dir, state.step):
                print(
                    f"Set aside {path.name}: it follows step {state.step}, which this run continues from",
                    flush=True,
                )
        run.metrics_file = JsonlWriter(run.run_dir / "metrics.jsonl")
    accelerator.wait_for_everyone()
    if t.trackers():
        accelerator.init_trackers(t.project_name, config=flatten_config(config))
    if changed:
        run.log({"resumed_with": {key: list(values) for key, values in changed.items()}})
    S, P, V, B, GA = (
        d.num_slides,
        d.num_patches,
        d.num_views,
        t.per_device_batch_size,
        t.gradient_accumulation_steps,
    )
    W = accelerator.num_processes
    schedule = f", schedule over {run.schedule_steps} steps" if run.schedule_steps != run.max_steps else ""
    if run.reference_steps is not None:
        schedule += f" at the reference's {run.reference_steps} per epoch"
    epochs = f" | {run.batches_per_epoch} batches per process per epoch" if run.batches_per_epoch else ""
    accelerator.print(
        "\n".join(
            [
                f"***** Running {OBJECTIVE_NAMES[config.model.objective]} *****",
                f"  device: {accelerator.device} | processes: {W} | distributed: {accelerator.distributed_type}"
                f" | mixed precision: {accelerator.mixed_precision}",
                f"  data: {d.dataset} ({run.modality}) | train patients: "
                f"{len(run.train_dataset) if not d.streaming else 'streaming'} | validation patches: "
                f"{len(run.val_ds) if run.val_ds is not None else 0}",
                f"  per-device batch [B={B}, S={S}, P={P}, V={V}, C=3, H={d.crop_size}, W={d.crop_size}] = "
                f"{B * S * P * V} images",
                f"  global batch: {B} x {W} processes x {GA} accumulation = {B * W * GA} patients = "
                f"{B * S * P * V * W * GA} images per optimizer step",
                f"  optimizer steps: {run.max_steps} (warm-up {run.warmup_steps}, {t.lr_scheduler}, lr {t.lr}"
                f"{schedule}){epochs}" + (f" | starting at step {state.step}" if state.step else ""),
                f"  output: {out}"
                + (f" (written to {run.run_dir} until the run has finished)" if run.run_dir != out else ""),
            ]
        ),
        flush=True,
    )
    steps_per_epoch = math.ceil(run.batches_per_epoch / GA) if run.batches_per_epoch else None
    # The loss contrasts the patients of one forward over every process (B x W); accumulation adds none.
    run.warn(
        training_warnings(B * W, S, run.max_steps, steps_per_epoch, run.warmup_steps, config.model.objective)
    )


def evaluate(run: Run, quiet: bool = False) -> dict[str, Any]:
    """Evaluate the frozen embeddings on the validation split: kNN accuracy (patch / slide / patient), zero-shot
    accuracy with the class descriptions (``model.class_prompts``) and each class's top attributes. Every process
    takes part (sharded models need all ranks); the training RNG does not move.

    Returns:
        `dict`: ``metrics`` (``eval/<level>/<metric>`` for kNN, ``eval/zeroshot/<level>/<metric>``) and
        ``top_attributes`` (class -> its :data:`TOP_ATTRIBUTES` top patient-level attributes: a class is what a
        patient has; ``python -m hlss_hf.evaluate explain`` lists every level).
    """
    t = run.config.training
    banks_model = run.unwrapped  # the banks are buffers, whole on every process whatever the sharding

    def report(train, val) -> dict[str, Any]:
        # k beyond the bank is clamped here and named once (k_exceeds_bank) rather than warned at every evaluation.
        k = min(t.knn_k, len(train))
        scores = knn_scores(train, val, k=k, temperature=t.knn_temperature)
        groups = (val.labels, val.slide_ids, val.patient_ids, val.num_classes)
        metrics = hierarchical_metrics(scores, *groups, aggregation=t.knn_aggregation)
        confusion = hierarchical_confusion_matrices(scores, *groups, aggregation=t.knn_aggregation)
        warnings = evaluation_warnings(train.labels.tolist(), val.labels.tolist(), val.class_names, k=t.knn_k)
        metrics = informative_metrics(metrics, val.num_classes)  # top-k over too few classes is always 1
        metrics = {f"eval/{key}": float(value) for key, value in metrics.items()}
        if run.class_embeds is not None:
            scores = zero_shot_probabilities(val.embeddings, run.class_embeds, ZERO_SHOT_TEMPERATURE)
            zero_shot = hierarchical_metrics(
                scores, val.labels, val.slide_ids, val.patient_ids, val.num_classes, aggregation="sum"
            )
            zero_shot = informative_metrics(zero_shot, val.num_classes)
            metrics.update({f"eval/zeroshot/{key}": float(value) for key, value in zero_shot.items()})
        # The attributes whose descriptions each class's image embeddings are nearer to than images in general (the
        # fixed banks: what the text says, whatever the heads have learnt).
        summary = class_attribute_summary(banks_model, val, k=TOP_ATTRIBUTES, use_heads=False)
        top = {
            name: [item["attribute"] for item in items]
            for name, items in summary["levels"]["patient"]["top"].items()
        }
        return {
            "metrics": metrics,
            "top_attributes": top,
            "warnings": [w.to_dict() for w in warnings],
            "confusion": {level: matrix.tolist() for level, matrix in confusion.items()},
            "class_names": list(val.class_names),
        }

    result = distributed_evaluate(
        run.accelerator,
        run.model,
        run.train_ds,
        run.val_ds,
        report,
        run.image_processor,
        batch_size=t.eval_batch_size,
        progress=True,  # a bar on the main process: embedding a large split takes a while
    )
    run.log(result["metrics"])
    run.warn([RunWarning(**w) for w in result.get("warnings", [])])
    if not quiet:
        run.accelerator.print(f"step {run.state.step}: " + format_evaluation(result, t))
    return result


def train_loop(run: Run, resume_path: Path | None) -> bool:
    """Optimizer steps until ``max_steps`` (or ``max_steps_this_run``: then a checkpoint and ``True``)."""
    from tqdm.auto import tqdm

    config, accelerator, state, model = run.config, run.accelerator, run.state, run.model
    t, d = config.training, config.data
    GA = t.gradient_accumulation_steps
    images_per_step = (
        t.per_device_batch_size * d.num_slides * d.num_patches * d.num_views * accelerator.num_processes * GA
    )
    run_limit = state.step + t.max_steps_this_run if t.max_steps_this_run else None
    progress = tqdm(
        total=run.max_steps,
        initial=state.step,
        disable=not accelerator.is_local_main_process,
        desc="align" if config.model.objective == "align" else "HLSS",
        unit="step",
    )
    unchecked = resume_path  # the newest checkpoint whose next step has not run yet
    sums: dict[str, float] = {}
    micro, tic = 0, time.perf_counter()
    model.train()
    while state.step < run.max_steps:
        if d.streaming:
            loader = _stream_batches(run.train_loader, run.train_dataset, state.step * GA, accelerator.device)
        else:
            run.train_loader.set_epoch(state.epoch)
            run.train_dataset.set_epoch(state.epoch)
            if run.train_sampler is not None:  # every epoch the run still needs, in one iteration
                left = state.batch_in_epoch + (run.max_steps - state.step) * GA
                run.train_sampler.num_epochs = max(1, math.ceil(left / run.batches_per_epoch))
            loader = run.train_loader
            if state.batch_in_epoch:
                loader = accelerator.skip_first_batches(run.train_loader, state.batch_in_epoch)
        for batch in loader:
            if run.batches_per_epoch is not None and state.batch_in_epoch >= run.batches_per_epoch:
                # The iteration ran into the next epoch.
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            with accelerator.accumulate(model):
                # objective align: each drawn patch's caption, from the table (no text forward in a step).
                text = {} if run.captions is None else {"text_embeds": run.captions.lookup(batch["rows"])}
                run.guard.active = True
                outputs = model(pixel_values=batch["pixel_values"], return_loss=True, **text)
                if not all_finite(outputs.loss, accelerator):  # every process stops together
                    run.guard.active = False
                    raise non_finite_error(outputs, state, run.run_dir, unchecked, accelerator)
                accelerator.backward(outputs.loss)
                if accelerator.sync_gradients and t.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                run.optimizer.step()
                run.scheduler.step()
                run.optimizer.zero_grad(set_to_none=True)
                run.guard.active = False
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
            if state.step % t.logging_steps == 0 or state.step == run.max_steps:
                record = {k: v / micro for k, v in sums.items()}
                record.update(
                    epoch=state.epoch,
                    lr=run.scheduler.get_last_lr()[0],
                    images_per_s=images_per_step * (micro / GA) / max(time.perf_counter() - tic, 1e-9),
                )
                run.log(record, tracker_prefix="train/")
                progress.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}", lr=f"{record['lr']:.2e}")
                sums, micro, tic = {}, 0, time.perf_counter()
            if (
                t.eval_steps
                and state.step % t.eval_steps == 0
                and run.val_ds is not None
                and state.step < run.max_steps
            ):
                evaluate(run)
                tic = time.perf_counter()
            stop_here = run_limit is not None and run_limit <= state.step < run.max_steps
            if (t.save_steps and state.step % t.save_steps == 0) or stop_here:
                unchecked = save_checkpoint(
                    accelerator,
                    run.run_dir,
                    state,
                    config.to_dict(),
                    keep=t.save_total_limit,
                    finite_weights=weights_finite(model, accelerator),
                )
                tic = time.perf_counter()
            if stop_here:
                progress.close()
                return True
            if state.step >= run.max_steps:
                break
        else:
            state.epoch += 1
            state.batch_in_epoch = 0
            continue
        if run.batches_per_epoch is not None and state.batch_in_epoch >= run.batches_per_epoch:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    progress.close()
    return False


def finish(run: Run, out: Path, initial_eval: dict[str, Any], seconds: float) -> dict[str, float]:
    """Evaluate, save beside, swap into ``output_dir``, push."""
    config, accelerator = run.config, run.accelerator
    t = config.training
    result = evaluate(run, quiet=True) if t.eval_at_end and run.val_ds is not None else {}
    metrics = result.get("metrics", {})
    # Every process takes part: with FSDP / DeepSpeed the full weights exist only once gathered.
    state_dict = accelerator.get_state_dict(run.model)
    if accelerator.is_main_process:
        card_context = {
            "model": run.unwrapped,
            "train_dataset": run.train_dataset,
            "modality": run.modality,
            "num_processes": accelerator.num_processes,
            "device": accelerator.device,
            "seconds": seconds,
            "argv": run.argv,
            "mixed_precision": accelerator.mixed_precision,
            "top_attributes": result.get("top_attributes"),
            "warnings": run.warnings.to_list(),
            "initial_metrics": initial_eval.get("metrics") if initial_eval else None,
            "confusion": result.get("confusion"),
            "class_names": result.get("class_names"),
        }
        save_final_model(run, state_dict, metrics, card_context)
        run.metrics_file.close()
        publish_output(run.run_dir, out)
        if result:
            print(format_evaluation(result, t), flush=True)
        if result and initial_eval:
            print(format_change(initial_eval, result, config), flush=True)
        if t.push_to_hub:
            print(f"Pushed to {push_to_hub(config)}", flush=True)
        print(format_outputs(out, config, accelerator), flush=True)
    accelerator.wait_for_everyone()
    return metrics


def output_dir_of(argv: list[str]) -> str:
    """The output folder a command line's run writes (what its lock guards)."""
    return parse_config(argv, default_config=default_config_for(argv)).training.output_dir


@holds_output_dir(output_dir_of)
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run HLSS pretraining (or the image-text alignment before it, ``model.objective: align``).

    Args:
        argv (`list[str]`, *optional*): Command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        `dict`: ``{"step", "epoch", "output_dir", "run_dir", "metrics", "stopped_early"}`` (for tests and
        notebooks).
    """
    from accelerate.utils import set_seed

    # 1. Settings: the config, where the run writes, what it resumes (before anything heavy happens).
    argv = sys.argv[1:] if argv is None else list(argv)
    default_config = default_config_for(argv)
    config = parse_config(argv, default_config=default_config)
    own_data = default_config is None and not names_config_file(argv)
    if own_data and os.environ.get("RANK", "0") == "0":  # once, not once per process
        print(
            f"Settings: the built-in defaults for your own data ({DEFAULT_CONFIG.name} is the demo's; "
            "configs/wsi.yaml is a starter for your own slides): `python train.py --help --data.dataset "
            f"{config.data.dataset}` lists them",
            flush=True,
        )
    t = config.training
    run_dir, resume_path, changed = plan_run(config)
    make_init_model(config)
    out = Path(t.output_dir)

    # 2. Accelerator, logging, seed.
    accelerator = make_accelerator(t, project_dir=run_dir)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("hlss_hf").setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)
    set_seed(t.seed)
    run = Run(config=config, argv=argv, accelerator=accelerator, run_dir=run_dir)
    run.warnings = WarningLog(printer=lambda text: accelerator.print(text, flush=True))

    # 3. Data; 4. model, optimizer, schedule; 5. resume. Nothing is written before this has all worked.
    load_data(run)
    build_training(run)
    if resume_path is not None:
        resume(run, resume_path, changed)
    # Continuing in the checkpoint's own folder (not a new run started from a checkpoint kept elsewhere).
    continuing = resume_path is not None and run_dir.absolute() in Path(resume_path).absolute().parents
    open_run(run, out, resumed=continuing, changed=changed)

    # 6. Train, after a kNN baseline of the untrained model when asked for.
    initial_eval: dict[str, Any] = {}
    if t.eval_before_training and t.eval_at_end and run.val_ds is not None and run.state.step == 0:
        accelerator.print(f"Evaluation before training (the same model, {starting_point(config)}):")
        initial_eval = evaluate(run, quiet=True)
        accelerator.print(format_evaluation(initial_eval, t))
    start = time.perf_counter()
    stopped_early = train_loop(run, resume_path)

    # 7. Finish: evaluate, save beside, swap in, push.
    metrics: dict[str, float] = {}
    if stopped_early:
        accelerator.print(
            f"Stopped after step {run.state.step} (training.max_steps_this_run); continue with "
            "--resume_from_checkpoint latest"
        )
    else:
        metrics = finish(run, out, initial_eval, time.perf_counter() - start)
    if run.metrics_file is not None:
        run.metrics_file.close()
    accelerator.end_training()
    return {
        "step": run.state.step,
        "epoch": run.state.epoch,
        "output_dir": str(out),
        "run_dir": str(run_dir),
        "metrics": metrics,
        "stopped_early": stopped_early,
        "text_tower_calls_during_training": run.guard.calls,
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


def save_final_model(run: Run, state_dict: dict, metrics: dict[str, float], card_context: dict) -> None:
    """Model, processor, pipelines, card and settings, written beside and moved into the run's folder (main
    process)."""
    from hlss_hf.pipeline_hlss import add_pipelines_to_folder

    unwrapped = run.unwrapped
    index = getattr(run.train_dataset, "index", None)
    if index is not None:  # the class names travel with the model (fine-tuning, AutoPeftModel)
        unwrapped.config.id2label = dict(enumerate(index.class_names))
        unwrapped.config.label2id = {name: i for i, name in enumerate(index.class_names)}

    def write(folder: Path) -> None:
        from hlss_hf.explain import plot_confusion_matrix, plot_loss_curve
        from hlss_hf.training.checkpoints import read_jsonl

        # Plots people look at: the losses over the run (this run's metrics.jsonl, a resumed run's earlier steps
        # included) and the final kNN confusion matrices.
        plot_loss_curve(read_jsonl(run.run_dir / "metrics.jsonl"), folder / PLOTS_DIR / "loss_curve.png")
        for level, matrix in (card_context.get("confusion") or {}).items():
            plot_confusion_matrix(
                torch.tensor(matrix),
                card_context["class_names"],
                folder / PLOTS_DIR / f"knn_confusion_{level}.png",
                title=f"kNN {level} ({run.config.data.validation_split}, step {run.state.step})",
            )
        unwrapped.save_pretrained(folder, state_dict=state_dict)
        run.processor.save_pretrained(folder)
        add_pipelines_to_folder(folder)  # the SRH-aware pipelines, also as remote code
        card = render_model_card(run.config, run.state, metrics, card_context)
        (folder / "README.md").write_text(card, encoding="utf-8")
        with open(folder / "train_config.yaml", "w", encoding="utf-8") as f:
            yaml.safe_dump(run.config.to_dict(), f, sort_keys=False)

    size = sum(t.numel() * t.element_size() for t in state_dict.values() if torch.is_tensor(t))
    write_files_atomically(run.run_dir, write, needed_bytes=size)


def format_outputs(out: Path, config: TrainConfig, accelerator) -> str:
    """The run's last lines: where the model, metrics, plots and tracker logs are."""
    t = config.training
    lines = [
        f"Saved to {out}:",
        f"  model:    {out} (AutoModel.from_pretrained; card README.md, settings train_config.yaml)",
        f"  metrics:  {out / 'metrics.jsonl'}",
    ]
    plots = sorted(path.name for path in (out / PLOTS_DIR).glob("*.png"))
    if plots:
        lines.append(f"  plots:    {out / PLOTS_DIR}/ ({', '.join(plots)})")
    trackers = t.trackers()
    if trackers:
        names = trackers if isinstance(trackers, list) else ["all"]
        where = out / t.project_name
        hint = f"; tensorboard --logdir {where}" if "tensorboard" in names or names == ["all"] else ""
        lines.append(f"  trackers: {', '.join(names)} in {where}{hint}")
    if (out / "checkpoints").is_dir():
        lines.append(f"  checkpoints: {out / 'checkpoints'} (--resume_from_checkpoint latest)")
    return "\n".join(lines)


def starting_point(config: TrainConfig) -> str:
    """What a run's model is before its first step, in words."""
    if config.model.init_from is not None:
        return f"towers from {config.model.init_from}"
    return "random-init vision tower"


def _level_metrics(metrics: dict[str, float], prefix: str, level: str) -> list[tuple[str, float]]:
    return sorted(
        (key[len(prefix) + len(level) + 1 :], value)
        for key, value in metrics.items()
        if key.startswith(f"{prefix}{level}/") and "/" not in key[len(prefix) + len(level) + 1 :]
    )


def format_evaluation(result: dict[str, Any], t) -> str:
    """kNN and zero-shot metrics, one line per level, and each class's top attributes."""
    metrics = result["metrics"]
    lines = [f"kNN evaluation (k={t.knn_k}, {t.knn_aggregation} aggregation) on the validation split:"]
    for level in LEVELS:
        items = _level_metrics(metrics, "eval/", level)
        if items:
            lines.append(f"  {level:<8}" + "  ".join(f"{name} {value:.4f}" for name, value in items))
    if any(key.startswith("eval/zeroshot/") for key in metrics):
        lines.append(
            "Zero-shot classification with the class descriptions (model.class_prompts, sum aggregation):"
        )
        for level in LEVELS:
            items = _level_metrics(metrics, "eval/zeroshot/", level)
            if items:
                lines.append(f"  {level:<8}" + "  ".join(f"{name} {value:.4f}" for name, value in items))
    lines.append(format_top_attributes(result["top_attributes"]))
    return "\n".join(lines)


def format_top_attributes(top: dict[str, list[str]]) -> str:
    """Each class's top patient-level attributes (hlss_hf.explain.class_attribute_summary on the validation split)."""
    lines = [
        f"Top {TOP_ATTRIBUTES} patient-level attributes per class (descriptions its patches are nearer to than patches "
        "in general, through the fixed banks):"
    ]
    lines.extend(f"  {name:<12} {', '.join(attributes)}" for name, attributes in top.items())
    return "\n".join(lines)


def format_change(before: dict[str, Any], after: dict[str, Any], config: TrainConfig) -> str:
    """Accuracy per level (kNN, zero-shot) before training and after, side by side."""
    lines = [f"The same model before training ({starting_point(config)}) -> after training:"]
    for prefix, name in (("eval/", "kNN acc"), ("eval/zeroshot/", "zero-shot acc")):
        for level in LEVELS:
            key = f"{prefix}{level}/acc"
            if key in before["metrics"] and key in after["metrics"]:
                old, new = before["metrics"][key], after["metrics"][key]
                lines.append(f"  {name:<14} {level:<8} {old:.4f} -> {new:.4f} ({new - old:+.4f})")
    return "\n".join(lines)


def cli() -> None:
    """Entry point: ``--help`` lists every config key. Errors a user can fix (config, a missing dataset folder or Hub
    repo, a non-finite loss, file system, Hub) print one line ``error: ...`` and exit with status 1, leaving no
    empty output folder behind; ``--debug`` or ``HLSS_DEBUG=1`` shows the traceback instead."""
    from hlss_hf.cli import debug_requested, exit_on_error
    from hlss_hf.files import remove_new_empty_folder

    argv = sys.argv[1:]
    check_train_command_line(argv)
    debug = "--debug" in argv or debug_requested()
    argv = [arg for arg in argv if arg != "--debug"]
    with exit_on_error(debug, user_errors=(ConfigError, CheckpointError, NonFiniteLossError)):
        output_dir = parse_config(argv, default_config=default_config_for(argv)).training.output_dir
        cleanup = remove_new_empty_folder(output_dir)
        try:
            main(argv)
        except BaseException:
            cleanup()
            raise


if __name__ == "__main__":
    cli()
