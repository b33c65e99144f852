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


def frame(ids: list[int], max_len: int | None, bos_eos: bool) -> list[int]:
    """Cut ids to ``max_len``, with <bos> and <eos> around them (inside the limit) when asked."""
    if bos_eos:
        body = ids if max_len is None else ids[: max_len - 2]
        return [BOS_ID, *body, EOS_ID]
    return ids if max_len is None else ids[:max_len]


def content(ids: Iterable[int]) -> list[int]:
    """The ids a decoder produced, up to the first <eos>, without <pad> and <bos> (and no negatives)."""
    out = []
    for i in ids:
        if i == EOS_ID:
            break
        if i not in (PAD_ID, BOS_ID) and i >= 0:
            out.append(i)
    return out


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

    def ids(self, tokens: Iterable[str]) -> list[int]:
        """Already tokenized text -> ids (<unk> for tokens outside the vocabulary)."""
        get = self.stoi.get
        return [get(tok, UNK_ID) for tok in tokens]

    def encode(self, text: str, max_len: int | None = None, bos_eos: bool = False) -> list[int]:
        return frame(self.ids(tokenize(text)), max_len, bos_eos)

    def decode(self, ids: Iterable[int]) -> str:
        return detokenize([self.itos[i] if i < len(self.itos) else UNK for i in content(ids)])


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int = PAD_ID) -> torch.Tensor:
    """Right-pad id lists into one (B, T) long tensor, T the longest (at least 1)."""
    width = max(1, max(len(s) for s in seqs))
    out = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


class SubwordTokenizer:
    """A sentencepiece unigram model, one vocabulary for both languages (Kudo, 2018).

    Its serialized model travels inside the checkpoint as bytes, so checkpoints still load with
    ``weights_only=True`` and archives stay self-contained. Ids 0-3 are the shared specials, so
    padding, <bos> and <eos> mean the same in every model. Rare words split into pieces, so normal
    text never maps to <unk>.
    """

    def __init__(self, model: bytes):
        import sentencepiece as spm

        self.model = bytes(model)
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=self.model)
        except RuntimeError:
            raise ValueError("not a sentencepiece model") from None
        specials = tuple(self.sp.id_to_piece(i) for i in range(len(SPECIALS)))
        if specials != SPECIALS:
            raise ValueError(f"subword model must start with {SPECIALS}, got {specials}")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, seed: int = 0) -> SubwordTokenizer:
        """Learn a unigram vocabulary of ``vocab_size`` pieces from ``texts`` (deterministic)."""
        import io

        import sentencepiece as spm

        out = io.BytesIO()
        spm.set_random_generator_seed(seed)
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(list(texts)),
            model_writer=out,
            model_type="unigram",
            vocab_size=vocab_size,
            character_coverage=1.0,  # every character of the corpus: accents, ¿ and ¡ included
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_piece=PAD,
            unk_piece=UNK,
            bos_piece=BOS,
            eos_piece=EOS,
            hard_vocab_limit=False,  # a small corpus may hold fewer pieces than asked for
            num_threads=1,  # the same pieces on every machine
            minloglevel=2,
        )
        return cls(out.getvalue())

    def __len__(self) -> int:
        return self.sp.get_piece_size()

    def pieces(self, text: str) -> list[str]:
        return self.sp.encode(text, out_type=str)

    def encode(self, text: str, max_len: int | None = None, bos_eos: bool = False) -> list[int]:
        return frame(self.sp.encode(text), max_len, bos_eos)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([i for i in content(ids) if i < len(self)])

    def piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)
