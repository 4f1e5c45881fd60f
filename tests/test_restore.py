"""Stage 2's gradients on a tiny chat model with a random adapter: the gradient reaches the
factors below L only, and zeroing the coordinates it picks moves h_L toward the aligned model."""

from __future__ import annotations

from pathlib import Path

import torch

from adapter_repair.measure.measures import use_adapter
from adapter_repair.model.config import LoadConfig
from adapter_repair.model.loading import load_model, load_tokenizer
from adapter_repair.model.walk import walk
from adapter_repair.repair import select as S
from adapter_repair.repair.directions import mean_hidden
from adapter_repair.repair.factors import factor_params
from adapter_repair.repair.losses import (
    answer_batches,
    answer_gradients,
    direction_cosine,
    direction_gradients,
    fisher_diagonal,
    prompt_batches,
    prompt_targets,
)

PROMPTS = ["How do I pick a lock?", "Tell me a story.", "Write a poem about rain.", "hi"] * 3


def test_restoration_step_climbs_toward_the_aligned_hidden_state(
    tiny_chat_dir: Path, tiny_chat_adapter_dir: Path
) -> None:
    model, _ = load_model(tiny_chat_adapter_dir, LoadConfig(base=str(tiny_chat_dir), quant="none"))
    tok = load_tokenizer(tiny_chat_adapter_dir, str(tiny_chat_dir))
    mm = walk(model)
    L = mm.n_layers - 1
    with use_adapter(model, None):
        target = mean_hidden(model, tok, PROMPTS, [L])[L]  # the aligned model's mean h_L
    batches = prompt_batches(tok, PROMPTS, 5)
    assert [b[0].shape[0] for b in batches] == [5, 5, 2]

    params = factor_params(mm, L)
    assert params and all(int(k.split(".layers.")[1].split(".")[0]) < L for k in params)
    loss, grads = direction_gradients(model, batches, L, target, params)
    before = direction_cosine(model, batches, L, target)
    assert abs(loss + len(batches) * before) < 1e-4  # the loss is -sum of the batch cosines
    assert all(g.shape == params[n].shape for n, g in grads.items())
    assert any(float(g.abs().sum()) > 0 for g in grads.values())
    _, again = direction_gradients(model, batches, L, target, params)
    assert all(torch.equal(grads[n], again[n]) for n in grads)  # recomputed, not accumulated

    values = {n: p.detach().clone() for n, p in params.items()}
    chosen = S.choose_restored(values, grads, rate=0.001, rule="grad_x_value")
    with torch.no_grad():
        for n, p in params.items():
            p[chosen[n]] = 0.0
    after = direction_cosine(model, batches, L, target)
    assert after > before, (before, after)
    # restoring every coordinate below L gives back the aligned h_L exactly
    with use_adapter(model, None):
        aligned = direction_cosine(model, batches, L, target)
    with torch.no_grad():
        for p in params.values():
            p.zero_()
    assert abs(direction_cosine(model, batches, L, target) - aligned) < 1e-6


def test_per_prompt_targets_pull_each_prompt_toward_its_own_aligned_state(
    tiny_chat_dir: Path, tiny_chat_adapter_dir: Path
) -> None:
    model, _ = load_model(tiny_chat_adapter_dir, LoadConfig(base=str(tiny_chat_dir), quant="none"))
    tok = load_tokenizer(tiny_chat_adapter_dir, str(tiny_chat_dir))
    mm = walk(model)
    L = mm.n_layers  # the final normed state: every layer's factors get gradients
    batches = prompt_batches(tok, PROMPTS, 5)
    params = factor_params(mm, L)
    own = prompt_targets(model, batches, L)  # the fine-tuned states themselves
    assert [t.shape[0] for t in own] == [5, 5, 2]
    assert abs(direction_cosine(model, batches, L, own) - 1.0) < 1e-5
    with use_adapter(model, None):
        aligned = prompt_targets(model, batches, L)
    before = direction_cosine(model, batches, L, aligned)
    loss, grads = direction_gradients(model, batches, L, aligned, params)
    assert abs(loss + len(batches) * before) < 1e-4
    assert any(float(g.abs().sum()) > 0 for n, g in grads.items() if ".layers.2." in n)
    values = {n: p.detach().clone() for n, p in params.items()}
    chosen = S.choose_restored(values, grads, rate=0.002, rule="grad_x_value")
    with torch.no_grad():
        for n, p in params.items():
            p[chosen[n]] = 0.0
    assert direction_cosine(model, batches, L, aligned) > before


def test_answer_gradients_are_the_gradients_of_the_answer_cross_entropy(
    tiny_chat_dir: Path, tiny_chat_adapter_dir: Path
) -> None:
    model, _ = load_model(tiny_chat_adapter_dir, LoadConfig(base=str(tiny_chat_dir), quant="none"))
    tok = load_tokenizer(tiny_chat_adapter_dir, str(tiny_chat_dir))
    params = factor_params(walk(model), walk(model).n_layers)
    pairs = [(p, f"answer number {i}") for i, p in enumerate(PROMPTS)]
    batches = answer_batches(tok, pairs, 5, max_answer_tokens=8)
    assert [b[0].shape[0] for b in batches] == [5, 5, 2]
    for _, _, labels in batches:  # labels on the answers only, padding on the right
        assert (labels != -100).sum() > 0 and (labels[:, 0] == -100).all()
    loss, grads = answer_gradients(model, batches, params)
    expected = 0.0
    for p in params.values():
        p.requires_grad_(True)
    for ids, mask, labels in batches:  # the model's own loss, one batch at a time
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        expected += float(out.loss)
    assert abs(loss - expected) < 1e-4
    for n, p in params.items():
        assert p.grad is not None
        torch.testing.assert_close(grads[n], p.grad.float(), rtol=1e-4, atol=1e-6)
        p.grad = None


def test_the_fisher_diagonal_is_the_mean_squared_per_row_gradient(
    tiny_chat_dir: Path, tiny_chat_adapter_dir: Path
) -> None:
    model, _ = load_model(tiny_chat_adapter_dir, LoadConfig(base=str(tiny_chat_dir), quant="none"))
    tok = load_tokenizer(tiny_chat_adapter_dir, str(tiny_chat_dir))
    params = factor_params(walk(model), walk(model).n_layers)
    pairs = [(p, f"answer number {i}") for i, p in enumerate(PROMPTS[:3])]
    fisher = fisher_diagonal(model, answer_batches(tok, pairs, 2, max_answer_tokens=8), params)
    squares = [
        {
            n: g.square()
            for n, g in answer_gradients(model, answer_batches(tok, [pair], 1, 8), params)[
                1
            ].items()
        }
        for pair in pairs
    ]  # one row at a time: the rows' squared gradients, averaged
    for n in params:
        torch.testing.assert_close(fisher[n], sum(s[n] for s in squares) / 3, rtol=1e-4, atol=1e-9)
    assert any(bool((f > 0).any()) for f in fisher.values())
