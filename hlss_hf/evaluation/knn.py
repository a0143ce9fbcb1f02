"""Weighted kNN classification of frozen embeddings, as the HLSS paper evaluates (docs/method.md#knn-evaluation)."""

from __future__ import annotations

import warnings

import torch

from hlss_hf.evaluation.embeddings import EmbeddingSet, check_compatible
from hlss_hf.evaluation.metrics import check_aggregation, hierarchical_metrics

# Elements of one similarity block in knn_predict (float32: 128 MiB); bounds memory whatever the bank size.
DEFAULT_MAX_BLOCK_ELEMENTS = 2**25


def knn_predict(
    query: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.07,
    chunk_size: int = 1024,
    max_block_elements: int = DEFAULT_MAX_BLOCK_ELEMENTS,
) -> torch.Tensor:
    """Weighted kNN class scores: each of the `k` most similar bank entries votes `exp(sim / temperature)`.

    Similarity is the dot product, i.e. cosine on L2-normalised embeddings. Queries are processed `chunk_size`
    at a time and, when `chunk_size * len(bank)` exceeds `max_block_elements`, the bank is scanned in blocks
    with a running top-k merge, so the extra memory is bounded by about `2 * max_block_elements` floats
    (128 MiB per block by default) whatever the sizes.

    Returns the summed votes per class `[Q, C]` of queries `[Q, D]` against the bank `[M, D]` with
    `bank_labels` `[M]`; `k` must be in `[1, M]` (no silent clamping here: :func:`knn_scores` clamps).
    """
    if query.ndim != 2 or bank.ndim != 2 or query.shape[1] != bank.shape[1]:
        raise ValueError(
            f"query [Q, D] and bank [M, D] must share D; got {tuple(query.shape)}, {tuple(bank.shape)}"
        )
    num_bank = bank.shape[0]
    if bank_labels.shape != (num_bank,):
        raise ValueError(f"bank_labels must be [{num_bank}], got {tuple(bank_labels.shape)}")
    if not 1 <= k <= num_bank:
        raise ValueError(f"k={k} must be between 1 and the bank size ({num_bank} embeddings)")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1 or max_block_elements < 1:
        raise ValueError(
            f"chunk_size and max_block_elements must be >= 1, got {chunk_size}, {max_block_elements}"
        )
    bank_labels = bank_labels.to(device=bank.device, dtype=torch.long)
    if num_bank and (bank_labels.min() < 0 or bank_labels.max() >= num_classes):
        raise ValueError(
            f"bank_labels must lie in [0, {num_classes}), got [{bank_labels.min()}, {bank_labels.max()}]"
        )
    query = query.to(device=bank.device, dtype=bank.dtype)

    query_chunk = min(chunk_size, max(1, query.shape[0]))
    # Bank block: as large as the element budget allows, but never smaller than k (the merge keeps k per query).
    bank_chunk = max(k, max_block_elements // query_chunk)
    scores = torch.zeros(query.shape[0], num_classes, dtype=torch.float32, device=bank.device)
    for q_start in range(0, query.shape[0], query_chunk):
        q = query[q_start : q_start + query_chunk]
        top_sim = top_idx = None
        for b_start in range(0, num_bank, bank_chunk):
            sim = q @ bank[b_start : b_start + bank_chunk].T  # [q, b]
            block_sim, block_idx = sim.topk(min(k, sim.shape[1]), dim=1)
            block_idx += b_start
            del sim
            if top_sim is None:
                top_sim, top_idx = block_sim, block_idx
            else:
                # Running merge: keep the k best of the previous best and this block's best.
                merged_sim = torch.cat([top_sim, block_sim], dim=1)
                merged_idx = torch.cat([top_idx, block_idx], dim=1)
                top_sim, order = merged_sim.topk(min(k, merged_sim.shape[1]), dim=1)
                top_idx = merged_idx.gather(1, order)
        weights = (top_sim.float() / temperature).exp()  # [q, k]
        scores[q_start : q_start + q.shape[0]].scatter_add_(1, bank_labels[top_idx], weights)
    return scores


def knn_scores(
    train: EmbeddingSet, val: EmbeddingSet, k: int = 200, temperature: float = 0.07, chunk_size: int = 1024
) -> torch.Tensor:
    """kNN patch scores `[len(val), C]` of `val` against the bank `train`. A `k` beyond the bank is clamped
    with a warning (small demo datasets have under 200 training patches); :func:`knn_predict` refuses it."""
    check_compatible(train, val)
    if k > len(train):
        warnings.warn(
            f"k={k} is larger than the training bank ({len(train)} patches); using k={len(train)}",
            stacklevel=2,
        )
        k = len(train)
    return knn_predict(
        val.embeddings,
        train.embeddings,
        train.labels,
        train.num_classes,
        k=k,
        temperature=temperature,
        chunk_size=chunk_size,
    )


def knn_evaluate(
    train: EmbeddingSet,
    val: EmbeddingSet,
    k: int = 200,
    temperature: float = 0.07,
    chunk_size: int = 1024,
    aggregation: str = "reference",
) -> dict[str, float]:
    """kNN evaluation (docs/method.md#knn-evaluation): :func:`knn_scores` of `val` against the bank `train`,
    then :func:`hierarchical_metrics` with the slide / patient rule `aggregation` (default: reference)."""
    check_aggregation(aggregation)
    scores = knn_scores(train, val, k=k, temperature=temperature, chunk_size=chunk_size)
    return hierarchical_metrics(
        scores, val.labels, val.slide_ids, val.patient_ids, val.num_classes, aggregation=aggregation
    )
