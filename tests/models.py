"""Tiny models and adapters built from configs, for the tests (no download)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
)

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

_COMMON: dict[str, Any] = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)

LAYOUTS: dict[str, type[PretrainedConfig]] = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
    "mistral": MistralConfig,
    "gemma": GemmaConfig,
    "gemma2": Gemma2Config,
}


def tiny_config(layout: str = "llama", **overrides: Any) -> PretrainedConfig:
    kw = {**_COMMON, **overrides}
    if layout.startswith("gemma"):
        kw.setdefault("head_dim", 16)
    return LAYOUTS[layout](**kw)


def tiny_model(layout: str = "llama", seed: int = 0, **overrides: Any) -> Any:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(layout, **overrides))
    if layout.startswith("gemma"):
        # Gemma norms start at w = 0 (gain 1 + w); give them a visible per-channel gain.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim == 1 and "norm" in name:
                    p.uniform_(-0.5, 0.5)
    return model.eval()


def lora_config(**overrides: Any) -> LoraConfig:
    kw: dict[str, Any] = dict(r=4, lora_alpha=8, target_modules=ALL_LINEAR, lora_dropout=0.0)
    kw.update(overrides)
    return LoraConfig(**kw)


def make_adapter(base_dir: Path | str, out_dir: Path, seed: int = 1, **lora_overrides: Any) -> Path:
    """A LoRA with random non-zero A and B (as after training) over the model at base_dir."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, lora_config(**lora_overrides))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.05)
    peft_model.save_pretrained(str(out_dir))
    return out_dir


def tiny_chat_model(out: Path, vocab_size: int = 320, seed: int = 0) -> Path:
    """A tiny Llama with a real byte-level BPE tokenizer and a chat template, saved to ``out``
    (random weights: for plumbing, not behaviour)."""
    from adapter_repair.beds.pico import _train_tokenizer
    from adapter_repair.measure import prompts as P

    corpus = [*P.harmful("probe").prompts, *P.benign("benign").prompts[:200]]
    tokenizer = _train_tokenizer(corpus, vocab_size, out)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        tiny_config(
            "llama",
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
        )
    )
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(str(out))
    return out
