"""Stage 1: project the adapter's factors off a direction per layer, in closed form.

Writers (modules whose output is added to the residual stream: o_proj, down_proj) lose the
direction from ``B``: ``B <- B - a U (U^T B)``; readers (q, k, v, gate, up) stop reacting to it:
``A <- A - a (A U) U^T``. Exact, rank kept, never a d x d matrix. The tensor functions are pure
(tested on hand-made tensors); :func:`project_adapter` applies them to the live factors.

Shapes: ``A`` is (r, d_in), ``B`` is (d_out, r), basis matrices ``U`` are (d, k) with
orthonormal columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from adapter_repair.measure.measures import use_adapter
from adapter_repair.model.walk import ModelMap, norm_gain
from adapter_repair.repair.directions import (
    difference_directions,
    mean_hidden,
    shift_directions,
    unit,
)
from adapter_repair.repair.factors import ADAPTER


def orthonormal_basis(vectors: Sequence[torch.Tensor], tol: float = 1e-6) -> torch.Tensor:
    """Orthonormal columns spanning ``vectors`` (each (d,)); near-zero or dependent ones are
    dropped (a zero direction normalised would be NaN). Returns (d, k), k possibly 0."""
    if not vectors:
        raise ValueError("no vectors")
    d = vectors[0].shape[0]
    kept: list[torch.Tensor] = []
    for v in vectors:
        w = v.detach().to(torch.float64).clone()  # (d,)
        scale = float(w.norm())
        if scale <= tol:
            continue
        for u in kept:
            w -= (u @ w) * u
        if float(w.norm()) <= tol * scale:
            continue
        kept.append(w / w.norm())
    if not kept:
        return torch.zeros(d, 0, dtype=vectors[0].dtype)
    return torch.stack(kept, dim=1).to(vectors[0].dtype)  # (d, k)


def project_write(B: torch.Tensor, U: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """``B - a U (U^T B)``: the module's output no longer moves the residual stream along
    span(U). Exact, O(d_out r k), rank kept. B (d_out, r), U (d_out, k)."""
    _check_strength(strength)
    U = U.to(B.dtype)
    return B - strength * (U @ (U.T @ B))  # (d_out, r)


def project_read(A: torch.Tensor, U: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """``A - a (A U) U^T``: the adapter no longer reacts to its input along span(U).
    A (r, d_in), U (d_in, k)."""
    _check_strength(strength)
    U = U.to(A.dtype)
    return A - strength * ((A @ U) @ U.T)  # (r, d_in)


def _check_strength(a: float) -> None:
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"projection strength must be in [0, 1]; got {a}")


def projection_directions(
    model: Any,
    tokenizer: Any,
    probe: Sequence[str],
    benign: Sequence[str],
    layers: Sequence[int],
    kind: str,
    batch_size: int,
) -> dict[int, torch.Tensor | None]:
    """Per ``hidden_states`` index, the unit direction stage 1 projects off (None: nothing)."""
    with use_adapter(model, None):
        aligned_probe = mean_hidden(model, tokenizer, probe, layers, batch_size=batch_size)
        aligned_benign = mean_hidden(model, tokenizer, benign, layers, batch_size=batch_size)
    if kind == "refusal":
        return difference_directions(aligned_probe, aligned_benign)
    with use_adapter(model, ADAPTER):
        tuned_probe = mean_hidden(model, tokenizer, probe, layers, batch_size=batch_size)
        tuned_benign = mean_hidden(model, tokenizer, benign, layers, batch_size=batch_size)
    return shift_directions(tuned_probe, aligned_probe, tuned_benign, aligned_benign)


def project_adapter(
    model_map: ModelMap,
    directions: dict[int, torch.Tensor | None],
    sides: str,
    strength: float,
) -> int:
    """Apply stage 1 to the live factors: writers (layer l) lose ``directions[l+1]`` from B,
    readers lose unit(g * directions[l]) from A (g the input norm's gain; a post-norm writer's
    direction likewise passes through its norm's gain). Returns how many matrices changed."""
    changed = 0
    with torch.no_grad():
        for site in model_map:
            if site.layer is None:
                continue
            module: Any = site.module
            if site.writes and sides in ("write", "both"):
                r = directions.get(site.layer + 1)
                if r is not None and site.out_norm is not None:
                    r = unit(norm_gain(site.out_norm).float().cpu() * r)
                if r is not None:
                    B = module.lora_B[ADAPTER].weight  # (d_out, r)
                    U = orthonormal_basis([r]).to(B.device)  # (d_out, 1)
                    B.copy_(project_write(B.float(), U.float(), strength).to(B.dtype))
                    changed += 1
            if site.reads and sides in ("read", "both"):
                r = directions.get(site.layer)
                if r is not None and site.in_norm is not None:
                    r = unit(norm_gain(site.in_norm).float().cpu() * r)
                if r is not None:
                    A = module.lora_A[ADAPTER].weight  # (r, d_in)
                    U = orthonormal_basis([r]).to(A.device)  # (d_in, 1)
                    A.copy_(project_read(A.float(), U.float(), strength).to(A.dtype))
                    changed += 1
    return changed
