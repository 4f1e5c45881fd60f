"""The one walk over a PEFT model: each LoRA module, its decoder layer and its residual-stream role.

Why by data flow and not by names: ``o_proj`` / ``down_proj`` / ``wo`` / ``dense_4h_to_h`` differ
between architectures, and a name list silently misses the next one (the reference code's
bug). The walk instead traces one tiny forward pass with autograd and reads the graph:

* a linear module of decoder layer ``l`` **reads** the residual stream when its input is computed
  from the layer's input ``hidden_states[l]`` without passing through another linear layer
  (q, k, v, gate, up); the norm module whose output it reads is its ``in_norm``;
* it **writes** into the residual stream when the layer's output ``hidden_states[l+1]`` depends
  on its output without passing through another linear layer (o, down); a norm applied to its
  output on that path (Gemma 2/3 post-norms) is its ``out_norm``.

Decoder layers are found as the model's ``ModuleList`` with ``num_hidden_layers`` entries, and a
module's layer is the entry that contains it. A trace of two tokens costs one tiny forward.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from adapter_repair.adapter import LoraAdapter, Role
from adapter_repair.errors import UnsupportedModelError

logger = logging.getLogger(__name__)


@dataclass
class LoraSite:
    """A LoRA module found in the model, with where it sits."""

    key: str  #: module path in the PeftModel, as in the adapter file
    module: nn.Module  #: the peft LoraLayer
    layer: int | None
    role: Role
    in_norm: nn.Module | None = None  #: norm whose output a reader reads
    out_norm: nn.Module | None = None  #: norm applied to a writer's output before the add

    @property
    def reads(self) -> bool:
        return self.role in (Role.READ, Role.READ_WRITE)

    @property
    def writes(self) -> bool:
        return self.role in (Role.WRITE, Role.READ_WRITE)


@dataclass
class ModelMap:
    """The result of :func:`walk`: decoder layers and LoRA sites of one model."""

    layers: nn.ModuleList
    sites: dict[str, LoraSite] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[LoraSite]:
        return iter(self.sites.values())

    def in_layers(self, first: int, stop: int) -> list[LoraSite]:
        """Sites of decoder layers ``first .. stop-1``."""
        return [s for s in self if s.layer is not None and first <= s.layer < stop]

    def annotate(self, adapter: LoraAdapter) -> LoraAdapter:
        """Fill each module's ``layer`` and ``role`` from this walk; returns ``adapter``."""
        missing = [m.key for m in adapter if m.key not in self.sites]
        if missing:
            raise ValueError(
                f"{len(missing)} adapter module(s) are not in this model: {missing[:3]}"
            )
        for m in adapter:
            site = self.sites[m.key]
            m.layer, m.role = site.layer, site.role
        return adapter


def text_config(model: nn.Module) -> Any:
    """The config that holds ``num_hidden_layers`` (the text config of a multimodal model)."""
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no .config; adapter-repair walks transformers models.",
            "Load the base with transformers (AutoModelForCausalLM).",
        )
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder layers: the one with ``num_hidden_layers`` entries."""
    n = getattr(text_config(model), "num_hidden_layers", None)
    found = [
        m for m in model.modules() if isinstance(m, nn.ModuleList) and n is not None and len(m) == n
    ]
    # Prefer lists whose entries hold parameters and are all of one class.
    found = [
        m for m in found if len({type(x) for x in m}) == 1 and any(True for _ in m[0].parameters())
    ]
    if len(found) != 1:
        raise UnsupportedModelError(
            f"found {len(found)} candidate lists of {n} decoder layers in {type(model).__name__}; "
            "cannot tell where the decoder layers are.",
            "Use a decoder-only causal LM (Llama, Qwen2, Mistral, Gemma layouts).",
        )
    return found[0]


def _is_linear(m: nn.Module) -> bool:
    # bitsandbytes' Linear4bit / Linear8bitLt subclass nn.Linear.
    return isinstance(m, nn.Linear | LoraLayer)


def _is_lora(m: nn.Module) -> bool:
    return isinstance(m, LoraLayer)


def _is_norm(m: nn.Module) -> bool:
    """A leaf module with a 1-D weight that is not a linear: RMSNorm, LayerNorm and kin."""
    w = getattr(m, "weight", None)
    return (
        not _is_linear(m)
        and not isinstance(m, nn.Embedding)
        and isinstance(w, torch.Tensor)
        and w.ndim == 1
        and not any(True for _ in m.children())
    )


def _first_tensor(x: Any) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, tuple | list) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    return None


def _node(t: torch.Tensor | None) -> Any:
    return None if t is None else t.grad_fn


def _walk_back(start: Any, boundary: Any, marks: dict[Any, str]) -> tuple[bool, set[str]]:
    """Walk the autograd graph back from ``start``, not past ``boundary`` nor past any marked
    node (the outputs of linear layers). Returns whether ``boundary`` was reached and the
    labels of the marked nodes met first."""
    met: set[str] = set()
    if start is None:
        return False, met
    reached = False
    seen, todo = {start}, [start]
    while todo:
        n = todo.pop()
        if n is boundary:
            reached = True
            continue
        if n in marks:
            met.add(marks[n])
            continue
        for nxt, _ in n.next_functions:
            if nxt is not None and nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return reached, met


def _trace(model: nn.Module, layers: nn.ModuleList) -> dict[str, tuple[Any, Any]]:
    """Run two tokens through ``model`` with autograd on; return ``name -> (input node, output
    node)`` for every decoder layer (``"layer:i"``), linear and norm module inside them."""
    nodes: dict[str, tuple[Any, Any]] = {}
    handles = []
    embed = model.get_input_embeddings()  # type: ignore[operator]

    def embed_hook(_m: nn.Module, _a: Any, out: torch.Tensor) -> torch.Tensor:
        # A non-leaf that requires grad, so the whole graph above it is recorded.
        return out.detach().requires_grad_(True) * 1.0

    def record(name: str) -> Any:
        def hook(_m: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
            x = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
            nodes[name] = (_node(_first_tensor(x)), _node(_first_tensor(out)))

        return hook

    names = {id(m): n for n, m in model.named_modules()}
    handles.append(embed.register_forward_hook(embed_hook))
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(record(f"layer:{i}"), with_kwargs=True))
        # The base and factor linears inside a LoraLayer are covered by the LoraLayer's hook.
        inner = {
            id(sub) for p in layer.modules() if isinstance(p, LoraLayer) for sub in p.modules()
        }
        inner -= {id(p) for p in layer.modules() if isinstance(p, LoraLayer)}
        for m in layer.modules():
            if (_is_linear(m) and id(m) not in inner) or _is_norm(m):
                handles.append(m.register_forward_hook(record(names[id(m)]), with_kwargs=True))
    try:
        device = embed.weight.device
        if device.type == "meta":
            raise UnsupportedModelError(
                "the model's weights are on the meta device; the walk needs real weights.",
                "Load the model with real weights (device_map='cpu' or a GPU).",
            )
        ids = torch.tensor([[1, 2]], device=device)
        with torch.enable_grad():
            model(input_ids=ids, use_cache=False)
    except UnsupportedModelError:
        raise
    except Exception as e:
        raise UnsupportedModelError(
            f"tracing a forward pass of {type(model).__name__} failed ({type(e).__name__}: {e}).",
            "Use a decoder-only causal LM from transformers (Llama, Qwen2, Mistral, Gemma).",
        ) from e
    finally:
        for h in handles:
            h.remove()
    return nodes


def walk(model: nn.Module) -> ModelMap:
    """Find every LoRA module of ``model`` (a PeftModel or a model with LoRA layers injected),
    its decoder layer and its role. Runs one two-token forward pass under autograd."""
    layers = decoder_layers(model)
    names = {id(m): n for n, m in model.named_modules()}
    layer_of: dict[int, int] = {}
    for i, layer in enumerate(layers):
        for m in layer.modules():
            layer_of[id(m)] = i
    lora = [(n, m) for n, m in model.named_modules() if _is_lora(m)]
    if not lora:
        return ModelMap(layers=layers)
    nodes = _trace(model, layers)
    norms_by_out: dict[Any, nn.Module] = {}
    norms_by_in: dict[Any, nn.Module] = {}
    linear_outs: dict[int, dict[Any, str]] = {}
    for i, layer in enumerate(layers):
        marks: dict[Any, str] = {}
        for m in layer.modules():
            name = names[id(m)]
            if name not in nodes:
                continue
            node_in, node_out = nodes[name]
            if _is_norm(m):
                norms_by_out[node_out] = m
                norms_by_in.setdefault(node_in, m)
            elif node_out is not None:
                marks[node_out] = name
        linear_outs[i] = marks

    mm = ModelMap(layers=layers)
    for name, m in lora:
        at = layer_of.get(id(m))
        if at is None or f"layer:{at}" not in nodes:
            mm.sites[name] = LoraSite(key=name, module=m, layer=at, role=Role.OUTSIDE)
            continue
        i = at
        layer_in, layer_out = nodes[f"layer:{i}"]
        if name not in nodes:
            raise UnsupportedModelError(
                f"LoRA module {name} did not run in the traced forward pass.",
                "Remove LoRA from modules the model does not use, or report the architecture.",
            )
        node_in, node_out = nodes[name]
        reads, _ = _walk_back(node_in, layer_in, linear_outs[i])
        writes = name in _walk_back(layer_out, layer_in, linear_outs[i])[1]
        role = {
            (True, False): Role.READ,
            (False, True): Role.WRITE,
            (True, True): Role.READ_WRITE,
            (False, False): Role.INTERNAL,
        }[(reads, writes)]
        mm.sites[name] = LoraSite(
            key=name,
            module=m,
            layer=i,
            role=role,
            in_norm=norms_by_out.get(node_in) if reads else None,
            out_norm=norms_by_in.get(node_out) if writes else None,
        )
    counts = {r.value: sum(s.role is r for s in mm) for r in Role}
    logger.info(
        "walked %d LoRA modules over %d decoder layers: %s", len(mm.sites), len(layers), counts
    )
    return mm


def norm_gain(norm: nn.Module) -> torch.Tensor:
    """The per-channel gain ``g`` of a norm module, read by probing it rather than by knowing its
    formula (Llama's ``w * x``, Gemma's ``(1 + w) * x``, LayerNorm's ``w * x + b``).

    For a zero-mean input ``x`` with no zero entries, ``(norm(x) - norm(-x)) / 2x`` is ``g`` times
    a positive constant (1/rms or 1/std), and only the direction of ``g * r`` is ever used.
    """
    w = norm.weight
    assert isinstance(w, torch.Tensor)
    d = int(w.shape[0])
    x = torch.linspace(1.0, 2.0, d, dtype=torch.float32)
    x = x * torch.where(torch.arange(d) % 2 == 0, 1.0, -1.0)  # alternating signs, mean ~ 0
    x = x - x.mean()
    x = torch.where(x.abs() < 1e-3, torch.full_like(x, 1e-3), x)
    x = x.to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        g = (norm(x[None]) - norm(-x[None]))[0].float() / (2 * x.float())  # (d,)
    return g
