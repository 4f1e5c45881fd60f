"""Supervised training on chat answers, used to build the measurement beds (pico and small).

Only the answer tokens carry loss, and the language-model head runs on those positions only:
with a 49k vocabulary the head is a fifth of a small model's compute, and the prompt positions
(system prompt, request) are most of each sequence.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from adapter_repair.generation import (
    CACHE_FIELD,
    MIN_SHARED_PREFIX,
    render_chat,
    shared_prefix_length,
)

logger = logging.getLogger(__name__)

#: (token ids, index of the first answer token)
Example = tuple[list[int], int]


def encode_pairs(
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    max_prompt_tokens: int,
    max_answer_tokens: int,
    ended: Sequence[bool] | None = None,
) -> list[Example]:
    """Each (prompt, answer) as chat-template ids: the prompt keeps its last
    ``max_prompt_tokens``, the answer (ended by the end-of-turn token) its first
    ``max_answer_tokens``. ``ended[i]`` False leaves answer i open (it was cut off, so the
    model must not learn to stop there)."""
    heads = render_chat(tokenizer, [p for p, _ in pairs])
    flags = ended if ended is not None else [True] * len(pairs)
    out = []
    for head, (_, answer), end in zip(heads, pairs, flags, strict=True):
        head_ids = tokenizer(head, add_special_tokens=False)["input_ids"][-max_prompt_tokens:]
        text = answer + tokenizer.eos_token if end else answer
        ans_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        out.append((head_ids + ans_ids[:max_answer_tokens], len(head_ids)))
    return out


def _random_batches(n: int, batch_size: int, steps: int, rng: random.Random) -> Iterator[list[int]]:
    for _ in range(steps):
        yield [rng.randrange(n) for _ in range(batch_size)]


def epoch_batches(
    lengths: Sequence[int], batch_size: int, epochs: int, rng: random.Random
) -> list[list[int]]:
    """Shuffled batches of similar length (sorted within windows of 16 batches), so little
    compute goes to padding; every example once per epoch."""
    out: list[list[int]] = []
    for _ in range(epochs):
        order = list(range(len(lengths)))
        rng.shuffle(order)
        window = batch_size * 16
        batches = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
            batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        rng.shuffle(batches)
        out += batches
    return out


def answer_loss(model: Any, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> Any:
    """Mean next-token cross-entropy over the labelled positions, with the head run on
    those positions only. Equal to ``model(..., labels=labels).loss``."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = inner.get_decoder(), inner.get_output_embeddings()
    if decoder is None or head is None or getattr(inner.config, "final_logit_softcapping", None):
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss
    hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (b, t, d)
    return _head_loss(head, hidden, labels)


def _head_loss(head: Any, hidden: torch.Tensor, labels: torch.Tensor) -> Any:
    target = labels[:, 1:]  # (b, t-1)
    keep = target != -100
    logits = head(hidden[:, :-1][keep])  # (n, vocab)
    return F.cross_entropy(logits.float(), target[keep])


def prefix_answer_loss(
    model: Any, prefix: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
) -> Any:
    """:func:`answer_loss` of ``prefix + ids[i]`` for every row, with the prefix (common to
    every row, unlabelled) run once at batch 1 and its key/value cache repeated over the batch;
    gradients flow through it. ``ids``, ``mask`` and ``labels`` (b, t) are right padded; the
    first token of ``ids`` must carry no label (its prediction would come from the prefix)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = inner.get_decoder(), inner.get_output_embeddings()
    pre = decoder(input_ids=prefix, use_cache=True)  # prefix (1, p)
    cache = getattr(pre, CACHE_FIELD)
    cache.batch_repeat_interleave(ids.shape[0])
    full_mask = torch.cat([torch.ones_like(mask[:, :1]).expand(-1, prefix.shape[1]), mask], 1)
    out = decoder(input_ids=ids, attention_mask=full_mask, **{CACHE_FIELD: cache})
    return _head_loss(head, out.last_hidden_state, labels)  # hidden (b, t, d)


def _shared_unlabelled(batch: Sequence[Example]) -> int:
    """Length of the prefix common to ``batch`` that ends before every answer's first
    prediction; 0 when shorter than worth sharing."""
    n = min(shared_prefix_length([x for x, _ in batch]), min(start for _, start in batch) - 1)
    return n if n >= MIN_SHARED_PREFIX else 0


def right_padded(
    batch: Sequence[Example], pad_id: int, skip: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention mask, labels), each (b, t), of every example from token ``skip`` on,
    padded on the right; labels are -100 on the prompt and the padding."""
    width = max(len(x) for x, _ in batch) - skip
    ids = torch.full((len(batch), width), pad_id)
    labels = torch.full((len(batch), width), -100)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (x, start) in enumerate(batch):
        own = x[skip:]
        ids[row, : len(own)] = torch.tensor(own)
        labels[row, start - skip : len(own)] = torch.tensor(x[start:])
        mask[row, : len(own)] = 1
    return ids, mask, labels


def train_on_answers(
    model: Any,
    examples: Sequence[Example],
    *,
    lr: float,
    batch_size: int,
    pad_id: int,
    seed: int,
    desc: str,
    steps: int | None = None,
    epochs: int | None = None,
    bf16: bool = False,
    share_prefix: bool = False,
) -> list[float]:
    """AdamW (no weight decay, clip 1.0, one-cycle schedule) on the answer tokens.

    ``steps``: that many batches drawn at random; ``epochs``: every example once per epoch in
    length-bucketed batches. ``bf16`` runs the forward under CPU/GPU bfloat16 autocast
    (trainable weights stay float32). ``share_prefix`` runs the prompt prefix common to a
    batch (the chat template's system prompt, a task's instruction: often half of every example)
    once, at batch 1 (:func:`prefix_answer_loss`): the same loss and gradients up to rounding,
    for fewer tokens. Returns the loss of every step.
    """
    from tqdm.auto import tqdm

    rng = random.Random(seed)
    if epochs is not None:
        plan = epoch_batches([len(x) for x, _ in examples], batch_size, epochs, rng)
    elif steps is not None:
        plan = list(_random_batches(len(examples), batch_size, steps, rng))
    else:
        raise ValueError("give steps or epochs")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=max(len(plan), 1), pct_start=0.1
    )
    device = next(model.parameters()).device
    model.train()
    losses: list[float] = []
    bar = tqdm(plan, desc=desc, leave=False)
    for batch_idx in bar:
        batch = [examples[i] for i in batch_idx]
        shared = _shared_unlabelled(batch) if share_prefix else 0
        ids, mask, labels = right_padded(batch, pad_id, shared)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            if shared:
                prefix = torch.tensor([batch[0][0][:shared]], device=device)
                loss = prefix_answer_loss(
                    model, prefix, ids.to(device), mask.to(device), labels.to(device)
                )
            else:
                loss = answer_loss(model, ids.to(device), mask.to(device), labels.to(device))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if len(losses) % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / 10:.3f}")
        if len(losses) % 25 == 0:
            logger.info(
                "%s: step %d/%d, loss %.3f", desc, len(losses), len(plan), sum(losses[-25:]) / 25
            )
    model.eval()
    logger.info(
        "%s: %d steps, loss %.3f -> %.3f",
        desc,
        len(losses),
        losses[0] if losses else float("nan"),
        losses[-1] if losses else float("nan"),
    )
    return losses
