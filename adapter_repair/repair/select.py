"""Stage 2's choices as pure functions over adapter factors (no model, no I/O): the
candidates (coordinates whose gradient would move them toward their aligned value, 0), their
scores, the global top-k, and which of the zeroed ones roll back. The loop feeds them
gradients; these functions only decide, so each rule is tested on hand-made tensors.

Shapes: per LoRA module, ``A`` is (r, d_in) and ``B`` is (d_out, r); the adapter's delta is
``s * B @ A``. Gradients, values and masks have their factor's shape.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

SCORES = ("grad", "grad_x_value", "benign_aware", "ratio", "fisher")
BENIGN_SCORES = ("benign_aware", "ratio")  #: the scores that need a benign gradient
FISHER_SCORES = ("fisher",)  #: the scores that need the task loss's diagonal Fisher
#: ratio score: normalised benign magnitudes below this count as this (no division by ~0)
RATIO_FLOOR = 0.1


def candidates(value: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Coordinates a descent step moves toward 0: gradient and value non-zero and of the same
    sign. Boolean, same shape."""
    return (value != 0) & (grad != 0) & (torch.sign(grad) == torch.sign(value))


def score(
    value: torch.Tensor,
    grad: torch.Tensor,
    rule: str = "benign_aware",
    *,
    benign_grad: torch.Tensor | None = None,
    grad_scale: float = 1.0,
    benign_scale: float = 1.0,
    fisher: torch.Tensor | None = None,
    cost_scale: float = 1.0,
) -> torch.Tensor:
    """Score of zeroing each coordinate (higher first).

    ``grad``: |g| (the reference). ``grad_x_value``: |g x value|, the first-order loss change of
    zeroing. ``benign_aware``: |g| / (penalty + 1) with g and g_b divided by their mean magnitude
    over the candidates (``grad_scale``, ``benign_scale``), penalty = |g_b| where zeroing would
    raise the benign loss (sign(g_b) differs from sign(value)), else 0. ``ratio``: |g| / max(|g_b|,
    RATIO_FLOOR), both normalised the same way, whatever the sign: zeroing is a full step, not an
    infinitesimal one, so a coordinate the benign loss is sensitive to is a risk either way (the
    first trial's "harmful grad / benign grad", which kept the task whole; DESIGN.md).
    ``fisher``: a second-order trade: the harmful loss zeroing removes to first order, g x
    value (``grad_scale``: its mean over the candidates), against the task loss it costs to
    second order, 1/2 F_ii value^2 with F the task loss's empirical diagonal Fisher
    (``cost_scale``: its mean), as (benefit / grad_scale) / (cost / cost_scale + 1).
    """
    if rule == "fisher":
        if fisher is None:
            raise ValueError("the fisher score needs the task loss's diagonal Fisher")
        benefit = (grad * value).abs() / grad_scale
        return benefit / (zeroing_cost(value, fisher) / cost_scale + 1.0)
    if rule == "grad":
        return grad.abs()
    if rule == "grad_x_value":
        return (grad * value).abs()
    if rule in BENIGN_SCORES:
        if benign_grad is None:
            raise ValueError(f"the {rule} score needs benign_grad")
        g = grad.abs() / grad_scale
        b = benign_grad.abs() / benign_scale
        if rule == "ratio":
            return g / b.clamp_min(RATIO_FLOOR)
        harms_benign = torch.sign(benign_grad) != torch.sign(value)
        return g / (torch.where(harms_benign, b, 0.0) + 1.0)
    raise ValueError(f"score must be one of {', '.join(SCORES)}; got {rule!r}")


def zeroing_cost(value: torch.Tensor, fisher: torch.Tensor) -> torch.Tensor:
    """The task loss that zeroing each coordinate costs to second order, 1/2 F_ii value^2 (the
    task loss's gradient is about 0 where the fine-tune left it)."""
    return 0.5 * fisher * value.square()


def mean_abs(tensors: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> float:
    """Mean magnitude over the masked entries of all tensors (1.0 when there are none)."""
    total, count = 0.0, 0
    for name, t in tensors.items():
        m = masks[name]
        total += float(t[m].abs().sum())
        count += int(m.sum())
    return total / count if count and total > 0 else 1.0


def global_top(
    values: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], k: int
) -> dict[str, torch.Tensor]:
    """The k largest masked entries across all tensors, as a boolean mask per tensor
    (k is capped by the number of masked entries)."""
    names = list(values)
    flat = [torch.where(masks[n], values[n], -math.inf).flatten() for n in names]
    out = {n: torch.zeros(masks[n].shape, dtype=torch.bool) for n in names}
    k = min(k, sum(int(masks[n].sum()) for n in names))
    if k <= 0:
        return out
    joined = torch.cat(flat)
    chosen = torch.zeros(joined.shape, dtype=torch.bool)
    chosen[torch.topk(joined, k).indices] = True
    start = 0
    for n, f in zip(names, flat, strict=True):
        out[n] = chosen[start : start + f.numel()].view(masks[n].shape)
        start += f.numel()
    return out


def select_top(
    scores: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    rate: float,
    n_coordinates: int,
) -> dict[str, torch.Tensor]:
    """The global top-k candidates across all tensors, k = ceil(rate x n_coordinates) capped
    by the number of candidates (the reference's k could exceed it, or be 0). Returns a boolean
    mask per tensor; all False when there is no candidate."""
    if not 0 < rate <= 1:
        raise ValueError(f"rate must be in (0, 1]; got {rate}")
    return global_top(scores, masks, math.ceil(rate * n_coordinates))


def top_share(
    values: Mapping[str, torch.Tensor], eligible: Mapping[str, torch.Tensor], share: float
) -> dict[str, torch.Tensor]:
    """A rollback's choice: the top ``share`` (ceil) of the eligible entries by ``values``."""
    if not 0 <= share <= 1:
        raise ValueError(f"rollback share must be in [0, 1]; got {share}")
    n_eligible = sum(int(m.sum()) for m in eligible.values())
    return global_top(values, eligible, math.ceil(share * n_eligible))


def rollback_mask(
    zeroed: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    benign_grad: Mapping[str, torch.Tensor],
    share: float = 0.2,
) -> dict[str, torch.Tensor]:
    """Of the coordinates zeroed in this step, those whose benign gradient would move them
    back toward their reference value (a descent step -g_b has the sign of the reference
    value), the top ``share`` (ceil) by |g_b|. Boolean mask per tensor."""
    eligible = {
        n: zeroed[n]
        & (reference[n] != 0)
        & (torch.sign(-benign_grad[n]) == torch.sign(reference[n]))
        for n in zeroed
    }
    return top_share({n: benign_grad[n].abs() for n in eligible}, eligible, share)


def rollback_by_cost(
    zeroed: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    fisher: Mapping[str, torch.Tensor],
    share: float = 0.2,
) -> dict[str, torch.Tensor]:
    """The rollback of the ``fisher`` score: of the coordinates zeroed in this step, the top
    ``share`` (ceil) by the task loss their zeroing cost, 1/2 F_ii reference^2."""
    eligible = {n: zeroed[n] & (reference[n] != 0) for n in zeroed}
    return top_share({n: zeroing_cost(reference[n], fisher[n]) for n in eligible}, eligible, share)


def choose_restored(
    values: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor],
    rate: float,
    *,
    rule: str = "benign_aware",
    benign_grads: Mapping[str, torch.Tensor] | None = None,
    per_matrix: bool = False,
    fisher: Mapping[str, torch.Tensor] | None = None,
    unit: str = "coordinate",
) -> dict[str, torch.Tensor]:
    """One restoration step's choice (stage 2, steps 2-3): the candidates of every factor
    matrix, scored by ``rule`` and taken globally, k = ceil(rate x all coordinates); with
    ``unit`` component, whole rank components instead (:func:`choose_components`).

    ``per_matrix`` divides each matrix's scores by their mean over its candidates, since A and B
    (and modules of different widths) live on different scales.
    """
    scores, masks = coordinate_scores(
        values, grads, rule=rule, benign_grads=benign_grads, per_matrix=per_matrix, fisher=fisher
    )
    if unit == "component":
        return choose_components(values, scores, masks, rate)
    if unit != "coordinate":
        raise ValueError(f"unit must be coordinate or component; got {unit!r}")
    n_coordinates = sum(v.numel() for v in values.values())
    return select_top(scores, masks, rate, n_coordinates)


def coordinate_scores(
    values: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor],
    *,
    rule: str,
    benign_grads: Mapping[str, torch.Tensor] | None,
    per_matrix: bool,
    fisher: Mapping[str, torch.Tensor] | None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Every coordinate's score under ``rule`` (:func:`score`, scales taken over the
    candidates) and the candidate masks."""
    masks = {n: candidates(values[n], grads[n]) for n in values}
    if rule in BENIGN_SCORES and benign_grads is None:
        raise ValueError(f"the {rule} score needs benign_grads")
    if rule in FISHER_SCORES and fisher is None:
        raise ValueError(f"the {rule} score needs the task loss's diagonal Fisher")
    if rule in FISHER_SCORES:
        assert fisher is not None
        benefit = {n: grads[n] * values[n] for n in values}
        g_scale = mean_abs(benefit, masks)
        c_scale = mean_abs({n: zeroing_cost(values[n], fisher[n]) for n in values}, masks)
    else:
        g_scale, c_scale = mean_abs(grads, masks), 1.0
    b_scale = mean_abs(benign_grads, masks) if benign_grads is not None else 1.0
    scores = {}
    for n in values:
        s = score(
            values[n],
            grads[n],
            rule,
            benign_grad=None if benign_grads is None else benign_grads[n],
            grad_scale=g_scale,
            benign_scale=b_scale,
            fisher=None if fisher is None else fisher[n],
            cost_scale=c_scale,
        )
        if per_matrix and bool(masks[n].any()):
            s = s / s[masks[n]].mean().clamp_min(1e-30)
        scores[n] = s
    return scores, masks


# -- rank components ------------------------------------------------------------------------
# Component k of a LoRA module is row k of A (r, d_in) with column k of B (d_out, r): one
# rank-1 term of the delta, one singular direction of it in the canonical basis.


def _modules(names: Iterable[str]) -> list[str]:
    return [n.removesuffix(".lora_A") for n in names if n.endswith(".lora_A")]


def component_sums(
    per_coordinate: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Per module key, the sum over each rank component's masked coordinates, (r,)."""
    out = {}
    for key in _modules(per_coordinate):
        a, b = f"{key}.lora_A", f"{key}.lora_B"
        in_a = torch.where(masks[a], per_coordinate[a], 0.0).sum(1)  # (r,)
        in_b = torch.where(masks[b], per_coordinate[b], 0.0).sum(0)  # (r,)
        out[key] = in_a + in_b
    return out


def expand_components(
    components: Mapping[str, torch.Tensor], within: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Coordinate masks of the chosen components ((r,) booleans per module key), limited to
    ``within`` (the non-zero coordinates, or the ones zeroed this step)."""
    out = {}
    for key, chosen in components.items():
        a, b = f"{key}.lora_A", f"{key}.lora_B"
        out[a] = chosen.unsqueeze(1).expand_as(within[a]) & within[a]
        out[b] = chosen.unsqueeze(0).expand_as(within[b]) & within[b]
    return out


def choose_components(
    values: Mapping[str, torch.Tensor],
    scores: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    rate: float,
) -> dict[str, torch.Tensor]:
    """Whole rank components to restore: each scored by the sum of its candidates' scores,
    the top ceil(rate x all components) taken globally, every non-zero coordinate of each
    zeroed."""
    if not 0 < rate <= 1:
        raise ValueError(f"rate must be in (0, 1]; got {rate}")
    sums = component_sums(scores, masks)
    n_components = sum(t.numel() for t in sums.values())
    chosen = global_top(sums, {k: t > 0 for k, t in sums.items()}, math.ceil(rate * n_components))
    return expand_components(chosen, {n: v != 0 for n, v in values.items()})


def component_gain(
    benign_grad: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Per coordinate, a share of what returning its whole component lowers the benign loss,
    to first order: component k adds ``s b_k a_k^T`` to the delta, and ``-<g_B[:, k], b_k>``
    (``g_B`` the benign gradient of B taken before the zeroing; once a component is zeroed
    its own gradients are 0) is ``-<dL/dW, s b_k a_k^T>``. Carried on B's coordinates only (A's
    get 0), so that :func:`component_sums` counts it once."""
    out = {}
    for key in _modules(reference):
        a, b = f"{key}.lora_A", f"{key}.lora_B"
        out[a] = torch.zeros_like(reference[a])
        out[b] = -benign_grad[b] * reference[b]  # (d_out, r)
    return out


def rollback_components(
    zeroed: Mapping[str, torch.Tensor], want_back: Mapping[str, torch.Tensor], share: float
) -> dict[str, torch.Tensor]:
    """The rollback in whole components: of the components zeroed this step, those whose
    coordinates' ``want_back`` (per coordinate: how much returning it lowers the task loss)
    sums above 0, the top ``share`` (ceil) by that sum; their zeroed coordinates return."""
    sums = component_sums(want_back, zeroed)
    touched = component_sums({n: z.float() for n, z in zeroed.items()}, zeroed)
    eligible = {k: (sums[k] > 0) & (touched[k] > 0) for k in sums}
    return expand_components(top_share(sums, eligible, share), zeroed)
