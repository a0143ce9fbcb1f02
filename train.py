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

docs/training.md tells what a run does and writes, how it resumes and fails, and how processes split the batches.
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
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from hlss_hf.data import build_train_loader
from hlss_hf.errors import CheckpointError, NonFiniteLossError
from hlss_hf.evaluation import (
    class_text_embeddings,
    distributed_evaluate,
    hierarchical_confusion_matrices,
    hierarchical_metrics,
    knn_scores,
    zero_shot_probabilities,
)
from hlss_hf.explain import class_attribute_summary, plot_confusion_matrix, plot_loss_curve
from hlss_hf.files import remove_new_empty_folder, write_files_atomically
from hlss_hf.model_card import push_to_hub, render_model_card
from hlss_hf.pipeline_hlss import add_pipelines_to_folder
from hlss_hf.schema import modality_of
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
    make_init_model,
    resolve_attributes,
    resolve_tower,
)
from hlss_hf.training.checkpoints import (
    RunPlan,
    TrainState,
    describe_changes,
    holds_output_dir,
    load_checkpoint,
    plan_run,
    publish_output,
    record_next_step,
    save_checkpoint,
    set_aside_later_checkpoints,
    start_output,
)
from hlss_hf.training.loop import (
    RunLog,
    TextTowerGuard,
    batches,
    end_epoch_if_done,
    loss_parts,
    non_finite_error,
    optimizer_steps,
    read_jsonl,
    truncate_jsonl,
    weights_finite,
)
from hlss_hf.training.optim import (
    Schedule,
    lr_scheduler,
    make_accelerator,
    optimizer_groups,
    plan_schedule,
    set_peak_lr,
)
from hlss_hf.training.report import (
    PLOTS_DIR,
    TOP_ATTRIBUTES,
    describe_run,
    format_change,
    format_evaluation,
    format_outputs,
    starting_point,
)
from hlss_hf.training.run_warnings import (
    RunWarning,
    evaluation_warnings,
    informative_metrics,
    training_warnings,
)

logger = logging.getLogger("hlss_hf.train")

#: Softmax temperature of the zero-shot class scores (CLIP's logit scale of 100), as `evaluate zeroshot`'s default.
ZERO_SHOT_TEMPERATURE = 0.01


@dataclasses.dataclass(frozen=True)
class TrainData:
    """The splits and the training loader (not yet prepared)."""

    train_ds: Any
    val_ds: Any
    modality: str
    train_dataset: Any  # the hierarchical dataset of patients the loader draws from
    loader: Any


@dataclasses.dataclass(frozen=True)
class TrainParts:
    """The prepared model, optimizer, schedule and loader, and the text embeddings computed once before them."""

    model: Any
    optimizer: Any
    scheduler: Any
    loader: Any
    schedule: Schedule
    processor: Any
    image_processor: Any
    guard: TextTowerGuard
    # objective align: every training caption's text embedding (the text tower is frozen).
    captions: CaptionTable | None = None
    # model.class_prompts: one text embedding per class, for the zero-shot evaluation.
    class_embeds: torch.Tensor | None = None


def load_data(config: TrainConfig, accelerator) -> TrainData:
    """The splits and the hierarchical loader (the main process first: it builds / downloads, the others read its
    cache)."""
    with accelerator.main_process_first():
        train_ds, val_ds = load_splits(config)
        dataset, loader = build_train_loader(config, train_ds, accelerator.num_processes, accelerator.device)
    return TrainData(train_ds, val_ds, modality_of(train_ds.features), dataset, loader)


def build_training(config: TrainConfig, data: TrainData, accelerator) -> TrainParts:
    """Model (towers, banks, heads), processors, optimizer and LR schedule, prepared by Accelerate."""
    t, d = config.training, config.data
    text = resolve_tower(config.model.text, config.model.text_fallback, "text")
    tokenizer = build_tokenizer(config, text, resolve_attributes(config.model.attributes))
    class_names = data.train_ds.features["label"].names
    scale = dataset_scale(data.train_ds) if not d.streaming else {}
    model = build_model(config, data.modality, tokenizer, scale, class_names=class_names)
    image_processor = build_image_processor(config, data.modality)
    # Text embeddings the run needs, computed once before Accelerate wraps (and may shard) the model.
    model.to(accelerator.device)
    captions = class_embeds = None
    if config.model.objective == "align":
        progress = accelerator.is_local_main_process
        captions = build_caption_table(model, tokenizer, data.train_ds, d.text_column, progress=progress)
    prompts = class_prompts_for(config, class_names)
    if prompts is not None:
        class_embeds = class_text_embeddings(model, tokenizer, prompts, class_names)
    guard = TextTowerGuard()
    model.text_model.register_forward_pre_hook(guard)
    optimizer = torch.optim.AdamW(
        optimizer_groups(model, t), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon
    )
    patients = len(data.train_dataset) if t.schedule_length == "reference" else None
    schedule = plan_schedule(t, data.loader, patients, accelerator.num_processes, d.streaming)
    scheduler = lr_scheduler(t, optimizer, accelerator, schedule.steps, schedule.warmup)
    loader = data.loader
    if d.streaming:
        # The streaming dataset shards patients over processes itself: accelerate must not shard it again.
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    else:
        model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    processor = build_processor(image_processor, tokenizer)
    return TrainParts(
        model,
        optimizer,
        scheduler,
        loader,
        schedule,
        processor,
        image_processor,
        guard,
        captions,
        class_embeds,
    )


def resume(config: TrainConfig, plan: RunPlan, parts: TrainParts, accelerator) -> TrainState:
    """Weights, optimizer, scheduler and RNG from the checkpoint, and its counters; the settings that changed
    (already checked by :func:`hlss_hf.training.checkpoints.plan_run`) are applied."""
    path, schedule, changed = plan.resume_path, parts.schedule, plan.changes
    accelerator.print(f"Resuming from {path}")
    state, _ = load_checkpoint(accelerator, path)
    if state.step > schedule.max_steps:
        raise ConfigError(
            f"config key 'training.max_steps': the run ends at step {schedule.max_steps}, and checkpoint {path} is "
            f"at step {state.step}; raise training.max_steps / num_epochs to train further"
        )
    if schedule.batches_per_epoch is not None:
        # The counters must describe one position of this run's batches: an edited file would shift them.
        GA = schedule.accumulation
        expected = state.epoch * schedule.steps_per_epoch + math.ceil(state.batch_in_epoch / GA)
        if state.batch_in_epoch > schedule.batches_per_epoch or expected != state.step:
            raise CheckpointError(
                f"checkpoint {path}: train_state.json says step {state.step}, epoch {state.epoch}, batch_in_epoch "
                f"{state.batch_in_epoch}, which is no position of this run ({schedule.batches_per_epoch} batches "
                "per epoch); the file was edited or belongs to another run"
            )
    if state.step == schedule.max_steps:
        # Killed in its final evaluation or save: the run resumes into them, with nothing left to train.
        accelerator.print(f"Checkpoint {path} is at the run's last step: finishing (evaluation and save)")
    if "training.lr" in changed:
        set_peak_lr(parts.optimizer, parts.scheduler, config.training.lr)
    if changed:
        accelerator.print(
            f"Changed on resume (applied from step {state.step + 1}): {describe_changes(changed)}"
        )
    end_epoch_if_done(state, schedule.batches_per_epoch)
    return state


def open_run(
    config: TrainConfig, plan: RunPlan, data: TrainData, parts: TrainParts, state: TrainState, accelerator
):
    """The settings, data and model are valid: only now does the run touch its folder. Prints what will run;
    returns the run's :class:`~hlss_hf.training.loop.RunLog`."""
    t, schedule = config.training, parts.schedule
    if accelerator.is_main_process:
        start_output(plan.run_dir, plan.output_dir, resume=plan.continuing)
        if plan.continuing:
            at_end = state.step < schedule.max_steps
            truncate_jsonl(plan.run_dir / "metrics.jsonl", state.step, evaluations_at_max_step=at_end)
            for path in set_aside_later_checkpoints(plan.run_dir, state.step):
                print(
                    f"Set aside {path.name}: it follows step {state.step}, which this run continues from",
                    flush=True,
                )
    log = RunLog(accelerator)
    log.open(plan.run_dir / "metrics.jsonl")
    accelerator.wait_for_everyone()
    if t.trackers():
        accelerator.init_trackers(t.project_name, config=flatten_config(config))
    if plan.changes:
        log.log(state.step, {"resumed_with": {key: list(values) for key, values in plan.changes.items()}})
    accelerator.print(
        describe_run(config, accelerator, data, schedule, state, plan.output_dir, plan.run_dir), flush=True
    )
    # The loss contrasts the patients of one forward over every process (B x W); accumulation adds none.
    patients = t.per_device_batch_size * accelerator.num_processes
    found = training_warnings(
        patients,
        config.data.num_slides,
        schedule.max_steps,
        schedule.steps_per_epoch,
        schedule.warmup,
        config.model.objective,
    )
    log.warn(state.step, found)
    return log


def evaluate(
    config: TrainConfig, data: TrainData, parts: TrainParts, accelerator, log: RunLog, step: int
) -> dict:
    """Evaluate the frozen embeddings on the validation split: kNN accuracy (patch / slide / patient), zero-shot
    accuracy with the class descriptions (``model.class_prompts``) and each class's top attributes. Every process
    takes part (sharded models need all ranks); the training RNG does not move.

    Returns:
        `dict`: ``metrics`` (``eval/<level>/<metric>`` for kNN, ``eval/zeroshot/<level>/<metric>``),
        ``top_attributes`` (class -> its top patient-level attributes), ``warnings``, ``confusion`` and
        ``class_names``.
    """
    t = config.training
    banks_model = accelerator.unwrap_model(parts.model)  # the banks are buffers, whole on every process

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
        if parts.class_embeds is not None:
            scores = zero_shot_probabilities(val.embeddings, parts.class_embeds, ZERO_SHOT_TEMPERATURE)
            zero_shot = hierarchical_metrics(scores, *groups, aggregation="sum")
            zero_shot = informative_metrics(zero_shot, val.num_classes)
            metrics.update({f"eval/zeroshot/{key}": float(value) for key, value in zero_shot.items()})
        # The attributes whose descriptions each class's image embeddings are nearer to than images in general (the
        # fixed banks: what the text says, whatever the heads have learnt).
        summary = class_attribute_summary(banks_model, val, k=TOP_ATTRIBUTES, use_heads=False)
        levels = summary["levels"]["patient"]["top"]
        return {
            "metrics": metrics,
            "top_attributes": {name: [item["attribute"] for item in items] for name, items in levels.items()},
            "warnings": [w.to_dict() for w in warnings],
            "confusion": {level: matrix.tolist() for level, matrix in confusion.items()},
            "class_names": list(val.class_names),
        }

    result = distributed_evaluate(
        accelerator,
        parts.model,
        data.train_ds,
        data.val_ds,
        report,
        parts.image_processor,
        batch_size=t.eval_batch_size,
        progress=True,  # a bar on the main process: embedding a large split takes a while
    )
    log.log(step, result["metrics"])
    log.warn(step, [RunWarning(**w) for w in result.get("warnings", [])])
    return result


def train(
    config, plan: RunPlan, data: TrainData, parts: TrainParts, state: TrainState, log: RunLog, accelerator
):
    """Optimizer steps until ``max_steps`` (or ``max_steps_this_run``: then a checkpoint and ``True``)."""
    t, d, schedule, model = config.training, config.data, parts.schedule, parts.model
    images_per_step = t.per_device_batch_size * d.num_slides * d.num_patches * d.num_views
    images_per_step *= accelerator.num_processes * schedule.accumulation
    run_limit = state.step + t.max_steps_this_run if t.max_steps_this_run else None
    name = "align" if config.model.objective == "align" else "HLSS"
    progress = tqdm(
        total=schedule.max_steps,
        initial=state.step,
        disable=not accelerator.is_local_main_process,
        desc=name,
        unit="step",
    )
    unchecked = plan.resume_path  # the newest checkpoint whose next step has not run yet

    def forward(batch):
        # objective align: each drawn patch's caption, from the table (no text forward in a step).
        text = {} if parts.captions is None else {"text_embeds": parts.captions.lookup(batch["rows"])}
        with parts.guard:
            outputs = model(pixel_values=batch["pixel_values"], return_loss=True, **text)
        return outputs.loss, outputs

    sums: dict[str, float] = {}
    micro, tic = 0, time.perf_counter()
    model.train()
    stopped = False
    if state.step < schedule.max_steps:
        steps = optimizer_steps(
            accelerator,
            model,
            parts.optimizer,
            parts.scheduler,
            batches(parts.loader, data.train_dataset, state, accelerator, schedule),
            forward,
            lambda loss, outputs: loss_parts(outputs, accelerator),
            max_grad_norm=t.max_grad_norm,
            non_finite=lambda outputs: non_finite_error(outputs, state, plan.run_dir, unchecked, accelerator),
        )
        for measures in steps:
            for parts_of_batch in measures:
                for key, value in parts_of_batch.items():
                    sums[key] = sums.get(key, 0.0) + value
            micro += len(measures)
            state.step += 1
            progress.update(1)
            if unchecked is not None and accelerator.is_main_process:
                record_next_step(unchecked, finite=True)
            unchecked = None
            if state.step % t.logging_steps == 0 or state.step == schedule.max_steps:
                record = {k: v / micro for k, v in sums.items()}
                record.update(
                    epoch=state.epoch,
                    lr=parts.scheduler.get_last_lr()[0],
                    images_per_s=images_per_step
                    * (micro / schedule.accumulation)
                    / max(time.perf_counter() - tic, 1e-9),
                )
                log.log(state.step, record, tracker_prefix="train/")
                progress.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}", lr=f"{record['lr']:.2e}")
                sums, micro, tic = {}, 0, time.perf_counter()
            evaluate_now = t.eval_steps and state.step % t.eval_steps == 0 and data.val_ds is not None
            if evaluate_now and state.step < schedule.max_steps:
                result = evaluate(config, data, parts, accelerator, log, state.step)
                accelerator.print(f"step {state.step}: " + format_evaluation(result, t))
                tic = time.perf_counter()
            stopped = run_limit is not None and run_limit <= state.step < schedule.max_steps
            if (t.save_steps and state.step % t.save_steps == 0) or stopped:
                finite = weights_finite(model, accelerator)
                unchecked = save_checkpoint(
                    accelerator,
                    plan.run_dir,
                    state,
                    config.to_dict(),
                    keep=t.save_total_limit,
                    finite_weights=finite,
                )
                tic = time.perf_counter()
            if stopped or state.step >= schedule.max_steps:
                break
    if not stopped:
        end_epoch_if_done(state, schedule.batches_per_epoch)
    progress.close()
    return stopped


def finish(
    config,
    plan: RunPlan,
    data: TrainData,
    parts: TrainParts,
    state: TrainState,
    log: RunLog,
    accelerator,
    *,
    argv: list[str],
    before: dict[str, Any],
    seconds: float,
) -> dict[str, float]:
    """Evaluate, save beside, swap into ``output_dir``, push."""
    t = config.training
    at_end = t.eval_at_end and data.val_ds is not None
    result = evaluate(config, data, parts, accelerator, log, state.step) if at_end else {}
    metrics = result.get("metrics", {})
    # Every process takes part: with FSDP / DeepSpeed the full weights exist only once gathered.
    state_dict = accelerator.get_state_dict(parts.model)
    if accelerator.is_main_process:
        card_context = {
            "model": accelerator.unwrap_model(parts.model),
            "train_dataset": data.train_dataset,
            "modality": data.modality,
            "num_processes": accelerator.num_processes,
            "device": accelerator.device,
            "seconds": seconds,
            "argv": argv,
            "mixed_precision": accelerator.mixed_precision,
            "top_attributes": result.get("top_attributes"),
            "warnings": log.warnings.to_list(),
            "initial_metrics": before.get("metrics") if before else None,
            "confusion": result.get("confusion"),
            "class_names": result.get("class_names"),
        }
        save_final_model(config, plan, data, parts, state, state_dict, metrics, card_context)
        log.close()
        publish_output(plan.run_dir, plan.output_dir)
        if result:
            print(format_evaluation(result, t), flush=True)
        if result and before:
            print(format_change(before, result, config), flush=True)
        if t.push_to_hub:
            print(f"Pushed to {push_to_hub(config)}", flush=True)
        print(format_outputs(plan.output_dir, config, accelerator), flush=True)
    accelerator.wait_for_everyone()
    return metrics


def save_final_model(
    config, plan, data, parts, state, state_dict: dict, metrics: dict, card_context: dict
) -> None:
    """Model, processor, pipelines, card, settings and plots, written beside and moved into the run's folder (main
    process)."""
    unwrapped = card_context["model"]
    index = getattr(data.train_dataset, "index", None)
    if index is not None:  # the class names travel with the model (fine-tuning, AutoPeftModel)
        unwrapped.config.id2label = dict(enumerate(index.class_names))
        unwrapped.config.label2id = {name: i for i, name in enumerate(index.class_names)}

    def write(folder: Path) -> None:
        # Plots people look at: the losses over the run (this run's metrics.jsonl, a resumed run's earlier steps
        # included) and the final kNN confusion matrices.
        plot_loss_curve(read_jsonl(plan.run_dir / "metrics.jsonl"), folder / PLOTS_DIR / "loss_curve.png")
        for level, matrix in (card_context.get("confusion") or {}).items():
            plot_confusion_matrix(
                torch.tensor(matrix),
                card_context["class_names"],
                folder / PLOTS_DIR / f"knn_confusion_{level}.png",
                title=f"kNN {level} ({config.data.validation_split}, step {state.step})",
            )
        unwrapped.save_pretrained(folder, state_dict=state_dict)
        parts.processor.save_pretrained(folder)
        add_pipelines_to_folder(folder)  # the SRH-aware pipelines, also as remote code
        card = render_model_card(config, state, metrics, card_context)
        (folder / "README.md").write_text(card, encoding="utf-8")
        with open(folder / "train_config.yaml", "w", encoding="utf-8") as f:
            yaml.safe_dump(config.to_dict(), f, sort_keys=False)

    size = sum(t.numel() * t.element_size() for t in state_dict.values() if torch.is_tensor(t))
    write_files_atomically(plan.run_dir, write, needed_bytes=size)


def output_dir_of(argv: list[str]) -> str:
    """The output folder a command line's run writes (what its lock guards)."""
    return parse_config(argv, default_config=default_config_for(argv)).training.output_dir


@holds_output_dir(output_dir_of)
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run HLSS pretraining (or the image-text alignment before it, ``model.objective: align``).

    Args:
        argv (`list[str]`, *optional*): Command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        `dict`: ``{"step", "epoch", "output_dir", "run_dir", "metrics", "stopped_early",
        "text_tower_calls_during_training"}`` (for tests and notebooks).
    """
    # 1. Settings: the config, where the run writes, what it resumes (before anything heavy happens).
    argv = sys.argv[1:] if argv is None else list(argv)
    default_config = default_config_for(argv)
    config = parse_config(argv, default_config=default_config)
    if default_config is None and not names_config_file(argv) and os.environ.get("RANK", "0") == "0":
        print(  # once, not once per process
            f"Settings: the built-in defaults for your own data ({DEFAULT_CONFIG.name} is the demo's; "
            "configs/wsi.yaml is a starter for your own slides): `python train.py --help --data.dataset "
            f"{config.data.dataset}` lists them",
            flush=True,
        )
    t = config.training
    plan = plan_run(t, config.to_dict())
    make_init_model(config, main, REPO_ROOT)

    # 2. Accelerator, logging, seed.
    accelerator = make_accelerator(t, project_dir=plan.run_dir)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("hlss_hf").setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)
    set_seed(t.seed)

    # 3. Data; 4. model, optimizer, schedule; 5. resume. Nothing is written before this has all worked.
    data = load_data(config, accelerator)
    parts = build_training(config, data, accelerator)
    state = TrainState(num_processes=accelerator.num_processes)
    if plan.resume_path is not None:
        state = resume(config, plan, parts, accelerator)
    log = open_run(config, plan, data, parts, state, accelerator)

    # 6. Train, after a kNN baseline of the untrained model when asked for.
    before: dict[str, Any] = {}
    if t.eval_before_training and t.eval_at_end and data.val_ds is not None and state.step == 0:
        accelerator.print(f"Evaluation before training (the same model, {starting_point(config)}):")
        before = evaluate(config, data, parts, accelerator, log, state.step)
        accelerator.print(format_evaluation(before, t))
    start = time.perf_counter()
    stopped_early = train(config, plan, data, parts, state, log, accelerator)

    # 7. Finish: evaluate, save beside, swap in, push.
    metrics: dict[str, float] = {}
    if stopped_early:
        accelerator.print(
            f"Stopped after step {state.step} (training.max_steps_this_run); continue with "
            "--resume_from_checkpoint latest"
        )
    else:
        seconds = time.perf_counter() - start
        metrics = finish(
            config, plan, data, parts, state, log, accelerator, argv=argv, before=before, seconds=seconds
        )
    log.close()
    accelerator.end_training()
    return {
        "step": state.step,
        "epoch": state.epoch,
        "output_dir": str(plan.output_dir),
        "run_dir": str(plan.run_dir),
        "metrics": metrics,
        "stopped_early": stopped_early,
        "text_tower_calls_during_training": parts.guard.calls,
    }


def cli() -> None:
    """Entry point: ``--help`` lists every config key. Errors a user can fix (config, a missing dataset folder or Hub
    repo, a non-finite loss, file system, Hub) print one line ``error: ...`` and exit with status 1, leaving no
    empty output folder behind; ``--debug`` or ``HLSS_DEBUG=1`` shows the traceback instead."""
    from hlss_hf.cli import debug_requested, exit_on_error

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
