"""``h_L(x)``: the residual stream entering decoder layer L at the last prompt token, the one
function every direction, loss and cosine reads it through.

``hidden_states[L][:, -1]`` in Hugging Face's convention (index 0 is the embedding output), but
read by forward pre-hooks and computed by stopping the forward pass at the highest layer asked
for: layers above it and the LM head never run, which is most of the cost when L is low and what
keeps stage 2's backward pass short. L = n_layers reads the final (normed) hidden state, the
input of the LM head.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from adapter_repair.model.inputs import (
    encode_prompts,
    model_device,
    pad_left,
    pad_token_id,
    position_ids_for,
    render_chat,
)
from adapter_repair.model.walk import decoder_layers


class _Stop(Exception):
    """Raised by the hook on the highest layer asked for, to end the forward pass there."""


def _input_of(args: Any, kwargs: Any) -> torch.Tensor:
    x: torch.Tensor = args[0] if args else kwargs["hidden_states"]
    return x


def last_token_states(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    layers: Sequence[int],
    *,
    decoder: nn.ModuleList | None = None,
) -> dict[int, torch.Tensor]:
    """Per layer index l in ``layers``, ``hidden_states[l][:, -1]`` of ``model`` for a
    left-padded batch, each (batch, d_model), in the model's dtype.

    Runs decoder layers ``0 .. max(layers)-1`` only. ``l == n_layers`` is the decoder's output
    after its final norm (``hidden_states[-1]``, what the LM head reads): every layer runs, the
    head does not. Gradients flow when the caller has them on.

    Args:
        model: a causal LM or a PeftModel over one (adapter state as the caller set it).
        input_ids: (batch, seq), left padded so that position -1 is each prompt's last token.
        attention_mask: (batch, seq), 0 on padding; None when there is none.
        layers: indices l with ``0 <= l <= n_layers``.
        decoder: the decoder layers, if the caller has them already.
    """
    decoder = decoder if decoder is not None else decoder_layers(model)
    n = len(decoder)
    wanted = sorted(set(layers))
    if not wanted or not 0 <= wanted[0] <= wanted[-1] <= n:
        raise ValueError(f"layers must satisfy 0 <= l <= n_layers = {n}; got {list(layers)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    seen: dict[int, torch.Tensor] = {}

    def hook_for(layer: int) -> Any:
        def hook(_m: nn.Module, args: Any, kwargs: Any) -> None:
            seen[layer] = _input_of(args, kwargs)[:, -1]  # (batch, d_model)
            if layer == wanted[-1]:
                raise _Stop

        return hook

    handles = [
        _module_reading(model, decoder, layer).register_forward_pre_hook(
            hook_for(layer), with_kwargs=True
        )
        for layer in wanted
    ]
    try:
        model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_for(attention_mask),
            use_cache=False,
        )
    except _Stop:
        return {layer: seen[layer] for layer in wanted}
    finally:
        for h in handles:
            h.remove()
    raise RuntimeError(f"decoder layer {wanted[-1]} never ran; cannot read its input")


def _module_reading(model: nn.Module, decoder: nn.ModuleList, layer: int) -> nn.Module:
    """The module whose input is ``hidden_states[layer]``: decoder layer ``layer``, or the LM
    head for ``layer == n_layers``."""
    if layer < len(decoder):
        return decoder[layer]
    peft: Any = model
    inner = peft.get_base_model() if hasattr(peft, "get_base_model") else peft
    head = inner.get_output_embeddings()
    if head is None:
        raise ValueError("the model has no output head to read the final hidden state at")
    module: nn.Module = head
    return module


def last_token_hidden(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    layer: int,
    *,
    layers: nn.ModuleList | None = None,
) -> torch.Tensor:
    """``h_L`` = ``hidden_states[layer][:, -1]``, (batch, d_model): :func:`last_token_states`
    at one layer ``1 <= L <= n_layers`` (``layers``: the decoder layers, if at hand)."""
    decoder = layers if layers is not None else decoder_layers(model)
    if not 1 <= layer <= len(decoder):
        raise ValueError(f"layer must satisfy 1 <= L <= n_layers = {len(decoder)}; got {layer}")
    return last_token_states(model, input_ids, attention_mask, [layer], decoder=decoder)[layer]


@torch.no_grad()
def prompt_states(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    layers: Sequence[int],
    *,
    batch_size: int = 16,
) -> dict[int, torch.Tensor]:
    """Per layer index l (Hugging Face convention: 0 = embeddings), ``hidden_states[l][:, -1]``
    of every prompt (chat template, generation prompt), in the order given, float32
    (n, d_model). Prompts run sorted by length so that batches carry little padding."""
    if not prompts:
        raise ValueError("no prompts to read hidden states of")
    ids = encode_prompts(tokenizer, render_chat(tokenizer, prompts), None)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    device = model_device(model)
    decoder = decoder_layers(model)
    rows: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for start in range(0, len(order), batch_size):
        batch = [ids[i] for i in order[start : start + batch_size]]
        input_ids, mask = pad_left(batch, pad_token_id(tokenizer))
        states = last_token_states(
            model, input_ids.to(device), mask.to(device), layers, decoder=decoder
        )
        for layer in layers:
            rows[layer].append(states[layer].float().cpu())  # (b, d_model)
    back = torch.tensor(order).argsort()  # position of prompt i in the sorted run
    return {layer: torch.cat(r)[back] for layer, r in rows.items()}
