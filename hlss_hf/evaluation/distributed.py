"""Evaluation in which every process of a distributed run (DDP, FSDP, DeepSpeed) takes part: each embeds its
share of the rows through the prepared model, the embeddings are gathered in dataset order (docs/evaluation.md).

Sharded by hand, in the rounds of :func:`hlss_hf.evaluation.embeddings._embed_rounds`, not by
`accelerate.data_loader.prepare_data_loader` + `gather_for_metrics` (which give the same embeddings for a map-style
split): for a stream Accelerate 1.16 shards a multi-file `datasets.IterableDataset` by file (unequal rows per
process: FSDP hangs, order lost), while its `IterableDatasetShard` has no length for `gather_for_metrics` to drop the
padding by and repeats every row in each DataLoader worker. The rounds give every process equal forwards, in stream
order, with any workers.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from accelerate.utils import broadcast_object_list
from torch import nn

from hlss_hf.evaluation.embeddings import EmbeddingSet, _embed_rounds, _embedding_set, _split_info
from hlss_hf.evaluation.knn import knn_evaluate
from hlss_hf.evaluation.metrics import check_aggregation


def distributed_knn_evaluate(
    accelerator,
    model: nn.Module,
    train_ds,
    val_ds,
    processor: Any = None,
    *,
    batch_size: int = 64,
    k: int = 200,
    temperature: float = 0.07,
    aggregation: str = "reference",
    chunk_size: int = 1024,
    num_workers: int | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """kNN evaluation in which every process takes part: for training-time evaluation under DDP, FSDP or DeepSpeed.

    :func:`distributed_evaluate` with :func:`knn_evaluate`. With one process the embeddings and metrics equal
    :func:`extract_embeddings` (same `batch_size`, CPU) followed by :func:`knn_evaluate`; every process
    returns the metrics.
    """
    check_aggregation(aggregation)
    knn = partial(knn_evaluate, k=k, temperature=temperature, chunk_size=chunk_size, aggregation=aggregation)
    settings = {"batch_size": batch_size, "num_workers": num_workers, "progress": progress}
    return distributed_evaluate(accelerator, model, train_ds, val_ds, knn, processor, **settings)


def distributed_evaluate(
    accelerator,
    model: nn.Module,
    train_ds,
    val_ds,
    evaluate_fn: Callable[[EmbeddingSet, EmbeddingSet], Any],
    processor: Any = None,
    *,
    batch_size: int = 64,
    num_workers: int | None = None,
    progress: bool = False,
) -> Any:
    """Embed two splits with every process taking part, then evaluate the embeddings on the main process.

    Call it on every process with the *prepared* model: the wrapped model's forward
    (`model(pixel_values=..., return_loss=False).image_embeds`) lets FSDP gather its shards and DeepSpeed ZeRO-3
    its partitions, where `get_image_features` on the unwrapped module would see only the local shard. Each
    process embeds its rounds of rows (:func:`~hlss_hf.evaluation.embeddings._embed_rounds`); the main process
    runs `evaluate_fn(train_set, val_set)` on the gathered sets and every process returns its result. The CPU /
    CUDA random state is restored afterwards (DataLoader workers draw a seed from it), so evaluating does not
    change training (docs/evaluation.md#during-training).

    `evaluate_fn` must not run the model (the other processes do not take part), and its result must be
    picklable. `processor`, `batch_size` (per process) and `num_workers` as for :func:`extract_embeddings`;
    `progress`: a bar on the main process.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sets = []
    was_training = model.training
    model.eval()
    device = accelerator.device
    cuda = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            for dataset in (train_ds, val_ds):
                sets.append(
                    _embed_across_processes(
                        accelerator, model, dataset, processor, batch_size, num_workers, progress
                    )
                )
    finally:
        model.train(was_training)
    # On the main process only; an error there reaches every process, so that none waits for the result forever.
    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = evaluate_fn(*sets)
        except Exception as err:  # noqa: BLE001 - raised below, on every process
            error = err
    if accelerator.num_processes > 1:
        message = [result, None if error is None else f"{type(error).__name__}: {error}"]
        result, main_error = broadcast_object_list(message, from_process=0)
        if error is None and main_error is not None:
            raise RuntimeError(f"evaluation failed on the main process: {main_error}")
    if error is not None:
        raise error
    return result


def _embed_across_processes(
    accelerator, model, dataset, processor, batch_size: int, num_workers: int | None, progress: bool
) -> EmbeddingSet | None:
    """Embed `dataset` on every process; the set on the main process, `None` on the others."""
    world, rank = accelerator.num_processes, accelerator.process_index
    device = accelerator.device
    info = _split_info(dataset)
    image_size = getattr(getattr(accelerator.unwrap_model(model), "config", None), "image_size", None)

    def embed(pixel_values: torch.Tensor) -> torch.Tensor:
        embeds = getattr(
            model(pixel_values=pixel_values, return_loss=False, return_dict=True), "image_embeds", None
        )
        if embeds is None:
            raise TypeError(
                f"{type(accelerator.unwrap_model(model)).__name__}.forward(pixel_values, return_loss=False) "
                "returned no image_embeds: distributed_knn_evaluate needs an HLSSModel-like forward"
            )
        return embeds

    show = progress and accelerator.is_main_process
    local, rows = _embed_rounds(
        embed,
        dataset,
        info,
        processor,
        image_size,
        batch_size,
        num_workers,
        device,
        show,
        world=world,
        rank=rank,
    )
    rounds, size, dim = local.shape
    if world > 1:
        # Every process must have read the same rows (a stream split by node would not be): say so, not hang.
        total = len(rows["label"]) if info.streamed else len(dataset)
        shapes = accelerator.gather(torch.tensor([[rounds, total]], device=device)).tolist()
        if any(shape != shapes[0] for shape in shapes):
            raise RuntimeError(
                f"the processes read different versions of split {info.split!r} ([rounds, rows] per process: "
                f"{shapes}); every process must see the whole split in the same order (do not split a stream by node)"
            )
    gathered = accelerator.gather(local.contiguous()) if world > 1 else local
    if not accelerator.is_main_process:
        return None
    return _embedding_set(
        dataset, info, rows, gathered.reshape(world, rounds, size, dim).transpose(0, 1).reshape(-1, dim).cpu()
    )
