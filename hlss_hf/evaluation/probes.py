"""Linear probe and zero-shot classification of frozen embeddings (docs/evaluation.md)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hlss_hf.evaluation.embeddings import EmbeddingSet, check_compatible, pooled
from hlss_hf.evaluation.metrics import hierarchical_metrics


def train_linear_probe(
    train: EmbeddingSet, weight_decay: float = 1e-4, max_iter: int = 200, seed: int = 0
) -> nn.Linear:
    """Multinomial logistic regression on frozen embeddings, full batch with `max_iter` L-BFGS iterations and
    the L2 penalty `weight_decay * ||W||^2 / 2`; returns `nn.Linear(D, C)` on the CPU, in eval mode."""
    if len(train) == 0:
        raise ValueError("cannot train a linear probe on an empty embedding set")
    if weight_decay < 0 or max_iter < 1:
        raise ValueError(f"need weight_decay >= 0 and max_iter >= 1, got {weight_decay}, {max_iter}")
    generator = torch.Generator().manual_seed(seed)
    x, y = train.embeddings.float(), train.labels
    probe = nn.Linear(x.shape[1], train.num_classes)
    with torch.no_grad():
        probe.weight.normal_(0, 0.01, generator=generator)
        probe.bias.zero_()
    optimizer = torch.optim.LBFGS(
        probe.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe"
    )

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(x), y) + 0.5 * weight_decay * probe.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return probe.eval()


def linear_probe_evaluate(
    train: EmbeddingSet,
    val: EmbeddingSet,
    weight_decay: float = 1e-4,
    max_iter: int = 200,
    seed: int = 0,
    aggregation: str = "sum",
) -> tuple[dict[str, float], torch.Tensor]:
    """`(metrics, scores)`: :func:`hierarchical_metrics` (slide / patient rule `aggregation`) of the
    probabilities `[len(val), C]` that :func:`train_linear_probe` on `train` gives `val`."""
    check_compatible(train, val)
    probe = train_linear_probe(train, weight_decay=weight_decay, max_iter=max_iter, seed=seed)
    with torch.no_grad():
        scores = probe(val.embeddings.float()).softmax(dim=-1)
    metrics = hierarchical_metrics(
        scores, val.labels, val.slide_ids, val.patient_ids, val.num_classes, aggregation=aggregation
    )
    return metrics, scores


def class_text_embeddings(
    model: nn.Module,
    tokenizer: Any,
    class_prompts: Mapping[str, Sequence[str]],
    class_names: Sequence[str],
    batch_size: int = 64,
) -> torch.Tensor:
    """`[C, D]` class text embeddings in `class_names` order, `normalize(mean_k normalize(text(prompt_k)))`
    (prompt ensembling) through the model's `get_text_features`; `class_prompts` must name exactly those."""
    if getattr(model, "text_model", "missing") is None or not callable(
        getattr(model, "get_text_features", None)
    ):
        raise ValueError(f"{type(model).__name__} has no text tower: zero-shot classification needs one")
    if tokenizer is None:
        raise ValueError("zero-shot classification needs the text tower's tokenizer, got None")
    unknown = [name for name in class_prompts if name not in class_names]
    if unknown:
        raise ValueError(f"prompts given for unknown classes {unknown}; the classes are {list(class_names)}")
    missing = [name for name in class_names if not class_prompts.get(name)]
    if missing:
        raise ValueError(f"no prompt for classes {missing}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    rows = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for name in class_names:
                prompts = [str(p) for p in class_prompts[name]]
                embeds = []
                for start in range(0, len(prompts), batch_size):
                    tokens = tokenizer(
                        prompts[start : start + batch_size],
                        padding=True,
                        truncation=True,
                        return_tensors="pt",
                    )
                    out = model.get_text_features(
                        input_ids=tokens["input_ids"].to(device),
                        attention_mask=tokens["attention_mask"].to(device),
                    )
                    embeds.append(F.normalize(pooled(out, "text_embeds").float(), dim=-1))
                rows.append(F.normalize(torch.cat(embeds).mean(dim=0), dim=-1).cpu())
    finally:
        model.train(was_training)
    return torch.stack(rows)


def zero_shot_scores(
    model: nn.Module,
    tokenizer: Any,
    embeddings: EmbeddingSet | torch.Tensor,
    class_prompts: Mapping[str, Sequence[str]],
    class_names: Sequence[str] | None = None,
    temperature: float = 0.01,
) -> torch.Tensor:
    """Zero-shot class probabilities: softmax over classes of `cos(image, class text) / temperature`.

    Class order: `class_names`, else the set's, else `class_prompts`'; the default temperature is CLIP's logit
    scale of 100.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if isinstance(embeddings, EmbeddingSet):
        class_names = class_names if class_names is not None else embeddings.class_names
        embeddings = embeddings.embeddings
    class_names = list(class_names) if class_names is not None else list(class_prompts)
    text = class_text_embeddings(model, tokenizer, class_prompts, class_names)
    return zero_shot_probabilities(embeddings, text, temperature)


def zero_shot_probabilities(
    embeddings: torch.Tensor, class_embeds: torch.Tensor, temperature: float = 0.01
) -> torch.Tensor:
    """`[N, C]` softmax over classes of `cos(image, class text) / temperature`, from image embeddings `[N, D]`
    and :func:`class_text_embeddings` `[C, D]`."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if class_embeds.shape[1] != embeddings.shape[1]:
        raise ValueError(
            f"text embeddings have size {class_embeds.shape[1]}, image embeddings {embeddings.shape[1]}"
        )
    text = F.normalize(class_embeds.float().to(embeddings.device), dim=-1)
    logits = F.normalize(embeddings.float(), dim=-1) @ text.T
    return (logits / temperature).softmax(dim=-1)


def zero_shot_evaluate(
    model: nn.Module,
    tokenizer: Any,
    val: EmbeddingSet,
    class_prompts: Mapping[str, Sequence[str]],
    temperature: float = 0.01,
    aggregation: str = "sum",
) -> tuple[dict[str, float], torch.Tensor]:
    """:func:`zero_shot_scores` on `val`, then :func:`hierarchical_metrics` with `aggregation` (`"sum"` or
    `"reference"`). Returns `(metrics, scores)`."""
    if len(val) == 0:
        raise ValueError("cannot evaluate an empty embedding set")
    scores = zero_shot_scores(model, tokenizer, val, class_prompts, temperature=temperature)
    metrics = hierarchical_metrics(
        scores, val.labels, val.slide_ids, val.patient_ids, val.num_classes, aggregation=aggregation
    )
    return metrics, scores
