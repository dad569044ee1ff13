"""Fusion report: how much of each concept's own change survives, per layer (DESIGN §2.3).

    e_i = tr((W − W_i) Ĝ_i (W − W_i)ᵀ) / tr(dW_i Ĝ_i dW_iᵀ)   (0 = fully kept, 1 = as if never trained)

for the fused W and, side by side, for naive averaging (W0 + mean dW_i) and summing (W0 + Σ dW_i).
Written as fusion_report.json and fusion_report.png; `table()` renders it for the terminal.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from rich.table import Table

from shared.fusion import identity_loss, naive_lora
from shared.grams import is_text_side, site_of

if TYPE_CHECKING:
    from server.fuse import Fusion, Source

COLUMNS = ("fused", "average", "sum")


class IdentityReport:
    """Identity loss per concept and layer, from Grams alone."""

    def __init__(self, fusion: Fusion, sources: dict[str, Source]):
        self.fusion, self.sources = fusion, sources
        self.data: dict = {}

    def compute(self) -> IdentityReport:
        fusion = self.fusion
        concepts = {}
        for terms in fusion.state.concepts:
            src = self.sources.get(terms.name)
            layers: dict[str, dict[str, float]] = {}
            grams: dict[str, torch.Tensor] = {}
            for qual in terms.up:
                model, _, module = qual.partition(".")
                site = f"{model}.{site_of(module)}"
                if is_text_side(module):
                    gram = fusion.kv_grams.get(terms.name, {}).get(site)
                elif src is not None and src.stats is not None:
                    if site not in grams:
                        weight = fusion.base.unet if model == "unet" else fusion.base.text_encoder
                        d_in = weight.get_submodule(module).in_features
                        grams[site] = src.stats.normalised(src.stats.key_for(model, module), d_in)
                    gram = grams[site]
                else:
                    gram = None
                if gram is None:
                    continue
                owners = [c for c in fusion.state.concepts if qual in c.up]
                up, down = fusion.lora[qual]
                row = {"fused": identity_loss(up, down, terms.up[qual], terms.down[qual], gram)}
                for method in ("average", "sum"):
                    n_up, n_down = naive_lora([c.up[qual] for c in owners], [c.down[qual] for c in owners], method)
                    row[method] = identity_loss(n_up, n_down, terms.up[qual], terms.down[qual], gram)
                layers[qual] = row
            means = {col: sum(r[col] for r in layers.values()) / len(layers) for col in COLUMNS} if layers else {}
            concepts[terms.name] = {"mean": means, "layers": layers, "complete": src is not None}
        self.data = {"method": fusion.method, "lam": fusion.lam, "columns": list(COLUMNS), "concepts": concepts}
        return self

    def table(self) -> Table:
        return table_of(self.data)

    def write(self, folder: Path) -> None:
        (folder / "fusion_report.json").write_text(json.dumps(self.data, indent=1))
        self.plot(folder / "fusion_report.png")

    def plot(self, path: Path) -> None:
        """Left: per-concept means by method. Right: per-layer identity loss, fused vs average."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        concepts = [n for n, e in self.data["concepts"].items() if e["layers"]]
        fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1, 2]})
        width = 0.8 / len(COLUMNS)
        for j, col in enumerate(COLUMNS):
            values = [self.data["concepts"][n]["mean"][col] for n in concepts]
            label = f"{self.data['method']} (fused)" if col == "fused" else col
            left.bar([i + j * width for i in range(len(concepts))], values, width, label=label)
        left.set_xticks([i + width for i in range(len(concepts))], concepts, rotation=20, ha="right")
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
        right.legend(fontsize=7, ncol=2)
        fig.tight_layout()
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
