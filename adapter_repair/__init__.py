"""adapter-repair: restore the refusals a LoRA fine-tune removed, at adapter rank.

The library loads a PEFT LoRA adapter and its (possibly quantized) base, walks the PEFT model
once to find every LoRA module with its decoder layer and its role in the residual stream, and
repairs the adapter factors. It never prints and never talks to the Hub.

Names are imported lazily (PEP 562), so ``import adapter_repair`` and ``adapter-repair --help``
do not pay for torch and transformers until they are used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "AdapterRepairError": "adapter_repair.errors",
    "LoadConfig": "adapter_repair.config",
    "ProjectConfig": "adapter_repair.config",
    "PushConfig": "adapter_repair.config",
    "RepairConfig": "adapter_repair.config",
    "RestoreConfig": "adapter_repair.config",
    "RepairResult": "adapter_repair.repair",
    "repair": "adapter_repair.repair",
    "repair_folder": "adapter_repair.repair",
    "LoraAdapter": "adapter_repair.adapter",
    "LoraModule": "adapter_repair.adapter",
    "load_adapter": "adapter_repair.adapter",
    "save_adapter": "adapter_repair.adapter",
    "last_token_hidden": "adapter_repair.hidden",
    "attach_adapter": "adapter_repair.loading",
    "load_base": "adapter_repair.loading",
    "load_model": "adapter_repair.loading",
    "load_prompt_file": "adapter_repair.prompts",
    "LoraSite": "adapter_repair.walk",
    "ModelMap": "adapter_repair.walk",
    "Role": "adapter_repair.walk",
    "walk": "adapter_repair.walk",
}

__all__ = [
    "AdapterRepairError",
    "LoadConfig",
    "LoraAdapter",
    "LoraModule",
    "LoraSite",
    "ModelMap",
    "ProjectConfig",
    "PushConfig",
    "RepairConfig",
    "RepairResult",
    "RestoreConfig",
    "Role",
    "__version__",
    "attach_adapter",
    "last_token_hidden",
    "load_adapter",
    "load_base",
    "load_model",
    "load_prompt_file",
    "repair",
    "repair_folder",
    "save_adapter",
    "walk",
]

if TYPE_CHECKING:
    from adapter_repair.adapter import LoraAdapter, LoraModule, load_adapter, save_adapter
    from adapter_repair.config import (
        LoadConfig,
        ProjectConfig,
        PushConfig,
        RepairConfig,
        RestoreConfig,
    )
    from adapter_repair.errors import AdapterRepairError
    from adapter_repair.hidden import last_token_hidden
    from adapter_repair.loading import attach_adapter, load_base, load_model
    from adapter_repair.prompts import load_prompt_file
    from adapter_repair.repair import RepairResult, repair, repair_folder
    from adapter_repair.walk import LoraSite, ModelMap, Role, walk


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'adapter_repair' has no attribute {name!r}")
