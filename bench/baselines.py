"""Comparison methods for bench/repair.py (bench only, never part of the package).

- :func:`safe_lora`: a Safe LoRA-style projection (Hsu et al. 2024). For each LoRA module,
  the alignment matrix ``V = W_aligned - W_unaligned`` of its base weight spans the directions
  alignment wrote; the module's update ``s B A`` is projected onto span(V)'s column space,
  ``B <- U (U^T B)`` with U an orthonormal basis of col(V), for the modules whose update is
  least like its projection. The published method scales by ``V V^T / ||V||_F``; an exact
  orthogonal projection is used here (the same subspace, no arbitrary scale). It needs the
  unaligned weights, which the small world has and a user does not.
- :func:`one_shot_patch`: a one-shot safety patch (Zhang et al., "Safety at One Shot: Patching
  Fine-Tuned LLMs with A Single Instance", ICLR 2026): the adapter's own factors fine-tuned for
  a few epochs on a single refusal example, here one probe prompt and the aligned model's own
  greedy refusal to it.
- :func:`irr`: IRR (Wu et al., "Separate the Wheat from the Chaff: A Post-Hoc Approach to
  Safety Re-Alignment for Fine-Tuned Language Models", ACL Findings 2025), as its public code
  runs it on a LoRA fine-tune: on the merged dense delta ``dW = s B A`` of each adapted
  weight, the entries whose sign disagrees with the safety vector ``W_aligned - W_unaligned``
  are removed (set to the aligned value), every one of them (its default), and the entries
  kept are recalibrated by SparseGPT's Optimal-Brain-Surgeon update (blocks of 128 columns,
  damping 1% of the Hessian's mean diagonal) against ``H = X^T X`` of the layer's inputs on
  task rows. The safety Fisher that ranks removals only matters when a share is kept
  (``keep`` > 0). Differences: H is taken in one pass over the fine-tuned model (IRR recomputes
  each layer's inputs after editing the layers below), over the task rows' answer positions
  (IRR includes padding). Its output is a dense model, not an adapter.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from adapter_repair.adapter import LoraAdapter
from adapter_repair.repair.recalibrate import input_hessians, obs_remove

logger = logging.getLogger(__name__)


def column_basis(V: torch.Tensor, rtol: float = 1e-4) -> torch.Tensor:
    """Orthonormal basis (d_out, k) of V's column space, dropping singular values below
    ``rtol`` x the largest (V (d_out, d_in) is a merged LoRA: low rank up to rounding)."""
    U, S, _ = torch.linalg.svd(V.double(), full_matrices=False)  # U (d_out, m), S (m,)
    if S.numel() == 0 or float(S[0]) == 0.0:
        return torch.zeros(V.shape[0], 0, dtype=torch.float32)
    keep = S[0] * rtol < S
    return U[:, keep].float()  # (d_out, k)


def safe_lora(
    adapter: LoraAdapter,
    aligned: dict[str, torch.Tensor],
    unaligned: dict[str, torch.Tensor],
    share: float = 1.0,
) -> tuple[LoraAdapter, dict[str, Any]]:
    """Project the ``share`` of modules whose update is least like its projection (all by
    default) onto the column space of their alignment matrix. Returns the new adapter and a
    record (similarity per module, how many projected)."""
    out = adapter.clone()
    sims: dict[str, float] = {}
    bases: dict[str, torch.Tensor] = {}
    for m in out:
        name = f"{m.base_name}.weight"
        V = aligned[name].float() - unaligned[name].float()  # (d_out, d_in)
        U = column_basis(V)  # (d_out, k)
        B = m.B.float()  # (d_out, r)
        PB = U @ (U.T @ B)  # (d_out, r)
        # ||C dW|| / ||dW||, dW = s B A: the cosine between the update and its projection
        full = torch.linalg.matrix_norm(B @ m.A.float())
        proj = torch.linalg.matrix_norm(PB @ m.A.float())
        sims[m.key] = float(proj / full) if float(full) > 0 else 1.0
        bases[m.key] = U
    n = math.ceil(share * len(sims))
    chosen = set(sorted(sims, key=lambda k: sims[k])[:n])
    changed = 0
    total = 0
    for m in out:
        total += m.A.numel() + m.B.numel()
        if m.key not in chosen:
            continue
        U = bases[m.key]
        B = m.B.float()
        newB = (U @ (U.T @ B)).to(m.B.dtype)  # (d_out, r)
        changed += int((newB != m.B).sum())
        m.B = newB
    record = {
        "projected": len(chosen),
        "modules": len(sims),
        "share": share,
        "similarity_mean": sum(sims.values()) / max(1, len(sims)),
        "changed": changed / max(1, total),
    }
    return out, record


def dense_restore(
    model: Any,
    tokenizer: Any,
    aligned: dict[str, torch.Tensor],
    probe: list[str],
    benign: list[str],
    judge: Any,
    *,
    layer: int,
    rate: float = 0.002,
    steps: int = 20,
    rollback: float = 0.2,
    eval_every: int = 5,
    batch_size: int = 16,
    max_new_tokens: int = 32,
    aligned_probe_states: torch.Tensor,
    target_rate: float,
) -> dict[str, Any]:
    """The published method on dense weights, for comparison: ``model`` is the fine-tuned model
    merged into float32 dense weights; each step restores single weights of decoder layers
    0..L-1 to their aligned values (``aligned``, by parameter name), the top ``rate`` of the
    decoder's linear weights by |gradient| of ``-cos(mean h_L, h*)`` among those the gradient
    moves toward the aligned value; then the top ``rollback`` of the restored ones the benign
    gradient (``-cos(mean h_L, b*)``) wants back return to their fine-tuned value; every
    ``eval_every`` steps the probe harmful rate is measured, and it stops at the aligned
    model's own probe rate (``target_rate``). The decisions are :mod:`adapter_repair.repair.select`' rules on
    ``W - W_aligned`` (restoring sets that difference to 0, as it sets an adapter coordinate
    to 0). ``aligned_probe_states``: h_L of the aligned model on ``probe`` (n, d)."""
    from adapter_repair.measure.config import GenerationConfig
    from adapter_repair.measure.generation import generate
    from adapter_repair.measure.measures import Rate
    from adapter_repair.model.walk import decoder_layers
    from adapter_repair.repair import select as S
    from adapter_repair.repair.losses import direction_gradients, prompt_batches, prompt_targets

    layers = decoder_layers(model)
    params = {
        n: p
        for n, p in model.named_parameters()
        if p.dim() == 2 and ".layers." in n and int(n.split(".layers.")[1].split(".")[0]) < layer
    }
    for p in model.parameters():
        p.requires_grad_(False)
    reference = {n: p.detach().clone() for n, p in params.items()}  # the fine-tuned weights
    gen = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=64, progress=False)
    probe_batches = prompt_batches(tokenizer, probe, batch_size)
    guard_batches = prompt_batches(tokenizer, benign, batch_size)
    h_star = aligned_probe_states.mean(0)  # (d,)
    b_star = torch.cat(prompt_targets(model, guard_batches, layer, layers=layers)).mean(0)  # (d,)

    def harmful_rate() -> float:
        answers = generate(model, tokenizer, probe, gen, desc="probe")
        return Rate.of(judge.harmful(probe, answers)).rate

    history: list[dict[str, Any]] = []
    n_coordinates = sum(p.numel() for p in params.values())
    for step in range(1, steps + 1):
        _, g = direction_gradients(model, probe_batches, layer, h_star, params, layers=layers)
        diff = {n: (p.detach() - aligned[n]).float() for n, p in params.items()}
        masks = {n: S.candidates(diff[n], g[n]) for n in params}
        chosen = S.select_top({n: g[n].abs() for n in params}, masks, rate, n_coordinates)
        with torch.no_grad():
            for n, p in params.items():
                p[chosen[n]] = aligned[n][chosen[n]].to(p.dtype)
        restored = sum(int(m.sum()) for m in chosen.values())
        del g, diff, masks
        rolled = 0
        if rollback > 0:
            _, g_b = direction_gradients(model, guard_batches, layer, b_star, params, layers=layers)
            ref_diff = {n: (reference[n] - aligned[n]).float() for n in params}
            back = S.rollback_mask(chosen, ref_diff, g_b, rollback)
            with torch.no_grad():
                for n, p in params.items():
                    p[back[n]] = reference[n][back[n]]
            rolled = sum(int(m.sum()) for m in back.values())
            del g_b, ref_diff
        record: dict[str, Any] = {"step": step, "restored": restored, "rolled_back": rolled}
        if step % eval_every == 0 or step == steps:
            record["probe_harmful"] = harmful_rate()
        history.append(record)
        logger.info("dense step %s", record)
        if record.get("probe_harmful", 1.0) <= target_rate:
            break
    changed = sum(int((p.detach() != reference[n]).sum()) for n, p in params.items())
    total = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n)
    return {"history": history, "changed_decoder": changed / total}


ONE_SHOT = {"epochs": 10, "lr": 1e-4}  #: the one-shot patch's settings (Adam, batch of one)


def one_shot_patch(
    model: Any,
    tokenizer: Any,
    prompt: str,
    refusal: str,
    *,
    epochs: int = int(ONE_SHOT["epochs"]),
    lr: float = float(ONE_SHOT["lr"]),
    max_answer_tokens: int = 64,
) -> dict[str, Any]:
    """Fine-tune every LoRA factor of ``model`` (a PeftModel, adapter on) for ``epochs`` Adam
    steps on the single example (``prompt``, ``refusal``): the answer tokens' cross-entropy,
    as the adapter was trained. Nothing is masked or held: the patch may move every
    coordinate. Returns each epoch's loss and the share of coordinates changed."""
    from adapter_repair.model.walk import walk
    from adapter_repair.repair.factors import all_factors, changed_share, snapshot
    from adapter_repair.repair.heal import HealLoss, heal
    from adapter_repair.repair.losses import answer_batches

    params = all_factors(walk(model))
    before = snapshot(params)
    batches = answer_batches(tokenizer, [(prompt, refusal)], 1, max_answer_tokens)
    losses = heal(
        model, params, before, HealLoss(batches, lambda: iter(()), 0.0), steps=epochs, lr=lr
    )
    return {"losses": losses, "changed": changed_share(params, before)}


IRR = {"keep": 0.0, "blocksize": 128, "percdamp": 0.01, "calibration_rows": 128}


def removal_mask(
    delta: torch.Tensor, safety: torch.Tensor, fisher: torch.Tensor | None, keep: float
) -> torch.Tensor:
    """IRR's unsafe entries of ``delta`` (a block of columns): those whose sign disagrees with
    the safety vector (the fine-tune moved them toward the unaligned model); with ``keep`` >
    0, that share of them with the lowest safety Fisher stays."""
    conflict = torch.sign(delta) != torch.sign(safety)  # (d_out, d_in)
    if keep <= 0 or fisher is None:
        return conflict
    scores = fisher[conflict]
    n_keep = int(keep * scores.numel())
    if n_keep == 0:
        return conflict
    cut = torch.kthvalue(scores.float(), n_keep).values
    return conflict & (fisher > cut)


def irr(
    model: Any,
    names: list[str],
    aligned: dict[str, torch.Tensor],
    unaligned: dict[str, torch.Tensor],
    calibration: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    *,
    keep: float = float(IRR["keep"]),
    blocksize: int = int(IRR["blocksize"]),
    percdamp: float = float(IRR["percdamp"]),
    fisher: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """IRR on ``model``, the fine-tuned model merged into dense float32 weights, in place:
    for each linear layer in ``names`` (the adapted ones), remove the unsafe entries of its
    delta from the aligned weight and recalibrate the rest (:func:`obs_remove`). Returns the
    share of delta entries removed."""
    modules = dict(model.named_modules())
    hessians = input_hessians(
        model, {n: modules[n] for n in names}, calibration, dtype=torch.float64
    )
    removed = 0
    total = 0
    for name in names:
        weight = modules[name].weight
        key = f"{name}.weight"
        W_al = aligned[key].to(device=weight.device, dtype=weight.dtype)
        delta = weight.detach() - W_al  # (d_out, d_in)
        safety = (aligned[key].float() - unaligned[key].float()).to(weight.device)
        F = None if fisher is None else fisher.get(key)

        def choose(
            block: torch.Tensor,
            i1: int,
            i2: int,
            safety: torch.Tensor = safety,
            F: torch.Tensor | None = F,
        ) -> torch.Tensor:
            f = None if F is None else F[:, i1:i2]
            return removal_mask(block, safety[:, i1:i2].double(), f, keep)

        new, n = obs_remove(delta, choose, hessians[name], blocksize, percdamp)
        with torch.no_grad():
            weight.copy_(W_al + new)
        removed += n
        total += int((delta != 0).sum())
    return {"removed": removed / max(1, total), "layers": len(names)}
