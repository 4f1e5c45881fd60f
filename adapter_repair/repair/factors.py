"""The adapter being repaired, as live PEFT parameters: which factors there are, snapshots of
their state and putting one back, how much of the adapter changed, and a copy as a
:class:`~adapter_repair.adapter.LoraAdapter`.

The repaired adapter is PEFT's adapter "default"; the aligned model is the same PeftModel with
it disabled, so no second copy of the base is ever needed. The fidelity guard adds a frozen copy
of the input adapter under "reference".
"""

from __future__ import annotations

from typing import Any

import torch

from adapter_repair.adapter import LoraAdapter
from adapter_repair.model.walk import ModelMap

ADAPTER = "default"  #: the adapter being repaired, as PeftModel names it
REFERENCE = "reference"  #: the fine-tuned adapter as it came in (the fidelity guard only)


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


def all_factors(model_map: ModelMap) -> dict[str, torch.nn.Parameter]:
    """Every layer's live factors of the adapter being repaired."""
    return factor_params(model_map, model_map.n_layers, ADAPTER)


def snapshot(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """A detached copy of the factors: the adapter state of a step (it is small)."""
    return {n: p.detach().clone() for n, p in params.items()}


def load_state(params: dict[str, torch.nn.Parameter], state: dict[str, torch.Tensor]) -> None:
    """Put a :func:`snapshot` back into the live factors."""
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n])


def changed_share(
    params: dict[str, torch.nn.Parameter], reference: dict[str, torch.Tensor]
) -> float:
    """Share of all adapter coordinates that differ from ``reference``."""
    diff = sum(int((p.detach() != reference[n]).sum()) for n, p in params.items())
    total = sum(p.numel() for p in params.values())
    return diff / total if total else 0.0


def zeroed_masks(
    params: dict[str, torch.nn.Parameter], reference: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Per factor, the coordinates that are 0 now and were not in ``reference``: those restored
    to the aligned value."""
    return {n: (p.detach() == 0) & (reference[n] != 0) for n, p in params.items()}


def zeroed_share(
    params: dict[str, torch.nn.Parameter], reference: dict[str, torch.Tensor]
) -> float:
    """Share of all adapter coordinates restored to 0 (:func:`zeroed_masks`); with a heal, the
    rest may have moved too."""
    zeroed = sum(int(m.sum()) for m in zeroed_masks(params, reference).values())
    total = sum(p.numel() for p in params.values())
    return zeroed / total if total else 0.0


def to_adapter(
    adapter: LoraAdapter, params: dict[str, torch.nn.Parameter], model_map: ModelMap
) -> LoraAdapter:
    """A copy of ``adapter`` holding the live factors, in the adapter file's dtypes."""
    out = adapter.clone()
    for m in out:
        a = params.get(f"{m.key}.lora_A")
        b = params.get(f"{m.key}.lora_B")
        if a is None or b is None:
            continue
        m.A = a.detach().to(device="cpu", dtype=m.A.dtype).clone()
        m.B = b.detach().to(device="cpu", dtype=m.B.dtype).clone()
    return model_map.annotate(out)


def put_adapter(params: dict[str, torch.nn.Parameter], adapter: LoraAdapter) -> None:
    """Write ``adapter``'s factors into the live ones (``params`` from :func:`all_factors`),
    in their dtype and device: the live model becomes that adapter."""
    with torch.no_grad():
        for m in adapter:
            for side, t in (("lora_A", m.A), ("lora_B", m.B)):
                p = params.get(f"{m.key}.{side}")
                if p is not None:
                    p.copy_(t.to(device=p.device, dtype=p.dtype))


def add_reference(model: Any) -> None:
    """Load a copy of the adapter as it came in under the name "reference", for the fidelity
    guard (PEFT keeps the active adapter "default")."""
    model.add_adapter(REFERENCE, model.peft_config[ADAPTER])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f".{REFERENCE}." in name:
                src = dict(model.named_parameters())[name.replace(f".{REFERENCE}.", f".{ADAPTER}.")]
                p.copy_(src)
                p.requires_grad_(False)
    model.set_adapter(ADAPTER)
