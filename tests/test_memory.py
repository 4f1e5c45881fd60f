"""What keeps a repair's memory down without changing its numbers: unquantized tensors out of
the checkpoint's memory map, freed memory handed back, activation checkpointing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapter_repair.model.answers import answer_loss
from adapter_repair.model.config import LoadConfig
from adapter_repair.model.loading import load_model, load_tokenizer
from adapter_repair.model.memory import checkpointed, own_memory, release_freed_memory
from adapter_repair.model.walk import walk
from adapter_repair.repair.factors import ADAPTER, factor_params
from adapter_repair.repair.losses import answer_batches


@pytest.fixture(scope="module")
def loaded4(tiny_chat_adapter_dir: Path, tiny_chat_dir: Path):
    config = LoadConfig(base=str(tiny_chat_dir), quant="4bit", dtype="bfloat16")
    model, _ = load_model(tiny_chat_adapter_dir, config)
    return model, load_tokenizer(None, str(tiny_chat_dir))


def test_own_memory_copies_values_and_keeps_tied_weights_tied(loaded4) -> None:
    model, _ = loaded4
    inner = model.get_base_model()
    emb, head = inner.get_input_embeddings().weight, inner.get_output_embeddings().weight
    before = emb.detach().clone()
    ptr = emb.data_ptr()
    copied = own_memory(model)
    assert copied >= emb.numel() * emb.element_size()
    assert emb.data_ptr() != ptr and torch.equal(emb.detach(), before)  # new memory, same values
    assert (head is emb) == inner.config.tie_word_embeddings and head.data_ptr() == (
        emb.data_ptr() if head is emb else head.data_ptr()
    )
    packed = [p for p in model.parameters() if p.__class__.__name__ == "Params4bit"]
    assert packed  # left as they are
    assert release_freed_memory() in (True, False)


def test_checkpointing_gives_the_same_loss_and_gradients_and_undoes_itself(loaded4) -> None:
    model, tok = loaded4
    mm = walk(model)
    below = factor_params(mm, mm.n_layers, ADAPTER)
    pairs = [("Name a colour.", "Blue."), ("Count to three, please.", "One, two, three.")]
    ((ids, mask, labels),) = answer_batches(tok, pairs, 8, 8)

    def loss_and_grads() -> tuple[float, list[torch.Tensor]]:
        for p in below.values():
            p.requires_grad_(True)
        loss = answer_loss(model, ids, mask, labels)
        grads = torch.autograd.grad(loss, list(below.values()), allow_unused=True)
        return float(loss.detach()), [g for g in grads if g is not None]

    plain, plain_g = loss_and_grads()
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    hook = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with hook:
        loss_and_grads()
    plain_saved, saved = sum(saved), []
    with checkpointed(mm.layers), hook:
        ck, ck_g = loss_and_grads()
        assert all(layer.gradient_checkpointing for layer in mm.layers)
        assert not any(m.training for layer in mm.layers for m in layer.children())
    assert sum(saved) < plain_saved  # fewer activations kept for the backward
    assert ck == pytest.approx(plain, rel=1e-5)
    assert len(ck_g) == len(plain_g) and all(
        torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(ck_g, plain_g, strict=True)
    )
    assert not any(layer.gradient_checkpointing or layer.training for layer in mm.layers)


def test_freed_heap_goes_back_between_each_forward_and_its_backward(
    loaded4, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CPU what glibc keeps between passes, not the live tensors, was most of a step's
    resident set (bench/results/cost.md): the stage hands the heap back after each batch's
    forward, before its backward allocates, and after the backward."""
    from adapter_repair.repair import losses

    model, tok = loaded4
    mm = walk(model)
    below = factor_params(mm, mm.n_layers, ADAPTER)
    pairs = [("Name a colour.", "Blue."), ("Count to three, please.", "One, two, three.")]
    batches = answer_batches(tok, pairs, 1, 8)  # two batches: two forward/backward pairs
    events: list[str] = []

    def release() -> bool:
        events.append("release")
        return release_freed_memory()  # the real hand-back, recorded

    monkeypatch.setattr(losses, "release_freed_memory", release)
    first = next(iter(below.values()))
    hook = first.register_hook(lambda g: events.append("backward"))  # fires inside a backward
    try:
        _, grads = losses.answer_gradients(model, batches, below)
    finally:
        hook.remove()
    assert any(float(g.abs().sum()) > 0 for g in grads.values())
    # collapse repeats: each backward sits between two hand-backs
    runs = [e for i, e in enumerate(events) if i == 0 or events[i - 1] != e]
    assert runs == ["release", "backward", "release", "backward", "release"]
