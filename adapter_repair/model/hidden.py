"""``h_L(x)``: the residual stream entering decoder layer L at the last prompt token.

``hidden_states[L][:, -1]`` in Hugging Face's convention (index 0 is the embedding output), but
computed by stopping the forward pass at layer L: layers L..n-1 and the LM head never run, which
is most of the cost when L is low and what keeps stage 2's backward pass short. L = n_layers reads
the final (normed) hidden state, the input of the LM head.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from adapter_repair.walk import decoder_layers


class _Stop(Exception):
    """Raised by the hook on layer L to end the forward pass with its input."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding, so a padded prompt sees the positions it would alone."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (batch, seq)


def last_token_hidden(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    layer: int,
    *,
    layers: nn.ModuleList | None = None,
) -> torch.Tensor:
    """``hidden_states[layer][:, -1]`` of ``model`` for a left-padded batch, (batch, d_model).

    Runs decoder layers ``0 .. layer-1`` only. ``layer == n_layers`` is the decoder's output
    after its final norm (``hidden_states[-1]``, what the LM head reads): every layer runs, the
    head does not. Gradients flow when the caller has them on.

    Args:
        model: a causal LM or a PeftModel over one (adapter state as the caller set it).
        input_ids: (batch, seq), left padded so that position -1 is each prompt's last token.
        attention_mask: (batch, seq), 0 on padding; None when there is none.
        layer: L, with ``1 <= L <= n_layers``.
        layers: the decoder layers, if the caller has them already.
    """
    layers = layers if layers is not None else decoder_layers(model)
    if not 1 <= layer <= len(layers):
        raise ValueError(f"layer must satisfy 1 <= L <= n_layers = {len(layers)}; got {layer}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)

    def stop(_m: nn.Module, args: Any, kwargs: Any) -> None:
        x = args[0] if args else kwargs["hidden_states"]
        raise _Stop(x)

    if layer < len(layers):
        target: nn.Module = layers[layer]
    else:
        peft: Any = model
        inner = peft.get_base_model() if hasattr(peft, "get_base_model") else peft
        head = inner.get_output_embeddings()
        if head is None:
            raise ValueError("the model has no output head to read the final hidden state at")
        target = head
    handle = target.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_for(attention_mask),
            use_cache=False,
        )
    except _Stop as s:
        return s.hidden[:, -1]  # (batch, d_model)
    finally:
        handle.remove()
    raise RuntimeError(f"decoder layer {layer} never ran; cannot read its input")
