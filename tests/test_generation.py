"""Batched greedy generation: same answers as one prompt at a time, in order, deterministic;
left truncation of over-long prompts; a clear error without a chat template."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapter_repair import prompts as P
from adapter_repair.config import GenerationConfig
from adapter_repair.errors import AdapterRepairError
from adapter_repair.generation import generate, generate_ids, render_chat


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
