"""The repair stages' pure functions, on hand-made tensors whose right answer is known."""

from __future__ import annotations

import math

import pytest
import torch

from adapter_repair.repair import project
from adapter_repair.repair import select as S


def test_projection_removes_the_direction_and_keeps_rank_and_the_rest() -> None:
    torch.manual_seed(0)
    d_out, d_in, r = 12, 10, 3
    B, A = torch.randn(d_out, r), torch.randn(r, d_in)
    u = project.orthonormal_basis([torch.randn(d_out)])  # (d_out, 1)
    B2 = project.project_write(B, u)
    assert B2.shape == B.shape
    assert torch.allclose(u.T @ B2, torch.zeros(1, r), atol=1e-6)  # nothing written along u
    # the delta's other directions are untouched: (I - u u^T) B A is unchanged
    P = torch.eye(d_out) - u @ u.T
    assert torch.allclose(P @ B2 @ A, P @ B @ A, atol=1e-5)
    assert torch.linalg.matrix_rank(B2 @ A) == r
    half = project.project_write(B, u, 0.5)
    assert torch.allclose(u.T @ half, 0.5 * (u.T @ B), atol=1e-6)

    v = project.orthonormal_basis([torch.randn(d_in), torch.randn(d_in)])  # (d_in, 2)
    A2 = project.project_read(A, v)
    assert torch.allclose(A2 @ v, torch.zeros(r, 2), atol=1e-6)  # blind to span(v)
    x = torch.randn(d_in)
    x_perp = x - v @ (v.T @ x)
    assert torch.allclose(A2 @ x_perp, A @ x_perp, atol=1e-5)


def test_orthonormal_basis_drops_zero_and_dependent_vectors() -> None:
    a = torch.tensor([1.0, 0.0, 0.0])
    U = project.orthonormal_basis([torch.zeros(3), a, 2 * a, torch.tensor([1.0, 1.0, 0.0])])
    assert U.shape == (3, 2)
    assert torch.allclose(U.T @ U, torch.eye(2), atol=1e-6)
    assert not torch.isnan(U).any()
    assert project.orthonormal_basis([torch.zeros(4)]).shape == (4, 0)
    with pytest.raises(ValueError, match="strength"):
        project.project_write(torch.ones(3, 1), U, 1.5)


def test_candidates_are_nonzero_coordinates_a_descent_step_moves_toward_zero() -> None:
    value = torch.tensor([1.0, -1.0, 1.0, -2.0, 0.0, 3.0])
    grad = torch.tensor([0.5, -0.1, -0.5, 0.2, 1.0, 0.0])
    assert S.candidates(value, grad).tolist() == [True, True, False, False, False, False]


def test_scores() -> None:
    value = torch.tensor([2.0, 1.0, -1.0])
    grad = torch.tensor([1.0, 3.0, -2.0])
    assert S.score(value, grad, "grad").tolist() == [1.0, 3.0, 2.0]
    assert S.score(value, grad, "grad_x_value").tolist() == [2.0, 3.0, 2.0]
    # benign gradient of the other sign than the value: zeroing raises the benign loss
    benign = torch.tensor([-4.0, 4.0, 1.0])
    s = S.score(value, grad, "benign_aware", benign_grad=benign, grad_scale=2.0, benign_scale=2.0)
    assert s.tolist() == pytest.approx([0.5 / 3.0, 1.5 / 1.0, 1.0 / 1.5])
    with pytest.raises(ValueError, match="benign_grad"):
        S.score(value, grad, "benign_aware")
    # ratio: |g| / max(|g_b|, floor) after scaling, whatever the benign gradient's sign
    r = S.score(value, grad, "ratio", benign_grad=benign, grad_scale=2.0, benign_scale=4.0)
    assert r.tolist() == pytest.approx([0.5 / 1.0, 1.5 / 1.0, 1.0 / 0.25])
    tiny = S.score(value, grad, "ratio", benign_grad=torch.zeros(3), grad_scale=1.0)
    assert tiny.tolist() == pytest.approx([v / S.RATIO_FLOOR for v in (1.0, 3.0, 2.0)])
    with pytest.raises(ValueError, match="benign_grad"):
        S.score(value, grad, "ratio")
    with pytest.raises(ValueError, match="score must be one of"):
        S.score(value, grad, "random")


def test_select_top_is_global_capped_and_never_empty_by_rounding() -> None:
    scores = {"a": torch.tensor([[5.0, 1.0], [0.5, 9.0]]), "b": torch.tensor([3.0, 7.0, 2.0])}
    masks = {"a": torch.tensor([[True, True], [True, False]]), "b": torch.ones(3, dtype=torch.bool)}
    top = S.select_top(scores, masks, rate=0.3, n_coordinates=7)  # ceil(2.1) = 3
    assert top["a"].tolist() == [[True, False], [False, False]]  # 9.0 is not a candidate
    assert top["b"].tolist() == [True, True, False]
    tiny = S.select_top(scores, masks, rate=1e-6, n_coordinates=7)  # k = ceil(...) = 1, not 0
    assert sum(int(m.sum()) for m in tiny.values()) == 1 and tiny["b"][1]
    everything = S.select_top(scores, masks, rate=1.0, n_coordinates=100)  # capped at 6
    assert sum(int(m.sum()) for m in everything.values()) == 6
    none = S.select_top(
        scores, {k: torch.zeros_like(v, dtype=torch.bool) for k, v in masks.items()}, 0.5, 7
    )
    assert not any(m.any() for m in none.values())


def test_rollback_takes_the_top_share_of_coordinates_the_benign_gradient_pulls_back() -> None:
    reference = {"a": torch.tensor([1.0, 1.0, -1.0, 1.0, 2.0, -3.0])}
    zeroed = {"a": torch.tensor([True, True, True, True, True, False])}
    # -g_b has the reference's sign for indices 0, 2, 4 (index 5 was not zeroed this step)
    benign = {"a": torch.tensor([-1.0, 2.0, 5.0, 0.5, -3.0, 9.0])}
    back = S.rollback_mask(zeroed, reference, benign, share=0.5)  # ceil(1.5) = 2 of 3
    assert back["a"].tolist() == [False, False, True, False, True, False]
    assert not S.rollback_mask(zeroed, reference, benign, share=0.0)["a"].any()
    assert math.isclose(S.mean_abs(benign, zeroed), (1 + 2 + 5 + 0.5 + 3) / 5)


def test_choose_restored_takes_candidates_only_and_the_benign_score_spares_the_task() -> None:
    values = {"A": torch.tensor([1.0, 1.0, 1.0, -1.0]), "B": torch.tensor([2.0, -2.0])}
    grads = {"A": torch.tensor([3.0, 2.9, -5.0, -1.0]), "B": torch.tensor([0.1, 0.2])}
    plain = S.choose_restored(values, grads, rate=2 / 6, rule="grad")
    assert plain["A"].tolist() == [True, True, False, False]  # -5.0 moves away from 0
    # the task would lose most from zeroing A[0]: the benign-aware score takes A[1] and A[3]
    benign = {"A": torch.tensor([-9.0, 0.0, 0.0, 0.0]), "B": torch.tensor([0.0, 0.0])}
    aware = S.choose_restored(values, grads, rate=2 / 6, rule="benign_aware", benign_grads=benign)
    assert aware["A"].tolist() == [False, True, False, True]
    with pytest.raises(ValueError, match="benign_grads"):
        S.choose_restored(values, grads, rate=0.5)


def test_the_fisher_score_weighs_harm_removed_against_the_task_loss_it_costs() -> None:
    values = {"A": torch.tensor([1.0, 1.0, 2.0, -1.0])}
    grads = {"A": torch.tensor([2.0, 2.0, 1.0, -1.0])}
    # zeroing A[0] costs the task most (F 100); A[1] removes as much harm at no cost
    fisher = {"A": torch.tensor([100.0, 0.0, 0.0, 0.0])}
    assert torch.equal(S.zeroing_cost(values["A"], fisher["A"]), torch.tensor([50.0, 0, 0, 0]))
    first = S.choose_restored(values, grads, rate=0.5, rule="grad")
    assert first["A"].tolist() == [True, True, False, False]
    second = S.choose_restored(values, grads, rate=0.5, rule="fisher", fisher=fisher)
    # g x value: 2, 2, 2, 1; A[0]'s cost sends it below A[3]
    assert second["A"].tolist() == [False, True, True, False]
    with pytest.raises(ValueError, match="Fisher"):
        S.choose_restored(values, grads, rate=0.5, rule="fisher")


def test_the_fisher_rollback_returns_the_zeroed_coordinates_of_highest_task_cost() -> None:
    reference = {"a": torch.tensor([1.0, 2.0, -1.0, 1.0])}
    zeroed = {"a": torch.tensor([True, True, True, False])}
    fisher = {"a": torch.tensor([1.0, 1.0, 9.0, 99.0])}  # costs 0.5, 2, 4.5 (and 49.5 unzeroed)
    back = S.rollback_by_cost(zeroed, reference, fisher, share=0.5)  # ceil(1.5) = 2 of 3
    assert back["a"].tolist() == [False, True, True, False]


def test_the_canonical_basis_keeps_the_delta_and_orders_singular_directions() -> None:
    from adapter_repair.repair.basis import canonical_factors, canonicalize_

    torch.manual_seed(0)
    a, b = torch.randn(4, 7), torch.randn(9, 4)  # (r, d_in), (d_out, r)
    b[:, 3] = 0  # rank 3 of 4
    new_a, new_b = canonical_factors(a, b)
    assert new_a.shape == a.shape and new_b.shape == b.shape
    torch.testing.assert_close(new_b @ new_a, b @ a, rtol=1e-5, atol=1e-5)
    # rank components: orthogonal, equal norms on both sides, in decreasing order, the lost
    # rank as a zero component
    gram_b, gram_a = new_b.T @ new_b, new_a @ new_a.T
    torch.testing.assert_close(gram_b, torch.diag(torch.diag(gram_b)), atol=1e-5, rtol=0)
    torch.testing.assert_close(gram_a, torch.diag(torch.diag(gram_a)), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.diag(gram_b), torch.diag(gram_a), rtol=1e-5, atol=1e-6)
    s = torch.diag(gram_b)
    assert bool((s[:-1] >= s[1:]).all()) and float(s[-1]) < 1e-8
    params = {
        "m.lora_A": torch.nn.Parameter(a.clone()),
        "m.lora_B": torch.nn.Parameter(b.clone()),
    }
    assert canonicalize_(params) == 1
    torch.testing.assert_close(params["m.lora_A"].detach(), new_a)
    torch.testing.assert_close(params["m.lora_B"].detach(), new_b)


def test_component_restoration_zeroes_whole_rank_components_by_their_summed_score() -> None:
    # one module, r = 3: component 1 has the most harm gradient on its coordinates
    A = torch.tensor([[1.0, 1.0], [2.0, -2.0], [0.5, 0.5]])  # (r, d_in)
    B = torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, 1.0]])  # (d_out, r)
    values = {"m.lora_A": A, "m.lora_B": B}
    grads = {
        "m.lora_A": torch.tensor([[0.1, 0.0], [1.0, -1.0], [0.2, 0.2]]),
        "m.lora_B": torch.tensor([[0.0, 0.5, 0.0], [0.0, -0.5, 0.1]]),
    }
    chosen = S.choose_restored(values, grads, 0.3, rule="grad", unit="component")  # ceil(0.9)
    assert chosen["m.lora_A"].tolist() == [[False, False], [True, True], [False, False]]
    assert chosen["m.lora_B"].tolist() == [[False, True, False], [False, True, False]]
    two = S.choose_restored(values, grads, 0.5, rule="grad", unit="component")  # ceil(1.5)
    assert two["m.lora_A"][[1, 2]].all() and not two["m.lora_A"][0].any()
    with pytest.raises(ValueError, match="unit"):
        S.choose_restored(values, grads, 0.3, rule="grad", unit="row")


def test_component_rollback_returns_whole_components_the_task_wants_back() -> None:
    zeroed = {
        "m.lora_A": torch.tensor([[True, True], [True, True], [False, False]]),
        "m.lora_B": torch.tensor([[True, True, False], [True, True, False]]),
    }
    # component 0 gains the task 3 in all, component 1 loses it (-1): only 0 may come back
    gain = {
        "m.lora_A": torch.tensor([[1.0, 1.0], [-1.0, 0.0], [9.0, 9.0]]),
        "m.lora_B": torch.tensor([[0.5, 0.0, 9.0], [0.5, 0.0, 9.0]]),
    }
    back = S.rollback_components(zeroed, gain, 1.0)
    assert back["m.lora_A"].tolist() == [[True, True], [False, False], [False, False]]
    assert back["m.lora_B"].tolist() == [[True, False, False], [True, False, False]]
    assert not any(m.any() for m in S.rollback_components(zeroed, gain, 0.0).values())


def test_component_gain_is_the_first_order_benign_gain_of_returning_the_component() -> None:
    """-<g_B[:, k], b_k> equals -<dL/dW, b_k a_k^T> for L(W), W = B A: checked by autograd."""
    torch.manual_seed(0)
    A, B, G = torch.randn(3, 5), torch.randn(4, 3), torch.randn(4, 5)  # G: dL/dW
    Bv = B.clone().requires_grad_(True)
    (G * (Bv @ A)).sum().backward()  # L linear in W: its gradient is G everywhere
    assert Bv.grad is not None
    gain = S.component_gain(
        {"m.lora_A": torch.zeros(3, 5), "m.lora_B": Bv.grad}, {"m.lora_A": A, "m.lora_B": B}
    )
    assert torch.all(gain["m.lora_A"] == 0)
    per_component = gain["m.lora_B"].sum(0)  # (r,)
    for k in range(3):
        expected = -(G * torch.outer(B[:, k], A[k])).sum()
        assert torch.isclose(per_component[k], expected, atol=1e-5)
