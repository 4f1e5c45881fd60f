"""The loss of answers given prompts: (prompt, answer) pairs as chat-template ids, right-padded
batches with labels on the answer only, and the mean cross-entropy of those labels.

Only the answer tokens carry loss, and the language-model head runs on those positions only:
with a 49k vocabulary the head is a fifth of a small model's compute, and the prompt positions
(system prompt, request) are most of each sequence. The repair's task loss and the beds'
trainer both use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from adapter_repair.model.inputs import CACHE_FIELD, render_chat

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


def answer_loss(model: Any, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> Any:
    """Mean next-token cross-entropy over the labelled positions, with the head run on
    those positions only. Equal to ``model(..., labels=labels).loss``."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = inner.get_decoder(), inner.get_output_embeddings()
    if decoder is None or head is None or getattr(inner.config, "final_logit_softcapping", None):
        return model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
    # no cache: nothing decodes after this pass, and a checkpointed layer must not write one
    hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    return _head_loss(head, hidden, labels)  # hidden (b, t, d)


def _head_loss(head: Any, hidden: torch.Tensor, labels: torch.Tensor) -> Any:
    target = labels[:, 1:]  # (b, t-1)
    keep = target != -100
    logits = head(hidden[:, :-1][keep])  # (n, vocab)
    return F.cross_entropy(logits.float(), target[keep])


def answer_logprobs(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the summed log-probability of its labelled tokens and their number, both (b,):
    how likely the model finds each answer, teacher-forced. The head runs on the labelled
    positions only (the full logits where the model soft-caps them)."""
    target = labels[:, 1:]  # (b, t-1)
    keep = target != -100
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = inner.get_decoder(), inner.get_output_embeddings()
    if decoder is None or head is None or getattr(inner.config, "final_logit_softcapping", None):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1][keep]
    else:  # (n, vocab) above; hidden (b, t, d) here
        hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        logits = head(hidden[:, :-1][keep])  # (n, vocab)
    token_lp = logits.float().log_softmax(-1).gather(1, target[keep][:, None])[:, 0]  # (n,)
    rows = keep.nonzero()[:, 0]  # (n,) the row of each labelled token
    sums = torch.zeros(ids.shape[0], device=token_lp.device).index_add_(0, rows, token_lp)
    return sums, keep.sum(1).to(sums.device)  # (b,), (b,)


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
