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

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent
if str(REPO_ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

# hlss_hf registers its Auto classes (loading torch: seconds) once this program has read its command line, so that
# --help and settings errors answer at once (hlss_hf/__init__.py).
HLSS_HF_PARSE_FIRST = True

from hlss_hf.cli import check_command_line, config_file
from hlss_hf.errors import ConfigError
from hlss_hf.training.config import TrainConfig, command_line_value, format_help, parse_config

DEFAULT_CONFIG = REPO_ROOT / "configs" / "demo.yaml"


def default_config_for(argv: list[str]) -> Path | None:
    """The settings file a command line without ``--config`` runs with: the demo's (``configs/demo.yaml``) for the
    demo only; ``--data.dataset <yours>`` gets the built-in defaults, meant for real data
    (docs/training.md#your-own-data-configs-and-defaults)."""
    if config_file(argv, TrainConfig) is not None:
        return None
    dataset = command_line_value(argv, "data.dataset")
    return DEFAULT_CONFIG if dataset in (None, "demo") else None


def print_help(argv: list[str]) -> None:
    """This docstring and every config key, with the defaults this command line's run would use: its --config, else
    the demo's for the demo and the built-in ones for any other --data.dataset."""
    print(__doc__)
    path = config_file(argv, TrainConfig) or default_config_for(
        [a for a in argv if a not in ("-h", "--help")]
    )
    print(format_help(TrainConfig, path))
    if path is not None and Path(path).resolve() == DEFAULT_CONFIG.resolve():
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

from accelerate.utils import set_seed
from tqdm.auto import tqdm

from hlss_hf.errors import CheckpointError, NonFiniteLossError
from hlss_hf.files import remove_new_empty_folder
from hlss_hf.training.building import TrainData, TrainParts, build_training, load_data, make_init_model
from hlss_hf.training.checkpoints import (
    RunPlan,
    TrainState,
    holds_output_dir,
    plan_run,
    record_next_step,
    save_checkpoint,
)
from hlss_hf.training.loop import (
    RunLog,
    batches,
    end_epoch_if_done,
    loss_parts,
    non_finite_error,
    optimizer_steps,
    resume,
    weights_finite,
)
from hlss_hf.training.optim import make_accelerator
from hlss_hf.training.report import finish_run, format_evaluation, open_run, starting_point
from hlss_hf.training.validation import evaluate


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


def output_dir_of(argv: list[str]) -> str:
    """The output folder a command line's run writes (what its lock guards)."""
    return parse_config(argv, default_config=default_config_for(argv)).training.output_dir


@holds_output_dir(output_dir_of)
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run HLSS pretraining (or the image-text alignment before it, ``model.objective: align``) on ``argv``
    (default ``sys.argv[1:]``); returns ``{"step", "epoch", "output_dir", "run_dir", "metrics", "stopped_early",
    "text_tower_calls_during_training"}`` (for tests and notebooks)."""
    # 1. Settings: the config, where the run writes, what it resumes (before anything heavy happens).
    argv = sys.argv[1:] if argv is None else list(argv)
    default_config = default_config_for(argv)
    config = parse_config(argv, default_config=default_config)
    if (
        default_config is None
        and config_file(argv, TrainConfig) is None
        and os.environ.get("RANK", "0") == "0"
    ):
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
        state = resume(accelerator, plan, parts.schedule, parts.optimizer, parts.scheduler, t.lr)
    log = open_run(config, plan, data, parts, state, accelerator)

    # 6. Train, after a kNN baseline of the untrained model when asked for.
    before: dict[str, Any] = {}
    if t.eval_before_training and t.eval_at_end and data.val_ds is not None and state.step == 0:
        accelerator.print(f"Evaluation before training (the same model, {starting_point(config)}):")
        before = evaluate(config, data, parts, accelerator, log, state.step)
        accelerator.print(format_evaluation(before, t))
    start = time.perf_counter()
    stopped_early = train(config, plan, data, parts, state, log, accelerator)

    # 7. Finish: evaluate, save beside, swap in, push (hlss_hf.training.report).
    metrics: dict[str, float] = {}
    if stopped_early:
        accelerator.print(
            f"Stopped after step {state.step} (training.max_steps_this_run); continue with "
            "--resume_from_checkpoint latest"
        )
    else:
        seconds = time.perf_counter() - start
        at_end = t.eval_at_end and data.val_ds is not None
        result = evaluate(config, data, parts, accelerator, log, state.step) if at_end else {}
        metrics = result.get("metrics", {})
        finish_run(
            config,
            plan,
            data,
            parts,
            state,
            log,
            accelerator,
            result=result,
            before=before,
            argv=argv,
            seconds=seconds,
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
        cleanup = remove_new_empty_folder(output_dir_of(argv))
        try:
            main(argv)
        except BaseException:
            cleanup()
            raise


if __name__ == "__main__":
    cli()
