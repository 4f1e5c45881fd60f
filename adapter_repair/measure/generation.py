"""Batched greedy generation with the model's chat template.

Why not one ``generate`` call per prompt (what the reference code does): evaluation dominates
a repair's wall time. Prompts are rendered with the chat template, sorted by length so that a
batch holds prompts of similar length (little padding), left padded, decoded greedily, and a
batch stops as soon as every sequence in it has ended. Results come back in input order.

Prompts longer than the model's context (less ``max_new_tokens``) are truncated from the left,
with a warning: the end of the rendered prompt (the user's last words and the generation
prompt) is what the answer depends on most.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from adapter_repair.measure.config import GenerationConfig
from adapter_repair.model.inputs import (
    CACHE_FIELD,
    MIN_SHARED_PREFIX,
    context_length,
    encode_prompts,
    model_device,
    pad_left,
    pad_token_id,
    render_chat,
    shared_prefix_length,
)

logger = logging.getLogger(__name__)


def generate_ids(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    config: GenerationConfig | None = None,
    *,
    desc: str = "generate",
) -> tuple[list[list[int]], list[list[int]]]:
    """Greedy decoding of ``prompts`` (chat template applied), in input order.

    Returns (prompt token ids, answer token ids), the answer cut after its first
    end-of-sequence token (kept) and without padding.
    """
    config = config or GenerationConfig()
    if not prompts:
        return [], []
    context = context_length(model)
    limit = None if context is None else max(1, context - config.max_new_tokens)
    ids = encode_prompts(tokenizer, render_chat(tokenizer, prompts), limit)
    answers = greedy_decode(
        model,
        ids,
        max_new_tokens=config.max_new_tokens,
        batch_size=config.batch_size,
        pad=pad_token_id(tokenizer),
        eos=tokenizer.eos_token_id,
        progress=config.progress,
        desc=desc,
    )
    return ids, answers


def greedy_decode(
    model: Any,
    ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    batch_size: int,
    pad: int,
    eos: int | list[int] | None,
    progress: bool = False,
    desc: str = "generate",
    share_prefix: bool = True,
) -> list[list[int]]:
    """Greedy continuations of already-encoded prompts, in input order: batches of similar
    length (longest first), each cut after its first end token.

    Prompts rendered with one chat template share its system prompt (and a task's instruction),
    often half of every prompt. With ``share_prefix`` that common prefix is encoded once and its
    key/value cache copied into every batch, whose own tokens follow it after padding
    (``prefix | pad | prompt``, masked, with positions counted over real tokens only), so
    prefilling costs what the prompts' own tokens cost. Each answer equals the one decoded from
    the left-padded full prompt, up to floating-point rounding.
    """
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    device = model_device(model)
    answers: list[list[int]] = [[] for _ in ids]
    was_training = model.training
    model.eval()
    shared = shared_prefix_length(ids) if share_prefix else 0
    if shared < MIN_SHARED_PREFIX:
        shared = 0
    bar = tqdm(total=len(ids), desc=desc, unit="prompt", disable=not progress, leave=False)
    try:
        prefix_cache = None
        prefix = torch.tensor([list(ids[0][:shared])], dtype=torch.long)  # (1, shared)
        if shared:
            with torch.no_grad():
                out = model(input_ids=prefix.to(device), use_cache=True)
                prefix_cache = getattr(out, CACHE_FIELD)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            input_ids, mask = pad_left([ids[i][shared:] for i in chunk], pad)
            extra: dict[str, Any] = {}
            if prefix_cache is not None:
                input_ids = torch.cat([prefix.expand(len(chunk), -1), input_ids], dim=1)
                mask = torch.cat([torch.ones(len(chunk), shared, dtype=mask.dtype), mask], dim=1)
                cache = copy.deepcopy(prefix_cache)
                cache.batch_repeat_interleave(len(chunk))
                extra[CACHE_FIELD] = cache
            with torch.no_grad():
                out = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=mask.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=pad,
                    eos_token_id=eos,
                    **extra,
                )
            new = out[:, input_ids.shape[1] :].cpu().tolist()
            for row, i in enumerate(chunk):
                answers[i] = _cut_at_eos(new[row], eos)
            bar.update(len(chunk))
    finally:
        bar.close()
        model.train(was_training)
    return answers


def _cut_at_eos(tokens: list[int], eos: int | list[int] | None) -> list[int]:
    ends = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    for j, t in enumerate(tokens):
        if t in ends:
            return tokens[: j + 1]
    return tokens


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    config: GenerationConfig | None = None,
    *,
    desc: str = "generate",
) -> list[str]:
    """Greedy answers to ``prompts`` (chat template applied) as text, in input order."""
    _, answers = generate_ids(model, tokenizer, prompts, config, desc=desc)
    return [tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers]
