"""Gradient fusion in closed form (docs/design.md §2.3): Grams in, weights out. Pure functions, no I/O.

Notation, per linear layer: base weight W0 (d_out x d_in); concept i has a LoRA
dW_i = s_i B_i A_i and normalised Gram Ĝ_i = G_i / n_i of its inputs; S = Σ w_i Ĝ_i.

    W* = argmin_W Σ_i w_i ||(W − W_i) X_iᵀ||² / n_i + λ ||W − W0||²
       = (Σ_i w_i W_i Ĝ_i + λ W0)(S + λI)⁻¹

and, because Σ w_i W_i Ĝ_i + λ W0 = W0 (S + λI) + Σ w_i dW_i Ĝ_i, the fused change is a LoRA:

    W* − W0 = Σ_i (s_i B_i) [w_i A_i Ĝ_i (S + λI)⁻¹] = up @ down,
    up = [s_1 B_1 … s_N B_N]  (d_out x N r),   down = stacked w_i A_i Ĝ_i (S + λI)⁻¹  (N r x d_in).

All arithmetic is float64; (S + λI) is factorised once per input site (Cholesky, never inverted)
and shared by every layer reading that input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from shared.errors import InvalidArgument

DTYPE = torch.float64
METHODS = ("gradient", "average", "sum")
DEFAULT_LAM = 1e-4  # λ relative to the mean eigenvalue of S (docs/fusion.md says why)
CHOLESKY_BLOCK = 320  # rows per block of the factorisation (160 to 320 measured best at widths 640 to 2,048)


def absolute_lam(S: torch.Tensor, relative: float = DEFAULT_LAM) -> float:
    """λ for S: `relative` times its mean eigenvalue tr(S)/d, so it scales with the activations."""
    if isinstance(relative, bool) or not isinstance(relative, (int, float)) or not math.isfinite(relative) or \
            not 0 < relative <= 1e6:
        raise InvalidArgument("lam", f"{relative!r} must be a finite number in (0, 1e6]")
    return relative * max(float(S.diagonal().sum()) / S.shape[0], 1e-12)


def regularised_cholesky(S: torch.Tensor, lam: float, block: int = CHOLESKY_BLOCK) -> torch.Tensor:
    """Lower Cholesky factor L of S + λI (S symmetric PSD, d x d). Only its lower triangle is the factor: the
    entries above the diagonal are left as they were (the triangular solves never read them).

    Factorised by blocks of rows: each diagonal block by LAPACK, the rest by triangular solves and products.
    torch.linalg.cholesky_ex of the whole matrix also zeroes the strict upper triangle of its column-major
    result, which took 40 % of its time at SDXL's width 1,280 (7 of 17 ms, measured)."""
    factor = S.to(DTYPE, copy=True)
    factor.diagonal().add_(lam)  # in place: no identity matrix, one pass less over d x d memory
    d = factor.shape[0]
    for start in range(0, d, block):
        end = min(start + block, d)
        diagonal, info = torch.linalg.cholesky_ex(factor[start:end, start:end])
        if int(info) != 0:
            raise InvalidArgument("lam", f"S + {lam:.3g}·I is not positive definite (leading minor "
                                         f"{start + int(info)}): the statistics are degenerate at this "
                                         "regulariser; raise lam")
        factor[start:end, start:end] = diagonal
        if end < d:  # the block column below, then the lower blocks of what is left take off its product
            below = torch.linalg.solve_triangular(diagonal, factor[end:, start:end].T, upper=False).T
            factor[end:, start:end] = below
            for top in range(end, d, block):
                factor[top:, top:top + block].sub_(below[top - end:] @ below[top - end:top - end + block].T)
    return factor


def projection(gram: torch.Tensor, relative: float = DEFAULT_LAM) -> torch.Tensor:
    """Ĝ (Ĝ + λI)⁻¹: what the closed form applies to a lone concept's change (W* − W0 = dW · this)."""
    return right_solve(gram, regularised_cholesky(gram, absolute_lam(gram, relative)))


def right_solve(rows: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """rows @ (S + λI)⁻¹ for a stack of rows (k x d), with L the Cholesky factor of S + λI: L⁻ᵀ(L⁻¹ rowsᵀ), two
    triangular solves (measured 2.5x faster than torch.cholesky_solve for the few rows a site has)."""
    inner = torch.linalg.solve_triangular(factor, rows.to(DTYPE).T, upper=False)
    return torch.linalg.solve_triangular(factor.T, inner, upper=True).T


def accumulate_site(S: torch.Tensor | None, gram: torch.Tensor, weight: float, downs: list[torch.Tensor],
                    block: int = 64) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One concept's part of a site: S + w Ĝ (in place when S is given) and A Ĝ for each of the site's modules
    it adapts (`downs`: their A, r x d), in one pass over Ĝ in blocks of rows that stay in cache. Ĝ is read
    from memory once instead of once for the sum and once per product (half the time at SDXL's widths)."""
    gram = gram.to(DTYPE)
    d = gram.shape[0]
    S = torch.zeros(d, d, dtype=DTYPE, device=gram.device) if S is None else S
    stacked = torch.cat([a.to(DTYPE) for a in downs]) if downs else gram.new_zeros(0, d)
    products = gram.new_zeros(stacked.shape[0], d)
    for start in range(0, d, block):
        rows = gram[start:start + block]
        S[start:start + block].add_(rows, alpha=weight)
        products.addmm_(stacked[:, start:start + block], rows)
    return S, list(products.split([a.shape[0] for a in downs]))


def fused_lora(ups: list[torch.Tensor], agrams: list[torch.Tensor], factor: torch.Tensor,
               weights: list[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) of W* − W0 from each concept's s_i B_i (d_out x r) and A_i Ĝ_i (r x d_in)."""
    weights = weights or [1.0] * len(ups)
    up = torch.cat([u.to(DTYPE) for u in ups], dim=1)
    rhs = torch.cat([w * a.to(DTYPE) for w, a in zip(weights, agrams)], dim=0)
    return up, right_solve(rhs, factor)


def fused_lora_rows(ups: list[torch.Tensor], downs: list[torch.Tensor], rows: list[torch.Tensor], lam: float,
                    weights: list[float] | None = None, extra: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same (up, down) as `fused_lora`, from the raw rows X_i (n_i x d) when Σ n_i is below d.

    With Y_i = √(w_i/n_i) X_i stacked into Y (n x d), S = YᵀY and w_i A_i Ĝ_i = C_i Y_i with
    C_i = √(w_i/n_i) A_i X_iᵀ; the push-through identity Yᵀ(YYᵀ + λI)⁻¹ = (YᵀY + λI)⁻¹Yᵀ gives
    down_i = C_i Y_i (S + λI)⁻¹ = [0 … C_i … 0] (YYᵀ + λI)⁻¹ Y: one n x n Cholesky instead of d x d.
    `extra` (m x d, already scaled) adds rows to S with target W0, as the preservation prompts.
    """
    weights = weights or [1.0] * len(ups)
    counts = torch.tensor([x.shape[0] for x in rows])
    scale = (torch.tensor(weights, dtype=DTYPE) / counts).sqrt().repeat_interleave(counts)
    Y = torch.cat([x.to(DTYPE) for x in rows]) * scale.to(rows[0].device)[:, None]
    A = torch.cat([a.to(DTYPE) for a in downs])
    # E = block-diagonal [C_1 … C_N], C_i = A_i Y_iᵀ: one product, then the off-diagonal blocks zeroed
    owner_row = torch.arange(len(downs)).repeat_interleave(torch.tensor([a.shape[0] for a in downs]))
    owner_col = torch.arange(len(rows)).repeat_interleave(counts)
    E = (A @ Y.T) * (owner_row[:, None] == owner_col[None, :]).to(Y.device, DTYPE)
    if extra is not None:
        Y = torch.cat([Y, extra.to(DTYPE)])
        E = torch.cat([E, E.new_zeros(E.shape[0], extra.shape[0])], dim=1)
    factor = regularised_cholesky(Y @ Y.T, lam)
    up = torch.cat([u.to(DTYPE) for u in ups], dim=1)
    return up, right_solve(E, factor) @ Y


def fused_weight(W0: torch.Tensor, deltas: list[torch.Tensor], grams: list[torch.Tensor], lam: float,
                 weights: list[float] | None = None) -> torch.Tensor:
    """W* directly from full matrices: (Σ w_i W_i Ĝ_i + λ W0)(Σ w_i Ĝ_i + λI)⁻¹ (reference form, for tests)."""
    weights = weights or [1.0] * len(deltas)
    W0 = W0.to(DTYPE)
    S = sum(w * g.to(DTYPE) for w, g in zip(weights, grams))
    rhs = sum(w * (W0 + d.to(DTYPE)) @ g.to(DTYPE) for w, d, g in zip(weights, deltas, grams)) + lam * W0
    return right_solve(rhs, regularised_cholesky(S, lam))


def objective(W: torch.Tensor, W0: torch.Tensor, deltas: list[torch.Tensor], grams: list[torch.Tensor],
              lam: float, weights: list[float] | None = None) -> torch.Tensor:
    """Σ w_i tr((W − W_i) Ĝ_i (W − W_i)ᵀ) + λ ||W − W0||², the quantity W* minimises."""
    weights = weights or [1.0] * len(deltas)
    W, W0 = W.to(DTYPE), W0.to(DTYPE)
    total = lam * ((W - W0) ** 2).sum()
    for w, d, g in zip(weights, deltas, grams):
        X = W - W0 - d.to(DTYPE)
        total = total + w * torch.trace(X @ g.to(DTYPE) @ X.T)
    return total


def lowrank_quadratic(P: torch.Tensor, Q: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """tr(X G Xᵀ) for X = P @ Q (d_out x k, k x d_in) without forming X: tr((PᵀP)(Q G Qᵀ))."""
    P, Q = P.to(DTYPE), Q.to(DTYPE)
    return ((P.T @ P) * (Q @ G.to(DTYPE) @ Q.T)).sum()


def identity_loss(up: torch.Tensor, down: torch.Tensor, own_up: torch.Tensor, own_down: torch.Tensor,
                  gram: torch.Tensor) -> float:
    """e_i = tr((W − W_i) Ĝ_i (W − W_i)ᵀ) / tr(dW_i Ĝ_i dW_iᵀ) with W − W0 = up@down, dW_i = own_up@own_down.

    0: the concept's layer output is fully kept; 1: as if it had never been trained.
    """
    own = lowrank_quadratic(own_up, own_down, gram)
    if own <= 0:
        return 0.0
    P = torch.cat([up.to(DTYPE), -own_up.to(DTYPE)], dim=1)
    Q = torch.cat([down.to(DTYPE), own_down.to(DTYPE)], dim=0)
    return float(lowrank_quadratic(P, Q, gram) / own)


def naive_lora(ups: list[torch.Tensor], downs: list[torch.Tensor], method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The baselines as LoRAs: 'sum' is W0 + Σ dW_i, 'average' is W0 + mean dW_i."""
    scale = 1.0 if method == "sum" else 1.0 / len(ups)
    return (torch.cat([scale * u.to(DTYPE) for u in ups], dim=1), torch.cat([d.to(DTYPE) for d in downs], dim=0))


def apply_lowrank(W0: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """W0 + up @ down computed in float64 and cast back to W0's dtype (rounded once): how the fused
    folder is written. Base + fused_lora.safetensors is merged by diffusers' own LoRA loader instead,
    which agrees with this to float32 rounding (tests/test_fuse.py measures it).
    """
    return (W0.to(DTYPE) + up.to(W0.device, DTYPE) @ down.to(W0.device, DTYPE)).to(W0.dtype)


@dataclass(frozen=True)
class Term:
    """One concept's part in one layer: up = s_i B_i, down = A_i, its weight w_i, and A_i Ĝ_i when the
    client recorded the layer's input (None on the text side, where the server has the rows)."""

    name: str
    weight: float
    up: torch.Tensor
    down: torch.Tensor
    agram: torch.Tensor | None = None


def fuse_site(method: str, modules: dict[str, list[Term]], S: torch.Tensor | None = None, lam: float = DEFAULT_LAM,
              grams: dict[str, torch.Tensor] | None = None, rows: dict[str, tuple[float, torch.Tensor]] | None = None,
              extra: torch.Tensor | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(up, down) of W* − W0 for every module reading one input site; modules[m] are the concepts that adapt m.

    'gradient': the closed form with S = Σ_all w_i Ĝ_i (+ extraᵀ extra) and λ relative to S. Client-side
    sites use each term's A_i Ĝ_i and one Cholesky of S + λI. Text-side sites pass the server's own
    `grams` (Ĝ_i by concept) and `rows` (w_i, X_i) of *every* concept; when all rows together are fewer
    than the width, the n x n row form replaces the d x d factorisation, and the rows of concepts that
    do not adapt a module still count in its S (with target W0, through `fused_lora_rows`' extra rows).
    'average' / 'sum': the naive baselines.
    """
    if method not in METHODS:
        raise InvalidArgument("method", f"{method!r} is not one of {', '.join(METHODS)}")
    if method != "gradient":
        return {m: naive_lora([t.up for t in terms], [t.down for t in terms], method) for m, terms in modules.items()}
    if S is None:
        raise InvalidArgument("stats", "a concept lacks statistics for this layer; compute them for every package")
    absolute = absolute_lam(S, lam)
    count = sum(x.shape[0] for _, x in (rows or {}).values()) + (0 if extra is None else extra.shape[0])
    row_form = bool(rows) and count < S.shape[0]
    factor = None if row_form else regularised_cholesky(S, absolute)
    out = {}
    for module, terms in modules.items():
        if row_form:
            owners = {t.name for t in terms}
            others = [(w / x.shape[0]) ** 0.5 * x for name, (w, x) in rows.items() if name not in owners]
            added = torch.cat(others + ([extra] if extra is not None else [])) if others or extra is not None else None
            out[module] = fused_lora_rows([t.up for t in terms], [t.down for t in terms],
                                          [rows[t.name][1] for t in terms], absolute, [t.weight for t in terms], added)
        else:
            agrams = [t.agram if grams is None else t.down.to(DTYPE) @ grams[t.name] for t in terms]
            out[module] = fused_lora([t.up for t in terms], agrams, factor, [t.weight for t in terms])
    return out


class LayerChanges:
    """One layer's fused change and the two naive baselines, prepared once for the identity rows of all its
    concepts: each row then costs the same whatever the number of concepts (with one low-rank form of K = N r
    columns per row, the report grew as N³).

    A change whose dense d_out x d_in matrix is cheaper to apply than its factors (K r-columns past the
    layer's width) is kept dense; otherwise as (up, down) with upᵀup computed once.
    """

    def __init__(self, fused: tuple[torch.Tensor, torch.Tensor], owners: list[Term]):
        changes = {"fused": fused}
        for method in ("average", "sum"):
            changes[method] = naive_lora([t.up for t in owners], [t.down for t in owners], method)
        self.forms: dict[str, tuple[torch.Tensor, ...]] = {}
        for method, (up, down) in changes.items():
            up, down = up.to(DTYPE), down.to(DTYPE)
            (d_out, k), d_in = up.shape, down.shape[1]
            if d_out * d_in <= k * (d_in + k):
                self.forms[method] = (up @ down,)
            else:
                self.forms[method] = (up, down, up.T @ up)

    def row(self, own: Term, gram: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> dict[str, float]:
        """The identity loss of concept `own` under each change: {'fused', 'average', 'sum'}. Its inputs are given
        as its Ĝ (`gram`, d x d) or as the rows X (n x d) with Ĝ = XᵀX / n (`rows`: the k/v layers' few text rows,
        where tr(M Ĝ Mᵀ) = ‖M Xᵀ‖² / n costs n/d of the Gram form)."""
        if (gram is None) == (rows is None):
            raise ValueError("give the concept's Gram or its rows")
        b, a = own.up.to(DTYPE), own.down.to(DTYPE)
        if rows is not None:
            x = rows.to(DTYPE).T / rows.shape[0] ** 0.5  # d x n: M Ĝ Mᵀ = (M x)(M x)ᵀ
            own_out = b @ (a @ x)
            own_part = float((own_out ** 2).sum())
            row = {}
            for method, form in self.forms.items():
                out = form[0] @ x if len(form) == 1 else form[0] @ (form[1] @ x)
                row[method] = float(((out - own_out) ** 2).sum() / own_part) if own_part > 0 else 0.0
            return row
        gram = gram.to(DTYPE)
        own_part = float(lowrank_quadratic(b, a, gram))
        row = {}
        for method, form in self.forms.items():
            if own_part <= 0:
                row[method] = 0.0
            elif len(form) == 1:  # dense: tr(X Ĝ Xᵀ) with X = ΔW − dW_i
                diff = form[0] - b @ a
                row[method] = float(((diff @ gram) * diff).sum() / own_part)
            else:  # tr(P Q Ĝ Qᵀ Pᵀ) with P = [up, −b], Q = [down; a], PᵀP from the cached upᵀup
                up, down, upup = form
                cross = -(up.T @ b)
                pp = torch.cat([torch.cat([upup, cross], 1), torch.cat([cross.T, b.T @ b], 1)])
                q = torch.cat([down, a])
                row[method] = float((pp * (q @ gram @ q.T)).sum() / own_part)
        return row
