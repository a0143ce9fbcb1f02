"""A pretraining run's start and end: the lines it prints (the run it starts, its evaluations, the change training
made, where its outputs are), its opened folder and log, and its final model folder (model, processor, pipelines,
card, settings, plots), swapped into ``output_dir`` and pushed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from hlss_hf.evaluation.explain import plot_confusion_matrix, plot_loss_curve
from hlss_hf.files import write_files_atomically
from hlss_hf.models.hlss.pipeline_hlss import add_pipelines_to_folder
from hlss_hf.training.checkpoints import (
    RunPlan,
    TrainState,
    publish_output,
    set_aside_later_checkpoints,
    start_output,
)
from hlss_hf.training.config import TrainConfig, flatten_config
from hlss_hf.training.loop import RunLog, read_jsonl, truncate_jsonl
from hlss_hf.training.model_card import push_to_hub, render_model_card
from hlss_hf.training.run_warnings import training_warnings

LEVELS = ("patch", "slide", "patient")


OBJECTIVE_NAMES = {"hlss": "HLSS training", "align": "image-text alignment (the stage before HLSS)"}


#: Attributes listed per class and level in the run's explanation (`evaluate explain` lists more).
TOP_ATTRIBUTES = 3


#: The output folder's subfolder of PNG plots (loss curve, kNN confusion matrices).
PLOTS_DIR = "plots"


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
    """Each class's top patient-level attributes (hlss_hf.evaluation.explain.class_attribute_summary on the validation split)."""
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


def describe_run(config: TrainConfig, accelerator, data, schedule, state, out: Path, run_dir: Path) -> str:
    """The ``***** Running ... *****`` block: devices, data, batch shapes, optimizer steps and where it writes."""
    t, d = config.training, config.data
    S, P, V, B, GA = (
        d.num_slides,
        d.num_patches,
        d.num_views,
        t.per_device_batch_size,
        t.gradient_accumulation_steps,
    )
    W = accelerator.num_processes
    length = f", schedule over {schedule.steps} steps" if schedule.steps != schedule.max_steps else ""
    if schedule.reference_steps is not None:
        length += f" at the reference's {schedule.reference_steps} per epoch"
    epochs = (
        f" | {schedule.batches_per_epoch} batches per process per epoch" if schedule.batches_per_epoch else ""
    )
    patients = len(data.train_dataset) if not d.streaming else "streaming"
    return "\n".join(
        [
            f"***** Running {OBJECTIVE_NAMES[config.model.objective]} *****",
            f"  device: {accelerator.device} | processes: {W} | distributed: {accelerator.distributed_type}"
            f" | mixed precision: {accelerator.mixed_precision}",
            f"  data: {d.dataset} ({data.modality}) | train patients: {patients} | validation patches: "
            f"{len(data.val_ds) if data.val_ds is not None else 0}",
            f"  per-device batch [B={B}, S={S}, P={P}, V={V}, C=3, H={d.crop_size}, W={d.crop_size}] = "
            f"{B * S * P * V} images",
            f"  global batch: {B} x {W} processes x {GA} accumulation = {B * W * GA} patients = "
            f"{B * S * P * V * W * GA} images per optimizer step",
            f"  optimizer steps: {schedule.max_steps} (warm-up {schedule.warmup}, {t.lr_scheduler}, lr {t.lr}"
            f"{length}){epochs}" + (f" | starting at step {state.step}" if state.step else ""),
            f"  output: {out}"
            + (f" (written to {run_dir} until the run has finished)" if run_dir != out else ""),
        ]
    )


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


def open_run(config: TrainConfig, plan: RunPlan, data, parts, state: TrainState, accelerator) -> RunLog:
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


def finish_run(
    config: TrainConfig,
    plan: RunPlan,
    data,
    parts,
    state: TrainState,
    log: RunLog,
    accelerator,
    *,
    result: dict[str, Any],
    before: dict[str, Any],
    argv: list[str],
    seconds: float,
) -> None:
    """Save the final model beside (``result``: the final evaluation, or ``{}``), swap it into ``output_dir``,
    push, print where everything is."""
    t = config.training
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
        save_final_model(
            config, plan, data, parts, state, state_dict, result.get("metrics", {}), card_context
        )
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
