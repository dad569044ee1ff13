"""The closed form against brute force: optimality, exactness of the LoRA form, identity loss."""

from __future__ import annotations

import pytest
import torch

from shared.errors import InvalidArgument
from shared.fusion import (
    LayerChanges,
    Term,
    accumulate_site,
    fused_lora,
    fused_lora_rows,
    fused_weight,
    identity_loss,
    lowrank_quadratic,
    naive_lora,
    objective,
    regularised_cholesky,
    right_solve,
)

D = torch.float64


def _problem(n_concepts=3, d_out=12, d_in=10, rank=2, rows=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    W0 = torch.randn(d_out, d_in, generator=gen, dtype=D)
    ups = [torch.randn(d_out, rank, generator=gen, dtype=D) for _ in range(n_concepts)]
    downs = [torch.randn(rank, d_in, generator=gen, dtype=D) for _ in range(n_concepts)]
    xs = [torch.randn(rows, d_in, generator=gen, dtype=D) for _ in range(n_concepts)]
    grams = [x.T @ x / rows for x in xs]
    return W0, ups, downs, grams


def test_closed_form_is_the_optimum():
    W0, ups, downs, grams = _problem()
    deltas = [u @ a for u, a in zip(ups, downs)]
    lam = 1e-3
    W = fused_weight(W0, deltas, grams, lam).requires_grad_(True)
    objective(W, W0, deltas, grams, lam).backward()
    scale = sum(((W0 + d) @ g).norm() for d, g in zip(deltas, grams))
    assert float(W.grad.norm() / scale) <= 1e-6
    for _ in range(5):  # and any perturbation is worse
        bumped = W.detach() + 1e-3 * torch.randn_like(W0)
        assert objective(bumped, W0, deltas, grams, lam) > objective(W.detach(), W0, deltas, grams, lam)


def test_one_concept_full_rank_data_gives_its_own_weights():
    W0, ups, downs, grams = _problem(n_concepts=1, rows=40)
    W1 = W0 + ups[0] @ downs[0]
    W = fused_weight(W0, [ups[0] @ downs[0]], grams, lam=1e-12)
    assert torch.allclose(W, W1, rtol=0, atol=1e-8 * W1.abs().max())


def test_fused_change_is_exactly_the_rank_nr_lora():
    W0, ups, downs, grams = _problem()
    lam = 1e-2
    factor = regularised_cholesky(sum(grams), lam)
    up, down = fused_lora(ups, [a @ g for a, g in zip(downs, grams)], factor)
    assert up.shape == (12, 6) and down.shape == (6, 10)
    reference = fused_weight(W0, [u @ a for u, a in zip(ups, downs)], grams, lam)
    assert torch.allclose(W0 + up @ down, reference, atol=1e-10)


def test_orthogonal_subspaces_fuse_losslessly():
    gen = torch.Generator().manual_seed(1)
    d_in, d_out, rank = 12, 8, 2
    basis = torch.linalg.qr(torch.randn(d_in, d_in, generator=gen, dtype=D))[0]
    ups, downs, grams = [], [], []
    for i in range(3):  # concept i's inputs span 4 basis directions of its own
        block = basis[:, 4 * i:4 * (i + 1)]
        x = torch.randn(20, 4, generator=gen, dtype=D) @ block.T
        grams.append(x.T @ x / 20)
        ups.append(torch.randn(d_out, rank, generator=gen, dtype=D))
        downs.append(torch.randn(rank, d_in, generator=gen, dtype=D))
    factor = regularised_cholesky(sum(grams), 1e-10)
    up, down = fused_lora(ups, [a @ g for a, g in zip(downs, grams)], factor)
    for u, a, g in zip(ups, downs, grams):
        assert identity_loss(up, down, u, a, g) <= 1e-6
    avg_up, avg_down = naive_lora(ups, downs, "average")
    assert all(identity_loss(avg_up, avg_down, u, a, g) > 0.1 for u, a, g in zip(ups, downs, grams))


def test_identity_loss_matches_brute_force_and_baselines():
    W0, ups, downs, grams = _problem(seed=3)
    up, down = naive_lora(ups, downs, "sum")
    assert torch.allclose(up @ down, sum(u @ a for u, a in zip(ups, downs)))
    up, down = naive_lora(ups, downs, "average")
    X = up @ down - ups[0] @ downs[0]
    own = ups[0] @ downs[0]
    brute = torch.trace(X @ grams[0] @ X.T) / torch.trace(own @ grams[0] @ own.T)
    assert abs(identity_loss(up, down, ups[0], downs[0], grams[0]) - float(brute)) < 1e-10
    other = ups[1] @ downs[1]
    assert torch.isclose(lowrank_quadratic(ups[1], downs[1], grams[1]), torch.trace(other @ grams[1] @ other.T))


def test_accumulate_site_adds_the_gram_and_gives_every_product_in_one_pass():
    _, ups, downs, grams = _problem(n_concepts=2, d_out=8, d_in=150, rank=3, rows=200, seed=9)  # 150: 3 blocks
    S, products = accumulate_site(None, grams[0], 1.0, [downs[0], downs[1]], block=64)
    assert torch.equal(S, grams[0]) and all(torch.allclose(p, a @ grams[0], rtol=0, atol=1e-12)
                                             for p, a in zip(products, downs))
    before = S.clone()
    S2, (only,) = accumulate_site(S, grams[1], 0.5, [downs[1]], block=64)
    assert S2 is S and torch.allclose(S2, before + 0.5 * grams[1], rtol=0, atol=1e-12)  # in place
    assert torch.allclose(only, downs[1] @ grams[1], rtol=0, atol=1e-12)


def test_layer_changes_give_the_identity_loss_in_both_forms():
    """The report's prepared changes (dense when the concepts' columns pass the width, factored otherwise) give
    each concept's identity loss as the direct formula does, for the fused change and both baselines."""
    for n_concepts, d_out, d_in in ((2, 40, 30), (12, 6, 8)):  # K = 2r < d: factored; K = 12r > d: dense
        W0, ups, downs, grams = _problem(n_concepts, d_out, d_in, seed=5)
        fused = fused_lora(ups, [a @ g for a, g in zip(downs, grams)],
                           regularised_cholesky(sum(grams), 1e-3))
        owners = [Term(f"c{i}", 1.0, u, a) for i, (u, a) in enumerate(zip(ups, downs))]
        changes = LayerChanges(fused, owners)
        assert len(changes.forms["fused"]) == (1 if n_concepts == 12 else 3)
        gen = torch.Generator().manual_seed(1)
        for own, gram in zip(owners, grams):
            row = changes.row(own, gram)
            x = torch.randn(5, d_in, generator=gen, dtype=D)  # a concept's few text rows: Ĝ = xᵀx / 5
            from_rows, from_gram = changes.row(own, rows=x), changes.row(own, x.T @ x / 5)
            assert all(abs(from_rows[m] - from_gram[m]) <= 1e-9 * max(1.0, from_gram[m]) for m in from_gram)
            expected = {"fused": identity_loss(*fused, own.up, own.down, gram)}
            for method in ("average", "sum"):
                expected[method] = identity_loss(*naive_lora(ups, downs, method), own.up, own.down, gram)
            assert all(abs(row[m] - expected[m]) <= 1e-9 * max(1.0, expected[m]) for m in expected), (row, expected)


def test_row_form_equals_the_gram_form():
    """Few text rows (Σ n_i < d): the n x n push-through solve gives the d x d Cholesky's LoRA."""
    gen = torch.Generator().manual_seed(3)
    d_in, d_out, rank = 40, 16, 2
    xs = [torch.randn(n, d_in, generator=gen, dtype=D) for n in (3, 5, 4)]
    ups = [torch.randn(d_out, rank, generator=gen, dtype=D) for _ in xs]
    downs = [torch.randn(rank, d_in, generator=gen, dtype=D) for _ in xs]
    weights = [1.0, 0.5, 2.0]
    extra = torch.randn(6, d_in, generator=gen, dtype=D) / 6 ** 0.5  # preservation rows, target W0
    grams = [x.T @ x / x.shape[0] for x in xs]
    S = sum(w * g for w, g in zip(weights, grams)) + extra.T @ extra
    lam = 1e-3 * float(S.trace()) / d_in
    up, down = fused_lora(ups, [a @ g for a, g in zip(downs, grams)], regularised_cholesky(S, lam), weights)
    up_r, down_r = fused_lora_rows(ups, downs, xs, lam, weights, extra)
    assert torch.equal(up, up_r)
    assert float((down_r - down).norm() / down.norm()) <= 1e-9


def test_the_blocked_factor_is_the_cholesky_factor_and_says_where_it_fails():
    """regularised_cholesky by blocks (a last block shorter than the others, and one block) gives LAPACK's
    lower factor, the solves on it are exact, and a matrix that is not positive definite is refused naming
    its first failing leading minor, whichever block it falls in."""
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(50, 30, generator=gen, dtype=D)
    S, lam = X.T @ X / 50, 1e-3
    exact = torch.linalg.cholesky(S + lam * torch.eye(30, dtype=D))
    rows = torch.randn(5, 30, generator=gen, dtype=D)
    for block in (7, 30, 64):
        factor = regularised_cholesky(S, lam, block=block)
        assert torch.allclose(factor.tril(), exact, rtol=0, atol=1e-13)
        solved = right_solve(rows, factor)
        assert torch.allclose(solved, torch.linalg.solve(S + lam * torch.eye(30, dtype=D), rows.T).T, rtol=0,
                              atol=1e-10 * solved.abs().max())
    assert torch.equal(S, X.T @ X / 50)  # S itself untouched
    broken = S.clone()
    broken[17, 17] = -1.0  # leading minors 1..17 are positive definite, the 18th is not
    for block in (7, 64):
        with pytest.raises(InvalidArgument, match="leading minor 18"):
            regularised_cholesky(broken, lam, block=block)
