"""One process of the multi-process evaluation tests (tests/test_fsdp.py), launched by ``accelerate launch``.

Every process builds the same tiny `HLSSModel`, prepares it (DDP, or FSDP2 with ``--mode fsdp``), runs one training
step and :func:`hlss_hf.evaluation.distributed_knn_evaluate` on the demo splits (map-style and streamed train
split), then ``accelerator.get_state_dict(model)``. The main process rebuilds a plain model from that state dict
and computes the one-process reference (`extract_embeddings` + `knn_evaluate`), and writes what the test checks
to ``--report`` (JSON).

FSDP on CPU: accelerate 1.15 never selects FSDP when ``cpu=True`` (the CPU / gloo run is always
``DistributedType.MULTI_CPU``, prepared with DDP, whatever the FSDP plugin or ``--use_fsdp`` says), and without
``cpu=True`` and without an accelerator its FSDP plugin raises "There are currently no available devices found".
torch's FSDP2 (``fully_shard``) itself runs on CPU with gloo, so ``--mode fsdp`` sets the accelerator state's
distributed type to FSDP by hand after construction; everything after that (``prepare`` -> ``fully_shard``,
the sharded forward, ``get_state_dict``) is accelerate's and torch's own FSDP2 code. On a GPU machine
``--mode fsdp-gpu`` uses no override (``accelerate launch --config_file configs/accelerate_fsdp.yaml``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _fsdp_plugin(wrap: str):
    from accelerate.utils import FullyShardedDataParallelPlugin

    # sync_module_states is obsolete in FSDP2; with it unset the plugin asks for a CUDA device on CPU.
    # "transformer": one FSDP unit per layer class in the model's _no_split_modules (as configs/accelerate_fsdp.yaml).
    policy = "transformer_based_wrap" if wrap == "transformer" else "no_wrap"
    return FullyShardedDataParallelPlugin(
        fsdp_version=2, sync_module_states=False, auto_wrap_policy=policy, state_dict_type="FULL_STATE_DICT"
    )


def _accelerator(mode: str, wrap: str):
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType

    if mode == "fsdp":
        plugin = _fsdp_plugin(wrap)
        accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
        # The override explained in the module docstring (accelerate picks MULTI_CPU for every CPU run). Also in
        # PartialState's shared state: every later AcceleratorState() copies it over its own.
        PartialState().distributed_type = DistributedType.FSDP
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
        return accelerator
    if mode == "fsdp-gpu":
        # The reference runs on the CPU: keep cuDNN's convolutions in full fp32 so the two agree to ~1e-6.
        torch.backends.cudnn.allow_tf32 = False
        return Accelerator()  # FSDP from the launch config / --use_fsdp
    return Accelerator(cpu=True)


def _allow_fsdp2(model) -> bool:
    """accelerate's FSDP2 preparation calls `model.get_input_embeddings()` unguarded; transformers 5's default raises
    NotImplementedError for a model it cannot map (HLSSModel: pixels in, no token embedding). Returns whether the
    model needed the stand-in (None: no input embedding to shard on its own)."""
    try:
        model.get_input_embeddings()
        return False
    except NotImplementedError:
        type(model).get_input_embeddings = lambda self: None
        return True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["ddp", "fsdp", "fsdp-gpu"], required=True)
    parser.add_argument("--data", required=True, help="a demo dataset folder (save_to_disk)")
    parser.add_argument("--report", required=True)
    parser.add_argument(
        "--wrap", choices=["none", "transformer"], default="none", help="FSDP units (--mode fsdp)"
    )
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--time", type=int, default=0, help="also time N distributed evaluations (benchmark)")
    args = parser.parse_args()

    import datasets
    from _tiny import hierarchical_pixels, tiny_hlss_model

    from hlss_hf.evaluation import distributed_knn_evaluate, extract_embeddings, knn_evaluate
    from hlss_hf.evaluation.distributed import _embed_across_processes

    accelerator = _accelerator(args.mode, args.wrap)
    model = tiny_hlss_model(seed=0)
    layout = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    patched = _allow_fsdp2(model) if "fsdp" in args.mode else False
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in params)
    full = sum(p.numel() for p in params)

    # One training step, each process on its own batch.
    model.train()
    pixels = hierarchical_pixels(b=2, seed=accelerator.process_index).to(accelerator.device)
    loss = model(pixel_values=pixels, return_loss=True).loss
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad()

    # After the step, what train.py's evaluation did before distributed_knn_evaluate: the unwrapped module's
    # get_image_features on the main process alone. Under FSDP2 that module holds only this process's shards.
    # Only with one FSDP unit (the root): with per-layer units the layers' hooks would all-gather on the main
    # process alone, and it would hang instead of failing.
    unwrapped_error = None
    if accelerator.is_main_process and "fsdp" in args.mode and args.wrap == "none":
        try:
            with torch.no_grad():
                accelerator.unwrap_model(model).get_image_features(pixel_values=pixels[0, 0, 0])
        except Exception as err:  # noqa: BLE001 - recorded for the test
            unwrapped_error = f"{type(err).__name__}: {err}"[:300]

    splits = datasets.load_from_disk(args.data)
    train, val = splits["train"], splits["validation"]
    stream = datasets.load_dataset(args.data, split="train", streaming=True)
    options = dict(batch_size=args.batch_size, k=args.k)
    rng = torch.get_rng_state()
    metrics = distributed_knn_evaluate(accelerator, model, train, val, **options)
    stream_metrics = distributed_knn_evaluate(accelerator, model, stream, val, **options)
    rng_unchanged = torch.equal(rng, torch.get_rng_state())
    model.eval()
    with torch.no_grad():
        gathered = _embed_across_processes(accelerator, model, stream, None, args.batch_size, None, False)
    model.train()
    seconds = []
    for _ in range(args.time):
        accelerator.wait_for_everyone()
        tic = time.perf_counter()
        distributed_knn_evaluate(accelerator, model, train, val, **options)
        accelerator.wait_for_everyone()
        seconds.append(time.perf_counter() - tic)
    from accelerate.utils import gather_object

    per_process = gather_object(
        [{"metrics": metrics, "stream": stream_metrics, "rng_unchanged": rng_unchanged}]
    )

    state = accelerator.get_state_dict(model)  # a collective under FSDP: every process calls it
    per_process_sizes = gather_object([len(state)])
    if accelerator.is_main_process:
        reference = tiny_hlss_model(seed=1)  # other random weights: everything below comes from `state`
        reference.load_state_dict({k: v.cpu() for k, v in state.items()})
        bank = extract_embeddings(reference, train, batch_size=args.batch_size, progress=False)
        queries = extract_embeddings(reference, val, batch_size=args.batch_size, progress=False)
        report = {
            "num_processes": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type),
            "wrapped": type(model).__name__,
            "trainable_elements_local": local,
            "trainable_elements_full": full,
            "patched_get_input_embeddings": patched,
            "loss_finite": bool(torch.isfinite(loss.detach()).item()),
            "per_process": per_process,
            "reference": knn_evaluate(bank, queries, k=args.k),
            "stream_embedding_max_diff": float((gathered.embeddings - bank.embeddings).abs().max()),
            "stream_rows_equal": gathered.labels.tolist() == bank.labels.tolist()
            and gathered.slide_ids == bank.slide_ids
            and gathered.patient_ids == bank.patient_ids,
            "state_layout_equal": {k: tuple(v.shape) for k, v in state.items()} == layout,
            "state_keys_missing": sorted(set(layout) - set(state)),
            "state_keys_extra": sorted(set(state) - set(layout)),
            "seconds": seconds,
            "unwrapped_main_only_error": unwrapped_error,
            "state_dict_sizes": per_process_sizes,
        }
        Path(args.report).write_text(json.dumps(report, indent=1), encoding="utf-8")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    main()
