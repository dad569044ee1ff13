"""A CLIP BPE vocabulary written locally: the 512 byte symbols CLIP starts from plus merges learnt from a
word list, so every word of the list is one token (as a base's own words are in SD's real vocabulary)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes (GPT-2 / CLIP convention)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = {}, 0
    for b in range(256):
        if b in keep:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Learn BPE merges until every word is one symbol (ties broken alphabetically)."""
    corpus = [tuple(w[:-1]) + (w[-1] + "</w>",) for w in dict.fromkeys(words)]
    merges: list[tuple[str, str]] = []
    while any(len(w) > 1 for w in corpus):
        pairs = Counter(p for w in corpus for p in zip(w, w[1:]))
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = []
        for w in corpus:
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged.append(tuple(out))
        corpus = merged
    return merges


def write_tokenizer_files(folder: Path, words: list[str], size: int | None = None) -> tuple[Path, Path]:
    """Write CLIP-style vocab.json and merges.txt into `folder`; return their paths.

    `size`: pad the vocabulary to that many entries (SD's is 49408) with entries no merge produces, so a text
    encoder built for it has an embedding table of the real size.
    """
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    merges = learn_merges(words)
    vocab = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges]
    if size is not None:
        if size < len(vocab) + len(SPECIALS):
            raise ValueError(f"a vocabulary of {size} cannot hold the {len(vocab) + len(SPECIALS)} entries needed")
        vocab += [f"<|unused{i}|>" for i in range(size - len(vocab) - len(SPECIALS))]
    vocab += list(SPECIALS)
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    vocab_path.write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    merges_path.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return vocab_path, merges_path


