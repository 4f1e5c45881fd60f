"""Stage 2's gradients: the adapter factors below the direction layer, and the gradient of
``-cos(mean h_L, target)`` with respect to them.

The base stays frozen (4-bit is fine); only the LoRA factors of decoder layers 0..L-1 get
gradients, because ``h_L`` is computed by a forward pass that stops at layer L
(:func:`adapter_repair.hidden.last_token_hidden`). The gradient is summed over prompt batches,
each batch's graph freed before the next, so memory holds one batch at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from adapter_repair.generation import (
    encode_prompts,
    model_device,
    pad_left,
    pad_token_id,
    render_chat,
)
from adapter_repair.hidden import last_token_hidden
from adapter_repair.walk import ModelMap

logger = logging.getLogger(__name__)

#: (input_ids, attention_mask), left padded
Batch = tuple[torch.Tensor, torch.Tensor]


def factor_params(
    model_map: ModelMap, stop_layer: int, adapter_name: str = "default"
) -> dict[str, torch.nn.Parameter]:
    """``<module key>.lora_A`` (r, d_in) and ``.lora_B`` (d_out, r) of every LoRA module in
    decoder layers ``0 .. stop_layer-1``, as the live parameters of the PeftModel."""
    out: dict[str, torch.nn.Parameter] = {}
    for site in model_map.in_layers(0, stop_layer):
        module: Any = site.module
        out[f"{site.key}.lora_A"] = module.lora_A[adapter_name].weight
        out[f"{site.key}.lora_B"] = module.lora_B[adapter_name].weight
    return out


def prompt_batches(tokenizer: Any, prompts: Sequence[str], batch_size: int) -> list[Batch]:
    """Chat-template prompts in left-padded batches of similar length."""
    ids = encode_prompts(tokenizer, render_chat(tokenizer, prompts), None)
    ids = sorted(ids, key=len)
    pad = pad_token_id(tokenizer)
    return [pad_left(ids[i : i + batch_size], pad) for i in range(0, len(ids), batch_size)]


def direction_gradients(
    model: Any,
    batches: Sequence[Batch],
    layer: int,
    target: torch.Tensor,
    params: dict[str, torch.nn.Parameter],
    *,
    layers: torch.nn.ModuleList | None = None,
) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss ``sum over batches of -cos(mean over the batch of h_L(x), target)`` and its
    gradient with respect to ``params`` (float32, detached). Gradients are computed afresh
    (nothing accumulates across calls)."""
    device = model_device(model)
    target = target.to(device=device, dtype=torch.float32)  # (d,)
    names = list(params)
    tensors = [params[n] for n in names]
    was = [t.requires_grad for t in tensors]
    for t in tensors:
        t.requires_grad_(True)
    total = 0.0
    grads = [torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in tensors]
    try:
        for ids, mask in batches:
            h = last_token_hidden(model, ids.to(device), mask.to(device), layer, layers=layers)
            loss = -F.cosine_similarity(h.float().mean(0), target, dim=0)
            parts = torch.autograd.grad(loss, tensors, allow_unused=True)
            for acc, g in zip(grads, parts, strict=True):
                if g is not None:
                    acc += g.float()
            total += float(loss.detach())
    finally:
        for t, w in zip(tensors, was, strict=True):
            t.requires_grad_(w)
    return total, {n: g.cpu() for n, g in zip(names, grads, strict=True)}


@torch.no_grad()
def direction_cosine(
    model: Any,
    batches: Sequence[Batch],
    layer: int,
    target: torch.Tensor,
    *,
    layers: torch.nn.ModuleList | None = None,
) -> float:
    """Mean over batches of cos(mean h_L, target): the signal stage 2 climbs."""
    device = model_device(model)
    values = []
    for ids, mask in batches:
        h = last_token_hidden(model, ids.to(device), mask.to(device), layer, layers=layers)
        values.append(
            float(F.cosine_similarity(h.float().mean(0), target.to(h.device).float(), dim=0))
        )
    return sum(values) / len(values)
