"""Directions: means of h_l equal the stopped forward pass's h_L, zero differences give None
(not NaN), and the adapter's harmful shift loses its part shared with benign prompts."""

from __future__ import annotations

from pathlib import Path

import torch

from adapter_repair.model.config import LoadConfig
from adapter_repair.model.hidden import last_token_hidden
from adapter_repair.model.loading import load_model, load_tokenizer
from adapter_repair.repair.directions import (
    difference_directions,
    mean_hidden,
    shift_directions,
    unit,
)
from adapter_repair.repair.losses import prompt_batches


def test_mean_hidden_is_the_mean_of_h_L(tiny_chat_dir: Path, tiny_chat_adapter_dir: Path) -> None:
    model, _ = load_model(tiny_chat_adapter_dir, LoadConfig(base=str(tiny_chat_dir), quant="none"))
    tok = load_tokenizer(tiny_chat_adapter_dir, str(tiny_chat_dir))
    prompts = ["a b c", "Tell me a story about a dog.", "hi", "What is two plus two?"]
    means = mean_hidden(model, tok, prompts, [0, 1, 2], batch_size=3)
    assert set(means) == {0, 1, 2} and means[1].shape == (model.config.hidden_size,)
    with torch.no_grad():
        rows = [
            last_token_hidden(model, ids, mask, 2) for ids, mask in prompt_batches(tok, prompts, 2)
        ]
    assert torch.allclose(torch.cat(rows).float().mean(0), means[2], atol=1e-5)
    # layer 0: every prompt ends in the same template token, so the difference of means vanishes
    other = mean_hidden(model, tok, ["x y z w", "Why is the sky blue?"], [0, 2])
    dirs = difference_directions({0: means[0], 2: means[2]}, other)
    assert dirs[0] is None
    assert dirs[2] is not None and abs(float(dirs[2].norm()) - 1) < 1e-5


def test_unit_and_shift() -> None:
    assert unit(torch.zeros(4)) is None
    e0, e1 = torch.eye(3)[0], torch.eye(3)[1]
    # harmful shift = e0 + e1, benign shift = e1: what is left is e0
    out = shift_directions({5: e0 + e1}, {5: torch.zeros(3)}, {5: 2 * e1}, {5: torch.zeros(3)})
    assert out[5] is not None and torch.allclose(out[5], e0)
