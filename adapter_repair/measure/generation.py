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

from adapter_repair.config import GenerationConfig
from adapter_repair.errors import AdapterRepairError

logger = logging.getLogger(__name__)


def render_chat(tokenizer: Any, prompts: Sequence[str]) -> list[str]:
    """Each prompt as a one-turn user message in the model's chat template, with the
    generation prompt and no answer."""
    if not getattr(tokenizer, "chat_template", None):
        raise AdapterRepairError(
            f"the tokenizer of {getattr(tokenizer, 'name_or_path', 'this model')} has no chat "
            "template; adapter-repair measures chat models through their template.",
            "Use the chat/instruct model the adapter was trained on, or give the adapter folder "
            "a tokenizer with a chat_template.",
        )
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]


def context_length(model: Any) -> int | None:
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    n = getattr(cfg, "max_position_embeddings", None)
    return int(n) if n else None


def encode_prompts(tokenizer: Any, texts: Sequence[str], max_length: int | None) -> list[list[int]]:
    """Token ids of rendered prompts; those over ``max_length`` cut from the left (warned)."""
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    if max_length is not None:
        too_long = [i for i, x in enumerate(ids) if len(x) > max_length]
        if too_long:
            logger.warning(
                "%d prompt(s) exceed the context (%d tokens with room for the answer) and are "
                "truncated from the left: prompt #%s",
                len(too_long),
                max_length,
                ", #".join(str(i) for i in too_long[:5]) + (" ..." if len(too_long) > 5 else ""),
            )
            ids = [x[-max_length:] for x in ids]
    return ids


def pad_left(batch: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (batch, longest), padding on the left."""
    width = max(len(x) for x in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, x in enumerate(batch):
        if x:
            ids[row, width - len(x) :] = torch.tensor(list(x), dtype=torch.long)
            mask[row, width - len(x) :] = 1
    return ids, mask


def pad_token_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    if pad is None:
        raise AdapterRepairError(
            "the tokenizer has neither a pad nor an end-of-sequence token.",
            "Use the model's own tokenizer.",
        )
    return int(pad)


def model_device(model: Any) -> torch.device:
    return next(p.device for p in model.parameters() if p.device.type != "meta")


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


#: Shortest common prompt prefix worth encoding once (the chat template's system prompt is
#: 20-40 tokens; below this the extra forward pass costs more than it saves).
MIN_SHARED_PREFIX = 16


def _cache_field() -> str:
    """Where a forward pass returns its key/value cache and ``generate`` takes one back:
    ``cache`` since transformers 5.2x, ``past_key_values`` before (now deprecated)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    fields = getattr(CausalLMOutputWithPast, "__dataclass_fields__", {})
    return "cache" if "cache" in fields else "past_key_values"


CACHE_FIELD = _cache_field()


def shared_prefix_length(ids: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix common to every prompt, leaving each at least one token of
    its own (generation needs a last token to run on)."""
    if not ids:
        return 0
    n = min(len(x) for x in ids) - 1
    first = ids[0]
    for x in ids[1:]:
        k = 0
        while k < n and x[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


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
