"""The Optimal-Brain-Surgeon recalibration (repair/recalibrate.py): the OBS update itself, and
the adapter's kept coordinates making up for the restored ones on the fit rows' inputs."""

from __future__ import annotations

from pathlib import Path

import torch

from adapter_repair.model.config import LoadConfig
from adapter_repair.model.loading import load_model, load_tokenizer
from adapter_repair.model.walk import walk
from adapter_repair.repair.factors import ADAPTER, factor_params
from adapter_repair.repair.losses import answer_batches
from adapter_repair.repair.recalibrate import (
    fixed_mask,
    lora_input_hessians,
    obs_remove,
    recalibrate,
)


def _layer_problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(200, 24, generator=g) @ torch.randn(24, 24, generator=g)  # correlated inputs
    W = torch.randn(10, 24, generator=g)  # (d_out, d_in)
    H = 2 * X.T @ X / X.shape[0]  # (d_in, d_in)
    return W, X, H


def test_obs_removal_of_one_entry_is_the_least_squares_optimum() -> None:
    """Removing one entry, the update of the rest is the exact optimum of the layer's output
    error (the OBS formula), here checked against least squares."""
    W, X, H = _layer_problem()
    remove = torch.zeros(W.shape, dtype=torch.bool)
    remove[3, 0] = True
    new, n = obs_remove(W, fixed_mask(remove), H, blocksize=8, percdamp=0.0)
    keep = ~remove[3]
    target = (X @ W[3]).double().unsqueeze(1)  # (N, 1)
    best = torch.linalg.lstsq(X[:, keep].double(), target).solution.squeeze(1)
    assert n == 1 and new[3, 0] == 0
    assert torch.allclose(new[3, keep].double(), best, atol=1e-3)
    assert torch.equal(new[:3], W[:3])  # other rows untouched


def test_obs_removal_zeroes_what_it_removes_and_makes_up_for_it() -> None:
    W, X, H = _layer_problem()
    remove = torch.rand(W.shape, generator=torch.Generator().manual_seed(1)) < 0.3
    outs = []
    for blocksize in (24, 8, 5):  # lazy block updates: the same result for any block size
        new, n = obs_remove(W, fixed_mask(remove), H, blocksize=blocksize)
        assert n == int(remove.sum())
        assert torch.all(new[remove] == 0)
        outs.append(new)
    assert torch.allclose(outs[0], outs[1], atol=1e-4) and torch.allclose(
        outs[0], outs[2], atol=1e-4
    )
    zeroed = torch.where(remove, torch.zeros_like(W), W)
    # the layer's outputs on its inputs: the recalibrated weights stay closer than zeroing
    err_obs = torch.linalg.matrix_norm((outs[0] - W) @ X.T)
    err_zero = torch.linalg.matrix_norm((zeroed - W) @ X.T)
    assert err_obs < 0.95 * err_zero


def test_obs_removal_of_nothing_changes_nothing() -> None:
    W, _, H = _layer_problem()
    new, n = obs_remove(W, lambda b, i1, i2: torch.zeros_like(b, dtype=torch.bool), H)
    assert n == 0
    assert torch.allclose(new, W, atol=1e-6)


def test_recalibration_keeps_restored_coordinates_at_zero_and_the_lora_output_closer(
    tiny_chat_dir: Path, tiny_chat_adapter_dir: Path
) -> None:
    model, _ = load_model(
        tiny_chat_adapter_dir, LoadConfig(base=str(tiny_chat_dir), quant="none", dtype="float32")
    )
    model.eval()
    tok = load_tokenizer(None, str(tiny_chat_dir))
    model_map = walk(model)
    params = factor_params(model_map, model_map.n_layers, ADAPTER)
    reference = {n: p.detach().clone() for n, p in params.items()}
    rows = [("say something kind", "you are great"), ("count to three", "one two three")]
    batches = answer_batches(tok, rows * 4, 4, 16)
    keys = [n.removesuffix(".lora_A") for n in params if n.endswith(".lora_A")]
    H = lora_input_hessians(model, model_map, keys, batches)

    def output_error() -> float:
        """sum over modules of |(B A - B0 A0) X^T|^2 on the fit inputs: tr(D H D^T)"""
        total = 0.0
        for k in keys:
            D = params[f"{k}.lora_B"].detach() @ params[f"{k}.lora_A"].detach()
            D0 = reference[f"{k}.lora_B"] @ reference[f"{k}.lora_A"]
            total += float(torch.trace((D - D0) @ H[k] @ (D - D0).T))
        return total

    g = torch.Generator().manual_seed(0)
    start = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():  # restore a random fifth of every factor
        for p in params.values():
            p[torch.rand(p.shape, generator=g) < 0.2] = 0
    restored = {n: (p.detach() == 0) & (reference[n] != 0) for n, p in params.items()}
    zeroed_error = output_error()
    assert recalibrate(model, model_map, params, start, reference, batches) == len(keys)
    assert output_error() < 0.8 * zeroed_error
    for n, p in params.items():
        assert torch.all(p.detach()[restored[n]] == 0)
    # nothing restored: nothing moves
    again = {n: p.detach().clone() for n, p in params.items()}
    assert recalibrate(model, model_map, params, again, again, batches) == 0
