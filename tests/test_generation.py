"""Batched greedy generation: same answers as one prompt at a time, in order, deterministic, and
with a shared prompt prefix encoded once; left truncation of over-long prompts; a clear error
without a chat template."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapter_repair.errors import AdapterRepairError
from adapter_repair.measure import prompts as P
from adapter_repair.measure.config import GenerationConfig
from adapter_repair.measure.generation import generate, generate_ids, greedy_decode
from adapter_repair.model.inputs import (
    MIN_SHARED_PREFIX,
    encode_prompts,
    pad_left,
    render_chat,
    shared_prefix_length,
)


@pytest.fixture(scope="module")
def chat(tiny_chat_dir: Path):
    return (
        AutoModelForCausalLM.from_pretrained(tiny_chat_dir).eval(),
        AutoTokenizer.from_pretrained(tiny_chat_dir),
    )


def test_batched_equals_one_at_a_time_and_keeps_order(chat) -> None:
    model, tok = chat
    prompts = list(P.harmful("eval").take(5).prompts) + list(P.benign("benign").take(4).prompts)
    cfg = GenerationConfig(max_new_tokens=8, batch_size=4, progress=False)
    batched = generate(model, tok, prompts, cfg)
    alone = [generate(model, tok, [p], GenerationConfig(8, 1, False))[0] for p in prompts]
    assert batched == alone
    assert generate(model, tok, prompts, cfg) == batched  # deterministic
    assert generate(model, tok, [], cfg) == []


def test_answers_are_cut_after_the_end_token(chat) -> None:
    model, tok = chat
    _, answers = generate_ids(model, tok, ["hello"] * 3, GenerationConfig(12, 3, False))
    for a in answers:
        assert tok.eos_token_id not in a[:-1]
        assert len(a) <= 12


def test_render_uses_the_chat_template(chat) -> None:
    _, tok = chat
    (text,) = render_chat(tok, ["Hi there"])
    assert text == "<|user|>\nHi there<|end|>\n<|assistant|>\n"


def test_over_long_prompts_are_cut_from_the_left_with_a_warning(
    chat, caplog: pytest.LogCaptureFixture
) -> None:
    model, tok = chat
    small = AutoModelForCausalLM.from_config(
        model.config.__class__(**{**model.config.to_dict(), "max_position_embeddings": 48})
    )
    long_prompt = " ".join(P.benign("benign").prompts[:5])
    with caplog.at_level(logging.WARNING, logger="adapter_repair"):
        ids, _ = generate_ids(small, tok, [long_prompt, "short"], GenerationConfig(8, 2, False))
    assert "truncated from the left" in caplog.text
    assert len(ids[0]) == 48 - 8
    rendered = tok(render_chat(tok, [long_prompt])[0], add_special_tokens=False)["input_ids"]
    assert ids[0] == rendered[-40:]  # the end (and the generation prompt) is kept


def test_a_tokenizer_without_chat_template_is_a_clear_error(chat) -> None:
    model, tok = chat
    tok = AutoTokenizer.from_pretrained(tok.name_or_path)
    tok.chat_template = None
    with pytest.raises(AdapterRepairError, match="no chat template"):
        generate(model, tok, ["hi"])


def test_shared_prefix_length() -> None:
    assert shared_prefix_length([]) == 0
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5]]) == 3
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2  # each keeps a token of its own
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2
    assert shared_prefix_length([[7, 1], [8, 1]]) == 0


@pytest.mark.parametrize("with_adapter", [False, True])
def test_a_shared_prefix_encoded_once_gives_the_same_answers(
    chat, tiny_chat_adapter_dir: Path, with_adapter: bool
) -> None:
    """Prompts with one long instruction in common (middle padding after the cached prefix,
    prompts of different lengths in one batch), on the model and on a PeftModel."""
    from peft import PeftModel

    model, tok = chat
    if with_adapter:
        model = PeftModel.from_pretrained(model, str(tiny_chat_adapter_dir)).eval()
    instruction = "Is the sentiment of this movie review positive or negative? Review: "
    reviews = ["a gem", "dull, long and far too pleased with itself", "fine", "the best film of"]
    ids = encode_prompts(tok, render_chat(tok, [instruction + r for r in reviews]), None)
    assert shared_prefix_length(ids) >= MIN_SHARED_PREFIX
    kw = {"max_new_tokens": 6, "batch_size": 3, "pad": tok.pad_token_id, "eos": tok.eos_token_id}
    shared = greedy_decode(model, ids, share_prefix=True, **kw)
    full = greedy_decode(model, ids, share_prefix=False, **kw)
    assert shared == full
    assert all(len(a) > 0 for a in shared)


def generate_kept(
    model: Any, ids: list[list[int]], pad: int, ends: list[int], max_new_tokens: int
) -> list[list[int]]:
    """transformers' own batched greedy ``generate`` (every row kept to the end), each answer
    cut after its first end token: what :func:`greedy_decode` must give."""
    import torch

    input_ids, mask = pad_left(ids, pad)
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=ends,
        )
    answers = []
    for row in out[:, input_ids.shape[1] :].tolist():
        cut = next((j for j, t in enumerate(row) if t in ends), len(row) - 1)
        answers.append(row[: cut + 1])
    return answers


def test_rows_leave_the_batch_once_ended_with_generates_answers(tiny_chat_dir: Path) -> None:
    """End tokens picked from a first run's answers, so rows end at different steps: each
    answer is what ``generate`` (every row kept to the end) gives, cut at its first end token,
    and the forward passes see fewer rows once some have ended. (On a trained model, with a
    PeftModel: tests/test_pico.py.) A fresh model: the module's one gets LoRA layers injected
    by the shared-prefix test."""

    model = AutoModelForCausalLM.from_pretrained(tiny_chat_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_chat_dir)
    prompts = list(P.harmful("eval").take(6).prompts)
    ids = encode_prompts(tok, render_chat(tok, prompts), None)
    kw = {"max_new_tokens": 10, "batch_size": 6, "pad": tok.pad_token_id}
    free = greedy_decode(model, ids, eos=None, **kw)
    assert all(len(a) == 10 for a in free)
    # an end token that some answers hold and others do not: rows end at different steps
    holders = {t: sum(t in a for a in free) for a in free for t in a}
    ends = [max((t for t, n in holders.items() if n < len(free)), key=holders.__getitem__)]

    batch_rows: list[int] = []
    hook = model.get_input_embeddings().register_forward_hook(
        lambda _m, args, _out: batch_rows.append(int(args[0].shape[0]))
    )
    try:
        ours = greedy_decode(model, ids, eos=ends, share_prefix=False, **kw)
    finally:
        hook.remove()
    assert ours == generate_kept(model, ids, tok.pad_token_id, ends, 10)
    assert any(len(a) < 10 for a in ours) and any(len(a) == 10 for a in ours)
    assert batch_rows[0] == 6 and min(batch_rows) < 6  # ended rows were dropped
    assert batch_rows == sorted(batch_rows, reverse=True)
