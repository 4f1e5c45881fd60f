"""The heal: a few masked LoRA steps after a restoration step, so the coordinates stage 2 kept
take up the task work the zeroed ones did.

Zeroing adapter coordinates removes the fine-tune's harmful behaviour and some of its task at
once: in a small adapter the two share coordinates. The heal trains the coordinates still
standing (never the restored ones: they stay at 0, the aligned value) on the answers to keep
(the fit rows', and the fine-tuned adapter's own answers to benign prompts) plus a harmful
loss: by default the cross-entropy of the aligned model's own refusals to the probe prompts
(or stage 2's pull of their h_L toward the aligned model's, which on the pico worlds left harm
where it was), so the task comes back and the harm does not. Like the recalibration of the
kept weights in IRR (Wu et al. 2025) and the masked fine-tuning after pruning, but by a few
gradient steps. The probe rate and the guard are
measured after it, as after any step: a heal that brings harm back is seen by the stop rule.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from adapter_repair.model.memory import release_freed_memory
from adapter_repair.repair.factors import zeroed_masks
from adapter_repair.repair.losses import Batch3, answer_loss_terms

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HealLoss:
    """What one heal step minimises: the mean answer loss of ``answers`` plus ``weight`` times
    the harmful loss, whose per-batch terms ``harm()`` yields (each a fresh graph; their sum
    is the loss)."""

    answers: Sequence[Batch3]
    harm: Callable[[], Iterator[torch.Tensor]]
    weight: float


def heal(
    model: torch.nn.Module,
    params: dict[str, torch.nn.Parameter],
    reference: dict[str, torch.Tensor],
    loss: HealLoss,
    steps: int,
    lr: float,
    optimizer: torch.optim.Optimizer | None = None,
) -> list[float]:
    """``steps`` Adam steps on ``params`` (the live factors below L) minimising ``loss``, the
    restored coordinates held at 0 (their gradient masked, and set to 0 after each step).
    Returns each step's loss. The base stays frozen; the parameters' ``requires_grad`` is
    put back as it was.

    ``optimizer`` (over ``params``' tensors) carries Adam's moments from one heal to the next
    (:func:`heal_optimizer`); without it each heal starts a fresh Adam, whose first step
    moves every coordinate by ``lr`` in its gradient's sign, however small that gradient."""
    if steps <= 0:
        return []
    frozen = zeroed_masks(params, reference)  # the restored coordinates stay at 0
    tensors = list(params.values())
    was = [t.requires_grad for t in tensors]
    opt = optimizer if optimizer is not None else heal_optimizer(params, lr)
    history: list[float] = []
    try:
        for t in tensors:
            t.requires_grad_(True)
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            total = 0.0
            # one batch's graph at a time: the gradients add up in .grad
            # as in the stage's gradient passes: freed heap back around each backward
            for term in answer_loss_terms(model, loss.answers):
                release_freed_memory()
                term.backward()
                total += float(term.detach())
            for term in loss.harm():
                release_freed_memory()
                (loss.weight * term).backward()
                total += loss.weight * float(term.detach())
            release_freed_memory()
            with torch.no_grad():
                for n, p in params.items():
                    if p.grad is not None:
                        p.grad[frozen[n]] = 0
            opt.step()
            with torch.no_grad():
                for n, p in params.items():
                    p[frozen[n]] = 0
            history.append(total)
    finally:
        for t, w in zip(tensors, was, strict=True):
            t.requires_grad_(w)
            t.grad = None
    return history


def heal_optimizer(params: dict[str, torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """The heal's Adam over ``params``: made once and passed to every :func:`heal` of a run
    (--heal-kept-state), its moments average the gradients of the heals so far, so a
    coordinate whose gradient keeps changing sign moves less than one whose gradient holds."""
    return torch.optim.Adam(list(params.values()), lr=lr)
