"""Input sites and Gram recording: forward hooks that accumulate G = Σ x xᵀ in float64.

Layers that read the same input share one *input site*: q/k/v of a self-attention (and of a
CLIP attention) read the same hidden states; to_k/to_v of a cross-attention read the text
states. A site is named after its representative module (q, or k for the text side).
"""

from __future__ import annotations

import torch

TEXT_SIDE = ("attn2.to_k", "attn2.to_v")  # cross-attention k/v: inputs are text features (server-side)


def site_of(module: str) -> str:
    """The input site (representative module name) that `module` reads from."""
    parent, _, leaf = module.rpartition(".")
    if leaf in ("q_proj", "k_proj", "v_proj"):
        return f"{parent}.q_proj"
    if leaf in ("to_k", "to_v") and parent.endswith("attn2"):
        return f"{parent}.to_k"
    if leaf in ("to_q", "to_k", "to_v"):
        return f"{parent}.to_q"
    return module


def group_sites(modules: list[str]) -> dict[str, list[str]]:
    """{site: [modules reading it]} in first-seen order."""
    sites: dict[str, list[str]] = {}
    for m in modules:
        sites.setdefault(site_of(m), []).append(m)
    return sites


def is_text_side(module: str) -> bool:
    return module.endswith(TEXT_SIDE)


class GramRecorder:
    """Accumulates the Gram and row count of the input of each site's module while active."""

    def __init__(self, model: torch.nn.Module, sites: list[str]):
        self.grams: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self._handles = []
        for site in sites:
            module = model.get_submodule(site)
            self._handles.append(module.register_forward_pre_hook(self._hook(site)))

    def _hook(self, site: str):
        def record(module: torch.nn.Module, args: tuple) -> None:
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).to(torch.float64)
            gram = x.T @ x
            if site in self.grams:
                self.grams[site] += gram
                self.rows[site] += x.shape[0]
            else:
                self.grams[site], self.rows[site] = gram, x.shape[0]
        return record

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> GramRecorder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
