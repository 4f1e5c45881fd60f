"""Directions in the residual stream: the harmful direction h*, the benign direction b*, the
refusal directions r_l, and the adapter's own harmful shift.

All are means of last-prompt-token hidden states (``hidden_states[l][:, -1]``, the prompt in
the model's chat template with the generation prompt) over a prompt set, on one PeftModel with
its adapter disabled (the aligned model) or enabled (the fine-tune).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from adapter_repair.model.hidden import prompt_states

logger = logging.getLogger(__name__)


def mean_hidden(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    layers: Sequence[int],
    *,
    batch_size: int = 16,
) -> dict[int, torch.Tensor]:
    """Per layer index l, the mean over ``prompts`` of ``hidden_states[l][:, -1]``, float32
    (d_model,)."""
    states = prompt_states(model, tokenizer, prompts, layers, batch_size=batch_size)
    return {layer: h.mean(0) for layer, h in states.items()}


def unit(v: torch.Tensor, eps: float = 1e-8) -> torch.Tensor | None:
    """v / |v|, or None for a (near) zero vector: at the input of layer 0 the last prompt token
    is always the same template token, so a difference of means there is zero, and normalising
    it would give NaN."""
    n = float(v.norm())
    return None if n <= eps * max(1.0, float(v.abs().max())) or n == 0.0 else v / n


def difference_directions(
    first: dict[int, torch.Tensor], second: dict[int, torch.Tensor]
) -> dict[int, torch.Tensor | None]:
    """Per layer, unit(first - second): refusal directions r_l = unit(mean probe - mean benign)
    on the aligned model. None where the difference vanishes."""
    return {layer: unit(first[layer] - second[layer]) for layer in first}


def shift_directions(
    tuned: dict[int, torch.Tensor],
    aligned: dict[int, torch.Tensor],
    tuned_benign: dict[int, torch.Tensor],
    aligned_benign: dict[int, torch.Tensor],
) -> dict[int, torch.Tensor | None]:
    """The adapter's own harmful shift per layer: the mean shift the adapter causes on harmful
    prompts, less its component along the shift it causes on benign prompts (what the task
    needs). None where nothing is left."""
    out: dict[int, torch.Tensor | None] = {}
    for layer in tuned:
        harm = tuned[layer] - aligned[layer]  # (d,)
        benign = unit(tuned_benign[layer] - aligned_benign[layer])
        if benign is not None:
            harm = harm - (harm @ benign) * benign
        out[layer] = unit(harm)
    return out
