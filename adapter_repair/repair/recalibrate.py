"""Optimal-Brain-Surgeon recalibration of the adapter coordinates kept after a restoration
step: the zeroed ones stay at 0 and the others of the same factor row move to make up for
them, so that each adapted layer's LoRA output on the fit rows' inputs changes as little as
the zeroing allows.

Zeroing a coordinate of ``A`` (r, d_in) or ``B`` (d_out, r) changes the LoRA output ``s B A x``
on every input; IRR (Wu et al. 2025) undoes the task part of such damage on dense deltas with
SparseGPT's OBS update against the layer's input Hessian ``H = X^T X`` on task rows. At adapter
rank the same update applies factor by factor: a row of ``A`` sees the layer inputs ``x``
(``H_A = X^T X``, d_in x d_in; exact per row when B's columns are orthogonal, as in the
canonical basis), then ``B`` is refit to the step's starting output ``B0 A0 x`` on the new
inputs ``A' x`` (least squares, ``H_B = A' H_A A'^T``, r x r) and its restored coordinates
removed by the same update. The harm the zeroing removed is not on the
task rows' inputs, so it is not put back; the probe rate measured after the step says whether
that holds.

Memory: one float32 ``d_in x d_in`` matrix per adapted module below L, held for one step
(about 0.5 GB for SmolLM2-135M all-linear; tens of GB at 7B: a lever for small bases).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from adapter_repair.model.inputs import model_device
from adapter_repair.model.walk import ModelMap
from adapter_repair.repair.factors import ADAPTER, zeroed_masks
from adapter_repair.repair.losses import Batch3

logger = logging.getLogger(__name__)

#: ``choose(block, i1, i2)``: the removal mask (d_out, i2 - i1) of one block of columns
Chooser = Callable[[torch.Tensor, int, int], torch.Tensor]


def obs_remove(
    W: torch.Tensor,
    choose: Chooser,
    H: torch.Tensor,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, int]:
    """``W`` (d_out, d_in) with the entries ``choose`` picks set to 0 and the others moved to
    make up for them, by the Optimal-Brain-Surgeon update with the input Hessian ``H``
    (d_in, d_in), column by column as SparseGPT does it: each removed entry's error is spread
    over the columns after it through the upper Cholesky factor of ``(H + damp I)^-1``, damp
    ``percdamp`` x the mean diagonal. ``choose`` gets each block of columns as the earlier
    updates left it. Rows are independent; a single removal is the exact least-squares
    optimum of the output error. Returns the new ``W`` (its dtype) and how many entries were
    removed."""
    out = W.detach().clone().double()  # (d_out, d_in)
    H = H.detach().clone().double()  # (d_in, d_in)
    dead = torch.diag(H) == 0  # inputs that never fire carry no information
    H[dead, dead] = 1.0
    out[:, dead] = 0.0
    H += (
        percdamp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    )
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    d_in = out.shape[1]
    removed = 0
    for i1 in range(0, d_in, blocksize):
        i2 = min(i1 + blocksize, d_in)
        W1 = out[:, i1:i2].clone()  # (d_out, b)
        remove = choose(W1, i1, i2).to(W1.device)  # (d_out, b)
        removed += int(remove.sum())
        Err = torch.zeros_like(W1)  # (d_out, b)
        Ub = U[i1:i2, i1:i2]  # (b, b)
        for j in range(i2 - i1):
            w = W1[:, j]  # (d_out,)
            q = torch.where(remove[:, j], torch.zeros_like(w), w)
            err = (w - q) / Ub[j, j]  # (d_out,)
            W1[:, j:] -= err.unsqueeze(1) @ Ub[j, j:].unsqueeze(0)
            W1[:, j] = q
            Err[:, j] = err
        out[:, i1:i2] = W1
        out[:, i2:] -= Err @ U[i1:i2, i2:]
    return out.to(W.dtype), removed


def fixed_mask(mask: torch.Tensor) -> Chooser:
    """A :data:`Chooser` that removes the entries of ``mask`` (d_out, d_in), whatever the
    earlier updates did to the block."""

    def choose(_block: torch.Tensor, i1: int, i2: int) -> torch.Tensor:
        return mask[:, i1:i2]

    return choose


def input_hessians(
    model: Any,
    modules: Mapping[str, torch.nn.Module],
    batches: Sequence[Batch3],
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """``X^T X`` (d_in, d_in), in ``dtype``, of the input of each of ``modules`` (by name) over
    the non-padding positions of ``batches``, from one forward pass each without gradient:
    the Hessian of a linear layer's output error, up to a scale the OBS update ignores.
    The adapter's recalibration takes it at each LoRA ``A`` (the layer's input); IRR on
    dense weights at each adapted linear layer."""
    H: dict[str, torch.Tensor] = {}
    mask: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Any:
        def fn(_m: Any, args: tuple[torch.Tensor, ...], _out: Any) -> None:
            x = args[0][mask["now"].to(args[0].device)].to(dtype)  # (n, d_in)
            H[name] = H[name] + x.T @ x if name in H else x.T @ x

        return fn

    handles = [module.register_forward_hook(hook(name)) for name, module in modules.items()]
    try:
        device = model_device(model)
        with torch.no_grad():
            for ids, attention, _labels in batches:
                mask["now"] = attention.bool()
                model(input_ids=ids.to(device), attention_mask=attention.to(device))
    finally:
        for h in handles:
            h.remove()
    return H


def lora_input_hessians(
    model: Any, model_map: ModelMap, keys: Sequence[str], batches: Sequence[Batch3]
) -> dict[str, torch.Tensor]:
    """:func:`input_hessians` (float32) at the ``A`` factor of each LoRA module in ``keys``."""
    modules: dict[str, Any] = {}
    for key in keys:
        site: Any = model_map.sites[key].module
        modules[key] = site.lora_A[ADAPTER]
    return input_hessians(model, modules, batches)


def recalibrate(
    model: Any,
    model_map: ModelMap,
    params: dict[str, torch.nn.Parameter],
    start: dict[str, torch.Tensor],
    reference: dict[str, torch.Tensor],
    batches: Sequence[Batch3],
    percdamp: float = 0.01,
) -> int:
    """OBS-recalibrate every LoRA module of ``params`` (``<key>.lora_A`` / ``.lora_B``) that has
    coordinates restored to 0 since ``reference``: from the factors as they were before the
    step zeroed them (``start``), the restored coordinates are removed by the OBS update, ``A``
    against the fit rows' layer inputs (``batches``), then ``B`` against ``A x``; the others
    take up their work. Restored coordinates end at 0. Returns how many modules moved."""
    zeroed = zeroed_masks(params, reference)
    keys = [
        n.removesuffix(".lora_A")
        for n in params
        if n.endswith(".lora_A")
        and (bool(zeroed[n].any()) or bool(zeroed[n.removesuffix("A") + "B"].any()))
    ]
    if not keys:
        return 0
    hessians = lora_input_hessians(model, model_map, keys, batches)
    for key in keys:
        nA, nB = f"{key}.lora_A", f"{key}.lora_B"
        H_x = hessians.pop(key)  # (d_in, d_in)
        zA, zB = zeroed[nA], zeroed[nB]
        A0, B0 = start[nA].float(), start[nB].float()  # (r, d_in), (d_out, r)
        new_A, _ = obs_remove(A0, fixed_mask(zA), H_x, percdamp=percdamp)
        H_z = new_A @ H_x @ new_A.T  # (r, r): the inputs B now sees, A' x
        # B that best keeps the step's starting output B0 A0 x on the new inputs A' x (the
        # A stage's error included), then the OBS removal of B's restored coordinates from it
        cross = B0 @ (A0 @ H_x @ new_A.T)  # (d_out, r)
        damp = percdamp * torch.diag(H_z).mean().clamp_min(1e-12)
        eye = torch.eye(H_z.shape[0], dtype=H_z.dtype, device=H_z.device)
        B_fit = torch.linalg.solve(H_z + damp * eye, cross.T).T  # (d_out, r)
        new_B, _ = obs_remove(B_fit, fixed_mask(zB), H_z, percdamp=percdamp)
        with torch.no_grad():
            params[nA].copy_(new_A.to(params[nA].dtype))
            params[nB].copy_(new_B.to(params[nB].dtype))
        del H_x
    logger.debug("recalibrated %d LoRA modules", len(keys))
    return len(keys)
