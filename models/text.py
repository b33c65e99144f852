"""Tokenization and vocabularies shared by training and the TorchServe handlers.

One implementation on purpose: the handler imports this module from inside the .mar, so a
token seen at train time maps to the same id at serving time.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

import torch

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
# The same ids in every vocabulary, so source and target sides share them (the translator
# masks padding and stops decoding by id).
SPECIALS = (PAD, UNK, BOS, EOS)
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(len(SPECIALS))

_TOKEN_RE = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]", re.UNICODE)
_NO_SPACE_BEFORE = set(".,;:!?)]}»”’%")
_NO_SPACE_AFTER = set("([{«“¿¡")


def tokenize(text: str) -> list[str]:
    """Lower-cased words and single punctuation marks: "Don't stop!" -> ["don't", "stop", "!"]."""
    return _TOKEN_RE.findall(text.lower())


def detokenize(tokens: Sequence[str]) -> str:
    """Join tokens back into text, closing up the space around punctuation."""
    out: list[str] = []
    for tok in tokens:
        if out and tok not in _NO_SPACE_BEFORE and out[-1][-1:] not in _NO_SPACE_AFTER:
            out.append(" ")
        out.append(tok)
    return "".join(out)


class Vocab:
    """Token <-> id map with the shared special tokens first."""

    def __init__(self, itos: Sequence[str]):
        if tuple(itos[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"vocabulary must start with {SPECIALS}, got {tuple(itos[:4])}")
        self.itos = list(itos)
        self.stoi = {tok: i for i, tok in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("vocabulary has duplicate tokens")

    @classmethod
    def build(cls, texts: Iterable[str], max_size: int, min_freq: int = 1) -> Vocab:
        counts = Counter(tok for text in texts for tok in tokenize(text))
        # Sort by (-count, token) so the same corpus always gives the same ids.
        common = sorted((c, t) for t, c in counts.items() if c >= min_freq and t not in SPECIALS)
        common.sort(key=lambda ct: (-ct[0], ct[1]))
        return cls(list(SPECIALS) + [t for _, t in common[: max(0, max_size - len(SPECIALS))]])

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str, max_len: int | None = None, bos_eos: bool = False) -> list[int]:
        ids = [self.stoi.get(tok, UNK_ID) for tok in tokenize(text)]
        if bos_eos:
            body = ids if max_len is None else ids[: max_len - 2]
            return [BOS_ID, *body, EOS_ID]
        return ids if max_len is None else ids[:max_len]

    def decode(self, ids: Iterable[int]) -> str:
        toks = []
        for i in ids:
            if i == EOS_ID:
                break
            if i in (PAD_ID, BOS_ID):
                continue
            toks.append(self.itos[i] if 0 <= i < len(self.itos) else UNK)
        return detokenize(toks)


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int = PAD_ID) -> torch.Tensor:
    """Right-pad id lists into one (B, T) long tensor, T the longest (at least 1)."""
    width = max(1, max(len(s) for s in seqs))
    out = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out
