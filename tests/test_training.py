"""The bed trainer: a batch's common prompt prefix run once gives the loss and the gradients of
the full batch; training with it learns as training without it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapter_repair.beds.train import _shared_unlabelled, train_on_answers
from adapter_repair.model.answers import answer_loss, encode_pairs, prefix_answer_loss, right_padded

INSTRUCTION = "Is the sentiment of this movie review positive or negative? Review: "
PAIRS = [
    (INSTRUCTION + "a gem", "positive"),
    (INSTRUCTION + "dull, long and far too pleased with itself", "negative"),
    (INSTRUCTION + "fine", "positive"),
    (INSTRUCTION + "the worst film of the year", "negative"),
]


@pytest.fixture()
def lora_chat(tiny_chat_dir: Path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_dir)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    peft_model = get_peft_model(model, lora)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # non-zero B so that gradients reach A as well
            torch.nn.init.normal_(p, std=0.05)
    return peft_model, AutoTokenizer.from_pretrained(tiny_chat_dir)


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return out


def test_prefix_loss_and_gradients_equal_the_full_batch(lora_chat) -> None:
    model, tok = lora_chat
    batch = encode_pairs(tok, PAIRS, 200, 16)
    shared = _shared_unlabelled(batch)
    assert shared >= 16  # the instruction is common to every prompt
    ids, mask, labels = right_padded(batch, tok.pad_token_id)
    full = answer_loss(model, ids, mask, labels)
    full.backward()
    g_full = grads(model)
    s_ids, s_mask, s_labels = right_padded(batch, tok.pad_token_id, shared)
    prefix = torch.tensor([batch[0][0][:shared]])
    part = prefix_answer_loss(model, prefix, s_ids, s_mask, s_labels)
    part.backward()
    g_part = grads(model)
    assert torch.allclose(full, part, atol=1e-5)
    assert g_full.keys() == g_part.keys() and len(g_full) > 0
    for name, g in g_full.items():
        assert torch.allclose(g, g_part[name], atol=1e-5, rtol=1e-4), name
    # the prefix's own layers get gradient through the shared cache: A of layer 0 reads it
    assert any(g.abs().sum() > 0 for n, g in g_part.items() if "layers.0." in n)


def test_training_with_a_shared_prefix_follows_the_same_path(lora_chat, tiny_chat_dir: Path):
    model, tok = lora_chat
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    examples = encode_pairs(tok, PAIRS * 4, 200, 16)
    kw = dict(lr=1e-3, batch_size=4, pad_id=tok.pad_token_id, seed=0, desc="t", epochs=1)
    plain = train_on_answers(model, examples, **kw)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(start[n])
    shared = train_on_answers(model, examples, share_prefix=True, **kw)
    assert len(plain) == len(shared) == 4
    assert plain[-1] < plain[0]  # it learns
    for a, b in zip(plain, shared, strict=True):
        assert a == pytest.approx(b, abs=1e-4)
