"""Stage 2's gradients: the adapter factors below the direction layer, and the gradient of
``-cos(mean h_L, target)`` with respect to them.

The base stays frozen (4-bit is fine); only the LoRA factors of decoder layers 0..L-1 get
gradients, because ``h_L`` is computed by a forward pass that stops at layer L
(:func:`adapter_repair.model.hidden.last_token_hidden`). The gradient is summed over prompt batches,
each batch's graph freed before the next, so memory holds one batch at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from adapter_repair.model.answers import answer_loss, encode_pairs, right_padded
from adapter_repair.model.hidden import last_token_hidden
from adapter_repair.model.inputs import (
    encode_prompts,
    model_device,
    pad_left,
    pad_token_id,
    render_chat,
)
from adapter_repair.model.memory import release_freed_memory

logger = logging.getLogger(__name__)

#: (input_ids, attention_mask), left padded
Batch = tuple[torch.Tensor, torch.Tensor]
#: (input_ids, attention_mask, labels), right padded, labels -100 outside the answers
Batch3 = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
#: prompts keep their last this many tokens in the answer loss
MAX_PROMPT_TOKENS = 1024


def prompt_batches(tokenizer: Any, prompts: Sequence[str], batch_size: int) -> list[Batch]:
    """Chat-template prompts in left-padded batches of similar length."""
    ids = encode_prompts(tokenizer, render_chat(tokenizer, prompts), None)
    ids = sorted(ids, key=len)
    pad = pad_token_id(tokenizer)
    return [pad_left(ids[i : i + batch_size], pad) for i in range(0, len(ids), batch_size)]


#: What a batch's states are pulled toward: one direction (d,) for every batch, or, per batch,
#: one state per prompt (b, d).
Targets = torch.Tensor | Sequence[torch.Tensor]


def _batch_loss(h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-cos(mean h, target) for a direction (d,); -mean_i cos(h_i, target_i) for per-prompt
    states (b, d)."""
    if target.dim() == 1:
        return -F.cosine_similarity(h.float().mean(0), target, dim=0)
    return -F.cosine_similarity(h.float(), target, dim=-1).mean()


def _target_of(targets: Targets, i: int, device: torch.device) -> torch.Tensor:
    t = targets if isinstance(targets, torch.Tensor) else targets[i]
    return t.to(device=device, dtype=torch.float32)


@torch.no_grad()
def prompt_targets(
    model: Any,
    batches: Sequence[Batch],
    layer: int,
    *,
    layers: torch.nn.ModuleList | None = None,
) -> list[torch.Tensor]:
    """Each batch's ``h_L`` (b, d) as the model stands now (float32, on CPU): per-prompt
    targets, e.g. the aligned model's own states for the harmful prompts."""
    device = model_device(model)
    return [
        last_token_hidden(model, ids.to(device), mask.to(device), layer, layers=layers)
        .float()
        .cpu()
        for ids, mask in batches
    ]


def _gradients(
    params: dict[str, torch.nn.Parameter], losses: Iterator[torch.Tensor]
) -> tuple[float, dict[str, torch.Tensor]]:
    """Sum of the losses ``losses`` yields (one graph at a time) and the sum of their
    gradients with respect to ``params`` (float32, on CPU, detached); nothing accumulates in
    the parameters' ``.grad``."""
    names = list(params)
    tensors = [params[n] for n in names]
    was = [t.requires_grad for t in tensors]
    for t in tensors:
        t.requires_grad_(True)
    total = 0.0
    # the first graph's gradients become the sums (no zero-filled copy of every factor beside
    # them: one factor-sized float32 set fewer at the backward's peak)
    grads: list[torch.Tensor | None] = [None] * len(tensors)
    try:
        for loss in losses:
            # the forward's freed temporaries back to the system before the backward grows
            # the heap again, and the backward's after it: on CPU what glibc keeps between
            # passes, not the live tensors, is most of a step's resident set (cost.md)
            release_freed_memory()
            parts = torch.autograd.grad(loss, tensors, allow_unused=True)
            for i, g in enumerate(parts):
                if g is None:
                    continue
                if grads[i] is None:  # a float32 tensor of its own, dense, to add into
                    own = g.dtype == torch.float32 and g.is_contiguous() and g._base is None
                    grads[i] = (
                        g
                        if own
                        else g.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
                    )
                else:
                    grads[i].add_(g)  # type: ignore[union-attr]
            del parts
            total += float(loss.detach())
            release_freed_memory()
    finally:
        for t, w in zip(tensors, was, strict=True):
            t.requires_grad_(w)
    return total, {
        n: (torch.zeros(t.shape, dtype=torch.float32) if g is None else g.cpu())
        for n, t, g in zip(names, tensors, grads, strict=True)
    }


def answer_batches(
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    batch_size: int,
    max_answer_tokens: int,
    ended: Sequence[bool] | None = None,
) -> list[Batch3]:
    """(prompt, answer) rows as right-padded (ids, mask, labels) batches of similar length,
    labels on the answer tokens only: the loss the fine-tune itself minimised."""
    examples = encode_pairs(tokenizer, pairs, MAX_PROMPT_TOKENS, max_answer_tokens, ended)
    examples = sorted(examples, key=lambda e: len(e[0]))
    pad = pad_token_id(tokenizer)
    return [
        right_padded(examples[i : i + batch_size], pad) for i in range(0, len(examples), batch_size)
    ]


def generated_answer_batches(
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    batch_size: int,
    max_new_tokens: int,
) -> list[Batch3]:
    """:func:`answer_batches` of a model's own greedy (prompt, answer) pairs: an answer that
    ran to ``max_new_tokens`` stays open (no end token is added)."""
    lengths = [len(tokenizer(a, add_special_tokens=False)["input_ids"]) for _, a in pairs]
    ended = [n < max_new_tokens for n in lengths]
    return answer_batches(tokenizer, pairs, batch_size, max_new_tokens, ended)


def answer_gradients(
    model: Any, batches: Sequence[Batch3], params: dict[str, torch.nn.Parameter]
) -> tuple[float, dict[str, torch.Tensor]]:
    """The summed mean cross-entropy of each batch's answers and its gradient with respect to
    ``params``. Unlike ``-cos`` to the fine-tuned states (zero gradient where the adapter
    stands), it says which coordinates the answers lean on before anything has moved."""
    device = model_device(model)
    losses = (
        answer_loss(model, ids.to(device), mask.to(device), labels.to(device))
        for ids, mask, labels in batches
    )
    return _gradients(params, losses)


def answer_loss_terms(model: Any, batches: Sequence[Batch3]) -> Iterator[torch.Tensor]:
    """Each batch's answer cross-entropy divided by the number of batches, one graph at a
    time: summed, the mean over batches (the heal backpropagates each term in turn, so
    memory holds one batch)."""
    device = model_device(model)
    for ids, mask, labels in batches:
        loss = answer_loss(model, ids.to(device), mask.to(device), labels.to(device))
        yield loss / len(batches)


def direction_gradients(
    model: Any,
    batches: Sequence[Batch],
    layer: int,
    target: Targets,
    params: dict[str, torch.nn.Parameter],
    *,
    layers: torch.nn.ModuleList | None = None,
) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss ``sum over batches of -cos(mean over the batch of h_L(x), target)`` (or, with
    per-prompt targets, of ``-mean_i cos(h_L(x_i), target_i)``) and its gradient with respect
    to ``params`` (float32, detached). Gradients are computed afresh (nothing accumulates
    across calls)."""
    device = model_device(model)

    def losses() -> Iterator[torch.Tensor]:
        for i, (ids, mask) in enumerate(batches):
            h = last_token_hidden(model, ids.to(device), mask.to(device), layer, layers=layers)
            yield _batch_loss(h, _target_of(target, i, device))

    return _gradients(params, losses())


def direction_loss_terms(
    model: Any,
    batches: Sequence[Batch],
    layer: int,
    target: Targets,
    *,
    layers: torch.nn.ModuleList | None = None,
) -> Iterator[torch.Tensor]:
    """Stage 2's loss (``-cos`` to the targets) of each batch divided by the number of
    batches, one graph at a time: summed, the mean over batches."""
    device = model_device(model)
    for i, (ids, mask) in enumerate(batches):
        h = last_token_hidden(model, ids.to(device), mask.to(device), layer, layers=layers)
        yield _batch_loss(h, _target_of(target, i, device)) / len(batches)


def fisher_diagonal(
    model: Any, batches: Sequence[Batch3], params: dict[str, torch.nn.Parameter]
) -> dict[str, torch.Tensor]:
    """The empirical diagonal Fisher of the answer loss: the mean over rows of each row's
    squared gradient with respect to ``params`` (float32, on CPU). One backward pass per row:
    a batch's summed gradient would square away the rows' disagreement."""
    device = model_device(model)
    total: dict[str, torch.Tensor] = {}
    n = 0
    for ids, mask, labels in batches:
        for i in range(ids.shape[0]):
            row = [t[i : i + 1].to(device) for t in (ids, mask, labels)]
            # a generator: the loss is built once _gradients has turned requires_grad on
            _, grads = _gradients(params, (answer_loss(model, *row) for _ in range(1)))
            for name, g in grads.items():
                total[name] = total[name] + g.square() if name in total else g.square()
            n += 1
    if n == 0:
        raise ValueError("the Fisher needs at least one answer row")
    return {name: t / n for name, t in total.items()}


@torch.no_grad()
def direction_cosine(
    model: Any,
    batches: Sequence[Batch],
    layer: int,
    target: Targets,
    *,
    layers: torch.nn.ModuleList | None = None,
) -> float:
    """Mean over batches of cos(mean h_L, target) (or of the per-prompt mean cosine): the
    signal stage 2 climbs."""
    device = model_device(model)
    values = []
    for i, (ids, mask) in enumerate(batches):
        h = last_token_hidden(model, ids.to(device), mask.to(device), layer, layers=layers)
        values.append(-float(_batch_loss(h, _target_of(target, i, h.device))))
    return sum(values) / len(values)
