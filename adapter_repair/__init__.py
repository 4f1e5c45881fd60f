"""adapter-repair: restore the refusals a LoRA fine-tune removed, at adapter rank.

The library loads a PEFT LoRA adapter and its (possibly quantized) base, walks the PEFT model
once to find every LoRA module with its decoder layer and its role in the residual stream, and
(in later stages) repairs the adapter factors. It never prints and never talks to the Hub.
"""

from adapter_repair.adapter import LoraAdapter, LoraModule, load_adapter, save_adapter
from adapter_repair.errors import AdapterRepairError
from adapter_repair.hidden import last_token_hidden
from adapter_repair.loading import LoadConfig, attach_adapter, load_base, load_model
from adapter_repair.walk import LoraSite, ModelMap, Role, walk

__version__ = "0.1.0"

__all__ = [
    "AdapterRepairError",
    "LoadConfig",
    "LoraAdapter",
    "LoraModule",
    "LoraSite",
    "ModelMap",
    "Role",
    "__version__",
    "attach_adapter",
    "last_token_hidden",
    "load_adapter",
    "load_base",
    "load_model",
    "save_adapter",
    "walk",
]
