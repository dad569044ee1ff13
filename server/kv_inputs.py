"""The inputs of the cross-attention k/v solve, gathered one concept at a time.

Every k/v layer reading token slot k sees the same text states, so its input Gram is one per slot, not
one per layer. While all concepts' rows (plus the preservation rows) stay fewer than the text width, the
rows themselves are kept for the n x n row form (shared.fusion.fused_lora_rows): at most width rows per
slot. Past that, each concept's rows are folded at once into S_k = Σ w_i Ĝ_i and its A_i Ĝ_i per layer
and dropped, so the server's memory per slot is one d x d Gram whatever the number of concepts.
"""

from __future__ import annotations

import torch

from server.state import ConceptTerms
from shared.fusion import accumulate_site


class KVInputs:
    """Per token slot: the concepts' text rows (row form) or S and every concept's A Ĝ (Gram form)."""

    def __init__(self, extra_rows: int, row_form: bool, modules_of_slot: dict[int, list[str]]):
        self.extra_rows, self.allow_rows = extra_rows, row_form
        self.width = 0  # the text width, from the first rows
        self.modules_of_slot = modules_of_slot  # slot -> model-qualified k/v layers reading it
        self.count = 0
        self.rows: dict[str, list[torch.Tensor]] = {}  # concept -> rows per slot, while in row form
        self.pending: list[ConceptTerms] = []
        self.S: dict[int, torch.Tensor] = {}
        self.agram: dict[tuple[str, str], torch.Tensor] = {}  # (concept, qual) -> A Ĝ

    @property
    def row_form(self) -> bool:
        return self.allow_rows and self.count + self.extra_rows < self.width

    def add(self, terms: ConceptTerms, rows: list[torch.Tensor]) -> None:
        """One concept's text rows per slot (n_i x d each, the same n_i in every slot)."""
        self.count += rows[0].shape[0]
        self.width = rows[0].shape[1]
        self.rows[terms.name] = rows
        self.pending.append(terms)
        if not self.row_form:
            for concept in self.pending:
                self._fold(concept, self.rows.pop(concept.name))
            self.pending.clear()

    def _fold(self, terms: ConceptTerms, rows: list[torch.Tensor]) -> None:
        for slot, x in enumerate(rows):
            quals = [q for q in self.modules_of_slot.get(slot, []) if q in terms.down]
            self.S[slot], products = accumulate_site(self.S.get(slot), x.T @ x / x.shape[0], terms.weight,
                                                     [terms.down[q] for q in quals])
            self.agram.update({(terms.name, q): p for q, p in zip(quals, products)})

    def site_inputs(self, slot: int, weights: dict[str, float], extra: torch.Tensor | None
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None, dict[str, torch.Tensor] | None]:
        """(S, grams, rows) for a site reading `slot`: S includes the preservation rows `extra`; grams and rows
        by concept in row form, None in Gram form (the terms then carry their A Ĝ from `agram`)."""
        if self.row_form:
            rows = {name: x[slot] for name, x in self.rows.items()}
            grams = {name: x.T @ x / x.shape[0] for name, x in rows.items()}
            S = sum(weights[name] * g for name, g in grams.items())
        else:
            rows = grams = None
            S = self.S[slot]
        if extra is not None:
            S = S + extra.T @ extra
        return S, grams, rows
