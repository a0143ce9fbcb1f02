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
processes with gradient, and process ``r`` of ``W`` receives batch ``W * s + r`` of one seeded permutation, so a
run on ``W`` processes with ``B`` patients each equals one process with ``W * B`` patients.
On a CPU-only machine, ``accelerate launch --multi_gpu --num_processes N`` runs the processes on CPU with gloo
(train.py then builds the ``Accelerator`` with ``cpu=True``; the launcher's ``--cpu`` cannot be combined with
``--multi_gpu``).

Outputs in ``training.output_dir``: the model (``save_pretrained``: safetensors, config, processor, model card
README.md), ``metrics.jsonl`` (one JSON object per logged step and evaluation), ``checkpoints/step_N`` (for
``--resume_from_checkpoint``) and tracker logs.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parent
if str(REPO_ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

from hlss_hf.building import (  # noqa: E402
    build_image_processor,
    build_model,
    build_processor,
    build_tokenizer,
    dataset_scale,
    load_splits,
    resolve_attributes,
    resolve_tower,
)
from hlss_hf.data import build_train_loader  # noqa: E402
from hlss_hf.data import stream_batches as _stream_batches  # noqa: E402
from hlss_hf.model_card import push_to_hub, render_model_card  # noqa: E402
from hlss_hf.training_utils import (  # noqa: E402
    ConfigError,
    JsonlWriter,
    TrainConfig,
    TrainState,
    clean_temporary_checkpoints,
    commit_checkpoint,
    config_help,
    flatten_config,
    latest_checkpoint,
    parse_config,
    resolve_resume_path,
    temporary_checkpoint_path,
    truncate_jsonl,
)

logger = logging.getLogger("hlss_hf.train")

DEFAULT_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
LOSS_KEYS = ("loss", "hvc_loss", "alignment_loss")


class NonFiniteLossError(RuntimeError):
    """Raised when a training step produces a NaN or infinite loss."""


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
# Evaluation and checkpoints


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


def save_checkpoint(accelerator, config: TrainConfig, step: int) -> Path:
    """``save_state`` into ``step_N.tmp``, then rename to ``step_N`` and rotate (main process)."""
    out = config.training.output_dir
    tmp = temporary_checkpoint_path(out, step)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    final = tmp.with_name(tmp.name[: -len(".tmp")])
    if accelerator.is_main_process:
        final = commit_checkpoint(out, step, config.training.save_total_limit)
    accelerator.wait_for_everyone()
    return final


# ---------------------------------------------------------------------------------------------------------------
# Training


def _trackers(report_to: str) -> list[str] | None:
    if report_to == "none":
        return None
    if report_to == "auto":
        return ["tensorboard"] if importlib.util.find_spec("tensorboard") is not None else None
    if report_to == "all":
        return "all"
    return [name.strip() for name in report_to.split(",") if name.strip()]


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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run HLSS pretraining.

    Args:
        argv (`list[str]`, *optional*): Command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        `dict`: ``{"step", "epoch", "output_dir", "metrics", "stopped_early"}`` (for tests and notebooks).
    """
    # 1. Parse and validate the config (before anything heavy happens).
    argv = sys.argv[1:] if argv is None else list(argv)
    config = parse_config(argv, default_config=DEFAULT_CONFIG)
    t, d = config.training, config.data

    # 2. Accelerator, logging, seed.
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    world = int(os.environ.get("WORLD_SIZE", "1"))
    # accelerate runs several processes on CPU (gloo) only when told `cpu=True`.
    use_cpu = t.cpu or (world > 1 and not torch.cuda.is_available())
    accelerator = Accelerator(
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        mixed_precision=t.mixed_precision,
        log_with=_trackers(t.report_to),
        project_config=ProjectConfiguration(project_dir=t.output_dir, logging_dir=t.output_dir),
        cpu=use_cpu,
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logger.setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)
    set_seed(t.seed)
    out = Path(t.output_dir)
    previous = [
        out / name for name in ("checkpoints", "metrics.jsonl", "model.safetensors") if (out / name).exists()
    ]
    if previous and t.resume_from_checkpoint is None and not t.overwrite_output_dir:
        # A fresh run would mix its metrics and checkpoint rotation with the earlier run's.
        raise ConfigError(
            f"config key 'training.output_dir': {out} already holds a run ({', '.join(p.name for p in previous)}); "
            "pass --resume_from_checkpoint latest, --training.overwrite_output_dir true, or another output_dir"
        )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        clean_temporary_checkpoints(out)
        if t.resume_from_checkpoint is None:
            for path in previous:
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
    accelerator.wait_for_everyone()

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
        optimizer_groups(model, t),
        lr=t.lr,
        betas=(t.adam_beta1, t.adam_beta2),
        eps=t.adam_epsilon,
    )
    W = accelerator.num_processes
    if d.streaming:
        batches_per_epoch = None
        max_steps = t.max_steps
        num_epochs = 1
    else:
        # Per-process batches per epoch after sharding (the sampler makes it exact; a kept partial batch
        # is padded to every process by accelerate).
        batches_per_epoch = math.ceil(len(train_loader) / W) if not d.drop_last else len(train_loader) // W
        steps_per_epoch = math.ceil(batches_per_epoch / t.gradient_accumulation_steps)
        max_steps = t.max_steps if t.max_steps is not None else math.ceil(t.num_epochs * steps_per_epoch)
        num_epochs = math.ceil(max_steps / steps_per_epoch)
    schedule_steps = schedule_length(t, max_steps, steps_per_epoch if batches_per_epoch else None)
    warmup_steps = int(round(t.warmup_ratio * schedule_steps))
    # The prepared scheduler steps once per process per optimizer step (accelerate's convention).
    scheduler = get_scheduler(
        t.lr_scheduler, optimizer, num_warmup_steps=warmup_steps * W, num_training_steps=schedule_steps * W
    )

    # 5. Prepare.
    if d.streaming:
        # The streaming dataset shards patients over processes itself: accelerate must not shard it again.
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    else:
        model, optimizer, train_loader, scheduler = accelerator.prepare(
            model, optimizer, train_loader, scheduler
        )
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    unwrapped = accelerator.unwrap_model(model)

    S, P, V, B, GA = (
        d.num_slides,
        d.num_patches,
        d.num_views,
        t.per_device_batch_size,
        t.gradient_accumulation_steps,
    )
    images_per_device = B * S * P * V
    images_per_step = images_per_device * W * GA
    batch_shape = f"[B={B}, S={S}, P={P}, V={V}, C=3, H={d.crop_size}, W={d.crop_size}]"

    # 6. Resume.
    if t.resume_from_checkpoint is not None:
        path = resolve_resume_path(t.resume_from_checkpoint, out)
        accelerator.print(f"Resuming from {path}")
        accelerator.load_state(str(path))
        if batches_per_epoch is not None and state.batch_in_epoch >= batches_per_epoch:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        if accelerator.is_main_process:
            truncate_jsonl(out / "metrics.jsonl", state.step)

    if accelerator.is_main_process:
        n_patients = len(train_dataset) if not d.streaming else "streaming"
        lines = [
            "***** Running HLSS training *****",
            f"  device: {accelerator.device} | processes: {W} | distributed: {accelerator.distributed_type}"
            f" | mixed precision: {accelerator.mixed_precision}",
            f"  data: {d.dataset} ({modality}) | train patients: {n_patients} | validation patches: "
            f"{len(val_ds) if val_ds is not None else 0}",
            f"  per-device batch {batch_shape} = {images_per_device} images",
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
            f"  output: {out}",
        ]
        print("\n".join(lines), flush=True)

    trackers = _trackers(t.report_to)
    if trackers:
        accelerator.init_trackers(t.project_name, config=flatten_config(config))
    metrics_file = JsonlWriter(out / "metrics.jsonl") if accelerator.is_main_process else None

    # 7. Train (after a kNN baseline of the untrained model, when asked for).
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
            pixel_values = batch["pixel_values"]
            with accelerator.accumulate(model):
                guard.active = True
                outputs = model(pixel_values=pixel_values, return_loss=True)
                loss = outputs.loss
                # Every process stops together when any one sees a non-finite loss.
                bad = (~torch.isfinite(loss.detach())).float().reshape(1)
                if W > 1:
                    bad = accelerator.reduce(bad, reduction="max")
                if bad.item() > 0:
                    guard.active = False
                    parts = _loss_parts(outputs)
                    last = latest_checkpoint(out)
                    raise NonFiniteLossError(
                        f"non-finite loss at step {state.step + 1} (epoch {state.epoch}): "
                        + ", ".join(f"{k}={v}" for k, v in parts.items())
                        + f". Last good checkpoint: {last if last is not None else 'none'}."
                    )
                accelerator.backward(loss)
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
                save_checkpoint(accelerator, config, state.step)
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

    # 8. Finish: evaluate, save, card, push.
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
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            from hlss_hf.pipeline_hlss import add_pipelines_to_folder

            index = getattr(train_dataset, "index", None)
            if index is not None:  # the class names travel with the model (fine-tuning, AutoPeftModel)
                unwrapped.config.id2label = dict(enumerate(index.class_names))
                unwrapped.config.label2id = {name: i for i, name in enumerate(index.class_names)}
            unwrapped.save_pretrained(out)
            processor.save_pretrained(out)
            add_pipelines_to_folder(out)  # the SRH-aware pipelines, also as remote code
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
            card = render_model_card(config, state, last_eval, card_context)
            (out / "README.md").write_text(card, encoding="utf-8")
            with open(out / "train_config.yaml", "w", encoding="utf-8") as f:
                yaml.safe_dump(config.to_dict(), f, sort_keys=False)
            print(f"Saved the model to {out}", flush=True)
            if last_eval:
                print(format_knn(last_eval, t), flush=True)
            if last_eval and initial_eval:
                print(format_knn_change(initial_eval, last_eval), flush=True)
            if t.push_to_hub:
                url = push_to_hub(config)
                print(f"Pushed to {url}", flush=True)
        accelerator.wait_for_everyone()
    if metrics_file is not None:
        metrics_file.close()
    accelerator.end_training()
    return {
        "step": state.step,
        "epoch": state.epoch,
        "output_dir": str(out),
        "metrics": last_eval,
        "stopped_early": stopped_early,
        "text_tower_calls_during_training": guard.calls,
    }


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
        print(config_help())
        return
    debug = "--debug" in argv or debug_requested()
    argv = [arg for arg in argv if arg != "--debug"]
    with exit_on_error(debug, user_errors=(ConfigError, NonFiniteLossError)):
        output_dir = parse_config(argv, default_config=DEFAULT_CONFIG).training.output_dir
        cleanup = remove_new_empty_folder(output_dir)
        try:
            main(argv)
        except BaseException:
            cleanup()
            raise


if __name__ == "__main__":
    cli()
