"""Supervised training on chat answers, used to build the measurement beds (pico and small):
batches of similar length, a shared prompt prefix run once, and the answer-only loss of
:mod:`adapter_repair.model.answers`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from adapter_repair.model.answers import (
    Example,
    answer_loss,
    prefix_answer_loss,
    right_padded,
)
from adapter_repair.model.inputs import MIN_SHARED_PREFIX, shared_prefix_length

logger = logging.getLogger(__name__)


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


def _shared_unlabelled(batch: Sequence[Example]) -> int:
    """Length of the prefix common to ``batch`` that ends before every answer's first
    prediction; 0 when shorter than worth sharing."""
    n = min(shared_prefix_length([x for x, _ in batch]), min(start for _, start in batch) - 1)
    return n if n >= MIN_SHARED_PREFIX else 0


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
    once, at batch 1 (:func:`~adapter_repair.model.answers.prefix_answer_loss`): the same loss and gradients up to rounding,
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
