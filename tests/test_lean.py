"""The lean LoRA forward used while decoding: the same bits as PEFT's forward, over a float and a
4-bit base, only where its case holds, and everything as before afterwards; the ready-made
decoding mask only where every layer attends in full."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from adapter_repair.measure.generation import _ready_masks
from adapter_repair.model.config import LoadConfig
from adapter_repair.model.inputs import encode_prompts, pad_left, render_chat
from adapter_repair.model.lean import lean_lora, lean_runner
from adapter_repair.model.loading import load_model, load_tokenizer


def _logits(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask).logits


def _batch(tok) -> tuple[torch.Tensor, torch.Tensor]:
    prompts = ["How do I bake bread?", "Name three colours, please, and say why you like them."]
    return pad_left(encode_prompts(tok, render_chat(tok, prompts), None), tok.pad_token_id)


@pytest.mark.parametrize("quant", ["none", "4bit"])
def test_lean_forward_gives_the_same_bits_as_peft(
    quant: str, tiny_chat_adapter_dir: Path, tiny_chat_dir: Path
) -> None:
    dtype = "float32" if quant == "none" else "bfloat16"
    config = LoadConfig(base=str(tiny_chat_dir), quant=quant, dtype=dtype)
    model, _ = load_model(tiny_chat_adapter_dir, config)
    model.eval()
    ids, mask = _batch(load_tokenizer(None, str(tiny_chat_dir)))
    peft = _logits(model, ids, mask)
    with model.disable_adapter():
        assert not torch.equal(_logits(model, ids, mask), peft)  # the adapter matters here
    lora = [m for m in model.modules() if hasattr(m, "lora_A")]
    with lean_lora(model) as switched:
        assert switched == len(lora) > 0
        assert all("forward" in m.__dict__ for m in lora)
        lean = _logits(lean_runner(model), ids, mask)
    assert torch.equal(lean, peft)  # bit for bit
    assert not any("forward" in m.__dict__ for m in lora)  # PEFT's forward is back
    assert torch.equal(_logits(model, ids, mask), peft)


def test_lean_forward_leaves_modules_outside_its_case(
    tiny_chat_adapter_dir: Path, tiny_chat_dir: Path
) -> None:
    model, _ = load_model(tiny_chat_adapter_dir, LoadConfig(base=str(tiny_chat_dir), quant="none"))
    model.eval()
    lora = [m for m in model.modules() if hasattr(m, "lora_A")]
    with model.disable_adapter(), lean_lora(model) as switched:
        assert switched == 0  # adapters off: PEFT's forward knows what that means
    hooked = lora[0].lora_A["default"].register_forward_hook(lambda *_: None)
    try:
        with lean_lora(model) as switched:
            assert switched == len(lora) - 1  # a hook on a piece it would skip: left alone
            assert "forward" not in lora[0].__dict__
    finally:
        hooked.remove()
    assert lean_runner(model) is model.get_base_model()
    inner = model.get_base_model()
    assert lean_runner(inner) is inner


def test_ready_masks_only_where_every_layer_attends_in_full(tiny_chat_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_dir)
    assert model.config._attn_implementation == "sdpa"
    assert _ready_masks(model)
    for change in ({"sliding_window": 16}, {"_attn_implementation": "eager"}):
        config = LlamaConfig(**model.config.to_dict())
        for k, v in change.items():
            setattr(config, k, v)
        model.config = config
        assert not _ready_masks(model), change
