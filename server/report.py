"""Fusion report: how much of each concept's own change survives, per layer (docs/design.md §2.3).

    e_i = tr((W − W_i) Ĝ_i (W − W_i)ᵀ) / tr(dW_i Ĝ_i dW_iᵀ)   (0 = fully kept, 1 = as if never trained)

for the fused W and, side by side, for naive averaging (W0 + mean dW_i) and summing (W0 + Σ dW_i).
Written as fusion_report.json and fusion_report.png; `table()` renders it for the terminal.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from rich.table import Table

from server.state import ConceptTerms
from shared.atomic import write_bytes_atomic
from shared.fusion import LayerChanges, Term
from shared.grams import site_of
from shared.validate import dumps_json

COLUMNS = ("fused", "average", "sum")
LEGEND_CONCEPTS = 8  # above this, the per-layer chart names line styles, not concepts


def layer_changes(concepts: list[ConceptTerms], qual: str, fused: tuple[torch.Tensor, torch.Tensor]
                  ) -> tuple[LayerChanges, dict[str, Term]]:
    """Layer `qual`'s prepared changes and its concepts' own terms by name (the report's one setup per layer).
    The fused change is judged as applied to the base: rounded to float32."""
    owners = {c.name: Term(c.name, c.weight, c.up[qual], c.down[qual]) for c in concepts if qual in c.up}
    up, down = fused
    return LayerChanges((up.float(), down.float()), list(owners.values())), owners


class IdentityReport:
    """Identity loss per concept and layer, from Grams alone (the maths: shared.fusion.LayerChanges).

    `gram_of(concept, qual)` gives concept's Ĝ at the input of layer `qual`, or None where it is not
    known (a concept whose package is gone); `complete` names the concepts with every Gram known. `known`
    holds rows already computed where the Grams were at hand ({concept: {qual: row}}: the cross-attention
    k/v layers, whose Grams the fusion itself computes).
    """

    def __init__(self, method: str, lam: float, concepts: list[ConceptTerms],
                 changes: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 gram_of: Callable[[str, str], torch.Tensor | None], complete: set[str],
                 known: dict[str, dict[str, dict[str, float]]] | None = None, order: list[str] | None = None):
        self.method, self.lam, self.concepts, self.changes = method, lam, concepts, changes
        self.gram_of, self.complete, self.known = gram_of, complete, known or {}
        # the layers' model order (`order`: model-qualified names); a concept read back from a fusion state
        # has its terms in the file's (alphabetical) order, and its chart line must run over the same layers
        self.position = {q: i for i, q in enumerate(order or [])}
        self.data: dict = {}

    def compute(self) -> IdentityReport:
        # One input site at a time: its layers' changes are prepared once, and each concept's Ĝ there is
        # asked for once, so neither the time per row nor the memory grows with the number of concepts.
        rows: dict[str, dict[str, dict[str, float]]] = {c.name: dict(self.known.get(c.name, {})) for c in self.concepts}
        sites: dict[str, list[str]] = {}
        done = {q for known in self.known.values() for q in known}
        for qual in self.changes:
            if qual not in done:
                model, _, module = qual.partition(".")
                sites.setdefault(f"{model}.{site_of(module)}", []).append(qual)
        for quals in sites.values():
            prepared = {q: layer_changes(self.concepts, q, self.changes[q]) for q in quals}
            for terms in self.concepts:
                mine = [q for q in quals if q in terms.up]
                gram = self.gram_of(terms.name, mine[0]) if mine else None
                for q in mine if gram is not None else []:
                    changes, owners = prepared[q]
                    rows[terms.name][q] = changes.row(owners[terms.name], gram)
        concepts = {}
        for terms in self.concepts:
            ordered = sorted(terms.up, key=lambda q: self.position.get(q, len(self.position)))
            layers = {q: rows[terms.name][q] for q in ordered if q in rows[terms.name]}  # in model order
            means = {col: sum(r[col] for r in layers.values()) / len(layers) for col in COLUMNS} if layers else {}
            concepts[terms.name] = {"mean": means, "layers": layers, "complete": terms.name in self.complete}
        self.data = {"method": self.method, "lam": self.lam, "columns": list(COLUMNS), "concepts": concepts}
        return self

    def table(self) -> Table:
        return table_of(self.data)

    def write(self, folder: Path) -> None:
        write_bytes_atomic(folder / "fusion_report.json", dumps_json(self.data).encode())
        self.plot(folder / "fusion_report.png")

    def plot(self, path: Path) -> None:
        """Left: per-concept means by method. Right: per-layer identity loss, fused vs average."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        concepts = [n for n, e in self.data["concepts"].items() if e["layers"]]
        # wider with many concepts, so that each keeps a readable bar group and label
        fig, (left, right) = plt.subplots(1, 2, figsize=(max(13.0, 9 + 0.3 * len(concepts)), 4.5),
                                          gridspec_kw={"width_ratios": [max(1.0, len(concepts) / 12), 2]},
                                          layout="constrained")
        width = 0.8 / len(COLUMNS)
        for j, col in enumerate(COLUMNS):
            values = [self.data["concepts"][n]["mean"][col] for n in concepts]
            label = f"{self.data['method']} (fused)" if col == "fused" else col
            left.bar([i + j * width for i in range(len(concepts))], values, width, label=label)
        upright = len(concepts) > 12  # many names side by side only fit standing
        left.set_xticks([i + width for i in range(len(concepts))], concepts, rotation=90 if upright else 20,
                        ha="center" if upright else "right")
        left.set_ylabel("identity loss (0 kept, 1 lost)")
        left.set_yscale("symlog", linthresh=1e-2)
        left.set_title("mean over layers")
        left.legend()
        for name in concepts:
            layers = self.data["concepts"][name]["layers"]
            xs = range(len(layers))
            line = right.plot(xs, [r["fused"] for r in layers.values()], label=f"{name}: fused")[0]
            right.plot(xs, [r["average"] for r in layers.values()], "--", color=line.get_color(),
                       label=f"{name}: average")
        right.set_xlabel("adapted layer (text encoder, then UNet, in model order)")
        right.set_yscale("symlog", linthresh=1e-3)
        right.set_title("per layer")
        if len(concepts) <= LEGEND_CONCEPTS:
            right.legend(fontsize=7, ncol=2)
        else:  # one entry per concept no longer fits beside the axes: the two line styles only
            styles = [right.plot([], [], color="black", label="fused (one colour per concept)")[0],
                      right.plot([], [], "--", color="black", label="average")[0]]
            right.legend(handles=styles, fontsize=7)
        tmp = path.with_name(f".{path.name}.tmp.png")
        fig.savefig(tmp, dpi=90)
        plt.close(fig)
        tmp.replace(path)


def table_of(data: dict) -> Table:
    """The report as a rich table: per-concept mean identity loss for the fused model and the baselines."""
    method = data["method"]
    table = Table(title=f"identity loss per concept (mean over layers; 0 = kept, 1 = lost); fused = {method}")
    table.add_column("concept")
    for col in COLUMNS:
        table.add_column(f"{method} (fused)" if col == "fused" else col, justify="right")
    table.add_column("layers", justify="right")
    for name, entry in data["concepts"].items():
        mean = entry["mean"]
        table.add_row(name, *[f"{mean[c]:.4f}" if mean else "-" for c in COLUMNS], str(len(entry["layers"])))
    return table
