"""A lean forward for LoRA modules while the adapter is only read (greedy decoding).

Why: PEFT's LoRA ``forward`` is general (mixed-adapter batches, variants such as DoRA, several
active adapters, dtype policies), and on every call it checks its arguments, walks the active
adapters and calls three sub-modules (dropout, ``lora_A``, ``lora_B``) through ``nn.Module``'s
call machinery. On the pico world's decode (bench/results/eval_speed.md) that Python is over a
third of the time: each token runs 28 LoRA modules per row batch, and each does a few small
matrix products. While the adapter is fixed and no gradient is taken, the same arithmetic can
run without it.

:func:`lean_lora` swaps in, for the duration of a block, a forward that does exactly what PEFT's
does for the plain case (one active vanilla LoRA adapter, not merged, no hooks on the pieces it
skips), operation for operation in the same order and dtypes, so the outputs are bitwise equal
(tests/test_lean.py). Any module outside that case keeps PEFT's forward, and any call with extra
arguments goes to PEFT's forward too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

#: PEFT's bitsandbytes LoRA classes, whose forward clones the base output and casts the LoRA
#: output to the base output's dtype before adding it (peft/tuners/lora/bnb.py)
_BNB_CLASSES = ("Linear4bit", "Linear8bitLt")


def _hookless(m: nn.Module) -> bool:
    return not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks)


def _plain_adapter(m: Any) -> str | None:
    """The one active vanilla LoRA adapter of ``m`` whose pieces the lean forward may skip
    calling, or None when ``m`` is not in that case."""
    if m.disable_adapters or m.merged:
        return None
    active = list(m.active_adapters)
    if len(active) != 1 or active[0] not in m.lora_A or active[0] in m.lora_variant:
        return None
    name: str = active[0]
    a, b, drop = m.lora_A[name], m.lora_B[name], m.lora_dropout[name]
    if type(a) is not nn.Linear or type(b) is not nn.Linear:
        return None
    if not (isinstance(drop, nn.Identity) or (isinstance(drop, nn.Dropout) and not drop.training)):
        return None  # a dropout that acts (training mode) must run
    if not all(_hookless(x) for x in (a, b, drop)):
        return None
    return name


def _lean_forward(m: Any) -> Callable[..., torch.Tensor] | None:
    """The lean forward of LoRA module ``m``, or None where PEFT's must run."""
    name = _plain_adapter(m)
    if name is None:
        return None
    kind = type(m).__name__ if type(m).__module__ == "peft.tuners.lora.bnb" else None
    if type(m) is not LoraLinear and kind not in _BNB_CLASSES:
        return None
    original = m.forward
    a, b = m.lora_A[name], m.lora_B[name]
    a_w, a_b, b_w, b_b = a.weight, a.bias, b.weight, b.bias
    scaling = m.scaling[name]
    base = m.base_layer
    # a plain torch Linear base is called as the functional it is; anything else as a module
    direct = type(base) is nn.Linear and _hookless(base)
    base_w: Any = base.weight if direct else None
    base_b: Any = base.bias if direct else None

    a_dtype = a_w.dtype
    casts = getattr(m, "cast_input_dtype_enabled", True)  # PEFT's _cast_input_dtype switch

    if kind is None:

        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if args or kwargs:
                return original(x, *args, **kwargs)
            result = F.linear(x, base_w, base_b) if direct else base(x)
            dtype = result.dtype
            if casts and x.dtype != a_dtype:
                x = x.to(dtype=a_dtype)
            result = result + F.linear(F.linear(x, a_w, a_b), b_w, b_b) * scaling
            return result if result.dtype == dtype else result.to(dtype)

        return forward

    def forward_bnb(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs:
            return original(x, *args, **kwargs)
        result = base(x).clone()
        convert = not torch.is_autocast_enabled()
        if convert:
            expected = result.dtype
            if casts and x.dtype != a_dtype:
                x = x.to(dtype=a_dtype)
        output = F.linear(F.linear(x, a_w, a_b), b_w, b_b) * scaling
        if convert:
            output = output.to(expected)
        return result + output

    return forward_bnb


@contextlib.contextmanager
def lean_lora(model: nn.Module) -> Iterator[int]:
    """Within the block, every LoRA module of ``model`` in the plain case runs the lean forward
    (the same values as PEFT's, less of its Python); yields how many modules switched. Meant for
    reading the adapter (generation under ``no_grad``): set adapters, merge or unmerge outside
    the block. Everything is as before on exit."""
    switched: list[nn.Module] = []
    try:
        for m in model.modules():
            if not isinstance(m, LoraLayer):
                continue
            lean = _lean_forward(m)
            if lean is not None:
                m.forward = lean  # an instance attribute, found before the class's method
                switched.append(m)
        yield len(switched)
    finally:
        for m in switched:
            m.__dict__.pop("forward", None)


def lean_runner(model: nn.Module) -> nn.Module:
    """The module greedy decoding calls: for a PeftModel whose active adapter is plain LoRA, the
    model it wraps (the LoRA modules live inside it, and ``PeftModel.forward`` then only passes
    its arguments on); any other model itself."""
    config = getattr(model, "active_peft_config", None)
    if config is None or config.is_prompt_learning or config.peft_type != "LORA":
        return model
    if getattr(config, "alora_invocation_tokens", None) is not None:
        return model  # activated LoRA: PeftModel.forward computes its offsets
    inner: nn.Module = model.get_base_model()  # type: ignore[operator]
    return inner
