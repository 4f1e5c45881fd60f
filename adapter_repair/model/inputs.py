"""Prompts as model inputs: the chat template, token ids, left padding, positions, and the
shared-prefix key/value cache. Generation, hidden states and answer losses all build their
batches here, so a prompt means the same tokens everywhere."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

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


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding, so a padded prompt sees the positions it would alone."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (batch, seq)


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
