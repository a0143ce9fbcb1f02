"""LoRA fine-tuning of an HLSS vision tower for patch classification, with PEFT and Accelerate (docs/finetuning.md).

    python finetune.py --model_name_or_path outputs/hlss-demo --dataset data/demo --num_epochs 3 --merge
    python finetune.py --config my_finetune.yaml --training.max_steps 200      # YAML + overrides
    accelerate launch --mixed_precision bf16 finetune.py --model_name_or_path me/hlss-srh --dataset <hub id>
    python finetune.py --help                                                  # every config key

Settings: `hlss_hf.training.config.FinetuneConfig`, read as train.py reads its own. docs/finetuning.md tells what
a run trains and writes (`adapter/`, `merged/`, `metrics.jsonl`, `finetune_report.json`) and how it fails.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

# hlss_hf registers its Auto classes (loading torch: seconds) once this program has read its command line, so that
# --help and settings errors answer at once (hlss_hf/__init__.py).
HLSS_HF_PARSE_FIRST = True

from hlss_hf.cli import check_command_line
from hlss_hf.errors import ConfigError
from hlss_hf.training.config import FinetuneConfig, flatten_config, format_help, parse_config


def print_help() -> None:
    """This docstring and every config key with its default."""
    print(__doc__)
    print(format_help(FinetuneConfig))


def parse_args(argv: list[str] | None = None) -> FinetuneConfig:
    """The validated `FinetuneConfig` of a command line (default `sys.argv[1:]`) and its optional `--config` YAML;
    `--help` prints every key. Raises `ConfigError` naming an unknown key or an impossible value."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if "-h" in argv or "--help" in argv:
        print_help()
        raise SystemExit(0)
    return parse_config(argv, FinetuneConfig)


if __name__ == "__main__":
    check_command_line(sys.argv[1:], parse_args, print_help)  # before torch and the model code load

import torch
from accelerate.utils import DistributedType, set_seed
from peft import get_peft_model
from tqdm.auto import tqdm

from hlss_hf.data import loader_workers
from hlss_hf.data.augmentation import build_augmentation
from hlss_hf.data.schema import modality_of
from hlss_hf.errors import DatasetError, NonFiniteLossError
from hlss_hf.files import write_text_atomically
from hlss_hf.training.checkpoints import (
    TrainState,
    holds_output_dir,
    plan_output,
    publish_output,
    start_output,
)
from hlss_hf.training.loop import RunLog, optimizer_steps
from hlss_hf.training.lora import (
    VISION_PREFIX,
    augmentation_config,
    default_lora_target_modules,
    evaluate,
    load_classifier,
    load_processor,
    lora_config_for,
    push_adapter,
    save_adapter,
    save_merged,
    set_train_mode,
)
from hlss_hf.training.model_card import write_finetune_cards
from hlss_hf.training.optim import lr_scheduler, make_accelerator
from hlss_hf.training.patches import (
    PatchClassificationDataset,
    check_label_values,
    hierarchy_ids,
    load_patch_dataset,
    resolve_labels,
    select_splits,
)
from hlss_hf.training.run_warnings import evaluation_warnings, finetune_warnings

logger = logging.getLogger("finetune")

REPORT_FILE = "finetune_report.json"
METRICS_FILE = "metrics.jsonl"
ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"


@holds_output_dir(lambda argv: parse_args(argv).training.output_dir)
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run fine-tuning; returns the report (also written to `output_dir/finetune_report.json`)."""
    # 1. Settings, the run's folder (a used output_dir needs training.overwrite_output_dir), accelerator.
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parse_args(argv)
    t = args.training
    out = Path(t.output_dir)
    # Fine-tuning has no resume, so every run works beside and swaps in at the end: a failed run leaves
    # output_dir as it was (or absent).
    run_dir = plan_output(out, overwrite=t.overwrite_output_dir, resume=None, always_stage=True)
    accelerator = make_accelerator(t, project_dir=run_dir)
    if t.merge and accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ConfigError(
            "config key 'training.merge': merging needs the whole model in one process; with FSDP / DeepSpeed "
            "save the adapter, then merge it with peft's merge_and_unload in one process"
        )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logger.setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)
    set_seed(t.seed)

    # 2. Data.
    with accelerator.main_process_first():
        data = load_patch_dataset(
            args.data.dataset, args.data.dataset_config_name, args.data.datasets_cache_dir
        )
    train_split, eval_split, eval_name = select_splits(data, args)
    names, value_to_index = resolve_labels(train_split, args.data.label_column, args.model.label_names)
    check_label_values(train_split, args.data.train_split, args.data.label_column, value_to_index, names)
    if eval_split is not None:
        check_label_values(eval_split, eval_name, args.data.label_column, value_to_index, names)

    # 3. Model, processor and LoRA.
    model = load_classifier(args.model.model_name_or_path, names)
    processor = load_processor(args.model.model_name_or_path, model, args.data.crop_size)
    crop = int(processor.crop_size["height"])
    modality = modality_of(train_split.features)
    if getattr(model.config, "modality", modality) != modality:
        raise DatasetError(
            f"dataset {args.data.dataset!r} holds {modality!r} patches but model "
            f"{args.model.model_name_or_path!r} was trained on {model.config.modality!r}"
        )
    processor.modality = modality
    lora_config = lora_config_for(
        model, args.model.lora_r, args.model.lora_alpha, args.model.lora_dropout, args.model.target_modules
    )
    # The leaf names as the user wrote them (or the tower's defaults); PEFT gets them as one regular expression.
    target_names = list(
        args.model.target_modules
        or default_lora_target_modules(model.config.vision_config, getattr(model, VISION_PREFIX))
    )
    model = get_peft_model(model, lora_config)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info(
        "LoRA %s on %s: %d trainable of %d parameters",
        lora_config.target_modules,
        args.model.model_name_or_path,
        trainable,
        total,
    )
    train_set = PatchClassificationDataset(
        train_split,
        value_to_index,
        processor,
        augment=build_augmentation(augmentation_config(args.data.augmentation), crop),
        label_column=args.data.label_column,
        modality=modality,
        seed=t.seed,
    )
    # Dropping the last partial global batch keeps every step identical whatever the number of processes
    # (accelerate would otherwise pad it differently); a split smaller than one global batch keeps it.
    global_batch = t.per_device_batch_size * accelerator.num_processes
    workers = loader_workers(args.data.num_workers, accelerator.device)
    train_loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=t.per_device_batch_size,
        shuffle=True,
        drop_last=len(train_set) >= global_batch,
        generator=torch.Generator().manual_seed(t.seed),
        **workers,
    )
    eval_loader = eval_labels = slide_ids = patient_ids = None
    if eval_split is not None:
        eval_set = PatchClassificationDataset(
            eval_split, value_to_index, processor, label_column=args.data.label_column, modality=modality
        )
        eval_loader = torch.utils.data.DataLoader(
            eval_set, batch_size=t.eval_batch_size, shuffle=False, **workers
        )
        eval_labels = eval_set.labels
        slide_ids, patient_ids = hierarchy_ids(eval_split, eval_name)

    # 4. Optimizer, prepare, schedule.
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    steps_per_epoch = max(1, math.ceil(len(train_loader) / t.gradient_accumulation_steps))
    total_steps = t.max_steps if t.max_steps is not None else math.ceil(t.num_epochs * steps_per_epoch)
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    scheduler = lr_scheduler(t, optimizer, accelerator, total_steps, int(round(t.warmup_ratio * total_steps)))
    scheduler = accelerator.prepare(scheduler)

    # 5. The settings, data and model are valid: only now does the run touch its folder.
    if accelerator.is_main_process:
        start_output(run_dir, out, resume=False)
    accelerator.wait_for_everyone()
    if t.trackers():
        accelerator.init_trackers(t.project_name, config=flatten_config(args))
    log = RunLog(accelerator)
    log.open(run_dir / METRICS_FILE)
    found = finetune_warnings(total_steps)
    if eval_labels is not None:
        found += evaluation_warnings(train_set.labels.tolist(), eval_labels.tolist(), names)
    log.warn(0, found)

    def run_eval(step: int, epoch: int) -> dict[str, float]:
        metrics = evaluate(model, eval_loader, accelerator, eval_labels, slide_ids, patient_ids, len(names))
        log.log(step, {"epoch": epoch, **{f"eval/{k}": v for k, v in metrics.items()}})
        logger.info("step %d eval: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
        return metrics

    # 6. Train.
    logger.info(
        "training %d steps (%d epochs of %d steps), %d patches, processes: %d, global batch %d, output %s%s",
        total_steps,
        num_epochs,
        steps_per_epoch,
        len(train_set),
        accelerator.num_processes,
        global_batch * t.gradient_accumulation_steps,
        out,
        f" (written to {run_dir} until the run has finished)",
    )
    start = time.perf_counter()
    set_train_mode(model)
    progress = tqdm(
        total=total_steps, disable=not accelerator.is_local_main_process, desc="LoRA", unit="step"
    )
    state = TrainState(num_processes=accelerator.num_processes)

    def epochs():
        for epoch in range(num_epochs):
            state.epoch = epoch
            train_set.set_epoch(epoch)
            yield from train_loader

    def forward(batch):
        outputs = model(pixel_values=batch["pixel_values"], labels=batch["labels"])
        return outputs.loss, outputs

    def non_finite(outputs) -> NonFiniteLossError:
        return NonFiniteLossError(
            f"non-finite loss at step {state.step + 1} (epoch {state.epoch}); {out} is unchanged (this run's "
            f"log is in {run_dir}). Lower training.lr (now {t.lr}) or check the data"
        )

    losses: list[float] = []
    last_eval: dict[str, float] | None = None
    last_eval_step = -1
    steps = optimizer_steps(
        accelerator,
        model,
        optimizer,
        scheduler,
        epochs(),
        forward,
        lambda loss, outputs: {"loss": float(loss.detach())},
        max_grad_norm=t.max_grad_norm,
        non_finite=non_finite,
        parameters=params,
    )
    for measures in steps:
        losses += [m["loss"] for m in measures]
        state.step += 1
        progress.update(1)
        if state.step % t.logging_steps == 0 or state.step == total_steps:
            # Every process reaches this line at the same steps: the mean over processes is the global loss.
            mean_loss = accelerator.reduce(
                torch.tensor(sum(losses) / len(losses), device=accelerator.device), "mean"
            )
            log.log(
                state.step, {"epoch": state.epoch, "loss": float(mean_loss), "lr": scheduler.get_last_lr()[0]}
            )
            progress.set_postfix(loss=f"{float(mean_loss):.4f}")
            losses = []
        if eval_loader is not None and t.eval_steps and state.step % t.eval_steps == 0:
            last_eval, last_eval_step = run_eval(state.step, state.epoch), state.step
        if state.step >= total_steps:
            break
    progress.close()
    if eval_loader is not None and last_eval_step != state.step:
        last_eval = run_eval(state.step, num_epochs - 1)
    train_seconds = time.perf_counter() - start

    # 7. Save beside, swap in, push.
    report: dict[str, Any] = {
        "args": args.to_dict(),
        "labels": names,
        "eval_split": eval_name,
        "lora": {
            "r": args.model.lora_r,
            "alpha": args.model.lora_alpha,
            "dropout": args.model.lora_dropout,
            "target_modules": target_names,
            # PEFT's regular expression over the whole model's module names, as passed to LoraConfig.
            "target_modules_regex": lora_config.target_modules,
            "modules_to_save": list(lora_config.modules_to_save),
        },
        "parameters": {"trainable": trainable, "total": total},
        "steps": state.step,
        "processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "train_patches": len(train_set),
        "train_seconds": train_seconds,
        "eval": last_eval,
        "warnings": log.warnings.to_list(),
        "adapter_dir": str(out / ADAPTER_DIR),
        "merged_dir": str(out / MERGED_DIR) if t.merge else None,
    }
    state_dict = accelerator.get_state_dict(model)  # every process: sharded weights are gathered here
    if accelerator.is_main_process:
        peft_model = accelerator.unwrap_model(model)
        save_adapter(peft_model, processor, names, run_dir / ADAPTER_DIR, state_dict=state_dict)
        if t.merge:
            save_merged(peft_model, processor, run_dir / MERGED_DIR)
        write_finetune_cards(
            args, report, argv, run_dir / ADAPTER_DIR, run_dir / MERGED_DIR if t.merge else None
        )
        write_text_atomically(
            run_dir / REPORT_FILE, json.dumps(report, indent=2, sort_keys=True, default=str) + "\n"
        )
        log.close()
        publish_output(run_dir, out)
        logger.info("saved %s", out)
        if t.push_to_hub:
            print(f"Pushed the adapter to {push_adapter(out / ADAPTER_DIR, args)}", flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return report


def cli() -> None:
    """Entry point: errors a user can fix (settings, data, a used output folder, a non-finite loss, file system,
    Hub) print one line ``error: ...`` and exit with status 1; ``--debug`` or ``HLSS_DEBUG=1`` shows the traceback."""
    from hlss_hf.cli import debug_requested, exit_on_error

    argv = sys.argv[1:]
    debug = "--debug" in argv or debug_requested()
    argv = [arg for arg in argv if arg != "--debug"]
    with exit_on_error(debug, user_errors=(ConfigError, NonFiniteLossError)):
        main(argv)


if __name__ == "__main__":
    cli()
