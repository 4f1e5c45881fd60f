"""The model walk on the four layouts, and h_L."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import get_peft_model

from adapter_repair.adapter import Role
from adapter_repair.model.config import LoadConfig
from adapter_repair.model.hidden import last_token_hidden
from adapter_repair.model.loading import load_model
from adapter_repair.model.walk import decoder_layers, norm_gain, walk
from tests.models import LAYOUTS, lora_config, tiny_model

READS = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
WRITES = {"o_proj", "down_proj"}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_walk_finds_layer_role_and_norms(layout: str) -> None:
    model = get_peft_model(tiny_model(layout), lora_config())
    mm = walk(model)
    assert mm.n_layers == 3
    assert len(mm.sites) == 3 * 7
    layers = model.get_base_model().model.layers
    for site in mm:
        # The test may read names; the walk itself never does.
        short = site.key.rsplit(".", 1)[1]
        assert site.layer == int(site.key.split("layers.")[1].split(".")[0]), site.key
        assert site.module is dict(model.named_modules())[site.key]
        layer = layers[site.layer]
        if short in READS:
            assert site.role is Role.READ, site.key
            expected_in = (
                layer.input_layernorm
                if short in {"q_proj", "k_proj", "v_proj"}
                else getattr(layer, "pre_feedforward_layernorm", layer.post_attention_layernorm)
            )
            assert site.in_norm is expected_in, site.key
            assert site.out_norm is None
        else:
            assert short in WRITES and site.role is Role.WRITE, site.key
            assert site.in_norm is None
            if layout == "gemma2":  # post-norms between the module and the residual add
                expected_out = (
                    layer.post_attention_layernorm
                    if short == "o_proj"
                    else layer.post_feedforward_layernorm
                )
                assert site.out_norm is expected_out, site.key
            else:
                assert site.out_norm is None, site.key


def test_walk_on_a_4bit_peft_model(tiny_llama_dir: Path, tiny_adapter_dir: Path) -> None:
    model, adapter = load_model(
        tiny_adapter_dir, LoadConfig(base=str(tiny_llama_dir), quant="4bit")
    )
    mm = walk(model)
    assert set(mm.sites) == set(adapter.modules)
    roles = {s.key.rsplit(".", 1)[1]: s.role for s in mm}
    assert {k for k, r in roles.items() if r is Role.WRITE} == WRITES
    assert {k for k, r in roles.items() if r is Role.READ} == READS


def test_module_outside_the_decoder_layers() -> None:
    model = get_peft_model(tiny_model("llama"), lora_config(target_modules=["lm_head", "o_proj"]))
    mm = walk(model)
    head = next(s for s in mm if s.key.endswith("lm_head"))
    assert head.role is Role.OUTSIDE and head.layer is None
    assert sum(s.role is Role.WRITE for s in mm) == 3


def test_walk_leaves_no_hooks_and_no_gradients() -> None:
    model = get_peft_model(tiny_model("llama"), lora_config())
    walk(model)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("layout", ["llama", "gemma"])
def test_norm_gain_points_along_the_effective_gain(layout: str) -> None:
    model = tiny_model(layout)
    norm = model.model.layers[1].input_layernorm
    g = norm_gain(norm)
    w = norm.weight.detach().float()
    expected = 1 + w if layout == "gemma" else w  # Gemma scales by (1 + w)
    assert torch.nn.functional.cosine_similarity(g, expected, dim=0) > 0.9999


# --- h_L


def test_h_L_equals_hidden_states_of_the_full_model(
    tiny_llama_dir: Path, tiny_adapter_dir: Path
) -> None:
    model, _ = load_model(tiny_adapter_dir, LoadConfig(base=str(tiny_llama_dir), quant="none"))
    ids = torch.tensor([[3, 9, 27, 81, 11], [4, 8, 15, 16, 23]])
    mask = torch.ones_like(ids)
    for enabled in (True, False):
        with torch.no_grad():
            if enabled:
                full = model(input_ids=ids, output_hidden_states=True).hidden_states
                hs = [last_token_hidden(model, ids, mask, L) for L in range(1, 3)]
            else:
                with model.disable_adapter():
                    full = model(input_ids=ids, output_hidden_states=True).hidden_states
                    hs = [last_token_hidden(model, ids, mask, L) for L in range(1, 3)]
        for L, h in enumerate(hs, start=1):
            assert h.shape == (2, 64)
            assert torch.allclose(h, full[L][:, -1], atol=1e-6), (enabled, L)


def test_h_L_runs_no_layer_above_L(tiny_llama_dir: Path, tiny_adapter_dir: Path) -> None:
    model, _ = load_model(tiny_adapter_dir, LoadConfig(base=str(tiny_llama_dir), quant="none"))
    layers = decoder_layers(model)
    calls = [0] * len(layers)
    handles = [
        layer.register_forward_hook(lambda *_a, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, layer in enumerate(layers)
    ]
    head_calls = []
    handles.append(
        model.get_base_model().lm_head.register_forward_hook(lambda *_a: head_calls.append(1))
    )
    try:
        with torch.no_grad():
            last_token_hidden(model, torch.tensor([[1, 2, 3]]), None, 1)
    finally:
        for h in handles:
            h.remove()
    assert calls == [1, 0, 0]
    assert head_calls == []


def test_h_L_with_left_padding_equals_each_prompt_alone(
    tiny_llama_dir: Path, tiny_adapter_dir: Path
) -> None:
    model, _ = load_model(tiny_adapter_dir, LoadConfig(base=str(tiny_llama_dir), quant="none"))
    a, b = [5, 6, 7, 8, 9], [10, 11]
    ids = torch.tensor([a, [0, 0, 0, *b]])
    mask = torch.tensor([[1] * 5, [0, 0, 0, 1, 1]])
    with torch.no_grad():
        batched = last_token_hidden(model, ids, mask, 2)
        alone = [last_token_hidden(model, torch.tensor([p]), None, 2)[0] for p in (a, b)]
    assert torch.allclose(batched[0], alone[0], atol=1e-5)
    assert torch.allclose(batched[1], alone[1], atol=1e-5)


def test_h_L_carries_gradients_into_the_adapter(
    tiny_llama_dir: Path, tiny_adapter_dir: Path
) -> None:
    model, _ = load_model(tiny_adapter_dir, LoadConfig(base=str(tiny_llama_dir), quant="4bit"))
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    h = last_token_hidden(model, torch.tensor([[1, 2, 3]]), None, 2)
    h.sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
    # Layers 0 and 1 run and get gradients; layer 2 never runs.
    assert all(
        g is not None and g.abs().sum() > 0 for n, g in grads.items() if "layers.2." not in n
    )
    assert all(g is None for n, g in grads.items() if "layers.2." in n)


@pytest.mark.parametrize("layer", [0, 4, -1])
def test_h_L_refuses_a_layer_out_of_range(tiny_llama_dir: Path, layer: int) -> None:
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="1 <= L <= n_layers = 3"):
        last_token_hidden(model, torch.tensor([[1, 2]]), None, layer)


def test_h_L_at_n_layers_is_the_final_normed_state() -> None:
    model = tiny_model("llama").eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][:, -1]
        got = last_token_hidden(model, ids, None, 3)
    assert torch.allclose(got, expected, atol=1e-6)
