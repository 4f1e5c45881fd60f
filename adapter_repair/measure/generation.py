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
    position_ids_for,
    render_chat,
    shared_prefix_length,
)
from adapter_repair.model.lean import lean_lora, lean_runner

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
    the left-padded full prompt, up to floating-point rounding. A row that has ended leaves
    its batch at once (:func:`_decode_batch`).
    """
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    device = model_device(model)
    was_training = model.training
    model.eval()
    shared = shared_prefix_length(ids) if share_prefix else 0
    if shared < MIN_SHARED_PREFIX:
        shared = 0
    ends = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    bar = tqdm(total=len(ids), desc=desc, unit="prompt", disable=not progress, leave=False)
    # nothing here is differentiated: inference mode skips autograd's bookkeeping, and the
    # LoRA modules run their lean forward (the same values, less Python per token)
    with torch.inference_mode(), lean_lora(model):
        try:
            answers = _decode_batches(
                lean_runner(model),
                ids,
                order,
                shared,
                batch_size,
                pad,
                ends,
                max_new_tokens,
                device,
                bar,
            )
        finally:
            bar.close()
            model.train(was_training)
    return answers


def _decode_batches(
    model: Any,
    ids: Sequence[Sequence[int]],
    order: Sequence[int],
    shared: int,
    batch_size: int,
    pad: int,
    ends: set[int],
    max_new_tokens: int,
    device: torch.device,
    bar: Any,
) -> list[list[int]]:
    """:func:`greedy_decode`'s loop over batches (``order``: longest first), the ``shared``
    prefix encoded once."""
    answers: list[list[int]] = [[] for _ in ids]
    prefix_cache = None
    prefix = torch.tensor([list(ids[0][:shared])], dtype=torch.long)  # (1, shared)
    if shared:
        out = model(input_ids=prefix.to(device), use_cache=True)
        prefix_cache = getattr(out, CACHE_FIELD)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        input_ids, mask = pad_left([ids[i][shared:] for i in chunk], pad)
        cache = None
        if prefix_cache is not None:
            input_ids = torch.cat([prefix.expand(len(chunk), -1), input_ids], dim=1)
            mask = torch.cat([torch.ones(len(chunk), shared, dtype=mask.dtype), mask], dim=1)
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(len(chunk))
        new = _decode_batch(
            model, input_ids.to(device), mask.to(device), cache, shared, max_new_tokens, ends
        )
        for row, i in enumerate(chunk):
            answers[i] = new[row]
        bar.update(len(chunk))
    return answers


def _decode_batch(
    model: Any,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    cache: Any,
    cached: int,
    max_new_tokens: int,
    ends: set[int],
) -> list[list[int]]:
    """Greedy continuations of one left-padded batch ``input_ids`` (b, t) whose first
    ``cached`` tokens are already in ``cache`` (or ``cache`` None and ``cached`` 0), each cut
    after its first end token.

    Why not ``generate``: a row that has ended stays in ``generate``'s batch, and its cache,
    until the last row ends, so a batch of short refusals and one long answer costs the long
    answer's length for every row. Here a row leaves the batch and the cache as soon as it
    ends. The steps are ``generate``'s greedy ones (positions from the attention mask, the
    last position's logits only, argmax), so each row's tokens are the same.
    """
    from transformers import DynamicCache

    b = input_ids.shape[0]
    device = input_ids.device
    answers: list[list[int]] = [[] for _ in range(b)]
    live = torch.arange(b, device=device)  # rows still decoding, by their place in the batch
    positions = position_ids_for(mask).masked_fill(mask == 0, 1)  # (b, t)
    step_ids = input_ids[:, cached:]  # (b, t - cached): what the cache does not hold yet
    step_positions = positions[:, cached:]
    cache = cache if cache is not None else DynamicCache()
    end_ids = torch.tensor(sorted(ends), dtype=torch.long, device=device)
    extra = _logits_to_keep(model)
    ready = _ready_masks(model)
    for k in range(max_new_tokens):
        padded = ready and k > 0 and not bool(mask.all())
        out = model(
            input_ids=step_ids,
            # (live, 1, 1, t): a one-token step attends to every unpadded position
            attention_mask=mask.bool()[:, None, None, :] if padded else mask,
            position_ids=step_positions,
            use_cache=True,
            **{CACHE_FIELD: cache},
            **extra,
        )
        cache = getattr(out, CACHE_FIELD)
        token = out.logits[:, -1, :].argmax(dim=-1)  # (live,)
        for row, t in zip(live.tolist(), token.tolist(), strict=True):
            answers[row].append(t)
        done = torch.isin(token, end_ids)  # (live,)
        if bool(done.all()):
            break
        if bool(done.any()):
            keep = (~done).nonzero().squeeze(1)  # (kept,)
            cache.batch_select_indices(keep)
            live, token, mask = live[keep], token[keep], mask[keep]
            step_positions = step_positions[keep]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)  # (live, t + 1)
        step_ids = token.unsqueeze(1)  # (live, 1)
        step_positions = step_positions[:, -1:] + 1
    return answers


def _ready_masks(model: Any) -> bool:
    """Whether a one-token decoding step may get its attention mask ready-made, as the
    (b, 1, 1, t) boolean tensor Hugging Face's ``sdpa_mask`` would build from the 2-D mask:
    the same tensor reaches attention, without rebuilding it every step. Only for scaled
    dot-product attention with every layer attending in full (a sliding window or chunked
    layer needs its own mask); elsewhere the 2-D mask goes in as before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if getattr(config, "sliding_window", None) or getattr(config, "attention_chunk_size", None):
        return False
    kinds = getattr(config, "layer_types", None) or ["full_attention"]
    return all(k == "full_attention" for k in kinds)


def _logits_to_keep(model: Any) -> dict[str, int]:
    """``logits_to_keep=1`` where the model's forward takes it (recent transformers'
    decoder-only models do): only the last position's logits are computed, not a
    (batch, prompt length, vocabulary) tensor at the prefill."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    accepts = "logits_to_keep" in inspect.signature(base.forward).parameters
    return {"logits_to_keep": 1} if accepts else {}


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
