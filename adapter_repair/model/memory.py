"""Memory the process holds beyond the model's own tensors, and activation checkpointing.

Measured at the 1.2B shape over the 4-bit base (bench/results/memory.md): the model's tensors
are 0.70 GB, yet the process held 3.21 GB after loading and 5.70 GB before a restoration step.
Two things made the difference, neither a live tensor:

* the checkpoint's memory map. Tensors kept unquantized (the embedding, the norms) can be views
  into the memory-mapped safetensors file, so the whole mapping, with every page read while
  quantizing, stays resident as long as they live: :func:`own_memory` copies them out;
* freed memory the C allocator keeps. A step allocates and frees hundreds of dequantized
  weights of a few tens of MB; glibc keeps the freed heap for reuse instead of returning it:
  :func:`release_freed_memory` hands it back between steps and around each backward pass
  (between a forward's freed blocks and a backward's new ones the heap would otherwise hold
  both).

What a step needs while it runs is mostly saved activations (a decoder layer's worth per
token, float32 where the LoRA path upcasts): :func:`checkpointed` keeps only each decoder
layer's input and recomputes the layer in the backward pass.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
from collections.abc import Iterator
from typing import Any

import torch

logger = logging.getLogger(__name__)

#: parameter classes of packed quantized weights (bitsandbytes): already in their own memory
PACKED = ("Params4bit", "Int8Params")

#: from this many base parameters on, ``checkpoint="auto"`` turns activation checkpointing on
AUTO_CHECKPOINT_PARAMETERS = 1_000_000_000
#: the values of the ``checkpoint`` setting
CHECKPOINT_MODES = ("auto", "on", "off")


def own_memory(model: torch.nn.Module) -> int:
    """Copy every CPU parameter and buffer that is not a packed quantized weight into memory of
    its own, so none aliases the memory-mapped checkpoint (which then unmaps). Returns the bytes
    copied. Values, dtypes and devices are unchanged."""
    copied, seen = 0, set()
    with torch.no_grad():
        for module in model.modules():
            for _, p in list(module.named_parameters(recurse=False)):
                if p.device.type != "cpu" or p.__class__.__name__ in PACKED or id(p) in seen:
                    continue
                seen.add(id(p))  # a tied weight is one parameter: copied once, still tied
                p.data = p.data.clone()
                copied += p.numel() * p.element_size()
            for name, b in list(module.named_buffers(recurse=False)):
                if b.device.type == "cpu":
                    setattr(module, name, b.clone())
    return copied


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, musl)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> bool:
    """Return the heap memory the C allocator holds freed to the operating system (glibc's
    ``malloc_trim(0)``); True where that was possible. Cheap: milliseconds."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


@contextlib.contextmanager
def checkpointed(layers: torch.nn.ModuleList, enabled: bool = True) -> Iterator[None]:
    """Within the block, gradients through ``layers`` (Hugging Face decoder layers) are taken
    with activation checkpointing: each layer keeps its input only and runs again in the
    backward pass, so a backward holds one layer's activations rather than every layer's, for
    about one more forward pass of compute. Only the layers switch to their checkpointing mode
    (their own ``training`` flag, which Hugging Face's checkpointing asks for); the modules inside
    stay in eval mode, so dropout stays off and the values are the same. Outside the block and
    without gradients nothing changes."""
    targets: list[Any] = (
        [m for m in layers if hasattr(m, "gradient_checkpointing")] if enabled else []
    )
    saved = [
        (m, m.gradient_checkpointing, m.training, m.__dict__.get("_gradient_checkpointing_func"))
        for m in targets
    ]
    checkpoint = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    try:
        for m in targets:
            m.gradient_checkpointing = True
            m._gradient_checkpointing_func = checkpoint
            m.training = True  # this module only: its children keep their mode
        yield
    finally:
        for m, was_on, was_training, func in saved:
            m.gradient_checkpointing = was_on
            m.training = was_training
            if func is None:
                m.__dict__.pop("_gradient_checkpointing_func", None)
            else:
                m._gradient_checkpointing_func = func


def base_parameters(model: torch.nn.Module) -> int:
    """The base model's parameter count, a packed 4-bit weight counted by the shape it unpacks
    to (its storage holds two values a byte); LoRA factors (every adapter attached) are not the
    base's and are left out."""
    n = 0
    for name, p in model.named_parameters():
        if ".lora_" in name:
            continue
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        n += int(torch.Size(shape).numel()) if shape is not None else p.numel()
    return n


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether any of ``model``'s weights is a packed quantized one (a bitsandbytes 4-bit or
    8-bit base, as QLoRA loads it)."""
    return any(p.__class__.__name__ in PACKED for p in model.parameters())


def wants_checkpointing(setting: str, model: torch.nn.Module) -> bool:
    """Whether the ``checkpoint`` setting (on, off, auto) turns checkpointing on for ``model``:
    auto does over a quantized base and from :data:`AUTO_CHECKPOINT_PARAMETERS` on. A quantized
    base is loaded because memory binds, and there a step's saved activations are most of what
    a step adds (QLoRA training checkpoints by default for the same reason: peft's
    ``prepare_model_for_kbit_training``). The price is about one more forward pass a gradient
    (bench/results/cost.md has the step times, the live tensors and the resident set with and
    without it at the small and 1.2B shapes; bench/results/scale*.md the 7B shape). A small
    unquantized base keeps the faster steps: memory nobody runs short of."""
    if setting not in CHECKPOINT_MODES:
        raise ValueError(f"checkpoint must be on, off or auto; got {setting!r}")
    if setting == "auto":
        return is_quantized(model) or base_parameters(model) >= AUTO_CHECKPOINT_PARAMETERS
    return setting == "on"
