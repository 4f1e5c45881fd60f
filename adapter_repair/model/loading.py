"""Load a base model (fp32, bf16, 8-bit, 4-bit NF4) and attach a LoRA adapter as a PeftModel.

The aligned model is the same PeftModel with its adapter disabled (``with
model.disable_adapter():``), never a second copy of the base: on a consumer GPU there is room
for one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

from adapter_repair.adapter import LoraAdapter, load_adapter
from adapter_repair.errors import AdapterRepairError, BaseMismatchError
from adapter_repair.model.config import LoadConfig
from adapter_repair.model.memory import own_memory, release_freed_memory

logger = logging.getLogger(__name__)


def fix_bnb_cpu_trap(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights into its AVX512-BF16 CPU layout.

    bitsandbytes 0.50.2, on CPUs with AVX512-BF16, repacks each Linear4bit weight on its first
    eval-mode forward under no_grad; gradients through it are silently wrong afterwards
    (relative error ~1.8 on LoRA grads). An evaluate -> repair -> evaluate tool hits exactly
    this, so every loaded model gets the flag turned off. Returns the number of layers changed.
    """
    if "bitsandbytes" not in sys.modules:
        return 0  # nothing quantized was loaded
    import bitsandbytes as bnb

    n = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit) and getattr(m, "support_avx512bf16_for_cpu", False):
            m.support_avx512bf16_for_cpu = False
            n += 1
    if n:
        logger.debug("disabled the bitsandbytes AVX512-BF16 CPU repacking on %d layers", n)
    return n


def _quantization_config(quant: str, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    if quant == "none":
        return None
    if quant == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )


def load_base(config: LoadConfig) -> PreTrainedModel:
    """Load the base causal LM as ``config`` says, from safetensors only, with no remote code."""
    if not config.base:
        raise AdapterRepairError(
            "no base model given and the adapter does not name one.",
            "Pass --base with the id or path of the model the adapter was trained on.",
        )
    quant = config.resolved_quant()
    dtype = config.resolved_dtype()
    if quant == "8bit" and dtype == torch.float32:
        # bitsandbytes casts float32 inputs to float16 on every 8-bit matmul (and logs it).
        dtype = torch.float16
    logger.info(
        "loading base %s (quant %s, dtype %s)",
        config.base,
        quant,
        str(dtype).removeprefix("torch."),
    )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            config.base,
            revision=config.base_revision,
            dtype=dtype,
            quantization_config=_quantization_config(quant, dtype),
            device_map=config.resolved_device_map(),
            use_safetensors=True,
            trust_remote_code=False,
        )
    except (OSError, ValueError) as e:
        raise AdapterRepairError(
            f"cannot load base model {config.base!r}: {e}",
            "Check the id or path (a folder with config.json and *.safetensors weights); "
            "pass --base to override the base the adapter names.",
        ) from e
    fix_bnb_cpu_trap(model)
    if quant in ("4bit", "8bit"):
        # its unquantized tensors may be views into the checkpoint's memory map, which then
        # keeps every page read while quantizing resident (a 1.2B base: 2.1 GB of 3.2)
        own_memory(model)
        release_freed_memory()
    model.eval()
    return model


def _model_type(name_or_path: str, revision: str | None = None) -> str | None:
    """The ``model_type`` of a config that resolves without the network, else None."""
    try:
        cfg = AutoConfig.from_pretrained(
            name_or_path, revision=revision, local_files_only=True, trust_remote_code=False
        )
    except Exception:
        return None
    return str(getattr(cfg, "model_type", "")) or None


def check_recorded_base(adapter: LoraAdapter, base: str, base_model_type: str | None) -> None:
    """Refuse an adapter whose recorded base is of another architecture than ``base``."""
    recorded = adapter.base_model_name_or_path
    if not recorded or recorded == base or base_model_type is None:
        return
    recorded_type = _model_type(recorded, adapter.config.get("revision"))
    if recorded_type is not None and recorded_type != base_model_type:
        raise BaseMismatchError(
            f"the adapter was trained on {recorded!r} ({recorded_type}) but the base given is "
            f"{base!r} ({base_model_type}).",
            f"Pass --base with a {recorded_type} model, the one the adapter was trained on.",
        )


def check_against_base(adapter: LoraAdapter, model: nn.Module) -> None:
    """Every LoRA module must name a linear layer of ``model`` with matching dimensions."""
    modules = dict(model.named_modules())
    missing = [m.base_name for m in adapter if m.base_name not in modules]
    if missing:
        raise BaseMismatchError(
            f"{len(missing)} target module(s) of the adapter are not in the base "
            f"{type(model).__name__}: {', '.join(missing[:3])}"
            + (" ..." if len(missing) > 3 else ""),
            "Pass --base with the model the adapter was trained on.",
        )
    for m in adapter:
        target = modules[m.base_name]
        d_in = getattr(target, "in_features", None)
        d_out = getattr(target, "out_features", None)
        if not isinstance(target, nn.Linear) or d_in is None or d_out is None:
            raise BaseMismatchError(
                f"target module {m.base_name} is a {type(target).__name__}, not a linear layer.",
                "adapter-repair repairs LoRA on linear layers; check that --base is the right model.",
            )
        if (m.d_in, m.d_out) != (d_in, d_out):
            raise BaseMismatchError(
                f"module {m.base_name}: the adapter expects a {m.d_in} -> {m.d_out} linear layer, "
                f"the base has {d_in} -> {d_out}.",
                "The adapter was trained on a different base: pass --base with that model.",
            )
        if m.rank > min(d_in, d_out):
            raise BaseMismatchError(
                f"module {m.base_name}: rank {m.rank} exceeds the layer's dimensions "
                f"({d_in} -> {d_out}).",
                "Retrain with a rank no larger than the smallest dimension of each target.",
            )


def attach_adapter(
    model: PreTrainedModel,
    adapter_path: str | os.PathLike[str],
    *,
    adapter: LoraAdapter | None = None,
    trainable: bool = False,
) -> PeftModel:
    """Validate the adapter folder against ``model`` and attach it as a PeftModel.

    ``trainable`` leaves the LoRA factors with ``requires_grad`` (stage 2 needs gradients).
    """
    adapter = adapter if adapter is not None else load_adapter(adapter_path)
    check_against_base(adapter, model)
    peft_model = PeftModel.from_pretrained(model, str(adapter_path), is_trainable=trainable)
    fix_bnb_cpu_trap(peft_model)
    peft_model.eval()
    return peft_model


def load_model(
    adapter_path: str | os.PathLike[str], config: LoadConfig | None = None
) -> tuple[PeftModel, LoraAdapter]:
    """Load the adapter (validated first, before any weights of the base are read), its base,
    and attach them. Returns the PeftModel and the adapter object."""
    adapter = load_adapter(adapter_path)
    config = (config or LoadConfig()).for_adapter(adapter)
    base = config.base or adapter.base_model_name_or_path
    if config.base is None and base is not None:
        config = dataclasses.replace(config, base=base)
    if base is not None:
        check_recorded_base(adapter, base, _model_type(base, config.base_revision))
    model = load_base(config)
    return attach_adapter(model, adapter_path, adapter=adapter), adapter


def load_tokenizer(adapter_path: str | os.PathLike[str] | None, base: str | None) -> Any:
    """The adapter folder's own tokenizer when it ships one (fine-tunes often change the chat
    template), else the base's."""
    from transformers import AutoTokenizer

    source: str | None = None
    if adapter_path is not None and (Path(adapter_path) / "tokenizer_config.json").is_file():
        source = str(adapter_path)
    elif base is not None:
        source = base
    if source is None:
        raise AdapterRepairError(
            "no tokenizer: the adapter ships none and no base is known.",
            "Pass --base with the model the adapter was trained on.",
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise AdapterRepairError(
            f"cannot load a tokenizer from {source!r}: {e}",
            "Check --base (it must hold the tokenizer files).",
        ) from e
    tokenizer.padding_side = "left"
    return tokenizer
