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
        self.held: dict[str, tuple[ConceptTerms, list[torch.Tensor]]] = {}  # concept -> rows per slot (row form)
        self.S: dict[int, torch.Tensor] = {}
        self.agram: dict[tuple[str, str], torch.Tensor] = {}  # (concept, qual) -> A Ĝ

    @property
    def row_form(self) -> bool:
        return self.allow_rows and self.count + self.extra_rows < self.width

    def add(self, terms: ConceptTerms, rows: list[torch.Tensor]) -> None:
        """One concept's text rows per slot (n_i x d each, the same n_i in every slot)."""
        self.count += rows[0].shape[0]
        self.width = rows[0].shape[1]
        self.held[terms.name] = (terms, rows)
        if not self.row_form:
            for concept, held in self.held.values():
                self._fold(concept, held)
            self.held.clear()

    @property
    def rows(self) -> dict[str, list[torch.Tensor]]:
        """The held rows per slot by concept (empty once folded into the Gram form)."""
        return {name: rows for name, (_, rows) in self.held.items()}

    def _fold(self, terms: ConceptTerms, rows: list[torch.Tensor]) -> None:
        for slot, x in enumerate(rows):
            quals = [q for q in self.modules_of_slot.get(slot, []) if q in terms.down]
            self.S[slot], products = accumulate_site(self.S.get(slot), x.T @ x / x.shape[0], terms.weight,
                                                     [terms.down[q] for q in quals])
            self.agram.update({(terms.name, q): p for q, p in zip(quals, products)})

    def site_inputs(self, slot: int, extra: torch.Tensor | None
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """(S, rows) for a site reading `slot`: S includes the preservation rows `extra`; the rows by concept in
        row form, None in Gram form (the terms then carry their A Ĝ from `agram`)."""
        if self.row_form:
            rows = {name: x[slot] for name, (_, x) in self.held.items()}
            S = sum(terms.weight / x[slot].shape[0] * x[slot].T @ x[slot] for terms, x in self.held.values())
        else:
            rows, S = None, self.S[slot]
        if extra is not None:
            S = S + extra.T @ extra
        return S, rows
